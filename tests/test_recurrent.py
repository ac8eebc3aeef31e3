"""Recurrent modules: gradient equals autograd; LRP with Arras et al.'s gated rule, fused and decomposed.

PyTorch records ``nn.LSTM`` on CPU in float32 as one fused ``aten.mkldnn_rnn_layer`` per layer and
direction, and in float64 (or with packed sequences) as plain ops. The LRP checks below hold the two
forms to each other, to conservation on bias-free models, and to a hand-written reference of Arras et
al. (2017)'s LSTM/GRU LRP that shares no code with relprop.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import relprop
from relprop.graph import Node, Value
from relprop.rules import NAMES
from relprop.rules.base import RuleContext
from relprop.rules.recurrent import Recurrent, RecurrentRuleError

VARIANTS = [
    dict(),
    dict(num_layers=2),
    dict(bidirectional=True),
    dict(batch_first=True),
    dict(num_layers=2, bidirectional=True, batch_first=True),
]
CELLS = [nn.LSTM, nn.GRU, nn.RNN]


class Head(nn.Module):
    """Batch-first input (B, T, D) -> logits from the last step's output (and, optionally, h_n)."""

    def __init__(self, rnn: nn.Module, classes: int = 3, bias: bool = False, use_hn: bool = False):
        super().__init__()
        self.rnn = rnn
        width = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.use_hn = use_hn
        self.fc = nn.Linear(width + (rnn.hidden_size if use_hn else 0), classes, bias=bias)

    def forward(self, x):
        if not self.rnn.batch_first:
            # contiguous: PyTorch then records the input projection as one addmm (a strided input gives
            # mm + add, a different program for rules that treat the bias apart, like z+ or flat)
            x = x.transpose(0, 1).contiguous()
        out, state = self.rnn(x)
        last = out[:, -1] if self.rnn.batch_first else out[-1]
        if self.use_hn:
            hn = state[0] if isinstance(state, tuple) else state
            last = torch.cat([last, hn[-1]], -1)
        return self.fc(last)


def _model(cell, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return Head(cell(3, 5, **kw)).to(dtype).eval()


def _grad_check(model, x, target=1):
    e = relprop.explain(model, x, target=target, method="gradient")
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model(xr)[:, target].sum(), xr)
    torch.testing.assert_close(e.attributions, ref, rtol=1e-5, atol=1e-7)


def _ops(model, x) -> set[str]:
    return {n.packet for n in relprop.trace(model, x).nodes}


def _mkldnn_used(model, x) -> bool:
    return "mkldnn_rnn_layer" in _ops(model, x)


# --------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda k: "-".join(f"{a}" for a in k) or "plain")
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gradient_equals_autograd(cell, kw, dtype):
    model = _model(cell, dtype, **kw)
    x = torch.randn(2, 6, 3, dtype=dtype)
    _grad_check(model, x)


def test_gradient_packed_sequence():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.rnn = nn.LSTM(3, 5, batch_first=True)
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), batch_first=True)
            _, (hn, _) = self.rnn(packed)
            return self.fc(hn[-1])

    model = Packed().eval()
    x = torch.randn(3, 6, 3)
    _grad_check(model, x)
    # LRP through the (decomposed) packed path conserves on a bias-free copy
    nobias = Packed().eval()
    nobias.rnn = nn.LSTM(3, 5, batch_first=True, bias=False)
    nobias.fc = nn.Linear(5, 2, bias=False)
    nobias.eval()
    e = relprop.explain(nobias, x, target=1, method="lrp", composite="lrp0")
    torch.testing.assert_close(e.attributions.sum((1, 2)), nobias(x)[:, 1].detach(), rtol=1e-4, atol=1e-6)
    # the padded steps of the shorter sequences get nothing
    assert e.attributions[1, 4:].abs().max() == 0 and e.attributions[2, 2:].abs().max() == 0


