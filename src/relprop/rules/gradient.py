"""The gradient rule set: every op's vector-Jacobian product.

Propagating plain gradients over the recorded graph must reproduce ``torch.autograd.grad``
exactly; it is the oracle that proves the trace (aliasing, in-place writes, routing) is right.
Hot ops get a direct backward kernel instead of re-running the forward under autograd.
"""

from __future__ import annotations

from typing import Callable

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
    gx, gw, _ = aten.convolution_backward(ctx.relevance[0], x, w, None, stride, padding, dilation, transposed,
                                          out_pad, groups, mask)
    return [gx, gw]


@fast_vjp("view", "_unsafe_view", "reshape", "_reshape_alias")
def _view(ctx: RuleContext):
    g = ctx.relevance[0]
    return [g.reshape(ctx.inputs[0].shape)] + [None] * (len(ctx.inputs) - 1)


@fast_vjp("add", "sub")
def _add(ctx: RuleContext):
    n = ctx.node
    g = ctx.relevance[0]
    if len(n.inputs) != 2 or n.kwargs or len(n.args) != 2 or n.args[0] is not n.inputs[0]:
        return None
    a, b = ctx.inputs
    gb = g if n.packet == "add" else -g
    return [_sum_to(g, a.shape) if ctx.needs[0] else None, _sum_to(gb, b.shape) if ctx.needs[1] else None]


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
