"""LRP rules for ops that are linear in one activation operand: convolution, dense matmuls.

All rules here are instances of one pattern (Zennit's "basic hook" idea, at op level): evaluate the
op with modified inputs/parameters, divide the arriving relevance by a stabilised denominator,
take the op's vector-Jacobian product w.r.t. the activation operand, and multiply by the (modified)
input. The op is re-executed from the graph node, so any linear ATen op (``convolution``, ``mm``,
``addmm``, ``bmm`` against a weight, ``baddbmm``...) gets every rule without per-op code; the VJP
uses the shared backward kernels of :mod:`relprop.rules.vjps` where an op has one.

Definitions follow Zennit 0.5 (sign conventions, which parts of the bias are kept), so numbers
agree with it wherever the same rule is applied to the same layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..canonical import merged_scale
from ..graph import Node, Value
from .base import HALF, RuleContext, register_family, to_float32, vjp
from .vjps import input_index

ParamMod = Callable[[torch.Tensor], torch.Tensor] | None


def _asked(grads: Sequence[torch.Tensor | None], i: int) -> torch.Tensor:
    """``grads[i]`` for a float input the VJP was asked for: always a tensor (``None`` is an internal error)."""
    g = grads[i]
    if g is None:
        raise RuntimeError(f"internal: the VJP returned no gradient for input {i} it was asked for")
    return g


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Denominator ``z + eps * sign(z)`` with sign(0) = +1 (Zennit's convention).

    ``eps = 0`` (LRP-0, AttnLRP's products and sums): where ``|z|`` is below the smallest normal number
    (an output that is exactly 0, or subnormal) the denominator is infinite, so ``R / z`` is 0 there:
    an output of 0 has no contributions to split, and whatever relevance arrives at it is absorbed (as
    a positive epsilon would absorb it). Dividing by ``finfo.tiny`` instead, as before, overflowed to
    inf wherever relevance arrived at a zero output (Flat puts relevance on every input, zeros too), and
    ``inf * 0`` in the VJP (a zero factor of a product) gave NaN, which no epsilon option could fix.

    Half precision (bfloat16/float16 models): the denominator is made in float32, so ``R / stab(z)`` and
    everything after it is float32 (relevance stays float32 through the pass, see :func:`.base.vjp`): a
    stabiliser of 1e-6 is below float16's normal range, and float16's quotients overflow at 65504.
    """
    if z.dtype in HALF:
        z = z.float()
    if eps == 0:
        d = z.abs()
        inf = torch.full((), float("inf"), dtype=z.dtype, device=z.device)
        if z.requires_grad:
            return torch.where(d < torch.finfo(z.dtype).tiny, inf, z)
        # Written into the temporary ``|z|`` (equal bits to ``z.masked_fill(|z| < tiny, inf)``, one temporary fewer).
        return torch.where(d < torch.finfo(z.dtype).tiny, inf, z, out=d)
    return torch.full_like(z, eps).copysign_(z).add_(z)