# --------------------------------------------------------------------------- LRP: conservation


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda k: "-".join(f"{a}" for a in k) or "plain")
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lrp0_conserves_on_bias_free_models(cell, kw, dtype):
    model = _model(cell, dtype, bias=False, **kw)
    x = torch.randn(2, 6, 3, dtype=dtype)
    e = relprop.explain(model, x, target=2, method="lrp", composite="lrp0")
    logit = model(x)[:, 2].detach()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e.attributions.sum((1, 2)), logit, **tol)


def test_fused_kernel_is_what_float32_lstm_records():
    """The fused path is really exercised (else the fused-vs-decomposed comparisons compare nothing)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN: nn.LSTM never records mkldnn_rnn_layer")
    x = torch.randn(2, 6, 3)
    assert _mkldnn_used(_model(nn.LSTM), x)
    assert not _mkldnn_used(_model(nn.LSTM, torch.float64), x.double())


# --------------------------------------------------------------------------- fused == decomposed


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda k: "-".join(f"{a}" for a in k) or "plain")
@pytest.mark.parametrize("composite", ["epsilon", "lrp0", "attnlrp", "epsilon_plus"])
def test_lstm_fused_float32_equals_decomposed_float64(kw, composite):
    _fused_vs_decomposed(kw, composite)


@pytest.mark.parametrize("composite", sorted(set(NAMES) - {"epsilon", "lrp0", "attnlrp", "epsilon_plus"}))
def test_every_composite_treats_fused_and_decomposed_lstm_alike(composite):
    """The fused rule applies the composite's dense rule (and its first-layer rule) to the cell's linear
    parts, as the decomposed recording gets them: the kernel PyTorch picks does not change the answer."""
    _fused_vs_decomposed(dict(num_layers=2, bidirectional=True), composite)


def _fused_vs_decomposed(kw, composite):
    model = _model(nn.LSTM, **kw)
    model.use_hn = False
    x = torch.randn(2, 6, 3)
    e32 = relprop.explain(model, x, target=0, method="lrp", composite=composite)
    m64 = _model(nn.LSTM, torch.float64, **kw)
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    e64 = relprop.explain(m64, x.double(), target=0, method="lrp", composite=composite)
    scale = e64.attributions.abs().max()
    assert scale > 0
    torch.testing.assert_close(e32.attributions.double(), e64.attributions, rtol=0, atol=1e-4 * float(scale))


def test_lstm_final_state_relevance_fused_equals_decomposed():
    """Relevance entering through h_n (not only through the output sequence) takes the same path."""
    torch.manual_seed(3)
    model = Head(nn.LSTM(3, 5, num_layers=2), use_hn=True).eval()
    x = torch.randn(2, 6, 3)
    e32 = relprop.explain(model, x, target=1, method="lrp", composite="lrp0")
    e64 = relprop.explain(model.double(), x.double(), target=1, method="lrp", composite="lrp0")
    torch.testing.assert_close(e32.attributions.double(), e64.attributions, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- hand-written reference


def _stab(z, eps):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _lrp_linear(hin, w, hout, r_out, eps):
    """Arras's ``lrp_linear`` with ``bias_factor=0``: R_in = sum_j hin_i w_ji / stab(hout_j) R_j."""
    return hin * ((r_out / _stab(hout, eps)) @ w)


