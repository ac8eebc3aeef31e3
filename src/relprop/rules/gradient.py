"""The gradient rule set: every op's vector-Jacobian product.

Propagating plain gradients over the recorded graph must reproduce ``torch.autograd.grad``
exactly; it is the oracle that proves the trace (aliasing, in-place writes, routing) is right.
Hot ops get a direct backward kernel instead of re-running the forward under autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import RuleContext, family_of, vjp

aten = torch.ops.aten

#: packet name -> fast VJP ``fn(ctx) -> list[grad | None]`` (same contract as a rule).
_FAST: dict[str, Callable[[RuleContext], list]] = {}


def fast_vjp(*packets: str):
    def deco(fn):
        for p in packets:
            _FAST[p] = fn
        return fn

    return deco


def gradient_rule(ctx: RuleContext) -> list[torch.Tensor | None]:
    """Exact VJP of any op (the op's own autograd formula)."""
    node = ctx.node
    if family_of(node) == "stop":
        return [None] * len(node.inputs)
    fast = _FAST.get(node.packet)
    if fast is not None:
        res = fast(ctx)
        if res is not None:
            return res
    return vjp(node, ctx.relevance, None, [i for i, n in enumerate(ctx.needs) if n])


def _sum_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to ``shape``."""
    if g.shape == shape:
        return g
    lead = g.dim() - len(shape)
    dims = list(range(lead)) + [i + lead for i, s in enumerate(shape) if s == 1 and g.shape[i + lead] != 1]
    return g.sum(dims, keepdim=True).reshape(shape) if dims else g.reshape(shape)


@fast_vjp("convolution")
def _conv(ctx: RuleContext):
    n = ctx.node
    x, w = ctx.inputs[0], ctx.inputs[1]
    if n.args[2] is not None or len(n.inputs) != 2:
        return None
    stride, padding, dilation, transposed, out_pad, groups = n.args[3:9]
    mask = [ctx.needs[0], ctx.needs[1], False]
    gx, gw, _ = aten.convolution_backward(
        ctx.relevance[0], x, w, None, stride, padding, dilation, transposed, out_pad, groups, mask
    )
    return [gx, gw]


@fast_vjp("view", "_unsafe_view", "reshape", "_reshape_alias")
def _view(ctx: RuleContext):
    g = ctx.relevance[0]
    return [g.reshape(ctx.inputs[0].shape)] + [None] * (len(ctx.inputs) - 1)


@fast_vjp("relu")
def _relu(ctx: RuleContext):
    return [ctx.relevance[0] * (ctx.out > 0)]


@fast_vjp("t", "transpose", "permute")
def _perm(ctx: RuleContext):
    n = ctx.node
    g = ctx.relevance[0]
    if n.packet == "t":
        return [g.t()]
    if n.packet == "transpose":
        return [g.transpose(n.args[1], n.args[2])]
    dims = n.args[1]
    inv = [0] * len(dims)
    for i, d in enumerate(dims):
        inv[d % len(dims)] = i
    return [g.permute(inv)]


@fast_vjp("mm", "bmm")
def _mm(ctx: RuleContext):
    a, b = ctx.inputs
    g = ctx.relevance[0]
    if len(ctx.inputs) != 2:
        return None
    return [g @ b.transpose(-1, -2) if ctx.needs[0] else None, a.transpose(-1, -2) @ g if ctx.needs[1] else None]


@fast_vjp("addmm")
def _addmm(ctx: RuleContext):
    n = ctx.node
    if len(ctx.inputs) != 3 or n.kwargs or len(n.args) != 3:
        return None  # beta/alpha given
    bias, a, b = ctx.inputs
    g = ctx.relevance[0]
    return [
        _sum_to(g, bias.shape) if ctx.needs[0] else None,
        g @ b.t() if ctx.needs[1] else None,
        a.t() @ g if ctx.needs[2] else None,
    ]


@fast_vjp("_native_batch_norm_legit_no_training", "native_batch_norm")
def _bn_eval(ctx: RuleContext):
    n = ctx.node
    if n.packet == "native_batch_norm" and n.arg(5):
        return None  # training mode: statistics depend on the batch
    if any(ctx.needs[1:]):
        return None
    eps = n.arg(6) if n.packet == "_native_batch_norm_legit_no_training" else n.arg(7)
    x = ctx.inputs[0]
    shape = [1, -1] + [1] * (x.dim() - 2)
    w, var = n.arg(1), n.arg(4)
    scale = torch.rsqrt(var.tensor + eps)
    if w is not None:
        scale = scale * w.tensor
    return [ctx.relevance[0] * scale.view(shape)] + [None] * (len(ctx.inputs) - 1)


@fast_vjp("max_pool2d_with_indices")
def _maxpool(ctx: RuleContext):
    n = ctx.node
    if ctx.relevance[0] is None:
        return [torch.zeros_like(ctx.inputs[0])]
    x = ctx.inputs[0]
    args = list(n.args[1:]) + [None] * (6 - len(n.args))
    kernel, stride, padding, dilation, ceil = (n.arg(1), n.arg(2, []), n.arg(3, 0), n.arg(4, 1), n.arg(5, False))
    stride = stride or kernel
    padding = padding if isinstance(padding, (list, tuple)) else [padding] * 2
    dilation = dilation if isinstance(dilation, (list, tuple)) else [dilation] * 2
    del args
    return [
        aten.max_pool2d_with_indices_backward(
            ctx.relevance[0], x, kernel, stride, padding, dilation, ceil, ctx.outputs[1]
        )
    ]


@fast_vjp("mean")
def _mean(ctx: RuleContext):
    n = ctx.node
    x = ctx.inputs[0]
    g = ctx.relevance[0]
    if n.op_name != "aten.mean.dim" or n.kwargs.get("dtype") is not None:
        return None
    dims = n.arg(1)
    keep = n.arg(2, False)
    dims = [d % x.dim() for d in (dims if isinstance(dims, (list, tuple)) else [dims])] or list(range(x.dim()))
    count = 1
    for d in dims:
        count *= x.shape[d]
    if not keep:
        for d in sorted(dims):
            g = g.unsqueeze(d)
    return [(g / count).expand(x.shape)]
