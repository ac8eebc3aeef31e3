"""``relprop.explain``: one entry point for every attribution method.

Methods register themselves in :data:`METHODS` with :func:`register_method`; adding one is a
function ``fn(model, inputs, *, target, **options) -> Explanation`` and a decorator.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch

from ..rules.composites import GradientComposite, resolve_composite
from .core import Explanation, Inputs, Target, run_backward

METHODS: dict[str, Callable[..., Explanation]] = {}


def register_method(*names: str):
    def deco(fn):
        for n in names:
            METHODS[n] = fn
        return fn

    return deco


def explain(model: Any, inputs: Inputs, *, target: Target, method: str = "gradient", **options: Any) -> Explanation:
    """Explain ``model``'s prediction for ``target`` on ``inputs``.

    Args:
        model: any ``nn.Module`` (or callable) taking ``inputs``.
        inputs: a tensor, a tuple of tensors (positional args) or a dict (keyword args, Hugging Face style).
        target: class index on the last dim of the output (or of ``.logits``), a per-sample tensor/list of
            indices, or a callable ``output -> tensor of shape (batch,)``.
        method: ``"gradient"``, ``"lrp"`` (with ``composite=``), or any name in ``relprop.METHODS``.
        **options: method options, e.g. ``composite="epsilon_plus_flat"``, ``epsilon=1e-6``, ``gamma=0.25``,
            ``low=``/``high=`` (z-box bounds), ``layers=["layer4"]`` (layer relevance).
    """
    fn = METHODS.get(method)
    if fn is None:
        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown method '{method}'. Available: {', '.join(sorted(METHODS))}.{hint}")
    with torch.inference_mode(False):
        return fn(model, inputs, target=target, **options)


@register_method("gradient")
def gradient(model, inputs, *, target, layers=None, keep_graph=False, params=False) -> Explanation:
    """Plain gradient of the target score w.r.t. the inputs (equals ``torch.autograd.grad``)."""
    return run_backward(
        model,
        inputs,
        target=target,
        composite=GradientComposite(),
        method="gradient",
        times_output=False,
        layers=layers,
        keep_graph=keep_graph,
        params=params,
    )


@register_method("lrp")
def lrp(
    model, inputs, *, target, composite="epsilon", layers=None, keep_graph=False, params=False, **options
) -> Explanation:
    """Layer-wise relevance propagation with a named composite or a :class:`relprop.Composite`."""
    comp = resolve_composite(composite, options)
    return run_backward(
        model,
        inputs,
        target=target,
        composite=comp,
        method="lrp",
        times_output=True,
        layers=layers,
        keep_graph=keep_graph,
        params=params,
    )