def arras_lstm(lstm: nn.LSTM, x: torch.Tensor, r_h: torch.Tensor, eps: float) -> torch.Tensor:
    """Arras et al. (2017), LSTM LRP for one layer, one direction, zero initial state, plain loop over time.

    x: (T, D) one sequence; r_h: (T, H) relevance arriving at each step's hidden state.
    Gates i, f, o get no relevance; the cell input g and the previous cell state share c_t's.
    """
    W_ih, W_hh = lstm.weight_ih_l0.detach().double(), lstm.weight_hh_l0.detach().double()
    H = W_hh.shape[1]
    b = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().double() if lstm.bias else torch.zeros(4 * H, dtype=x.dtype)
    T = x.shape[0]
    h = [torch.zeros(H, dtype=x.dtype)]
    c = [torch.zeros(H, dtype=x.dtype)]
    gates, pre = [], []
    for t in range(T):
        z = W_ih @ x[t] + W_hh @ h[-1] + b
        i, f, g, o = z[:H].sigmoid(), z[H : 2 * H].sigmoid(), z[2 * H : 3 * H].tanh(), z[3 * H :].sigmoid()
        c.append(f * c[-1] + i * g)
        h.append(o * c[-1].tanh())
        gates.append((i, f, g))
        pre.append(z[2 * H : 3 * H])
    gsl = slice(2 * H, 3 * H)
    Rx = torch.zeros_like(x)
    Rh_next = torch.zeros(H, dtype=x.dtype)
    Rc_next = torch.zeros(H, dtype=x.dtype)
    for t in reversed(range(T)):
        Rh = r_h[t] + Rh_next
        Rc = Rc_next + Rh
        i, f, g = gates[t]
        Rc_prev = (f * c[t]) / _stab(c[t + 1], eps) * Rc
        Rg = (i * g) / _stab(c[t + 1], eps) * Rc
        # the gate pre-activation z_g = W_ih x + W_hh h + b as one linear layer over [x; h]
        Rx[t] = _lrp_linear(x[t], W_ih[gsl], pre[t], Rg, eps)
        Rh_next = _lrp_linear(h[t], W_hh[gsl], pre[t], Rg, eps)
        Rc_next = Rc_prev
    return Rx


def arras_gru(gru: nn.GRU, x: torch.Tensor, r_h: torch.Tensor, eps: float) -> torch.Tensor:
    """The same rule for a GRU: h' = (1 - z) n + z h with gates z, r held constant, zero initial state."""
    W_ih, W_hh = gru.weight_ih_l0.detach().double(), gru.weight_hh_l0.detach().double()
    H = W_hh.shape[1]
    zero = torch.zeros(3 * H, dtype=x.dtype)
    b_ih = gru.bias_ih_l0.detach().double() if gru.bias else zero
    b_hh = gru.bias_hh_l0.detach().double() if gru.bias else zero
    T = x.shape[0]
    h = [torch.zeros(H, dtype=x.dtype)]
    saved = []
    for t in range(T):
        gi, gh = W_ih @ x[t] + b_ih, W_hh @ h[-1] + b_hh
        r = (gi[:H] + gh[:H]).sigmoid()
        z = (gi[H : 2 * H] + gh[H : 2 * H]).sigmoid()
        a = gi[2 * H :] + r * gh[2 * H :]
        n = a.tanh()
        h.append((1 - z) * n + z * h[-1])
        saved.append((r, z, gi[2 * H :], gh[2 * H :], a, n))
    ns = slice(2 * H, 3 * H)
    Rx = torch.zeros_like(x)
    Rh_next = torch.zeros(H, dtype=x.dtype)
    for t in reversed(range(T)):
        r, z, xn, hn, a, n = saved[t]
        Rh = r_h[t] + Rh_next
        s = Rh / _stab(h[t + 1], eps)
        Rn, Rh_prev = (1 - z) * n * s, z * h[t] * s
        sa = Rn / _stab(a, eps)  # n = tanh(a): identity; a = xn + r * hn split by the epsilon rule
        Rx[t] = _lrp_linear(x[t], W_ih[ns], xn, xn * sa, eps)
        Rh_next = Rh_prev + _lrp_linear(h[t], W_hh[ns], hn, r * hn * sa, eps)
    return Rx


