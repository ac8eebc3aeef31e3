"""The gradient rule set: every op's vector-Jacobian product.

Propagating plain gradients over the recorded graph must reproduce ``torch.autograd.grad``
exactly; it is the oracle that proves the trace (aliasing, in-place writes, routing) is right.
The VJP is :func:`relprop.rules.base.vjp`, shared with every other rule: hot ops get a direct
backward kernel from :data:`relprop.rules.vjps.VJPS`, the rest re-run the op under autograd.
"""

from __future__ import annotations

import torch

from .base import RuleContext


def gradient_rule(ctx: RuleContext) -> list[torch.Tensor | None]:
    """Exact VJP of any op (the op's own autograd formula); nothing flows through ``stop`` ops (detach...)."""
    if ctx.family == "stop":
        return [None] * len(ctx.node.inputs)
    return ctx.vjp(ctx.relevance)
