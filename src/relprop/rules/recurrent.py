"""LRP for recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells): Arras et al.'s gated rule.

Arras, Montavon, Mueller, Samek (2017), "Explaining recurrent neural network predictions in sentiment
analysis": in a product ``gate * signal`` the gate (a sigmoid output: LSTM's i, f, o; GRU's r, z) only
scales the signal, so the signal gets all the relevance and the gate none; sums (``c = f*c' + i*g``,
the gate pre-activations ``W_ih x + W_hh h``) split relevance by the epsilon rule; ``tanh`` passes it on;
the linear parts ``x W_ih^T + b_ih``, ``h W_hh^T + b_hh`` get the rule set's dense rule (epsilon in the
paper and in the epsilon/LRP-0/AttnLRP composites).

PyTorch records a recurrent layer in one of two forms, and both get this rule:

* **Fused kernels**: ``aten.mkldnn_rnn_layer`` (one LSTM layer and direction, CPU float32),
  ``aten._cudnn_rnn`` (the whole module on CUDA, packed sequences included), ``aten._thnn_fused_lstm_cell``
  / ``_thnn_fused_gru_cell`` (one step of ``nn.LSTMCell``/``nn.GRUCell`` on CUDA). :class:`Recurrent`
  re-derives the cell from the kernel's arguments (weights, biases, ``hx``, ``cx``, gate order i, f, g, o
  and r, z, n), checks that the re-derivation reproduces the kernel's recorded outputs (and raises
  rather than explain a different function), and walks relevance backwards through time. The gradient
  never uses this: the generic VJP re-runs the kernel under autograd.
* **Decomposed ops** (CPU float64, packed sequences on CPU, GRU/RNN on CPU, cells): ``addmm``, ``sigmoid``,
  ``tanh``, ``mul``, ``add``... :func:`recurrent_gate_operands` finds the products inside recurrent modules
  whose operand is a sigmoid output (looking through the views and ``as_strided_scatter`` writes that
  PyTorch's in-place ``sigmoid_`` on gate chunks records) and holds that operand constant, so the product
  rule sends everything to the signal.

The fused rule mirrors the decomposed graph op for op (the gate pre-activation ``(h W_hh^T + b_hh) +
(x W_ih^T + b_ih)`` split by the sum rule, then each linear part by the dense rule, as an ``addmm``; GRU's
``h' = (h - n) * z + n`` as PyTorch writes it), so a model gets the same relevance whichever kernel
PyTorch picked: float32 fused and float64 decomposed agree to float32 precision under every named
composite. (One caveat that is PyTorch's, not this rule's: for a non-contiguous input PyTorch records the
input projection as ``mm`` + bias ``add`` instead of ``addmm``; rules that treat the bias apart, such as
z+ or flat, then see a different program; the epsilon rule agrees either way.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..graph import Graph, Node, Value
from . import base
from .base import Rule, RuleContext, register_family
from .linear import Epsilon, stabilize

aten = torch.ops.aten

#: ``mode`` argument of the fused kernels (cuDNN's and oneDNN's enum).
_MODES = {0: "rnn_relu", 1: "rnn_tanh", 2: "lstm", 3: "gru"}
_GATES_PER_MODE = {"rnn_relu": 1, "rnn_tanh": 1, "lstm": 4, "gru": 3}

#: Recurrent module types whose products get the gated rule in the decomposed form.
_RECURRENT_MODULES = (torch.nn.RNNBase, torch.nn.RNNCellBase)


class RecurrentRuleError(RuntimeError):
    """A fused recurrent kernel whose arguments this rule does not cover (names the op and module)."""

    def __init__(self, node: Node, what: str):
        super().__init__(
            f"relprop: LRP through {node.op_name} in {node.location}: {what}. The gradient is not "
            f"affected. Register your own rule with relprop.register_rule('{node.packet}', rule), or run the "
            f"model on CPU in float64 (PyTorch then records the recurrent cell as plain ops, which LRP covers)."
        )
        self.node = node


# --------------------------------------------------------------------------- one layer, one direction


@dataclass
class _Layer:
    mode: str
    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: torch.Tensor | None
    b_hh: torch.Tensor | None
    reverse: bool


def _lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, w, b)


def _steps(batch_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(offset, rows)`` of each time step in a packed (time-major, longest sequence first) layout."""
    out, off = [], 0
    for bs in batch_sizes:
        out.append((off, int(bs)))
        off += int(bs)
    return out