def _output_relevance(model: Head, x: torch.Tensor, target: int) -> torch.Tensor:
    """LRP-0 relevance of the last step's hidden state under the linear head (T, B, H), zero elsewhere."""
    with torch.no_grad():
        out, _ = model.rnn(x.transpose(0, 1))
    r = torch.zeros_like(out, dtype=torch.float64)
    r[-1] = out[-1].double() * model.fc.weight[target].detach().double()
    return r


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fused-f32", "decomposed-f64"])
def test_lstm_equals_handwritten_arras_reference(bias, dtype):
    torch.manual_seed(1)
    model = Head(nn.LSTM(3, 5, bias=bias)).to(dtype).eval()
    x = torch.randn(2, 7, 3, dtype=dtype)
    e = relprop.explain(model, x, target=0, method="lrp", composite="lrp0")
    r_h = _output_relevance(model, x, 0)
    ref = torch.stack([arras_lstm(model.rnn, x[b].double(), r_h[:, b], eps=0.0) for b in range(x.shape[0])])
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(e.attributions.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    # the reference is not the uniform product rule: half of each product's relevance to the gate
    # would move relevance between time steps, so this comparison can fail
    assert float(ref.abs().max()) > 0


@pytest.mark.parametrize("bias", [False, True])
def test_gru_equals_handwritten_arras_reference(bias):
    torch.manual_seed(2)
    model = Head(nn.GRU(3, 5, bias=bias)).double().eval()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    e = relprop.explain(model, x, target=0, method="lrp", composite="lrp0")
    r_h = _output_relevance(model, x, 0)
    ref = torch.stack([arras_gru(model.rnn, x[b], r_h[:, b], eps=0.0) for b in range(x.shape[0])])
    torch.testing.assert_close(e.attributions, ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max()))


def test_gate_rule_differs_from_uniform_rule():
    """A regression guard: with the product family's uniform rule on LSTM gates the answer changes."""
    torch.manual_seed(1)
    model = Head(nn.LSTM(3, 5, bias=False)).double().eval()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    gated = relprop.explain(model, x, target=0, method="lrp", composite="lrp0").attributions
    r_h = _output_relevance(model, x, 0)
    ref = torch.stack([arras_lstm(model.rnn, x[b], r_h[:, b], eps=0.0) for b in range(2)])
    torch.testing.assert_close(gated, ref, rtol=1e-9, atol=1e-12)
    # uniform split at the gates (what an unmarked product gets) gives a different map
    half = torch.stack([_arras_lstm_uniform(model.rnn, x[b], r_h[:, b]) for b in range(2)])
    assert (half - ref).abs().max() > 1e-3 * ref.abs().max()


def _arras_lstm_uniform(lstm, x, r_h):
    """Counter-example for the guard above: LSTM LRP where gates take half of each product (AttnLRP-style)."""
    W_ih, W_hh = lstm.weight_ih_l0.detach().double(), lstm.weight_hh_l0.detach().double()
    H = W_hh.shape[1]
    T = x.shape[0]
    h, c, saved = [torch.zeros(H, dtype=x.dtype)], [torch.zeros(H, dtype=x.dtype)], []
    for t in range(T):
        z = W_ih @ x[t] + W_hh @ h[-1]
        i, f, g, o = z[:H].sigmoid(), z[H : 2 * H].sigmoid(), z[2 * H : 3 * H].tanh(), z[3 * H :].sigmoid()
        c.append(f * c[-1] + i * g)
        h.append(o * c[-1].tanh())
        saved.append(z)
    Rx = torch.zeros_like(x)
    Rh_next, Rc_next = torch.zeros(H, dtype=x.dtype), torch.zeros(H, dtype=x.dtype)
    for t in reversed(range(T)):
        z = saved[t]
        Rh = r_h[t] + Rh_next
        Rc = Rc_next + Rh / 2
        r_z = torch.zeros(4 * H, dtype=x.dtype)
        r_z[3 * H :] = Rh / 2
        i, f, g = z[:H].sigmoid(), z[H : 2 * H].sigmoid(), z[2 * H : 3 * H].tanh()
        Rfc = f * c[t] / _stab(c[t + 1], 0.0) * Rc
        Rig = i * g / _stab(c[t + 1], 0.0) * Rc
        r_z[H : 2 * H] = Rfc / 2
        r_z[:H] = Rig / 2
        r_z[2 * H : 3 * H] = Rig / 2
        Rx[t] = _lrp_linear(x[t], W_ih, z, r_z, 0.0)
        Rh_next = _lrp_linear(h[t], W_hh, z, r_z, 0.0)
        Rc_next = Rfc / 2
    return Rx


