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

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..canonical import merged_scale
from ..graph import Node, Value
from . import base
from .base import HALF, RuleContext, register_family, storage_ptr, to_float32, vjp
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
        if z.requires_grad:
            return torch.where(d < torch.finfo(z.dtype).tiny, _inf(z), z)
        return _absorbing(z, d)
    if z.requires_grad:
        return torch.full_like(z, eps).copysign_(z).add_(z)
    # ``copysign(eps, z) + z`` written straight into a tensor laid out as ``full_like(z)`` (equal bits: copysign
    # is exact), without first filling it with eps: one pass over the output fewer; float32/float64 take the sign
    # with integer ops (_eps_bits).
    d = torch.empty_like(z)
    bits = _eps_bits(eps, z.dtype)
    if bits is None:
        torch.copysign(_eps(eps, z), z, out=d)
    else:
        _signed_eps(z.view(bits[0]), d.view(bits[0]), bits)
    return d.add_(z)


def _absorbing(z: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The LRP-0 denominator of ``z`` written into ``d = |z|`` (a new tensor of ours): ``inf`` where ``|z| < tiny``,
    else ``z`` (equal bits to ``z.masked_fill(|z| < tiny, inf)``, one temporary fewer)."""
    return torch.where(d < torch.finfo(z.dtype).tiny, _inf(z), z, out=d)


def _inf(z: torch.Tensor) -> torch.Tensor:
    return torch.full((), float("inf"), dtype=z.dtype, device=z.device)


def _all_normal(a: torch.Tensor) -> bool:
    """Is every element of ``a`` (absolute values) at least the smallest normal number (False for NaN or none)?

    One reduction, read back: CPU callers only (on a GPU it would be a host sync per call)."""
    return a.numel() > 0 and bool(a.amin() >= torch.finfo(a.dtype).tiny)


def _all_normal_by_chunks(z: torch.Tensor) -> bool:
    """:func:`_all_normal` of ``|z|`` for a dense CPU tensor ``z``, without an output-sized temporary: ``|z|`` is
    taken a chunk at a time into a cache-sized buffer (exact: the minimum of the chunks' minima is the whole's)."""
    n = z.numel()
    if n == 0:
        return False
    flat = z.as_strided((n,), (1,))  # every element once (the caller checked the layout is dense)
    buf = torch.empty(min(n, CHUNK), dtype=z.dtype, device=z.device)
    for start in range(0, n, CHUNK):
        b = buf[: min(CHUNK, n - start)]
        if not _all_normal(torch.abs(flat[start : start + CHUNK], out=b)):
            return False
    return True


def _eps(eps: float, z: torch.Tensor) -> torch.Tensor:
    """``eps`` as a 0-dim tensor of ``z``'s dtype (rounded as ``full_like(z, eps)`` rounds it)."""
    return torch.full((), eps, dtype=z.dtype, device=z.device)


#: float dtype -> (the integer dtype of its size, its sign bit as that integer, ``struct`` formats: float, integer).
_INT_VIEW = {torch.float32: (torch.int32, -(2**31), "<f", "<i"), torch.float64: (torch.int64, -(2**63), "<d", "<q")}


@lru_cache(maxsize=64)
def _eps_bits(eps: float, dtype: torch.dtype) -> tuple[torch.dtype, int, int] | None:
    """For float32/float64: ``(integer dtype, sign mask, bits of |eps|)`` for :func:`_signed_eps`, else None.

    Why: ``copysign(eps, z)`` with a 0-dim ``eps`` runs at about half an add's speed on CPU (the largest item of
    ResNet-50's epsilon pass after the convolutions); two integer ops give the same bits in less time
    (``stabilize`` of a 4x256x40x40 float32 ``z``, 1 thread: 0.58 ms against 0.65, medians). Not per chunk in
    :func:`_stabilize_into`, where one op more per 32Ki elements cost more than it saved (1.4 ms against 1.1).
    ``eps`` is rounded to ``dtype`` as :func:`_eps` rounds it (C's double -> float cast), on the host: no
    tensor, no device read. None (callers keep copysign) for other dtypes or an ``eps`` out of ``dtype``'s
    range. Equal bits: ``tests/test_stabilize_bits.py``.
    """
    spec = _INT_VIEW.get(dtype)
    if spec is None:
        return None
    int_dtype, mask, ffmt, ifmt = spec
    try:
        packed = struct.pack(ffmt, eps)
    except (OverflowError, TypeError, struct.error):
        return None
    return int_dtype, mask, struct.unpack(ifmt, packed)[0] & ~mask


def _signed_eps(zi: torch.Tensor, out: torch.Tensor, bits: tuple[torch.dtype, int, int]) -> None:
    """``out = copysign(eps, z)`` on integer views (``zi = z.view(int)``, ``out`` an int view of the result):
    ``z``'s sign bit (NaN's and -0's too, as copysign takes it) or'ed with the bits of ``|eps|``: equal bits."""
    torch.bitwise_and(zi, bits[1], out=out)
    out.bitwise_or_(bits[2])


#: Elements per chunk of :func:`_stabilize_into` (128 KiB of float32: the scratch stays in cache). At most ATen's
#: parallel grain size (32768): each chunk's op then runs on the calling thread, with no thread-pool barrier per
#: chunk (at 2 threads on a loaded machine, 64Ki-element chunks took 80x the CPU time in waits).
CHUNK = 1 << 15


def _stabilize_into(z: torch.Tensor, eps: float) -> bool:
    """``z += copysign(eps, z)`` in place, ``z`` a dense CPU tensor of ours; False (nothing done) where not possible.

    The same values as :func:`stabilize` (``z + e`` = ``e + z``), through a cache-sized scratch buffer reused chunk
    after chunk instead of a new tensor the size of ``z``.
    """
    if eps == 0 or not _dense_own(z):
        return False
    n = z.numel()
    flat = z.as_strided((n,), (1,))  # every element once: the op is element-wise, the order is immaterial
    e = _eps(eps, z)
    buf = torch.empty(min(n, CHUNK), dtype=z.dtype, device=z.device)
    for start in range(0, n, CHUNK):
        part = flat[start : start + CHUNK]
        b = buf[: part.numel()]
        torch.copysign(e, part, out=b)  # (not _signed_eps: its extra op and views per chunk cost more than it saves)
        part.add_(b)
    return True


#: Ops whose VJP (:mod:`.vjps`, or autograd re-running the op on its inputs) never reads the op's recorded output:
#: only their rules may turn the output into scratch memory (``relu``'s VJP, for one, reads its output).
_OUTPUT_UNREAD = frozenset(
    {"add", "add_", "sub", "sub_", "mul", "mul_", "convolution", "_convolution", "mm", "addmm", "bmm", "baddbmm"}
)


def scratch_out(ctx: RuleContext) -> bool:
    """May the rule write into ``ctx.out`` (:meth:`~relprop.rules.base.RuleContext.out_is_scratch`, for an op whose
    VJP never reads its output)?"""
    return ctx.node.packet in _OUTPUT_UNREAD and ctx.out_is_scratch()


def ratio(rel: torch.Tensor, z: torch.Tensor, eps: float, scratch: bool = False) -> torch.Tensor:
    """``rel / stabilize(z, eps)``, a new tensor; the quotient is written into the (new) denominator.

    The same division as ``rel / stabilize(z, eps)`` (equal bits), one temporary the size of the output
    fewer: on CPU a fresh large tensor costs page faults on top of the pass over it. ``scratch``: ``z`` is
    the rule's to overwrite (a released output, :meth:`~relprop.rules.base.RuleContext.out_is_scratch`, or a
    new output the rule computed); then the denominator and the quotient are made in ``z`` itself (equal bits,
    no new output-sized tensor).
    """
    if eps == 0 and base.cheap_read(z) and not (z.requires_grad or rel.requires_grad):
        return _ratio0(rel, z, scratch)
    if scratch and writable(z, rel, z) and _stabilize_into(z, eps):
        return torch.div(rel, z, out=z)
    d = stabilize(z, eps)
    if writable(d, rel, d):
        return torch.div(rel, d, out=d)
    return rel / d


def _ratio0(rel: torch.Tensor, z: torch.Tensor, scratch: bool) -> torch.Tensor:
    """:func:`ratio` for ``eps = 0`` on CPU without autograd: ``rel / z`` itself where no ``|z|`` is below the
    smallest normal number (the usual case), found with one reduction instead of the boolean mask and the
    ``where`` of :func:`stabilize` (about 4x the cost of the division on CPU).

    Equal bits to ``rel / stabilize(z, 0)``: the stabilised denominator is ``z`` itself, bit for bit, wherever
    ``|z| >= tiny`` (inf included; a NaN anywhere takes the general path), so the quotient is the same division
    of the same numbers, written into the same memory (``|z|``'s new tensor, or ``z`` when it is scratch). The
    quotient is never written into ``z`` otherwise: ``z`` is a recorded (or held) output.
    """
    if scratch and z.dtype not in HALF and writable(z, rel, z) and _dense_own(z) and _all_normal_by_chunks(z):
        return torch.div(rel, z, out=z)
    if z.dtype in HALF:
        z = z.float()
    d = z.abs()  # the denominator's memory, as in stabilize
    if writable(d, rel, d):
        if _all_normal(d):
            return torch.div(rel, z, out=d)
        return torch.div(rel, _absorbing(z, d), out=d)
    return rel / _absorbing(z, d)


def _dense_own(z: torch.Tensor) -> bool:
    """A dense (contiguous or channels-last) CPU float32/float64 tensor, no view, no autograd: one whose elements
    may be visited as one flat array (``as_strided((n,), (1,))``) and written in place."""
    return (
        z.dtype not in HALF
        and z.device.type == "cpu"
        and not z.requires_grad
        and z._base is None
        and (z.is_contiguous() or z.is_contiguous(memory_format=torch.channels_last))
    )


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
    s = ratio(ctx.rel, ctx.out, eps, scratch_out(ctx))
    grads = vjp(ctx.node, [s], None, acts)
    # The quotient and what the VJP makes of it are ours: the last share may be written into its gradient
    # (a sum's VJP hands ``s`` itself to every operand, so not before the other shares are computed).
    last = acts[-1] if acts else None
    # Each share is a new tensor of its own: the last one written into its gradient, another into the relevance that
    # arrived where the pass hands it over (read by now) or into its own gradient where that is a new tensor no other
    # share reads (a product's VJP), the rest new products.
    spare = ctx.spare_relevance()
    inputs = ctx.inputs
    res = {}
    for a in acts:
        x, g = inputs[a], _asked(grads, a)
        if a != last and spare is not None and _fits(spare, x, g):
            res[a] = torch.mul(x, g, out=spare)
            spare = None
        elif a != last and _own_gradient(g, x, [s, *(grads[b] for b in acts if b != a), *(inputs[b] for b in acts)]):
            res[a] = g.mul_(x)
        else:
            res[a] = times(x, g, owned=a == last)
        ctx.own(res[a])
    return res


def _own_gradient(g: torch.Tensor, x: torch.Tensor, others: Sequence[torch.Tensor | None]) -> bool:
    """May ``x * g`` be written into ``g``: ``g`` has the shape, dtype and strides ``x * g`` would have (those of
    ``x``, dense), is no view, no autograd, and shares memory with none of ``others`` (the quotient, the other
    operands' gradients and the inputs, still to be read). Then ``g.mul_(x)`` has the new product's bits and layout."""
    p = _product_memory(g, x, g) if g.is_contiguous() else None
    return p is not None and all(t is None or storage_ptr(t) != p for t in others)


def _fits(out: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> bool:
    """May ``x * g`` be written into ``out``: the shape, dtype and strides ``x * g`` would have, no view, memory of
    its own, no autograd (then the product into ``out`` has the new tensor's bits and layout)."""
    p = _product_memory(out, x, g)
    return p is not None and p not in (storage_ptr(x), storage_ptr(g))


def _product_memory(out: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> int | None:
    """The address of ``out``'s memory if ``x * g`` may be written there as far as layout goes (the shape, dtype
    and strides ``x * g`` would have, no view, no autograd), else None; callers add what must not share it."""
    if not (
        out.shape == x.shape == g.shape
        and out.dtype == x.dtype == g.dtype
        and out.stride() == x.stride() == g.stride()
        and out._base is None
        and not (x.requires_grad or g.requires_grad or out.requires_grad)
    ):
        return None
    return storage_ptr(out)


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


#: Rules that modify a conv/dense op's weights (z+, alpha-beta, gamma, flat, w^2) build the modified copies one
#: block of output channels at a time, each no larger than the op's input or output or this many bytes: on
#: ResNet-50's last stage the weights are ten times the activations, and a whole modified copy (plus the
#: merged weight it was made from, plus the kernel's own reordered copy) set the peak memory of the pass.
#: (4 MiB: ResNet-50 at batch 4, 160 px peaks at 1.09x a gradient's memory; 1 MiB: 1.07x, about 5% slower.)
MIN_BLOCK_BYTES = 4 << 20


class _Params:
    """A conv/dense node's parameters as the linear rules read them, whole or by blocks of output channels.

    * Half-precision model: everything in float32 (modified weights ``p + gamma * p+`` are not rounded to
      half precision, and the forwards and VJPs on them run in float32, like the division they feed).
    * A merged batch norm whose merged weight was not built (:func:`.canonical.merged_scale`): the merged
      weight is computed from the model's weight block by block, with the merge's own arithmetic (equal bits),
      and never kept whole next to its modified copy; the merged bias is computed without the weight.
    * Blocks (:meth:`blocks`) exist for ``convolution`` (not transposed, one group) and ``mm``/``addmm``
      against a 2-D weight, whose output channels are independent slices of the weight and the bias.
    """

    def __init__(self, node: Node, ops: LinearOperands) -> None:
        # (no reference to the RuleContext: this object lives in its memo, and a cycle would keep every
        # modified weight alive until the garbage collector ran)
        self.ops, self.node = ops, node
        self.merged = merged_scale(node)
        self.half = any(v.dtype in HALF for v in node.inputs if v.is_float)
        self.layout = _block_layout(node, ops)
        self._bias: torch.Tensor | None = None

    def param(self, p: int) -> torch.Tensor:
        """Parameter input ``p``, unmodified and whole (float32 under half precision)."""
        m = self.merged
        if m is not None and p == m.weight_pos:
            t = m.merged_weight()
        elif m is not None and p == m.bias_pos:
            if self._bias is None:
                self._bias = m.merged_bias()
            t = self._bias
        else:
            t = self.node.inputs[p].tensor
        return to_float32(t) if self.half else t

    def block(self, p: int, start: int, length: int) -> torch.Tensor:
        """Output channels ``start:start + length`` of the weight or the bias (``p``), unmodified."""
        m = self.merged
        w_pos, w_dim = self.layout if self.layout is not None else (-1, 0)
        if m is not None and p == m.weight_pos:
            t = m.merged_weight(start, length)
        elif p == w_pos:
            t = self.node.inputs[p].tensor.narrow(w_dim, start, length)
        else:  # the bias (1-D)
            t = self.param(p).narrow(0, start, length)
        return to_float32(t) if self.half else t

    def blocks(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """``(start, length)`` of output-channel blocks whose weights take at most ``max(|x|, |out|, MIN_BLOCK_BYTES)``."""
        out = self.node.outputs[0]
        if self.layout is None or out is None or out.shape is None:
            return []
        w_pos, w_dim = self.layout
        shape = self.node.inputs[w_pos].shape
        if shape is None:
            return []
        channels = shape[w_dim]
        size = 4 if self.half else x.element_size()
        budget = max(x.numel() * size, out.shape.numel() * size, MIN_BLOCK_BYTES)
        n = -(-shape.numel() * size // budget)  # blocks needed
        if n <= 1 or channels < 2:
            return []
        step = -(-channels // min(n, channels))
        return [(c, min(step, channels - c)) for c in range(0, channels, step)]

    def tensors(
        self, x: torch.Tensor, pmod: ParamMod, no_bias: bool, memo: dict, block: tuple[int, int] | None = None
    ) -> list[torch.Tensor]:
        """The node's inputs with activation ``x`` and parameters ``pmod(param)`` (all output channels or a block).

        ``memo`` holds the modified parameters, so a rule's forward and its VJP modify each once.
        """
        node, ops = self.node, self.ops
        tensors: list = [None] * len(node.inputs)
        for i, v in enumerate(node.inputs):
            if i == ops.act:
                tensors[i] = to_float32(x) if self.half else x
            elif i not in ops.params:
                tensors[i] = to_float32(v.tensor) if self.half else v.tensor
            elif no_bias and i == ops.bias:
                shape = v.shape if block is None or v.shape is None else (block[1],)
                dtype = torch.float32 if self.half else v.dtype
                tensors[i] = torch.zeros(shape if shape is not None else (), dtype=dtype, device=v.device)
            else:
                key = (i, pmod)
                t = memo.get(key)
                if t is None:
                    t = self.param(i) if block is None else self.block(i, *block)
                    if pmod is not None:
                        # a merged weight (block) is a new tensor of ours: clamped in place (equal bits)
                        own = self.merged is not None and i == self.merged.weight_pos
                        t = _IN_PLACE[pmod](t) if own and pmod in _IN_PLACE else pmod(t)
                    memo[key] = t
                tensors[i] = t
        return tensors


def _block_layout(node: Node, ops: LinearOperands) -> tuple[int, int] | None:
    """``(weight input, its output-channel dim)`` where blocks of output channels are independent, else None."""
    p = node.packet
    if p == "convolution":
        if len(node.args) != 9 or node.args[6] or node.args[8] != 1 or node.kwargs:
            return None
        w = input_index(node, 1)
        b = input_index(node, 2)
        if w is None or w == ops.act or set(ops.params) - {w, b}:
            return None
        return w, 0
    if p in ("mm", "addmm") and not node.kwargs and len(node.args) == (2 if p == "mm" else 3):
        w, a = (1, 0) if p == "mm" else (2, 1)
        wi, ai = input_index(node, w), input_index(node, a)
        bi = input_index(node, 0) if p == "addmm" else None
        if wi is None or ai != ops.act or set(ops.params) - {wi, bi}:
            return None
        ws = node.inputs[wi].shape
        bs = node.inputs[bi].shape if bi is not None else None
        if ws is None or len(ws) != 2 or (bi is not None and (bs is None or tuple(bs) != (ws[1],))):
            return None
        return wi, 1
    return None


def _params(ctx: RuleContext, ops: LinearOperands) -> _Params:
    hit = ctx.memo.get(_Params)
    if hit is None:
        hit = ctx.memo[_Params] = _Params(ctx.node, ops)
    return hit


def forward(
    ctx: RuleContext, ops: LinearOperands, x: torch.Tensor, pmod: ParamMod = None, no_bias: bool = False
) -> torch.Tensor:
    """The op's first output for a modified activation ``x`` and parameters ``pmod(param)``."""
    with torch.no_grad():
        out = ctx.node.run(_params(ctx, ops).tensors(x, pmod, no_bias, ctx.memo))
    return out[0] if isinstance(out, (tuple, list)) else out


def input_vjp(ctx: RuleContext, ops: LinearOperands, s: torch.Tensor, pmod: ParamMod = None) -> torch.Tensor:
    """``J_x^T s`` for the op with parameters ``pmod(param)`` (independent of the bias).

    Goes through the shared :func:`vjp`, so convolutions and matmuls get their direct backward
    kernels (:mod:`relprop.rules.vjps`) on the modified weights too.
    """
    tensors = _params(ctx, ops).tensors(ctx.node.inputs[ops.act].tensor, pmod, False, ctx.memo)
    return _asked(vjp(ctx.node, [s], tensors, [ops.act]), ops.act)


#: One term of a modified linear op: ``(activation, parameter modifier, drop the bias)``.
Term = tuple[torch.Tensor, ParamMod, bool]


def shares(
    ctx: RuleContext, ops: LinearOperands, groups: Sequence[tuple[torch.Tensor, Sequence[Term]]], stabilizer: float
) -> list[list[torch.Tensor]]:
    """For each group ``(rel, terms)``: ``J_i^T (rel / stabilize(sum_i op(x_i; p_i)))`` for each term ``i``.

    Each returned tensor is new and the caller's (it may write into it, e.g. with :func:`times`).

    The pattern of every rule that modifies weights: z+ and alpha-beta (terms for the positive and negative
    inputs), gamma (two groups), flat and w^2 (one term). Where the weights are larger than the activations
    (:meth:`_Params.blocks`) the modified weights are made, used and dropped one block of output channels at
    a time: the blocks' outputs are independent, and the VJPs of the blocks add up to the whole one
    (``tests/test_lrp_blocks.py``: equal to the whole computation to rounding, float64 1e-12). Otherwise the
    whole op, with the same operations as before blocks existed (equal bits).
    """
    params = _params(ctx, ops)
    blocks = params.blocks(groups[0][1][0][0]) if groups and groups[0][1] else []
    res: list[list[torch.Tensor]] = []
    if not blocks:
        for rel, terms in groups:
            z = None
            for x, pmod, no_bias in terms:
                f = forward(ctx, ops, x, pmod, no_bias)
                z = f if z is None else z + f
            assert z is not None
            # = rel / stabilize(z) (equal bits), made in z (a new output of ours), dropped before the VJPs
            s = ratio(rel, z, stabilizer, scratch=True)
            del z
            res.append(_owned([input_vjp(ctx, ops, s, pmod) for _, pmod, _ in terms], s))
        return res
    node, act = ctx.node, ops.act
    out_dim = 1 if node.packet == "convolution" else -1
    x_rec = node.inputs[act].tensor  # the VJP w.r.t. the activation reads only its shape
    acc: list[list[torch.Tensor | None]] = [[None] * len(terms) for _, terms in groups]
    for block in blocks:
        memo: dict = {}  # this block's modified parameters, dropped after it
        for gi, (rel, terms) in enumerate(groups):
            z = None
            with torch.no_grad():
                for x, pmod, no_bias in terms:
                    f = node.run(params.tensors(x, pmod, no_bias, memo, block))
                    f = f[0] if isinstance(f, (tuple, list)) else f
                    z = f if z is None else z.add_(f)
            assert z is not None
            s = ratio(rel.narrow(out_dim, *block), z, stabilizer, scratch=True)
            del z
            for ti, (_, pmod, _) in enumerate(terms):
                g = _asked(vjp(node, [s], params.tensors(x_rec, pmod, False, memo, block), [act]), act)
                prev = acc[gi][ti]
                acc[gi][ti] = g if prev is None else prev.add_(g)
    return [[_asked(row, i) for i in range(len(row))] for row in acc]


def _owned(grads: list[torch.Tensor], s: torch.Tensor) -> list[torch.Tensor]:
    """``grads`` as new tensors of their own (a rule may write into them): a copy of any that is ``s``, a view or
    shares memory with another (a linear op's VJP makes a new tensor; this guards the exception)."""
    seen = {s.data_ptr()}
    out = []
    for g in grads:
        if g._base is not None or g.data_ptr() in seen:
            g = g.clone()
        seen.add(g.data_ptr())
        out.append(g)
    return out


def _placeholder(v: Value) -> torch.Tensor:
    """Stand-in for an input a VJP does not read (a merged bias): zeros of its shape, without computing it."""
    if v.data is not None:
        return v.data
    return torch.zeros(v.shape if v.shape is not None else (), dtype=v.dtype, device=v.device)


def _pos(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=0)


def _neg(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(max=0)


#: In-place forms of parameter modifiers, for a modified copy made from a new tensor of ours.
_IN_PLACE: dict[Callable, Callable[[torch.Tensor], torch.Tensor]] = {
    _pos: lambda t: t.clamp_(min=0),
    _neg: lambda t: t.clamp_(max=0),
}


class Epsilon:
    """LRP-epsilon: ``R_x = x * J^T (R / (z + eps sign z))``; ``epsilon=0`` is LRP-0."""

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def __call__(self, ctx: RuleContext) -> list:
        ops = LinearOperands.of(ctx)
        node = ctx.node
        x = node.inputs[ops.act].tensor
        s = ratio(ctx.rel, ctx.out, self.epsilon, scratch_out(ctx))
        # Parameters only: an activation held constant (CP-LRP's attention weights in eager attention)
        # must get no relevance, or some leaks into the softmax and q, k.
        wanted = [p for p in ops.params if ctx.needs[p] and p != ops.bias and not node.inputs[p].is_activation]
        merged = merged_scale(node) if not wanted else None
        if merged is not None:
            # A batch norm merged into this op: J^T s with the merged weight W * scale is J_W^T (scale * s)
            # with the model's W, so the merged weight is never built (tests/test_lrp_fast.py: equal to it).
            s = times(merged.scale, s, owned=True)
            given = {ops.act: x, merged.weight_pos: merged.weight.tensor}
            tensors = [given[i] if i in given else _placeholder(v) for i, v in enumerate(node.inputs)]
            g = _asked(vjp(node, [s], tensors, [ops.act]), ops.act)
            return _only(ctx, ops, ctx.own(times(x, g, owned=g is not s)))
        g = input_vjp(ctx, ops, s)
        res = _only(ctx, ops, ctx.own(times(x, g, owned=g is not s)))
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
        x = ctx.node.inputs[ops.act].tensor
        xp, xn = _pos(x), _neg(x)
        z = ctx.out
        pos = ((z > 0) * ctx.rel, [(xp, gp, False), (xn, gn, True)])
        neg = ((z < 0) * ctx.rel, [(xp, gn, False), (xn, gp, True)])
        (pp, pn), (np_, nn) = shares(ctx, ops, [pos, neg], self.stabilizer)
        # xp * pp + xn * pn + xp * np_ + xn * nn, in this order (equal bits), into the tensors shares made
        r = _add(_signed_sum(xp, xn, [pp, pn]), times(xp, np_, owned=True))
        r = _add(r, times(xn, nn, owned=True))
        return _only(ctx, ops, r)

    def __repr__(self) -> str:
        return f"Gamma(gamma={self.gamma})"


#: Ops whose output has no value below zero (NaN is not below zero either).
_NONNEGATIVE = {"relu", "relu_"}
#: Ops whose output has no value below zero when their first input has none: pooling, averages, views, copies.
_KEEP_NONNEGATIVE = {
    "max_pool2d_with_indices",
    "max_pool2d",
    "max_pool1d",
    "max_pool3d_with_indices",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "_adaptive_avg_pool2d",
    "mean",
    "view",
    "_unsafe_view",
    "reshape",
    "flatten",
    "clone",
    "contiguous",
    "alias",
    "detach",
    "t",
    "transpose",
    "permute",
}


def nonnegative(v: Value, depth: int = 6) -> bool:
    """Does the graph show that ``v`` has no value below zero (a ReLU's output, pooled, averaged or viewed)?

    ``False`` means "not known", and the caller looks at the values. Where it says ``True``, ``(x < 0).any()``
    is false, so a rule that branches on it computes the same bits without the pass over ``x``.
    """
    for _ in range(depth):
        p = v.producer
        if p is None or v.output_index != 0 or p.region is not None:
            return False
        if p.packet in _NONNEGATIVE:
            return True
        if p.packet not in _KEEP_NONNEGATIVE or not p.inputs or p.args[0] is not p.inputs[0]:
            return False
        v = p.inputs[0]
    return False


class AlphaBeta:
    """LRP-alpha-beta; ``AlphaBeta(1, 0)`` is z-plus (generalised to negative inputs, as Zennit)."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-12:
            raise ValueError(f"alpha-beta rule needs alpha, beta >= 0 and alpha - beta = 1, got {alpha}, {beta}")
        self.alpha, self.beta, self.stabilizer = alpha, beta, stabilizer

    def __call__(self, ctx: RuleContext) -> list:
        ops = LinearOperands.of(ctx)
        xv = ctx.node.inputs[ops.act]
        x = xv.tensor
        # After a ReLU the input has no negative part: skip its terms (they are exactly zero) and the copy.
        # Known from the graph where a ReLU made it; else looked up, on CPU only: on an accelerator the check
        # would be a host sync per layer, so the terms are computed (zero there) instead.
        has_neg = not nonnegative(xv) and (not base.cheap_read(x) or bool((x < 0).any()))
        xp, xn = (_pos(x), _neg(x)) if has_neg else (x, None)

        def terms(p: ParamMod, n: ParamMod) -> list[Term]:
            # z = op(x+; p(W), p(b)) + op(x-; n(W)): the contributions of one sign
            return [(xp, p, False)] + ([(xn, n, True)] if xn is not None else [])

        groups = [(ctx.rel, terms(_pos, _neg))]
        if self.beta:
            groups.append((ctx.rel, terms(_neg, _pos)))
        g = shares(ctx, ops, groups, self.stabilizer)
        r = _signed_sum(xp, xn, g[0])
        if self.alpha != 1:
            r = self.alpha * r
        if self.beta:
            r = r - self.beta * _signed_sum(xp, xn, g[1])
        return _only(ctx, ops, r)

    def __repr__(self) -> str:
        return f"AlphaBeta(alpha={self.alpha}, beta={self.beta})"


def _signed_sum(xp: torch.Tensor, xn: torch.Tensor | None, g: list[torch.Tensor]) -> torch.Tensor:
    """``x+ * g[0] (+ x- * g[1])``, written into ``g`` (the caller's, from :func:`shares`): equal bits."""
    r = times(xp, g[0], owned=True)
    return r if xn is None else _add(r, times(xn, g[1], owned=True))


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b``, into ``a`` (a new tensor of the caller's) where :func:`writable` allows: equal bits."""
    return a.add_(b) if writable(a, a, b) else a + b


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
        x = ctx.node.inputs[ops.act].tensor
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
        x = ctx.node.inputs[ops.act].tensor
        pmod: Callable[[torch.Tensor], torch.Tensor]
        if self.flat:
            pmod, no_bias = torch.ones_like, True
        else:
            pmod, no_bias = (lambda p: p * p), False
        ((r,),) = shares(ctx, ops, [(ctx.rel, [(torch.ones_like(x), pmod, no_bias)])], self.stabilizer)
        return _only(ctx, ops, r)

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
    "shares",
    "nonnegative",
]