def _run_layer(
    layer: _Layer, x: torch.Tensor, batch_sizes: Sequence[int], h0: torch.Tensor, c0: torch.Tensor | None
) -> tuple[list[dict], tuple]:
    """Re-run one layer and direction; keep what the LRP pass reads per step.

    ``x`` is packed: (N, D) with step ``t`` in rows ``offset_t : offset_t + batch_sizes[t]`` (a padded
    (T, B, D) input is the special case ``x.reshape(T * B, D)``, ``batch_sizes = [B] * T``). A sequence
    that has ended keeps its last state (the rows past ``batch_sizes[t]``); in the reverse direction a
    sequence starts from ``h0`` at its own last element. Returns the per-step records in processing
    order and ``(output (N, H), h_n (B, H), c_n)``.
    """
    steps_at = _steps(batch_sizes)
    order = reversed(range(len(steps_at))) if layer.reverse else range(len(steps_at))
    xg = _lin(x, layer.w_ih, layer.b_ih)  # (N, G*H): the input part of every step at once
    h, c = h0, c0  # full batch; rows of inactive sequences hold their final (or initial) state
    steps: list[dict] = []
    outs: dict[int, torch.Tensor] = {}  # step -> its output rows (filled in processing order)
    for t in order:
        off, bs = steps_at[t]
        h_prev = h[:bs]
        A = _lin(h_prev, layer.w_hh, layer.b_hh)
        B = xg[off : off + bs]
        rec = {"t": t, "h_prev": h_prev, "A": A, "B": B}
        if layer.mode == "lstm":
            if c is None:
                raise RuntimeError("internal: an LSTM layer re-run without its cell state")
            c_prev = c[:bs]
            z = A + B
            zi, zf, zg, zo = z.chunk(4, -1)
            i, f, g, o = zi.sigmoid(), zf.sigmoid(), zg.tanh(), zo.sigmoid()
            c_new = f * c_prev + i * g
            h_new = o * c_new.tanh()
            rec.update(z=z, i=i, f=f, g=g, c_prev=c_prev, c=c_new)
            c = torch.cat([c_new, c[bs:]]) if bs < c.shape[0] else c_new
        elif layer.mode == "gru":
            ar, az, an = A.chunk(3, -1)
            br, bz, bn = B.chunk(3, -1)
            r, zt = (ar + br).sigmoid(), (az + bz).sigmoid()
            a = bn + an * r
            n = a.tanh()
            d = h_prev - n
            h_new = d * zt + n
            rec.update(r=r, zt=zt, a=a, n=n, d=d, h=h_new)
        else:
            z = A + B
            h_new = z.tanh() if layer.mode == "rnn_tanh" else z.relu()
            rec.update(z=z, h=h_new)
        h = torch.cat([h_new, h[bs:]]) if bs < h.shape[0] else h_new
        outs[t] = h_new
        steps.append(rec)
    return steps, (torch.cat([outs[t] for t in range(len(steps_at))]), h, c)


def _share(parts: Sequence[torch.Tensor], total: torch.Tensor, rel: torch.Tensor, eps: float) -> list[torch.Tensor]:
    """Epsilon-rule split of ``rel`` over the summands ``parts`` of ``total`` (the ``sum`` family's rule)."""
    s = rel / stabilize(total, eps)
    return [p * s for p in parts]