# --------------------------------------------------------------------------- errors and the cuDNN form


def test_weight_relevance_through_fused_kernel_raises():
    model = _model(nn.LSTM)
    x = torch.randn(2, 6, 3)
    if not _mkldnn_used(model, x):
        pytest.skip("no fused kernel recorded")
    with pytest.raises(RecurrentRuleError, match="mkldnn_rnn_layer.*weights"):
        relprop.explain(model, x, target=0, method="lrp", composite="epsilon", params=True)


def _fake_node(op, args, outputs, module: nn.Module) -> Node:
    values: list[Value] = []

    def wrap(a):
        if isinstance(a, torch.Tensor):
            v = Value(len(values), a.detach(), "input", is_activation=True)
            values.append(v)
            return v
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return [wrap(b) for b in a]
        return a

    wrapped = tuple(wrap(a) for a in args)
    inputs = list(values)
    outs = [Value(len(values) + k, o.detach(), "op", is_activation=True) for k, o in enumerate(outputs)]
    return Node(0, op, wrapped, {}, inputs, outs, "rnn", type(module))


def test_self_check_refuses_a_kernel_it_cannot_reproduce():
    """The fused rule re-derives the cell and compares with the kernel's recorded outputs before explaining."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    h0 = torch.zeros(2, 4)
    with torch.no_grad():
        out, (hn, cn) = lstm(x)
    args = [x, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0, h0, h0.clone()]
    args += [False, [], 2, 4, 1, True, False, False, False]
    good = _fake_node(torch.ops.aten.mkldnn_rnn_layer.default, args, [out, hn[0], cn[0], out], lstm)
    ctx = RuleContext(good, [torch.ones_like(out), None, None, None], [True] + [False] * 6)
    (rx, *_) = Recurrent(epsilon=0.0, stabilizer=0.0)(ctx)
    assert rx.shape == x.shape
    bad = _fake_node(torch.ops.aten.mkldnn_rnn_layer.default, args, [out + 0.01, hn[0], cn[0], out], lstm)
    ctx = RuleContext(bad, [torch.ones_like(out), None, None, None], [True] + [False] * 6)
    with pytest.raises(RecurrentRuleError, match="does not reproduce"):
        Recurrent(epsilon=0.0, stabilizer=0.0)(ctx)


def _rnn_relu(*args, **kw):
    return nn.RNN(*args, nonlinearity="relu", **kw)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("cell", [*CELLS, _rnn_relu], ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "kw", [dict(), dict(num_layers=2, bidirectional=True, batch_first=True)], ids=["plain", "deep"]
)
def test_cudnn_form_equals_decomposed(cell, kw, bias):
    """``_cudnn_rnn`` (the whole module in one call on CUDA), checked on CPU with a node built from the
    module's own outputs: the rule's argument parsing, layer/direction layout and relevance match the
    decomposed float64 recording."""
    torch.manual_seed(4)
    rnn = cell(3, 4, bias=bias, **kw).double().eval()
    B, T = 2, 5
    x = torch.randn(B, T, 3, dtype=torch.float64) if rnn.batch_first else torch.randn(T, B, 3, dtype=torch.float64)
    L = rnn.num_layers * (2 if rnn.bidirectional else 1)
    h0 = torch.zeros(L, B, 4, dtype=torch.float64)
    lstm = cell is nn.LSTM
    with torch.no_grad():
        out, state = rnn(x)
    hn, cn = state if lstm else (state, None)
    mode = {nn.LSTM: 2, nn.GRU: 3, nn.RNN: 1, _rnn_relu: 0}[cell]
    weights = [w for w in rnn._flat_weights]
    args = [
        x,
        weights,
        4 if bias else 2,
        None,
        h0,
        h0.clone() if lstm else None,
        mode,
        4,
        0,
        rnn.num_layers,
        rnn.batch_first,
    ]
    args += [0.0, False, rnn.bidirectional, [], None]
    outs = [out, hn, cn if lstm else torch.empty(0), torch.empty(0), torch.empty(0)]
    node = _fake_node(torch.ops.aten._cudnn_rnn.default, args, outs, rnn)
    torch.manual_seed(5)
    r_out = torch.randn_like(out)
    needs = [False] * len(node.inputs)
    needs[0] = True
    got = Recurrent(epsilon=0.0, stabilizer=0.0)(RuleContext(node, [out * r_out, None, None, None, None], needs))[0]

    # the same relevance (out * r_out at the output sequence) pushed through the decomposed recording
    tm = not rnn.batch_first

    class BatchFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, xb):
            o = self.rnn(xb.transpose(0, 1) if tm else xb)[0]
            return o.transpose(0, 1) if tm else o

    rb = r_out.transpose(0, 1) if tm else r_out
    xb = x.transpose(0, 1) if tm else x
    model = BatchFirst().eval()
    assert "_cudnn_rnn" not in _ops(model, xb)
    score = lambda o: (o * rb).flatten(1).sum(1)  # noqa: E731
    e = relprop.explain(model, xb, target=score, method="lrp", composite="lrp0")
    torch.testing.assert_close(got.transpose(0, 1) if tm else got, e.attributions, rtol=1e-8, atol=1e-10)


def test_initial_state_from_another_lstm_gets_relevance():
    """An encoder's (h_n, c_n) as a decoder's initial state: relevance flows through hx and cx, fused and not."""

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(6)
            self.enc = nn.LSTM(3, 4, batch_first=True, bias=False)
            self.dec = nn.LSTM(2, 4, batch_first=True, bias=False)
            self.fc = nn.Linear(4, 2, bias=False)

        def forward(self, x):
            _, state = self.enc(x[:, :4])
            out, _ = self.dec(x[:, 4:, :2], state)
            return self.fc(out[:, -1])

    model = Seq2Seq().eval()
    x = torch.randn(2, 7, 3)
    e32 = relprop.explain(model, x, target=1, method="lrp", composite="lrp0").attributions
    logit = model(x)[:, 1].detach()
    torch.testing.assert_close(e32.sum((1, 2)), logit, rtol=1e-4, atol=1e-6)
    assert e32[:, :4].abs().sum() > 0.1 * e32.abs().sum()  # the encoder's steps get their share
    e64 = relprop.explain(model.double(), x.double(), target=1, method="lrp", composite="lrp0").attributions
    torch.testing.assert_close(e32.double(), e64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell], ids=lambda c: c.__name__)
def test_cells_in_a_python_loop_equal_the_reference(cell):
    """nn.LSTMCell/nn.GRUCell stepped by hand are recorded as plain ops; their gates get no relevance either."""

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(7)
            self.cell = cell(3, 5)
            self.fc = nn.Linear(5, 3, bias=False)

        def forward(self, x):
            h = torch.zeros(x.shape[0], 5, dtype=x.dtype)
            c = torch.zeros_like(h)
            for t in range(x.shape[1]):
                if cell is nn.LSTMCell:
                    h, c = self.cell(x[:, t], (h, c))
                else:
                    h = self.cell(x[:, t], h)
            return self.fc(h)

    model = Loop().double().eval()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    e = relprop.explain(model, x, target=0, method="lrp", composite="lrp0").attributions
    # the same weights in an nn.LSTM/nn.GRU, explained by the hand-written reference
    full = (nn.LSTM if cell is nn.LSTMCell else nn.GRU)(3, 5).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(full, name + "_l0").copy_(getattr(model.cell, name))
    head = Head(full).double()
    head.fc = model.fc
    r_h = _output_relevance(head, x, 0)
    ref_fn = arras_lstm if cell is nn.LSTMCell else arras_gru
    ref = torch.stack([ref_fn(full, x[b], r_h[:, b], eps=0.0) for b in range(2)])
    torch.testing.assert_close(e, ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max()))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell], ids=lambda c: c.__name__)
def test_fused_cell_kernels_equal_decomposed(cell, bias):
    """``_thnn_fused_lstm_cell``/``_thnn_fused_gru_cell`` (nn.LSTMCell/GRUCell on CUDA), checked on CPU with
    a node built from the cell's own outputs, against the decomposed float64 recording of the same step."""
    torch.manual_seed(8)
    m = cell(3, 4, bias=bias).double().eval()
    lstm = cell is nn.LSTMCell
    x, h, c = (torch.randn(2, n, dtype=torch.float64) for n in (3, 4, 4))
    ig, hg = x @ m.weight_ih.detach().T, h @ m.weight_hh.detach().T
    with torch.no_grad():
        out = m(x, (h, c)) if lstm else m(x, h)
    hy = out[0] if lstm else out
    outs = [out[0], out[1], torch.empty(0)] if lstm else [out, torch.empty(0)]
    op = torch.ops.aten._thnn_fused_lstm_cell.default if lstm else torch.ops.aten._thnn_fused_gru_cell.default
    args = [ig, hg, c if lstm else h, m.bias_ih if bias else None, m.bias_hh if bias else None]
    node = _fake_node(op, args, outs, m)
    torch.manual_seed(9)
    r = torch.randn_like(hy)
    needs = [k < 3 for k in range(len(node.inputs))]
    rel = [hy * r] + [None] * (len(outs) - 1)
    r_ig, r_hg, r_state = Recurrent(epsilon=0.0, stabilizer=0.0)(RuleContext(node, rel, needs))[:3]
    # LRP-0 through the mm ops recorded before the kernel
    r_x = x * ((r_ig / ig) @ m.weight_ih.detach())
    r_h = h * ((r_hg / hg) @ m.weight_hh.detach()) + (0 if lstm else r_state)

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = m

        def forward(self, xhc):
            x, h, c = xhc.split([3, 4, 4], -1)
            return self.cell(x, (h, c))[0] if lstm else self.cell(x, h)

    xhc = torch.cat([x, h, c], -1)
    e = relprop.explain(Step().eval(), xhc, target=lambda o: (o * r).sum(1), method="lrp", composite="lrp0")
    ref_x, ref_h, ref_c = e.attributions.split([3, 4, 4], -1)
    torch.testing.assert_close(r_x, ref_x, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(r_h, ref_h, rtol=1e-8, atol=1e-10)
    if lstm:
        torch.testing.assert_close(r_state, ref_c, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2, bidirectional=True)], ids=["plain", "deep"])