def ratio(rel: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """``rel / stabilize(z, eps)``, a new tensor; the quotient is written into the (new) denominator.

    The same division as ``rel / stabilize(z, eps)`` (equal bits), one temporary the size of the output
    fewer: on CPU a fresh large tensor costs page faults on top of the pass over it.
    """
    if (
        eps == 0
        and z.dtype not in HALF
        and rel.shape == z.shape
        and torch.result_type(rel, z) == z.dtype
        and not (rel.requires_grad or z.requires_grad)
    ):
        # LRP-0 (AttnLRP's products and sums): R / where(|z| < tiny, inf, z) is where(|z| < tiny, R * 0, R / z)
        # (R / inf and R * 0 are the same IEEE result): divide first, then patch those outputs in place.
        # Always patched, never "if any": that test reads a value back into Python, a host sync per layer
        # on a GPU (tests/test_gpu.py counts them).
        q = z.abs()
        small = q < torch.finfo(z.dtype).tiny
        torch.div(rel, z, out=q)
        return torch.where(small, rel * 0.0, q, out=q)
    d = stabilize(z, eps)
    if writable(d, rel, d):
        return torch.div(rel, d, out=d)
    return rel / d


def writable(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """May ``a op b`` (element-wise) be written into ``out`` (a new tensor of ours that is ``a`` or ``b``)?

    The other operand broadcasts to ``out``'s shape, the promoted dtype is ``out``'s, ``out`` is not a view,
    no autograd: then the in-place op computes the same values as the out-of-place one.
    """
    other = b if out is a else a
    return (
        (other.shape == out.shape or _broadcasts_to(other.shape, out.shape))
        and torch.result_type(a, b) == out.dtype
        and out._base is None
        and not (a.requires_grad or b.requires_grad)
    )


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    return len(shape) <= len(target) and all(d == 1 or d == t for d, t in zip(reversed(shape), reversed(target)))


def times(x: torch.Tensor, g: torch.Tensor, owned: bool) -> torch.Tensor:
    """``x * g``; written into ``g`` when ``owned`` (``g`` is a new tensor nothing else holds) allows it.

    Equal bits to ``x * g`` (IEEE products commute); one temporary fewer.
    """
    if owned and g is not x and writable(g, x, g) and g.data_ptr() != x.data_ptr():
        return g.mul_(x)
    return x * g


def contributions(ctx: RuleContext, acts: Sequence[int], eps: float) -> dict[int, torch.Tensor]:
    """``x_i * J_i^T (R / stab(z))`` for each activation operand ``i``: each operand's epsilon-LRP share.

    The parameter-free z-rule shared by sums (proportional split) and products (uniform split).
    """
    s = ratio(ctx.rel, ctx.out, eps)
    grads = vjp(ctx.node, [s], None, acts)
    # The quotient and what the VJP makes of it are ours: the last share may be written into its gradient
    # (a sum's VJP hands ``s`` itself to every operand, so not before the other shares are computed).
    last = acts[-1] if acts else None
    return {a: times(ctx.inputs[a], _asked(grads, a), owned=a == last) for a in acts}


_BIAS_ARG = {"convolution": 2, "addmm": 0, "baddbmm": 0, "addmv": 0, "_convolution": 2}


@dataclass
class LinearOperands:
    """Which inputs of a linear node are the activation, the parameters and the bias."""

    act: int
    params: list[int]
    bias: int | None

    @staticmethod
    def of(ctx: RuleContext) -> LinearOperands:
        node = ctx.node
        acts = ctx.activation_inputs()
        if len(acts) != 1:
            raise ValueError(f"{node!r} is not linear in exactly one activation operand")
        a = acts[0]
        params = [i for i, v in enumerate(node.inputs) if i != a and v.is_float]
        b = _BIAS_ARG.get(node.packet)
        bias = input_index(node, b) if b is not None else None
        return LinearOperands(a, params, bias)


def _mod_tensors(
    ctx: RuleContext,
    ops: LinearOperands,
    x: torch.Tensor,
    pmod: ParamMod,
    no_bias: bool,
) -> list[torch.Tensor]:
    tensors = list(ctx.inputs)
    tensors[ops.act] = x
    if any(isinstance(t, torch.Tensor) and t.dtype in HALF for t in tensors):
        # Half-precision model: modified weights and the forwards and VJPs on them in float32, like the
        # division they feed (the modified weights p + gamma * p+ are not rounded to half precision).
        tensors = [to_float32(t) for t in tensors]
    memo = ctx.memo
    for p in ops.params:
        t = tensors[p]
        if no_bias and p == ops.bias:
            t = torch.zeros_like(t)
        elif pmod is not None:
            # A rule evaluates the same modified weights in its forward and its VJP: modify once per node.
            key = (p, pmod)
            hit = memo.get(key)
            if hit is None:
                hit = memo[key] = pmod(t)
            t = hit
        tensors[p] = t
    return tensors


def forward(
    ctx: RuleContext, ops: LinearOperands, x: torch.Tensor, pmod: ParamMod = None, no_bias: bool = False
) -> torch.Tensor:
    """The op's first output for a modified activation ``x`` and parameters ``pmod(param)``."""
    with torch.no_grad():
        out = ctx.node.run(_mod_tensors(ctx, ops, x, pmod, no_bias))
    return out[0] if isinstance(out, (tuple, list)) else out


def input_vjp(ctx: RuleContext, ops: LinearOperands, s: torch.Tensor, pmod: ParamMod = None) -> torch.Tensor:
    """``J_x^T s`` for the op with parameters ``pmod(param)`` (independent of the bias).

    Goes through the shared :func:`vjp`, so convolutions and matmuls get their direct backward
    kernels (:mod:`relprop.rules.vjps`) on the modified weights too.
    """
    tensors = _mod_tensors(ctx, ops, ctx.inputs[ops.act], pmod, False)
    return _asked(vjp(ctx.node, [s], tensors, [ops.act]), ops.act)


def _placeholder(v: Value) -> torch.Tensor:
    """Stand-in for an input a VJP does not read (a merged bias): zeros of its shape, without computing it."""
    if v.data is not None:
        return v.data
    return torch.zeros(v.shape if v.shape is not None else (), dtype=v.dtype, device=v.device)


def _pos(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=0)


def _neg(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(max=0)


class Epsilon:
    """LRP-epsilon: ``R_x = x * J^T (R / (z + eps sign z))``; ``epsilon=0`` is LRP-0."""

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def __call__(self, ctx: RuleContext) -> list:
        ops = LinearOperands.of(ctx)
        node = ctx.node
        x = node.inputs[ops.act].tensor
        s = ratio(ctx.rel, ctx.out, self.epsilon)
        # Parameters only: an activation held constant (CP-LRP's attention weights in eager attention)
        # must get no relevance, or some leaks into the softmax and q, k.
        wanted = [p for p in ops.params if ctx.needs[p] and p != ops.bias and not node.inputs[p].is_activation]
        merged = merged_scale(node) if not wanted and x.dtype not in HALF else None
        if merged is not None:
            # A batch norm merged into this op: J^T s with the merged weight W * scale is J_W^T (scale * s)
            # with the model's W, so the merged weight is never built (tests/test_lrp_fast.py: equal to it).
            s = times(merged.scale, s, owned=True)
            tensors = [_placeholder(v) for v in node.inputs]
            tensors[ops.act], tensors[merged.weight_pos] = x, merged.weight.tensor
            g = _asked(vjp(node, [s], tensors, [ops.act]), ops.act)
            return _only(ctx, ops, times(x, g, owned=g is not s))
        g = input_vjp(ctx, ops, s)
        res = _only(ctx, ops, times(x, g, owned=g is not s))
        if wanted:  # weight relevance R_w = w * dz/dw^T s, asked for with explain(..., params=...)
            grads = vjp(ctx.node, [s], None, wanted)
            for p in wanted:
                res[p] = ctx.inputs[p] * _asked(grads, p)
        return res

    def __repr__(self) -> str:
        return f"Epsilon(epsilon={self.epsilon})"


class Gamma:
    """Generalised LRP-gamma (Zennit's): favours positive contributions for positive outputs."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6):
        self.gamma, self.stabilizer = gamma, stabilizer

    def __call__(self, ctx: RuleContext) -> list:
        ops = LinearOperands.of(ctx)
        g = self.gamma
        gp = lambda p: p + g * p.clamp(min=0)  # noqa: E731
        gn = lambda p: p + g * p.clamp(max=0)  # noqa: E731
        x = ctx.inputs[ops.act]
        xp, xn = _pos(x), _neg(x)
        z = ctx.out
        z_pos = forward(ctx, ops, xp, gp) + forward(ctx, ops, xn, gn, no_bias=True)
        z_neg = forward(ctx, ops, xp, gn) + forward(ctx, ops, xn, gp, no_bias=True)
        s_pos = (z > 0) * ctx.rel / stabilize(z_pos, self.stabilizer)
        s_neg = (z < 0) * ctx.rel / stabilize(z_neg, self.stabilizer)
        r = (
            xp * input_vjp(ctx, ops, s_pos, gp)
            + xn * input_vjp(ctx, ops, s_pos, gn)
            + xp * input_vjp(ctx, ops, s_neg, gn)
            + xn * input_vjp(ctx, ops, s_neg, gp)
        )
        return _only(ctx, ops, r)

    def __repr__(self) -> str:
        return f"Gamma(gamma={self.gamma})"


class AlphaBeta:
    """LRP-alpha-beta; ``AlphaBeta(1, 0)`` is z-plus (generalised to negative inputs, as Zennit)."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-12:
            raise ValueError(f"alpha-beta rule needs alpha, beta >= 0 and alpha - beta = 1, got {alpha}, {beta}")
        self.alpha, self.beta, self.stabilizer = alpha, beta, stabilizer

    def __call__(self, ctx: RuleContext) -> list:
        ops = LinearOperands.of(ctx)
        x = ctx.inputs[ops.act]
        # After a ReLU the input has no negative part: skip its terms (they are exactly zero) and the copy.
        # On an accelerator the check would be a host sync per layer: the terms are computed (zero there) instead.
        has_neg = x.device.type != "cpu" or bool((x < 0).any())
        xp, xn = (_pos(x), _neg(x)) if has_neg else (x, None)
        z_pos = forward(ctx, ops, xp, _pos)
        if xn is not None:
            z_pos = z_pos + forward(ctx, ops, xn, _neg, no_bias=True)
        s = ctx.rel / stabilize(z_pos, self.stabilizer)
        r = xp * input_vjp(ctx, ops, s, _pos)
        if xn is not None:
            r = r + xn * input_vjp(ctx, ops, s, _neg)
        if self.alpha != 1:
            r = self.alpha * r
        if self.beta:
            z_neg = forward(ctx, ops, xp, _neg)
            if xn is not None:
                z_neg = z_neg + forward(ctx, ops, xn, _pos, no_bias=True)
            s = ctx.rel / stabilize(z_neg, self.stabilizer)
            rn = xp * input_vjp(ctx, ops, s, _neg)
            if xn is not None:
                rn = rn + xn * input_vjp(ctx, ops, s, _pos)
            r = r - self.beta * rn
        return _only(ctx, ops, r)

    def __repr__(self) -> str:
        return f"AlphaBeta(alpha={self.alpha}, beta={self.beta})"


class ZPlus(AlphaBeta):
    """LRP-z+ (alpha=1, beta=0)."""

    def __init__(self, stabilizer: float = 1e-6):
        super().__init__(1.0, 0.0, stabilizer)

    def __repr__(self) -> str:
        return "ZPlus()"


class ZBox:
    """LRP-z^B for input layers with values bounded in ``[low, high]`` (scalars or broadcastable)."""

    def __init__(self, low: float | torch.Tensor, high: float | torch.Tensor, stabilizer: float = 1e-6):
        self.low, self.high, self.stabilizer = low, high, stabilizer

    def __call__(self, ctx: RuleContext) -> list:
        ops = LinearOperands.of(ctx)
        x = ctx.inputs[ops.act]
        low = torch.as_tensor(self.low, dtype=x.dtype, device=x.device).expand_as(x)
        high = torch.as_tensor(self.high, dtype=x.dtype, device=x.device).expand_as(x)
        z = forward(ctx, ops, x) - forward(ctx, ops, low, _pos) - forward(ctx, ops, high, _neg)
        s = ctx.rel / stabilize(z, self.stabilizer)
        r = x * input_vjp(ctx, ops, s) - low * input_vjp(ctx, ops, s, _pos) - high * input_vjp(ctx, ops, s, _neg)
        return _only(ctx, ops, r)

    def __repr__(self) -> str:
        return f"ZBox(low={self.low}, high={self.high})"


class WSquare:
    """LRP-w^2: relevance spread by squared weights, independent of the input values."""

    flat = False

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = stabilizer

    def __call__(self, ctx: RuleContext) -> list:
        ops = LinearOperands.of(ctx)
        x = ctx.inputs[ops.act]
        pmod: Callable[[torch.Tensor], torch.Tensor]
        if self.flat:
            pmod, no_bias = torch.ones_like, True
        else:
            pmod, no_bias = (lambda p: p * p), False
        ones = torch.ones_like(x)
        z = forward(ctx, ops, ones, pmod, no_bias=no_bias)
        s = ctx.rel / stabilize(z, self.stabilizer)
        return _only(ctx, ops, input_vjp(ctx, ops, s, pmod))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Flat(WSquare):
    """LRP-flat: relevance spread uniformly over each output's receptive field."""

    flat = True


def _only(ctx: RuleContext, ops: LinearOperands, r: torch.Tensor) -> list:
    res: list = [None] * len(ctx.node.inputs)
    res[ops.act] = r
    return res


def _dense_or_product(node: Node, constant_operands: tuple[int, ...] = ()) -> str:
    """A matmul against a weight is 'dense'; a product of two activations (attention) is 'product'.

    An activation operand the rule set holds constant (CP-LRP's attention weights) counts as a weight.
    """
    acts = [i for i in node.activation_inputs() if i not in constant_operands]
    return "product" if len(acts) >= 2 else "dense"


register_family("conv", "convolution", "_convolution", "convolution_overrideable", "mkldnn_convolution")
register_family(
    _dense_or_product,
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "matmul",
    "addmv",
    "mv",
    "linear",
    "dot",
    "_addmm_activation",
    "addbmm",
    "einsum",
    "vdot",
    "tensordot",
    "outer",
    "ger",
)


__all__: Sequence[str] = [
    "Epsilon",
    "Gamma",
    "AlphaBeta",
    "ZPlus",
    "ZBox",
    "WSquare",
    "Flat",
    "stabilize",
    "LinearOperands",
    "forward",
    "input_vjp",
]