#: ``dense(x (N, D), w (G, D), b (G,) | None, out (N, G), rel (N, G), is_input) -> relevance of x``: the rule
#: set's rule for the cell's linear parts (``is_input``: the input part ``x W_ih^T + b_ih``, else ``h W_hh^T + b_hh``).
Dense = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _lrp_layer(
    layer: _Layer,
    x: torch.Tensor,
    batch_sizes: Sequence[int],
    steps: list[dict],
    r_out: torch.Tensor,
    r_hn: torch.Tensor | None,
    r_cn: torch.Tensor | None,
    dense: Dense,
    stab: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Relevance of packed ``x`` (N, D), ``h0`` and ``c0`` from that of the outputs, backwards in time.

    Only the signal's rows of the weights carry relevance (the gates get none), so the linear parts are
    evaluated on those rows; the input part of every step is done in one call after the loop, as the
    decomposed form does it in one ``addmm`` over all steps.
    """
    H = layer.w_hh.shape[1]
    steps_at = _steps(batch_sizes)
    rows = slice(0, H) if layer.mode in ("rnn_tanh", "rnn_relu") else slice(2 * H, 3 * H)  # LSTM's g, GRU's n
    w_ih, w_hh = layer.w_ih[rows], layer.w_hh[rows]
    b_ih = layer.b_ih[rows] if layer.b_ih is not None else None
    b_hh = layer.b_hh[rows] if layer.b_hh is not None else None
    r_in = x.new_zeros(x.shape[0], H)  # relevance of x W_ih^T + b_ih (signal rows)
    b_all = x.new_zeros(x.shape[0], H)
    batch = int(batch_sizes[0]) if len(batch_sizes) else 0
    r_h = r_hn if r_hn is not None else x.new_zeros(batch, H)  # full batch, as the forward's state
    r_c = (r_cn if r_cn is not None else x.new_zeros(batch, H)) if layer.mode == "lstm" else None
    for rec in reversed(steps):
        off, bs = steps_at[rec["t"]]
        rh = r_h[:bs] + r_out[off : off + bs]
        A, B = rec["A"][..., rows], rec["B"][..., rows]
        b_all[off : off + bs] = B
        if layer.mode == "lstm":
            if r_c is None:
                raise RuntimeError("internal: LSTM relevance without a cell-state relevance")
            rc = r_c[:bs] + rh  # h = o * tanh(c): the gate o gets nothing, tanh passes relevance on
            i, f, g = rec["i"], rec["f"], rec["g"]
            rc_prev, r_g = _share([f * rec["c_prev"], i * g], rec["c"], rc, stab)  # gates f, i: none
            # g = tanh(z_g), z_g = (h W_hg^T + b_hg) + (x W_ig^T + b_ig)
            r_a, r_b = _share([A, B], rec["z"][..., rows], r_g, stab)
            rh_prev = dense(rec["h_prev"], w_hh, b_hh, A, r_a, False)
            r_c = torch.cat([rc_prev, r_c[bs:]]) if bs < r_c.shape[0] else rc_prev
        elif layer.mode == "gru":
            # h' = (h - n) * z + n (PyTorch's form): the gate z gets nothing
            r_d, r_n = _share([rec["d"] * rec["zt"], rec["n"]], rec["h"], rh, stab)
            r_hd, r_nd = _share([rec["h_prev"], -rec["n"]], rec["d"], r_d, stab)
            # n = tanh(a), a = (x W_in^T + b_in) + r * (h W_hn^T + b_hn): the gate r gets nothing
            r_b, r_an = _share([B, A * rec["r"]], rec["a"], r_n + r_nd, stab)
            rh_prev = r_hd + dense(rec["h_prev"], w_hh, b_hh, A, r_an, False)
        else:
            r_a, r_b = _share([A, B], rec["z"], rh, stab)  # h = act(z): identity rule
            rh_prev = dense(rec["h_prev"], w_hh, b_hh, A, r_a, False)
        r_h = torch.cat([rh_prev, r_h[bs:]]) if bs < r_h.shape[0] else rh_prev
        r_in[off : off + bs] = r_b
    r_x = dense(x, w_ih, b_ih, b_all, r_in, True)
    return r_x, r_h, r_c


def _dense_rule(rule: Rule, owner: Node) -> Callable[..., torch.Tensor]:
    """Apply a ``dense``-family rule to ``x W^T + b`` as if it had been recorded as an ``addmm``/``mm`` node."""
    if isinstance(rule, Epsilon):  # the common case, without building a node: x * (R / stab(z)) W

        def eps(x, w, b, out, rel):
            return x * ((rel / stabilize(out, rule.epsilon)) @ w)

        return eps

    def apply(x, w, b, out, rel):
        xv = Value(0, x, "op", is_activation=True)
        wv = Value(1, w.t(), "param")
        args: tuple[Value, ...]
        if b is None:
            op, args = aten.mm.default, (xv, wv)
        else:
            op, args = aten.addmm.default, (Value(2, b, "param"), xv, wv)
        ov = Value(3, out, "op", is_activation=True)
        node = Node(owner.index, op, args, {}, list(args), [ov], owner.module, owner.module_type)
        res = rule(RuleContext(node, [rel], [a is xv for a in args], base.NodeNotes("dense")))
        r = res[args.index(xv)]
        return r if r is not None else torch.zeros_like(x)

    return apply


# --------------------------------------------------------------------------- the rule


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-3 if a.dtype in (torch.float16, torch.bfloat16) else (1e-4 if a.dtype == torch.float32 else 1e-9)
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return a.shape == b.shape and bool(((a - b).abs() <= tol * scale).all())


class Recurrent:
    """Arras et al.'s LRP for fused recurrent kernels (``mkldnn_rnn_layer``, ``_cudnn_rnn``).

    The gates get no relevance; sums split it by the epsilon rule with ``stabilizer`` (what the ``sum``
    family's :class:`~relprop.rules.Proportional` does in the decomposed form); the linear parts
    ``x W_ih^T + b_ih`` and ``h W_hh^T + b_hh`` get the rule set's ``dense`` rule (Arras et al.: epsilon),
    applied as if PyTorch had recorded them as ``addmm`` ops, so a fused layer gets the relevance its
    decomposed recording gets under the same composite.

    Args:
        dense: rule for the linear parts (default ``Epsilon(epsilon)``).
        stabilizer: stabiliser of the sum rule (``c = f*c' + i*g``, the gate pre-activations).
        epsilon: shorthand for ``dense=Epsilon(epsilon)``.
        first: rule for the input part of the first layer, when the composite's first-layer rule
            (``Flat``, ``ZBox``...) falls on this kernel (see :meth:`with_first`).
    """

    def __init__(
        self,
        dense: Rule | None = None,
        stabilizer: float = 1e-6,
        *,
        epsilon: float | None = None,
        first: Rule | None = None,
    ):
        if dense is not None and epsilon is not None:
            raise ValueError("Recurrent: pass dense= or epsilon=, not both")
        self.dense = dense if dense is not None else Epsilon(1e-6 if epsilon is None else epsilon)
        self.stabilizer = stabilizer
        self.first = first

    def with_first(self, first: Rule | None) -> Recurrent:
        """This rule with ``first`` on the input part of the first layer (forward direction)."""
        other = copy.copy(self)
        other.first = first
        return other

    def __call__(self, ctx: RuleContext) -> list:
        packet = ctx.node.packet
        if packet == "mkldnn_rnn_layer":
            return self._mkldnn(ctx)
        if packet == "_cudnn_rnn":
            return self._cudnn(ctx)
        if packet in ("_thnn_fused_lstm_cell", "_thnn_fused_gru_cell"):
            return self._fused_cell(ctx)
        raise RecurrentRuleError(ctx.node, f"the recurrent rule does not know {packet}")

    def __repr__(self) -> str:
        first = f", first={self.first!r}" if self.first is not None else ""
        return f"Recurrent(dense={self.dense!r}, stabilizer={self.stabilizer}{first})"

    def _dense(self, owner: Node, first: bool) -> Dense:
        """The ``dense`` callable of :func:`_lrp_layer` for one layer and direction."""
        hidden = _dense_rule(self.dense, owner)
        inp = _dense_rule(self.first, owner) if (first and self.first is not None) else hidden

        def dense(x, w, b, out, rel, is_input):
            return (inp if is_input else hidden)(x, w, b, out, rel)

        return dense

    # aten::mkldnn_rnn_layer(input, weight0, weight1, weight2, weight3, hx_, cx_, reverse, batch_sizes, mode,
    #     hidden_size, num_layers, has_biases, bidirectional, batch_first, train) -> (output, hy, cy, workspace)
    # One layer, one direction; the module has already made the input time-major (T, B, D).
    def _mkldnn(self, ctx: RuleContext) -> list:
        node = ctx.node
        if len(node.inputs) != 7 or not all(isinstance(a, Value) for a in node.args[:7]):
            raise RecurrentRuleError(node, "unexpected arguments (expected 7 tensors)")
        x, w_ih, w_hh, b_ih, b_hh, hx, cx = ctx.inputs
        reverse, batch_sizes, mode, hidden = node.arg(7), node.arg(8), node.arg(9), node.arg(10)
        has_biases = node.arg(12)
        _refuse_params(ctx, (1, 2, 3, 4))
        mode_name = _MODES.get(mode)
        if mode_name is None:
            raise RecurrentRuleError(node, f"unknown mode {mode}")
        if batch_sizes:
            raise RecurrentRuleError(node, "packed sequences (batch_sizes) in mkldnn_rnn_layer are not supported")
        if x.dim() != 3 or w_hh.shape[-1] != hidden or w_ih.shape[0] != _GATES_PER_MODE[mode_name] * hidden:
            raise RecurrentRuleError(node, f"unexpected shapes (input {tuple(x.shape)}, weight_hh {tuple(w_hh.shape)})")
        layer = _Layer(mode_name, w_ih, w_hh, b_ih if has_biases else None, b_hh if has_biases else None, bool(reverse))
        T, B = x.shape[:2]
        flat, sizes = x.reshape(T * B, -1), [B] * T  # the padded layout as a packed one
        c0 = cx if mode_name == "lstm" else None
        with torch.no_grad():
            steps, (out, hn, cn) = _run_layer(layer, flat, sizes, hx, c0)
        out = out.reshape(T, B, -1)
        _check(node, mode_name, [out, hn, cn], ctx.outputs[:3])
        r = ctx.relevance
        r_out = (r[0] if r[0] is not None else torch.zeros_like(out)).reshape(T * B, -1)
        dense = self._dense(node, first=True)
        r_x, r_h0, r_c0 = _lrp_layer(layer, flat, sizes, steps, r_out, r[1], r[2], dense, self.stabilizer)
        res: list = [None] * 7
        res[0], res[5], res[6] = r_x.reshape(x.shape), r_h0, r_c0
        return [t if need else None for t, need in zip(res, ctx.needs)]

    # aten::_cudnn_rnn(input, weight[], weight_stride0, weight_buf, hx, cx, mode, hidden_size, proj_size,
    #     num_layers, batch_first, dropout, train, bidirectional, batch_sizes, dropout_state)
    #     -> (output, hy, cy, reserve, weight_buf)
    # The whole module in one call: weights are [w_ih, w_hh, (b_ih, b_hh)] per layer and direction; with
    # ``batch_sizes`` the input is a PackedSequence's data (N, D).
    def _cudnn(self, ctx: RuleContext) -> list:
        node = ctx.node
        args = node.args
        weights = args[1]
        mode, hidden, proj = node.arg(6), node.arg(7), node.arg(8)
        num_layers, batch_first, dropout, train = node.arg(9), node.arg(10), node.arg(11), node.arg(12)
        bidirectional, batch_sizes = node.arg(13), node.arg(14)
        stride = node.arg(2)
        if proj:
            raise RecurrentRuleError(node, "LSTM projections (proj_size > 0) are not supported by this rule")
        if train and dropout:
            raise RecurrentRuleError(node, "dropout between layers in training mode is not supported")
        mode_name = _MODES.get(mode)
        if mode_name is None or stride not in (2, 4) or not isinstance(weights, (list, tuple)):
            raise RecurrentRuleError(node, f"unexpected mode {mode} or weight layout (stride {stride})")
        dirs = 2 if bidirectional else 1
        if len(weights) != num_layers * dirs * stride:
            raise RecurrentRuleError(node, f"expected {num_layers * dirs * stride} weight tensors, got {len(weights)}")
        pos = _value_positions(node)  # positions in node.inputs: every Value in args, in order
        tensors = ctx.inputs
        w_pos = [pos[id(w)] for w in weights]
        _refuse_params(ctx, tuple(w_pos) + ((pos[id(args[3])],) if isinstance(args[3], Value) else ()))
        x = tensors[pos[id(args[0])]]
        hx = tensors[pos[id(args[4])]]
        cx_val = args[5] if isinstance(args[5], Value) and mode_name == "lstm" else None
        cx = tensors[pos[id(cx_val)]] if cx_val is not None else None
        packed = bool(batch_sizes)
        transpose = batch_first and not packed
        if packed:
            flat, sizes = x, [int(b) for b in batch_sizes]
        else:
            xt = x.transpose(0, 1) if transpose else x
            T, B = xt.shape[:2]
            flat, sizes = xt.reshape(T * B, -1), [B] * T

        def unflatten(t: torch.Tensor) -> torch.Tensor:  # packed rows -> the kernel's output layout
            if packed:
                return t
            t = t.reshape(T, B, -1)
            return t.transpose(0, 1) if transpose else t

        def flatten(t: torch.Tensor) -> torch.Tensor:
            if packed:
                return t
            return (t.transpose(0, 1) if transpose else t).reshape(T * B, -1)

        layers_io = []
        inp = flat
        hn_all, cn_all = [], []
        with torch.no_grad():
            for layer_i in range(num_layers):
                dir_out = []
                for d in range(dirs):
                    k = (layer_i * dirs + d) * stride
                    ws = [tensors[p] for p in w_pos[k : k + stride]]
                    b_ih, b_hh = (ws[2], ws[3]) if stride == 4 else (None, None)
                    layer = _Layer(mode_name, ws[0], ws[1], b_ih, b_hh, d == 1)
                    j = layer_i * dirs + d
                    steps, (out, hn, cn) = _run_layer(layer, inp, sizes, hx[j], cx[j] if cx is not None else None)
                    dir_out.append(out)
                    hn_all.append(hn)
                    cn_all.append(cn)
                    layers_io.append((layer, inp, steps))
                inp = torch.cat(dir_out, -1)
        outs = ctx.outputs
        mine = [unflatten(inp), torch.stack(hn_all), torch.stack(cn_all) if cx is not None else None]
        _check(node, mode_name, mine, [outs[0], outs[1], outs[2] if cx is not None else None])
        # backwards through the layers
        r = ctx.relevance
        r_next = flatten(r[0]) if r[0] is not None else torch.zeros_like(inp)
        r_hx = torch.zeros_like(hx)
        r_cx = torch.zeros_like(cx) if cx is not None else None
        for layer_i in reversed(range(num_layers)):
            r_in = None
            for d in range(dirs):
                j = layer_i * dirs + d
                layer, lin, steps = layers_io[j]
                r_o = r_next[..., d * hidden : (d + 1) * hidden]
                r_hn = r[1][j] if r[1] is not None else None
                r_cn = r[2][j] if (cx is not None and r[2] is not None) else None
                dense = self._dense(node, first=(layer_i == 0 and d == 0))
                r_x, r_h0, r_c0 = _lrp_layer(layer, lin, sizes, steps, r_o, r_hn, r_cn, dense, self.stabilizer)
                r_in = r_x if r_in is None else r_in + r_x
                r_hx[j] = r_h0
                if r_cx is not None and r_c0 is not None:
                    r_cx[j] = r_c0
            if r_in is None:
                raise RuntimeError("internal: a recurrent layer without directions")
            r_next = r_in
        res: list = [None] * len(node.inputs)
        res[pos[id(args[0])]] = unflatten(r_next)
        res[pos[id(args[4])]] = r_hx
        if cx_val is not None:
            res[pos[id(cx_val)]] = r_cx
        return [t if need else None for t, need in zip(res, ctx.needs)]

    # aten::_thnn_fused_lstm_cell(input_gates, hidden_gates, cx, input_bias=None, hidden_bias=None) -> (hy, cy, ws)
    # aten::_thnn_fused_gru_cell(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None) -> (hy, ws)
    # One time step on CUDA (nn.LSTMCell / nn.GRUCell): the gate pre-activations x W_ih^T and h W_hh^T are
    # recorded ``mm`` ops before it, so this rule splits relevance among them and the biases (which keep
    # their share), as the sum rule does between an ``mm`` and its bias in the decomposed form.
    def _fused_cell(self, ctx: RuleContext) -> list:
        node = ctx.node
        pos = _value_positions(node)
        args = [node.arg(k) for k in range(5)]
        if not all(isinstance(a, Value) for a in args[:3]):
            raise RecurrentRuleError(node, "unexpected arguments (expected 3 tensors)")
        tensors = ctx.inputs
        ig, hg, state = (tensors[pos[id(a)]] for a in args[:3])
        b_ih, b_hh = (tensors[pos[id(a)]] if isinstance(a, Value) else None for a in args[3:5])
        _refuse_params(ctx, [pos[id(a)] for a in args[3:5] if isinstance(a, Value)])
        lstm = node.packet == "_thnn_fused_lstm_cell"
        H = state.shape[-1]
        gi = ig + b_ih if b_ih is not None else ig
        gh = hg + b_hh if b_hh is not None else hg
        r_ig, r_hg, r_state = torch.zeros_like(ig), torch.zeros_like(hg), None
        rel = ctx.relevance
        stab = self.stabilizer
        if lstm:
            z = gi + gh
            i, f, g, o = (
                z[..., :H].sigmoid(),
                z[..., H : 2 * H].sigmoid(),
                z[..., 2 * H : 3 * H].tanh(),
                z[..., 3 * H :].sigmoid(),
            )
            cy = f * state + i * g
            hy = o * cy.tanh()
            _check(node, "lstm", [hy, cy], ctx.outputs[:2])
            r_c = _zero_or(rel[1], cy) + _zero_or(rel[0], hy)  # h = o * tanh(c): the gate o gets nothing
            r_state, r_g = _share([f * state, i * g], cy, r_c, stab)
            gs = slice(2 * H, 3 * H)
            # z_g = (x W_ig^T + b_ig) + (h W_hg^T + b_hg): the biases keep their shares
            s_z = r_g / stabilize(z[..., gs], stab)
            r_ig[..., gs], r_hg[..., gs] = ig[..., gs] * s_z, hg[..., gs] * s_z
        else:
            r, zt = (gi[..., :H] + gh[..., :H]).sigmoid(), (gi[..., H : 2 * H] + gh[..., H : 2 * H]).sigmoid()
            ns = slice(2 * H, 3 * H)
            a = gi[..., ns] + r * gh[..., ns]
            n = a.tanh()
            d = state - n
            hy = d * zt + n
            _check(node, "gru", [hy], ctx.outputs[:1])
            r_d, r_n = _share([d * zt, n], hy, _zero_or(rel[0], hy), stab)  # the gate z gets nothing
            r_state, r_nd = _share([state, -n], d, r_d, stab)
            r_gin, r_ghn = _share([gi[..., ns], r * gh[..., ns]], a, r_n + r_nd, stab)  # the gate r gets nothing
            r_ig[..., ns] = ig[..., ns] * r_gin / stabilize(gi[..., ns], stab)
            r_hg[..., ns] = hg[..., ns] * r_ghn / stabilize(gh[..., ns], stab)
        res: list = [None] * len(node.inputs)
        for a, t in zip(args[:3], (r_ig, r_hg, r_state)):
            res[pos[id(a)]] = t if res[pos[id(a)]] is None else res[pos[id(a)]] + t
        return [t if need else None for t, need in zip(res, ctx.needs)]


def _zero_or(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else torch.zeros_like(like)


def _check(node: Node, what: str, mine: Sequence[torch.Tensor | None], recorded: Sequence) -> None:
    """Refuse to explain a kernel whose recorded outputs the re-derived cell does not reproduce."""
    for k, (a, b) in enumerate(zip(mine, recorded)):
        if a is None or b is None:
            continue
        if not _close(a, b):
            diff = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
            raise RecurrentRuleError(
                node,
                f"the re-derived {what} cell does not reproduce the kernel's output {k} (max difference {diff:.3g}); "
                "relprop will not explain a different function",
            )


def _value_positions(node: Node) -> dict[int, int]:
    """``id(Value)`` -> its position in ``node.inputs`` (first occurrence), in argument order."""
    pos: dict[int, int] = {}
    k = 0

    def walk(a) -> None:
        nonlocal k
        if isinstance(a, Value):
            pos.setdefault(id(a), k)
            k += 1
        elif isinstance(a, (list, tuple)):
            for b in a:
                walk(b)

    for a in node.args:
        walk(a)
    for a in node.kwargs.values():
        walk(a)
    return pos


def _refuse_params(ctx: RuleContext, positions: Sequence[int]) -> None:
    if any(ctx.needs[p] for p in positions if p < len(ctx.needs)):
        raise RecurrentRuleError(ctx.node, "relevance of the recurrent weights (explain(params=...)) is not supported")


# --------------------------------------------------------------------------- the decomposed form


def _is_recurrent_module(node: Node) -> bool:
    return node.module_type is not None and issubclass(node.module_type, _RECURRENT_MODULES)


_VIEWS = {"view", "_unsafe_view", "alias", "clone", "contiguous", "expand", "reshape"}


def _source_op(v: Value, limit: int = 32) -> str | None:
    """The packet of the op whose result ``v`` reads, looking through views, copies and in-place writes.

    PyTorch's decomposed cells apply ``sigmoid_``/``tanh_`` to chunks of the gate tensor; the tape records
    that as ``as_strided_scatter`` writes into the flat storage and ``as_strided`` reads from it. A read
    whose geometry equals a write's is that write's source; a read that misses a write looks further
    back; a partial overlap answers ``None`` (unknown).
    """
    geom = None  # (size, stride, offset) of an as_strided read still to be resolved
    while limit > 0 and v.producer is not None:
        limit -= 1
        p = v.producer
        if geom is None:
            if p.packet == "as_strided" and p.inputs:
                geom = _geometry(p, 1)
                v = p.inputs[0]
                continue
            if p.packet in _VIEWS and p.inputs:
                v = p.inputs[0]
                continue
            return p.packet
        if p.packet == "as_strided_scatter" and len(p.inputs) == 2:
            w = _geometry(p, 2)
            if w == geom:
                v, geom = p.inputs[1], None
                continue
            if w is None or geom is None or _overlap(w, geom):
                return None
            v = p.inputs[0]
            continue
        return None
    return None


def _geometry(node: Node, first: int) -> tuple | None:
    size, stride = node.arg(first), node.arg(first + 1)
    offset = node.arg(first + 2) or 0
    if size is None or stride is None:
        return None
    return tuple(size), tuple(stride), int(offset)


def _overlap(a: tuple, b: tuple) -> bool:
    """Do two strided windows of one storage share an element? (Exact; gate chunks interleave by row.)"""
    (sa, sta, oa), (sb, stb, ob) = a, b
    if sa == sb and sta == stb and len(sa) == 2 and sta[1] == 1 and sta[0] >= sa[1] > 0 and sa[0] > 0:
        # same rows-of-columns window at two offsets (the gate chunks): overlap iff the offset difference
        # is k rows plus less than a row's width, for some |k| < number of rows
        delta, rows, cols, step = ob - oa, sa[0], sa[1], sta[0]
        k0 = delta // step
        return any(abs(k) < rows and abs(delta - k * step) < cols for k in (k0, k0 + 1))
    ia, ib = _indices(a), _indices(b)
    if ia is None or ib is None:
        return True
    return bool(torch.isin(ia, ib).any())


def _indices(g: tuple, limit: int = 1 << 24) -> torch.Tensor | None:
    size, stride, off = g
    n = 1
    for s in size:
        n *= s
    if n > limit:
        return None
    idx = torch.tensor([off], dtype=torch.long)
    for s, st in zip(size, stride):
        idx = (idx[:, None] + torch.arange(s, dtype=torch.long) * st).reshape(-1)
    return idx


def recurrent_gate_operands(
    graph: Graph, constant: dict[int, tuple[int, ...]] | None = None
) -> dict[int, tuple[int, ...]]:
    """Gates of the products inside recurrent modules: node index -> input positions held constant.

    In a ``mul`` recorded inside an ``nn.RNNBase``/``nn.RNNCellBase`` module, an activation operand that
    is a sigmoid output is a gate (Arras et al.): the product rule then passes all relevance to the
    other operand. A product of two gates keeps the product rule (no recurrent cell has one). The graph
    is not modified; ``constant`` is merged into the returned dict.
    """
    out = dict(constant or {})
    for node in graph.nodes:
        if node.packet != "mul" or not _is_recurrent_module(node):
            continue
        acts = node.activation_inputs()
        gates = [i for i in acts if _source_op(node.inputs[i]) == "sigmoid"]
        if not gates or len(gates) == len(acts) and len(acts) > 1:
            continue
        out[node.index] = tuple(sorted(set(out.get(node.index, ())) | set(gates)))
    return out


register_family("recurrent", "mkldnn_rnn_layer", "_cudnn_rnn", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell")
# Packing reorders rows (time-major, longest first) and unpacking pads them back: pure data movement,
# whose exact relevance routing is the VJP (the ``routing`` family's rule).
register_family("routing", "_pack_padded_sequence", "_pad_packed_sequence")