def test_cudnn_form_with_packed_sequences_equals_decomposed(cell, kw):
    """``_cudnn_rnn`` with ``batch_sizes`` (a PackedSequence on CUDA): sequences end (forward direction) and
    start from h0 at their own last element (reverse direction) as the decomposed CPU recording has them."""
    torch.manual_seed(10)
    rnn = cell(3, 4, batch_first=True, **kw).double().eval()
    lengths = torch.tensor([6, 4, 4, 1])
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, batch_first=True)
    L = rnn.num_layers * (2 if rnn.bidirectional else 1)
    h0 = torch.zeros(L, 4, 4, dtype=torch.float64)
    lstm = cell is nn.LSTM
    with torch.no_grad():
        out, state = rnn(packed)
    hn, cn = state if lstm else (state, None)
    torch.manual_seed(11)
    r_pad = torch.randn(4, 6, out.data.shape[-1], dtype=torch.float64)
    for b, n in enumerate(lengths):
        r_pad[b, n:] = 0
    r_data = pack_padded_sequence(r_pad, lengths, batch_first=True).data
    args = [packed.data, list(rnn._flat_weights), 4, None, h0, h0.clone() if lstm else None]
    args += [2 if lstm else 3, 4, 0, rnn.num_layers, True, 0.0, False, rnn.bidirectional, packed.batch_sizes.tolist()]
    args += [None]
    outs = [out.data, hn, cn if lstm else torch.empty(0), torch.empty(0), torch.empty(0)]
    node = _fake_node(torch.ops.aten._cudnn_rnn.default, args, outs, rnn)
    needs = [k == 0 for k in range(len(node.inputs))]
    got = Recurrent(epsilon=0.0, stabilizer=0.0)(RuleContext(node, [out.data * r_data, None, None, None, None], needs))[
        0
    ]

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            o, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True))
            return pad_packed_sequence(o, batch_first=True, total_length=6)[0]

    model = Packed().eval()
    score = lambda o: (o * r_pad).flatten(1).sum(1)  # noqa: E731
    e = relprop.explain(model, x, target=score, method="lrp", composite="lrp0")
    want = pack_padded_sequence(e.attributions, lengths, batch_first=True).data
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert e.attributions[3, 1:].abs().max() == 0  # padding gets nothing


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lstm_with_projections(dtype):
    """proj_size > 0 (h = W_hr (o * tanh(c))): PyTorch records plain ops; gradient exact, LRP-0 conserves."""
    torch.manual_seed(12)
    model = Head(nn.LSTM(3, 5, proj_size=2, bias=False, num_layers=2)).to(dtype).eval()
    model.fc = nn.Linear(2, 3, bias=False).to(dtype).eval()
    x = torch.randn(2, 6, 3, dtype=dtype)
    _grad_check(model, x)
    e = relprop.explain(model, x, target=0, method="lrp", composite="lrp0")
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e.attributions.sum((1, 2)), model(x)[:, 0].detach(), **tol)


