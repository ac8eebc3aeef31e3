"""Softmax and fused attention.

Softmax (AttnLRP, Achtibat et al. 2024, Prop. 3.1): ``R_x = x * (R - s * sum(R))``, which is the
input times the softmax gradient of ``R / s``; it needs no division, and positions with ``-inf``
scores (masked) get zero. Fused scaled-dot-product attention kernels are explained as their parts:
scores ``q k^T * scale (+ mask)``, softmax, weighted sum ``A v``, each product with the uniform
rule. CP-LRP (Ali et al. 2022) holds the attention weights constant: all relevance goes to ``v``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..graph import Node, Value
from . import base
from .base import HALF, PreparedGraph, RuleContext, register_family, vjp
from .linear import stabilize, times, writable
from .routing import Route


class SoftmaxRule:
    def through(self, ctx: RuleContext, prepared: PreparedGraph, resolve, may_skip) -> tuple[Node, list] | None:
        """Relevance of the score product's operands, past the score chain (see :func:`score_chain`)."""
        chain = score_chain(ctx, prepared, resolve, may_skip)
        r = ctx.relevance[0]
        return None if chain is None or r is None else (chain.product, chain.relevance(r, ctx.out))

    def __call__(self, ctx: RuleContext) -> list:
        res: list = [None] * len(ctx.node.inputs)
        if ctx.relevance[0] is None or not ctx.needs[0]:
            return res
        dim = ctx.node.args[1]
        x, s, r = ctx.inputs[0], ctx.out, ctx.relevance[0]
        res[0] = _softmax_input_relevance(x.to(r.dtype), s.to(r.dtype), r, dim).to(x.dtype)
        return res

    def __repr__(self) -> str:
        return "SoftmaxRule()"


def _softmax_input_relevance(x: torch.Tensor, s: torch.Tensor, r: torch.Tensor, dim: int) -> torch.Tensor:
    g = s * r.sum(dim, keepdim=True)
    if writable(g, r, g) and writable(g, x, g):
        # The same operations written into the one new tensor (attention-score sized: five temporaries
        # fewer); equal bits to the expression below (tests/test_lrp_fast.py).
        torch.sub(r, g, out=g)
        if base.cheap_read(x) and _finite(x):
            return g.mul_(x)  # no score to zero (the usual case): the boolean passes below would change nothing
        # ``not |x| < inf`` is ``not isfinite(x)`` (NaN compares false), in fewer passes than isfinite's.
        return g.mul_(x).masked_fill_(torch.lt(x.abs(), float("inf")).logical_not_(), 0.0)
    g = r - g
    return torch.where(torch.isfinite(x), x * g, torch.zeros_like(g))


_VIEWS = ("view", "_unsafe_view", "reshape")


