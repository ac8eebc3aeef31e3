"""Guided backpropagation and DeconvNet as rule sets over the operation graph.

Both are the gradient with the ReLU's backward replaced (Springenberg et al. 2015, Zeiler & Fergus
2014): guided backprop passes ``relu(g * (x > 0))``, DeconvNet ``relu(g)``. Captum hooks ``nn.ReLU``
modules only; keyed on the ATen ``relu`` op, these rules also cover ``torch.relu``/``F.relu`` calls and
modules used more than once.
"""

from __future__ import annotations

import torch

from .base import RuleContext
from .composites import GradientComposite

RELU_PACKETS = ("relu", "relu_")


class GuidedReLU:
    """``relu(g * (y > 0))``: only positive gradients through active units."""

    def __call__(self, ctx: RuleContext) -> list:
        g = ctx.relevance[0]
        if g is None:
            return [None] * len(ctx.node.inputs)
        return [torch.relu(g * (ctx.out > 0))] + [None] * (len(ctx.node.inputs) - 1)

    def __repr__(self) -> str:
        return "GuidedReLU()"


class DeconvReLU:
    """``relu(g)``: the ReLU applied to the backward signal, whatever the forward activation."""

    def __call__(self, ctx: RuleContext) -> list:
        g = ctx.relevance[0]
        if g is None:
            return [None] * len(ctx.node.inputs)
        return [torch.relu(g)] + [None] * (len(ctx.node.inputs) - 1)

    def __repr__(self) -> str:
        return "DeconvReLU()"


def guided_backprop_composite() -> GradientComposite:
    rule = GuidedReLU()
    return GradientComposite(ops={p: rule for p in RELU_PACKETS}, name="guided_backprop")


def deconvnet_composite() -> GradientComposite:
    rule = DeconvReLU()
    return GradientComposite(ops={p: rule for p in RELU_PACKETS}, name="deconvnet")


__all__ = ["DeconvReLU", "GuidedReLU", "RELU_PACKETS", "deconvnet_composite", "guided_backprop_composite"]