def test_gate_marking_finds_every_gate_and_only_gates():
    """Decomposed form: per step LSTM has 3 gated products (f*c, i*g, o*tanh(c)), GRU 2 (r*hn, (h-n)*z)."""
    from relprop.rules.recurrent import _source_op, recurrent_gate_operands

    T = 4
    for cell, per_step in ((nn.LSTM, 3), (nn.GRU, 2)):
        model = _model(cell, torch.float64, num_layers=2, bidirectional=True)
        graph = relprop.trace(model, torch.randn(2, T, 3, dtype=torch.float64))
        marked = recurrent_gate_operands(graph)
        muls = [n for n in graph.nodes if n.packet == "mul" and n.module == "rnn"]
        assert len(marked) == len(muls) == per_step * T * 4  # 2 layers x 2 directions
        for n in muls:
            assert len(marked[n.index]) == 1
            assert _source_op(n.inputs[marked[n.index][0]]) == "sigmoid"
            others = [i for i in n.activation_inputs() if i not in marked[n.index]]
            assert all(_source_op(n.inputs[i]) != "sigmoid" for i in others)


def test_window_overlap_fast_path_is_exact():
    from relprop.rules.recurrent import _indices, _overlap

    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        R, C = (int(v) for v in torch.randint(1, 6, (2,), generator=gen))
        S = C + int(torch.randint(0, 5, (1,), generator=gen))
        o1, o2 = (int(v) for v in torch.randint(0, 25, (2,), generator=gen))
        a, b = ((R, C), (S, 1), o1), ((R, C), (S, 1), o2)
        exact = bool(torch.isin(_indices(a), _indices(b)).any())
        assert _overlap(a, b) == exact, (a, b)