@dataclass
class ScoreChain:
    """Eager attention's scores, ``softmax(bmm(q, k^T) [viewed] * c + mask)``, explained in one step.

    The rules of the chain's nodes, applied one after another (``Uniform(0)`` on the product, a view,
    ``Uniform`` on ``* c``, ``Proportional(0)`` on ``+ mask``, :class:`SoftmaxRule`), make ``R / z1`` at the
    product's output equal, in exact arithmetic, to ``c * h`` with ``h = r - s * sum(r)`` (the softmax rule
    in gradient form): each rule multiplies by the value the next one divides by (``z3 * h / z3``,
    ``z2 / z1 = c``). Computed in about six passes over the attention-sized tensors instead of about twenty,
    and the scaled scores ``z2`` are never read. The chain's zero sets are kept: 0 where the softmax input
    is not finite or where ``|z3|`` or ``|z1|`` is below the smallest normal number (the LRP-0 absorption
    of :func:`.linear.ratio`). Equal to the step-by-step rules to rounding (tests/test_decoder_fast.py:
    float64 1e-12, float32 1e-5, zero sets included).
    """

    product: Node  # the bmm q @ k^T
    acts: list[int]  # its activation operands
    scale: float  # c
    z1: Value  # the product's output
    z3: Value  # the softmax input
    scaled: Node  # z2 = view(z1) * c
    masked: Node  # z3 = z2 + mask
    view: Node  # view(z1)

    def _z1(self) -> torch.Tensor:
        """The product ``z1``; released (:func:`release_scores`), it is recomputed with the recorded op on the
        recorded inputs (same bits) into a local tensor, not put back on the graph: it dies after the zero sets."""
        if self.z1.data is not None:
            return self.z1.data
        z1 = self._recomputed_z1()
        return self.z1.tensor if z1 is None else z1

    def _recomputed_z1(self) -> torch.Tensor | None:
        z1 = self.product.run([u.tensor for u in self.product.inputs])
        return z1 if isinstance(z1, torch.Tensor) and z1.shape == self.z1.shape and z1.is_contiguous() else None

    def _all_normal_in_place(self) -> tuple[bool, torch.Tensor | None]:
        """On CPU, with the whole chain released: are ``|z1|`` and ``|z3|`` finite and at least the smallest normal
        number (empty zero sets)? Found in one recomputed score-sized buffer: ``z1`` is checked, then turned into
        ``z3`` in place (``* c``, ``+ mask``: the recorded ops' kernels in place, same bits) and checked, a slice at
        a time (:func:`_normal_by_parts`). At 2,048 tokens that is two score-sized temporaries fewer than
        :meth:`relevance`'s general path, which runs when this answers False; it also gets the recomputed ``z1``
        when that is still intact (else it recomputes it: a second ``bmm`` where ``z3`` has ``-inf`` masks)."""
        if self.z1.data is not None or self.z3.data is not None or self.scaled.inputs[0].data is not None:
            return False, None
        mask = self.masked.inputs[1].tensor
        if mask.dtype != self.z3.dtype or self.z1.dtype != self.z3.dtype or not base.cheap_read(mask):
            return False, None
        z1 = self._recomputed_z1()
        if z1 is None or not base.cheap_read(z1) or not _normal_by_parts(z1):
            return False, z1
        z2 = self.view.run([z1])
        if not (isinstance(z2, torch.Tensor) and z2.data_ptr() == z1.data_ptr() and z2.shape == self.z3.shape):
            return False, z1
        return _normal_by_parts(z2.mul_(self.scale).add_(mask)), None

    def _abs_z3(self, z1: torch.Tensor) -> torch.Tensor:
        """``|z3|`` in a new contiguous tensor; released scores (:func:`release_scores`) are recomputed into it with
        the recorded ops from ``z1`` (same bits), not cached on the graph."""
        if self.z3.data is not None:
            return self.z3.data.abs().contiguous()
        viewed = self.scaled.inputs[0].data
        a = self.scaled.run([self.view.run([z1]) if viewed is None else viewed])  # z2, new
        mask = self.masked.inputs[1].tensor
        if not (
            isinstance(a, torch.Tensor)
            and a.is_contiguous()
            and a.shape == self.z3.shape
            and mask.dtype == a.dtype == self.z3.dtype
        ):
            return self.z3.tensor.abs().contiguous()
        return a.add_(mask).abs_()  # z2 + mask (the mask broadcasts to z2's shape): aten.add's own bits

    def relevance(self, r: torch.Tensor, s: torch.Tensor) -> list:
        """The product operands' relevance from the relevance ``r`` at the softmax output ``s``."""
        if self.z1.normal and self.z3.normal:
            # Noted where the scores were made (:func:`note_normal`): finite and normal, no zero set; nothing to
            # recompute (a released ``z1`` cost a ``bmm`` per layer here, only to find that out).
            return self._operands(r, s, None, self.z1.shape)
        normal, z1 = self._all_normal_in_place()
        if normal:  # (CPU, released scores, the usual case: no zero set to make)
            return self._operands(r, s, None, self.z1.shape)
        z1 = self._z1() if z1 is None else z1
        tiny = torch.finfo(z1.dtype).tiny
        # The zero sets first, so that at most two attention-sized temporaries of ours live at once. On CPU, a
        # tensor of finite normal numbers (the usual case) has empty zero sets: finding that out with two
        # reductions is much cheaper than the boolean passes. (On a GPU it would read a number back per layer,
        # a host sync: the masks are always made there.)
        cpu = base.cheap_read(z1)
        product_shape = z1.shape
        a = self._abs_z3(z1)
        drop = None if cpu and _normal(a) else torch.lt(a, float("inf")).logical_not_().logical_or_(torch.lt(a, tiny))
        shape = a.shape  # softmax rule: 0 where the input is not finite; sum rule: |z3| < tiny absorbs
        torch.abs(z1, out=a.view(z1.shape))
        if not (cpu and _normal(a)):
            small = torch.lt(a, tiny).view(shape)  # product rule: |z1| < tiny absorbs
            drop = small if drop is None else drop.logical_or_(small)
        del a, z1  # (a recomputed product dies here)
        return self._operands(r, s, drop, product_shape)

    def _operands(self, r: torch.Tensor, s: torch.Tensor, drop: torch.Tensor | None, product_shape: Any) -> list:
        """The product operands' relevance from the softmax rule's gradient form, zero set ``drop`` absorbed."""
        q = s * r.sum(-1, keepdim=True)
        torch.sub(r, q, out=q)  # h, in gradient form
        q.mul_(self.scale)
        if drop is not None:
            q.masked_fill_(drop, 0.0)
            del drop
        q = q.view(product_shape) if q.is_contiguous() else q.reshape(product_shape)
        grads = vjp(self.product, [q], None, self.acts)
        last = self.acts[-1]
        res: list = [None] * len(self.product.inputs)
        for i in self.acts:
            g = grads[i]
            if g is None:
                raise RuntimeError(f"internal: no gradient for input {i} of {self.product!r}")
            res[i] = times(self.product.inputs[i].tensor, g, owned=i == last).div_(len(self.acts))
        return res


