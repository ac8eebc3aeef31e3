"""The element-wise, softmax and layer-norm VJP shortcuts of ``relprop.rules.vjps`` give autograd's bits.

Each shortcut is autograd's own formula called directly (no re-run of the op under autograd). Proven here
against two oracles on the recorded nodes: ``autograd_vjp`` (the fallback the shortcut replaces) and
``torch.autograd.grad`` of the op itself, bit for bit (NaN, inf and signed-zero positions included), in
float32, float64 and half precision (the gradient method keeps the op's dtype; LRP's float32 relevance on a
half-precision op runs the op in float32), on odd shapes, both ends of the dims, non-contiguous and
broadcast (expanded) inputs, and on replacement operands (DeepLIFT's reference, modified weights). Then the
gradient method on whole models that use every shortcut equals ``torch.autograd.grad`` exactly, and no
shortcut op falls back to autograd there.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprop
import relprop.rules.base as base
from relprop.rules.base import Float32Inputs, vjp
from relprop.rules.vjps import VJPS, RecordedInputs, autograd_vjp
from relprop.trace import record

SHORTCUTS = {"_softmax", "_log_softmax", "relu", "tanh", "sigmoid", "exp", "sqrt", "rsqrt", "neg"}
SHORTCUTS |= {"silu", "gelu", "pow", "native_layer_norm"}
SCALAR = {"add", "sub", "mul", "div"}  # with a Python number operand (two-tensor kernels: test_lrp_fast, ...)
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (so NaN where NaN, -0.0 where -0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(_BITS[a.dtype]), b.contiguous().view(_BITS[b.dtype]))


def _special(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN, +-inf, +-0 and subnormals written into its first entries."""
    flat = x.detach().clone().reshape(-1)
    vals = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, torch.finfo(x.dtype).tiny / 4, -3.0, 2.0]
    n = min(len(vals), flat.numel())
    flat[:n] = torch.tensor(vals[:n], dtype=torch.float64).to(x.dtype)
    flat[n : n + max(n, flat.numel() // 3)] *= torch.finfo(x.dtype).tiny / 8  # subnormals: rounding order shows
    return flat.reshape(x.shape)


class Ops(nn.Module):
    """Every shortcut op on odd shapes: dims -1/0/1, a transposed and an expanded (stride-0) operand."""

    def __init__(self, width: int = 7):
        super().__init__()
        self.w = nn.Parameter(torch.randn(width) * 0.5 + 1)
        self.b = nn.Parameter(torch.randn(width))

    def forward(self, x):  # x: [3, 5, 7]
        t = x.transpose(0, 2)  # non-contiguous [7, 5, 3]
        e = x[:, :1].expand(3, 5, 7)  # stride 0 along dim 1
        a = torch.softmax(x, -1) + torch.softmax(t, 0).transpose(0, 2) + torch.softmax(e, 1)
        a = a + torch.log_softmax(x, 0) + torch.log_softmax(t, -1).transpose(0, 2)
        a = a + torch.relu(x) + torch.relu(e) + torch.tanh(t).transpose(0, 2) + torch.sigmoid(x)
        a = a + torch.exp(x * 0.1) + torch.sqrt(x.abs()) + torch.rsqrt(x.abs() + 1e-3) + torch.neg(e)
        a = a + F.silu(x) + F.silu(t).transpose(0, 2) + F.gelu(x) + F.gelu(e, approximate="tanh")
        a = a + x.pow(2) + x**3 + x.abs().pow(0.5) + (x.abs() + 0.5).pow(-0.5) + x.pow(0) + x.abs().pow(2.5)
        a = a + (x + 4).pow(-1) + x.pow(1) + x.pow(-2.0) + (x - 3) * 2 + (t + 1).transpose(0, 2) / 3.0 + e / 7 - 0.5
        a = a + F.layer_norm(x, (7,), self.w, self.b) + F.layer_norm(x, (5, 7)) + F.layer_norm(x, (7,), self.w)
        return a.sum((1, 2)).unsqueeze(1)


def _shortcut_nodes(graph):
    scalar = [n for n in graph.nodes if n.packet in SCALAR and len(n.inputs) == 1]
    return [n for n in graph.nodes if n.packet in SHORTCUTS and n.region is None] + scalar


def _oracle(node, grads, tensors, wrt):
    """``torch.autograd.grad`` of the node's op itself (its recorded overload and arguments)."""
    leaves = [t.detach().requires_grad_(i in wrt) for i, t in enumerate(tensors)]  # strides kept: they pick the kernel
    args, kwargs = node.rebuild(leaves)
    out = node.op(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    got = torch.autograd.grad(out, [leaves[i] for i in wrt], grads[0], allow_unused=True)
    res = [None] * len(tensors)
    for i, g in zip(wrt, got):
        res[i] = g if g is not None else torch.zeros_like(tensors[i])
    return res


def _check(node, grads, tensors, wrt, plain):
    """The shortcut equals both oracles on ``plain`` tensors (what the op runs on); returns whether it ran."""
    got = VJPS[node.packet](node, grads, tensors, wrt)
    if got is None:
        return False
    for want in (autograd_vjp(node, grads, plain, wrt), _oracle(node, grads, plain, wrt)):
        for i in wrt:
            assert same_bits(got[i], want[i]), (node, i, got[i], want[i])
    return True


def _record(dtype, special=False, seed=0):
    torch.manual_seed(seed)
    model = Ops().to(dtype).eval()
    x = torch.randn(3, 5, 7, dtype=dtype)
    return model, (_special(x) if special else x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("special", [False, True])
def test_shortcuts_equal_autograd_bits(dtype, special):
    model, x = _record(dtype, special)
    graph = record(model, (x,), {})
    ran = set()
    for node in _shortcut_nodes(graph):
        wrt = [0]
        out = node.outputs[0].tensor
        g = torch.randn_like(out)
        if special:
            g = _special(g).flip(list(range(g.dim())))  # specials where the input has none: inf where relu gives 0
        plain = [v.tensor for v in node.inputs]
        if _check(node, [g] + [None] * (len(node.outputs) - 1), RecordedInputs(node), wrt, plain):
            ran.add(node.op_name)
        # Replacement operands (DeepLIFT's reference, modified weights): the output is computed from them.
        repl = [t * 0.75 - 0.25 for t in plain]
        assert _check(node, [g] + [None] * (len(node.outputs) - 1), repl, wrt, repl), node
    assert ran == {
        "aten._softmax.default",
        "aten._log_softmax.default",
        "aten.relu.default",
        "aten.tanh.default",
        "aten.sigmoid.default",
        "aten.exp.default",
        "aten.sqrt.default",
        "aten.rsqrt.default",
        "aten.neg.default",
        "aten.silu.default",
        "aten.gelu.default",
        "aten.pow.Tensor_Scalar",
        "aten.native_layer_norm.default",
        "aten.add.Tensor",
        "aten.sub.Tensor",
        "aten.mul.Tensor",
        "aten.div.Tensor",
    }, ran
    scalars = {(n.op_name, n.args[1]) for n in graph.nodes if n.packet in SCALAR and len(n.inputs) == 1}
    assert {("aten.mul.Tensor", 2), ("aten.div.Tensor", 7), ("aten.div.Tensor", 3.0), ("aten.sub.Tensor", 3)} <= scalars
    exponents = {n.args[1] for n in graph.nodes if n.op_name == "aten.pow.Tensor_Scalar"}
    assert {0, 1, 2, 3, 0.5, -0.5, 2.5, -1, -2.0} <= exponents, exponents
    approx = {n.kwargs.get("approximate", "none") for n in graph.nodes if n.packet == "gelu"}
    assert approx == {"none", "tanh"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shortcuts_in_half_precision(dtype):
    """Half cotangents (the gradient method) keep the op's dtype; float32 relevance (LRP) runs it in float32."""
    model, x = _record(dtype, special=True, seed=1)
    graph = record(model, (x,), {})
    nodes = _shortcut_nodes(graph)
    assert {n.packet for n in nodes} == SHORTCUTS | SCALAR
    for node in nodes:
        out = node.outputs[0].tensor
        g = torch.randn_like(out, dtype=torch.float32)
        rest = [None] * (len(node.outputs) - 1)
        plain = [v.tensor for v in node.inputs]
        assert _check(node, [g.to(dtype)] + rest, RecordedInputs(node), [0], plain), node
        widened = [t.float() for t in plain]
        assert _check(node, [g] + rest, Float32Inputs(node), [0], widened), node
        # through base.vjp, which widens: equal to autograd on float32 copies of the recorded operands
        got = vjp(node, [g] + rest, None, [0])[0]
        assert same_bits(got, autograd_vjp(node, [g] + rest, widened, [0])[0]), node


def test_output_released_or_not_in_the_cotangents_dtype():
    """A released output is computed from the inputs (recorded bits); a cotangent in another dtype declines."""
    model, x = _record(torch.float32)
    graph = record(model, (x,), {})
    for node in _shortcut_nodes(graph):
        g = torch.randn_like(node.outputs[0].tensor)
        rest = [None] * (len(node.outputs) - 1)
        plain = [v.tensor for v in node.inputs]
        want = autograd_vjp(node, [g] + rest, plain, [0])[0]
        held = [v.data for v in node.outputs]
        for v in node.outputs:
            if v is not None:
                v.data = None
        got = VJPS[node.packet](node, [g] + rest, RecordedInputs(node), [0])
        assert got is not None and same_bits(got[0], want), node
        assert all(v is None or v.data is None for v in node.outputs), "the shortcut restored a released output"
        for v, d in zip(node.outputs, held):
            if v is not None:
                v.data = d
        assert VJPS[node.packet](node, [g.double()] + rest, RecordedInputs(node), [0]) is None, node
        assert VJPS[node.packet](node, [g], [t.double() for t in plain], [0]) is None, node


def test_shortcuts_decline_what_they_do_not_know():
    class M(nn.Module):
        def forward(self, x):
            y = torch.pow(x, x) + torch.pow(2.0, x)  # pow.Tensor_Tensor, pow.Scalar
            return F.layer_norm(y, (4,), self.w, self.b).sum(1, keepdim=True)

    m = M()
    m.w, m.b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))
    graph = record(m.eval(), (torch.rand(2, 4) + 0.5,), {})
    pows = [n for n in graph.nodes if n.packet == "pow"]
    assert {n.op_name for n in pows} == {"aten.pow.Tensor_Tensor", "aten.pow.Scalar"}
    for node in pows:
        g = [torch.ones(2, 4)]
        assert VJPS["pow"](node, g, RecordedInputs(node), [i for i, v in enumerate(node.inputs) if v.is_float]) is None
    ln = next(n for n in graph.nodes if n.packet == "native_layer_norm")
    g = [torch.ones(2, 4), None, None]
    assert VJPS["native_layer_norm"](ln, g, RecordedInputs(ln), [0, 1, 2]) is None  # weight/bias: autograd
    assert VJPS["native_layer_norm"](ln, [g[0], torch.ones(2, 1), None], RecordedInputs(ln), [0]) is None
    assert VJPS["native_layer_norm"](ln, g, RecordedInputs(ln), [0]) is not None

    graph = record(nn.Softmax(-1).eval(), (torch.randn(2, 4),), {})
    sm = next(n for n in graph.nodes if n.packet == "_softmax")
    g = [torch.ones(2, 4)]
    assert VJPS["_softmax"](sm, g, RecordedInputs(sm), [0]) is not None
    half_to_float = dataclasses.replace(sm, args=(sm.args[0], sm.args[1], True))
    assert VJPS["_softmax"](half_to_float, g, RecordedInputs(half_to_float), [0]) is None
    with_kwargs = dataclasses.replace(sm, args=sm.args[:2], kwargs={"half_to_float": False})
    assert VJPS["_softmax"](with_kwargs, g, RecordedInputs(with_kwargs), [0]) is None

    graph = record(nn.GELU().eval(), (torch.randn(2, 4),), {})
    gelu = next(n for n in graph.nodes if n.packet == "gelu")
    odd = dataclasses.replace(gelu, kwargs={"approximate": "erf"})
    assert VJPS["gelu"](odd, g, RecordedInputs(odd), [0]) is None


class Block(nn.Module):
    """A transformer-ish block: RMS norm (pow/mean/rsqrt), softmax attention, SiLU/GELU MLPs, layer norm."""

    def __init__(self, d: int = 12):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        q, k, v = self.qkv(h).chunk(3, -1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 3.0, -1) @ v
        x = x + att + torch.log_softmax(att, -1).neg()
        u = self.up(self.ln(x))
        x = x + self.down(F.silu(u) * torch.sigmoid(u) + F.gelu(u, approximate="tanh") + torch.tanh(u).relu())
        return (x + torch.exp(-x.abs()) + torch.sqrt(x.abs() + 1)).mean(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_gradient_method_with_shortcuts_equals_autograd(dtype, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(12, 3)).to(dtype).eval()
    x = torch.randn(2, 9, 12, dtype=dtype)
    fell_back = []

    def spy(node, grads, tensors, wrt):
        fell_back.append(node.packet)
        return autograd_vjp(node, grads, tensors, wrt)

    monkeypatch.setattr(base, "autograd_vjp", spy)
    got = relprop.explain(model, x, target=1, method="gradient").attributions
    xx = x.clone().requires_grad_()
    want = torch.autograd.grad(model(xx)[:, 1].sum(), xx)[0]
    assert same_bits(got, want)
    assert not (SHORTCUTS | SCALAR) & set(fell_back), fell_back
    graph = relprop.trace(model, x)
    assert {n.packet for n in graph.nodes} >= SHORTCUTS


class _Promoting(nn.Module):
    """``float32 + float64`` and ``float64 - float32``: the sum is float64, autograd hands each operand its own dtype."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        h = self.lin(x)  # float32
        return ((h + x.double()) - h.exp()).sum(-1)


def test_two_tensor_add_with_promotion_gives_each_operand_its_dtype():
    torch.manual_seed(0)
    model, x = _Promoting().eval(), torch.randn(3, 5)
    got = relprop.explain(model, x, target=None, method="gradient").attributions
    xx = x.clone().requires_grad_()
    want = torch.autograd.grad(model(xx).sum(), xx)[0]
    assert same_bits(got, want)
    graph = relprop.trace(model, x)
    for node in graph.nodes:
        if node.packet in ("add", "sub") and len(node.inputs) == 2:
            g = torch.randn(node.outputs[0].shape, dtype=node.outputs[0].dtype)
            mine = VJPS[node.packet](node, [g], RecordedInputs(node), [0, 1])
            ref = autograd_vjp(node, [g], RecordedInputs(node), [0, 1])
            assert mine is None or all(same_bits(a, b) for a, b in zip(mine, ref))
            assert [r.dtype for r in ref] == [v.dtype for v in node.inputs]


class _Mixer(nn.Module):
    """2-D matmuls with column-major operands: a transposed input into ``addmm`` (``Linear``), ``x.t() @ w`` (``mm``
    with a column-major first operand) and the usual ``Linear`` weight ``W.t()`` (column-major second operand)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(40, 24)
        self.w = nn.Parameter(torch.randn(24, 24))
        self.b = nn.Linear(24, 3, bias=False)

    def forward(self, x):  # x: (24, 40) column-major
        h = torch.tanh(self.a(x))  # addmm(bias, x, W.t())
        h = h + (h.t() @ self.w.t()).t()  # mm(h.t(), w.t()), both column-major
        return self.b(h)


@pytest.mark.parametrize(
    "model, x",
    [
        (_Mixer, (40, 24)),
        (lambda: nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)), (16, 4)),  # a transposed input
    ],
)
def test_column_major_matmul_operands_get_autograds_bits(model, x):
    torch.manual_seed(0)
    model = model().eval()
    x = torch.randn(*x).t()
    e = relprop.explain(model, x, target=1, method="gradient", params=True)
    xx = x.clone().requires_grad_()
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(model(xx)[:, 1].sum(), [xx, *model.parameters()])
    assert same_bits(e.attributions, grads[0])
    for n, g in zip(names, grads[1:]):
        assert same_bits(e.params[n], g), n