def _at_least(x: torch.Tensor, lo: float) -> bool:
    """Is every element of ``x`` at least ``lo`` and below +inf (False for NaN)? Two reductions in one pass;
    CPU callers only: on a GPU the answer is a read-back, a host sync per call (tests/test_gpu.py counts them)."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool(low >= lo) and bool(high < float("inf"))


def _finite(x: torch.Tensor) -> bool:
    """Is every element of ``x`` finite (False for NaN)? (-inf is below the dtype's lowest number.)"""
    return _at_least(x, torch.finfo(x.dtype).min)


#: float dtype -> (the integer dtype of its size, its exponent field, the smallest normal number's bits).
_EXPONENT = {
    torch.float32: (torch.int32, 0x7F800000, 0x00800000),
    torch.float64: (torch.int64, 0x7FF0000000000000, 0x0010000000000000),
}


#: Elements per slice of :func:`_normal_by_parts` (1 MiB of float32).
_SLICE = 1 << 18


def _normal_by_parts(x: torch.Tensor, size: int = _SLICE) -> bool:
    """:func:`_normal` of ``|x|`` for a contiguous ``x``, ``size`` elements at a time through one reused buffer (not
    a temporary the size of ``x``). Exact: the minimum and maximum of the slices' are the whole's.

    float32/float64 read the exponent field of the bits (``x.view(int)``): it is all zeros for zeros and subnormals
    and all ones for infinities and NaN, so ``|x|`` is finite and normal exactly where the field is neither: one
    ``&`` and one ``aminmax`` per slice (a Qwen2 layer's 2Mi float32 scores, 1 thread: 0.40 ms, against 0.66 ms for
    ``abs`` and ``aminmax``). One buffer of a fixed size, not x's size / 8: a new 16 MiB temporary per check raised
    the peak RSS of a 2,048-token Qwen2 explain by ~70 MiB (glibc keeps such sizes in its heap). Other dtypes take
    ``|x|``. Equal answers: tests/test_score_notes.py.
    """
    n = x.numel()
    if n == 0:
        return True
    flat = x.view(-1)
    spec = _EXPONENT.get(x.dtype)
    if spec is None:
        return all(_normal(part.abs()) for part in flat.split(size))
    int_dtype, field, smallest = spec
    bits = flat.view(int_dtype)
    buf = torch.empty(min(n, size), dtype=int_dtype, device=x.device)
    for start in range(0, n, size):
        part = bits[start : start + size]
        low, high = torch.aminmax(torch.bitwise_and(part, field, out=buf[: part.numel()]))
        if not (int(low) >= smallest and int(high) < field):
            return False
    return True


def note_normal(t: torch.Tensor) -> bool | None:
    """What :attr:`relprop.graph.Value.normal` notes for a value made as ``t``: :func:`_normal_by_parts`, for a
    contiguous float32/float64 CPU tensor; None (not looked at) otherwise, and on a GPU, where the answer would be
    a read-back, a host sync per layer (``base.cheap_read``). Taken where the data is made: by the recording's
    release policy (:func:`release_scores`) and by a plan's replay right after the op ran (before a later op may
    write into the memory)."""
    if t.dtype not in _EXPONENT or not t.is_contiguous() or not base.cheap_read(t):
        return None
    return _normal_by_parts(t.detach())


def _note(v: Value | None) -> None:
    if v is not None and v.data is not None and v.normal is None:
        v.normal = note_normal(v.data)


def _normal(a: torch.Tensor) -> bool:
    """Are all of ``a`` (absolute values) finite and at least the smallest normal number (False for NaN)?"""
    return _at_least(a, torch.finfo(a.dtype).tiny)


def _scores_source(v: Value) -> bool:
    """Is ``v`` (through views) the output of a product of two activations larger than both factors together?

    Attention scores ``q @ k^T`` are (tokens x tokens) per head, the factors (tokens x head dim): at 2,048 tokens
    a layer's scores are 32 times its queries and keys.
    """
    p = v.producer
    while p is not None and p.region is None and p.packet in _VIEWS and len(p.inputs) == 1:
        p = p.inputs[0].producer
    if p is None or p.region is not None or p.op_name != "aten.bmm.default" or len(p.inputs) != 2:
        return False
    a, b, out = p.inputs[0].shape, p.inputs[1].shape, p.outputs[0].shape if p.outputs[0] is not None else None
    if not (p.inputs[0].is_activation and p.inputs[1].is_activation) or a is None or b is None or out is None:
        return False
    return out.numel() > a.numel() + b.numel()


_aten = torch.ops.aten
_VIEW_OPS = (_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default)


def release_scores(node: Node) -> bool:
    """Release policy for :func:`relprop.trace.record`: the attention scores ``q @ k^T``, scaled and masked.

    Eager attention's ``q @ k^T`` (a ``bmm`` and the view ``matmul`` makes of it), ``* c`` and ``+ mask`` are
    three tensors of the scores' size per layer that a gradient does not keep (autograd saves the softmax
    only): at 2,048 tokens they outweigh everything else the tape holds. The one-step :class:`ScoreChain`
    never reads the scaled scores and reads the product and the masked ones only for its zero sets
    (recomputed there, one ``bmm`` per layer, into local buffers); a rule that does read them gets them
    recomputed from the same op and inputs (same bits). Called for every recorded op, right after it ran: identity
    tests first. For the product and the masked scores it notes, before they go, whether they are all finite and
    normal (:func:`note_normal`, on CPU): where they are, the chain makes no zero set and recomputes nothing.
    """
    op = node.op
    if op is _aten.bmm.default or op in _VIEW_OPS:
        released = not node.kwargs and node.outputs[0] is not None and _scores_source(node.outputs[0])
        if released and op is _aten.bmm.default:
            _note(node.outputs[0])
        return released
    if op is _aten.mul.Tensor:
        if node.kwargs or len(node.inputs) != 1 or type(node.args[1]) is not float or node.outputs[0] is None:
            return False
        return node.inputs[0].is_activation and _scores_source(node.inputs[0])
    if op is _aten.add.Tensor and not node.kwargs and len(node.inputs) == 2 and len(node.args) == 2:
        if node.outputs[0] is None:
            return False
        z, mask = node.inputs
        scaled = z.producer
        released = (
            z.is_activation
            and not mask.is_activation
            and z.shape == node.outputs[0].shape
            and scaled is not None
            and release_scores(scaled)
        )
        if released:
            _note(node.outputs[0])
        return released
    return False


def score_chain(ctx: RuleContext, prepared: PreparedGraph, resolve, may_skip) -> ScoreChain | None:
    """The :class:`ScoreChain` ending at softmax node ``ctx.node``, or ``None`` (then each rule runs on its own).

    Only where every node of the chain gets exactly the rule the one-step formula stands for (AttnLRP's
    defaults), each intermediate value has that one consumer and nothing else asks for its relevance
    (``may_skip``), shapes do not broadcast and everything is in the relevance's dtype.
    """
    from .elementwise import Uniform
    from .reduction import Proportional

    node, r = ctx.node, ctx.relevance[0]
    if r is None or not ctx.needs[0] or node.packet != "_softmax" or node.arg(2) is not False:
        return None
    z3 = node.inputs[0]
    dim = node.arg(1)
    if z3.shape is None or dim not in (-1, len(z3.shape) - 1):
        return None

    def single(v: Value, consumer: Node) -> Node | None:
        p = v.producer
        if p is None or p.region is not None or len(v.consumers) != 1 or v.consumers[0] is not consumer:
            return None
        return p if may_skip(v) else None

    def acts_of(n: Node) -> list[int]:
        return RuleContext(n, [None], [True] * len(n.inputs), prepared.notes_of(n)).activation_inputs()

    add = single(z3, node)
    if add is None or add.op_name != "aten.add.Tensor" or add.kwargs or len(add.args) != 2:
        return None
    rule = resolve(add)
    if type(rule) is not Proportional or rule.stabilizer != 0 or acts_of(add) != [0]:
        return None
    z2 = add.inputs[0]
    if z2.shape != z3.shape or not isinstance(add.args[1], Value):
        return None
    mul = single(z2, add)
    if mul is None or mul.op_name != "aten.mul.Tensor" or mul.kwargs or len(mul.inputs) != 1:
        return None
    c = mul.args[1]
    rule = resolve(mul)
    if type(c) is not float or type(rule) is not Uniform or acts_of(mul) != [0] or mul.inputs[0].shape != z2.shape:
        return None
    view = single(mul.inputs[0], mul)
    if view is None or view.packet not in _VIEWS or type(resolve(view)) is not Route or view.kwargs:
        return None
    z1 = view.inputs[0]
    product = single(z1, view)
    if product is None or product.op_name != "aten.bmm.default" or product.kwargs:
        return None
    rule = resolve(product)
    acts = acts_of(product)
    if type(rule) is not Uniform or rule.epsilon != 0 or not acts:
        return None
    dtypes = {z1.dtype, z3.dtype, node.first_output.dtype, r.dtype} | {product.inputs[a].dtype for a in acts}
    if len(dtypes) != 1 or r.dtype not in (torch.float32, torch.float64):
        return None
    return ScoreChain(product, acts, c, z1, z3, mul, add, view)


class AttentionRule:
    """Fused SDPA kernels as scores -> softmax -> weighted sum, with uniform/softmax rules."""

    def __init__(self, epsilon: float = 0.0, constant_weights: bool = False):
        self.epsilon = epsilon
        self.constant_weights = constant_weights

    def __call__(self, ctx: RuleContext) -> list:
        node = ctx.node
        q, k, v = ctx.inputs[:3]
        res: list = [None] * len(node.inputs)
        r = ctx.relevance[0]
        if r is None:
            return res
        # Half-precision model, float32 relevance (LRP): the rule runs in float32 on the recorded values.
        if r.dtype == torch.float32 and q.dtype in HALF:
            q, k, v = q.float(), k.float(), v.float()
        mask_value = node.kwargs.get(
            "attn_mask", node.arg(3) if node.packet == "_scaled_dot_product_efficient_attention" else None
        )
        mask = (
            ctx.inputs[node.inputs.index(mask_value)] if mask_value is not None and mask_value in node.inputs else None
        )
        causal = bool(
            node.kwargs.get("is_causal", node.arg(4, False) if "flash" in node.packet else node.arg(6, False))
        )
        scale = node.kwargs.get("scale")
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        rep = q.shape[-3] // k.shape[-3] if q.dim() >= 3 and k.shape[-3] != q.shape[-3] else 1
        kk = k.repeat_interleave(rep, dim=-3) if rep > 1 else k
        vv = v.repeat_interleave(rep, dim=-3) if rep > 1 else v
        qk = (q @ kk.transpose(-1, -2)) * scale
        scores = qk
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if causal:
            L, S = q.shape[-2], kk.shape[-2]
            keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L)
            scores = scores.masked_fill(~keep, float("-inf"))
        a = torch.softmax(scores, dim=-1)
        out = a @ vv
        s = r / stabilize(out, self.epsilon)
        share = 1.0 if self.constant_weights else 0.5
        r_v = share * vv * (a.transpose(-1, -2) @ s)
        if rep > 1:
            r_v = r_v.unflatten(-3, (k.shape[-3], rep)).sum(-3)
        res[2] = r_v.to(v.dtype)
        if not self.constant_weights:
            r_a = 0.5 * a * (s @ vv.transpose(-1, -2))
            g = r_a - a * r_a.sum(-1, keepdim=True)  # softmax rule, in gradient form
            g = torch.where(torch.isfinite(scores), g, torch.zeros_like(g))
            # scores = qk + mask: the mask is a constant, qk takes its proportional share qk * g
            r_q = 0.5 * q * ((g * scale) @ kk)
            r_k = 0.5 * kk * ((g * scale).transpose(-1, -2) @ q)
            if rep > 1:
                r_k = r_k.unflatten(-3, (k.shape[-3], rep)).sum(-3)
            res[0], res[1] = r_q.to(q.dtype), r_k.to(k.dtype)
        return res

    def __repr__(self) -> str:
        return f"AttentionRule(constant_weights={self.constant_weights})"


register_family("softmax", "_softmax", "softmax", "_safe_softmax")
register_family(
    "attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math",
    "scaled_dot_product_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
