"""``relprop.explain``: one entry point for every attribution method.

Methods register themselves in :data:`METHODS` with :func:`register_method`; adding one is a
function ``fn(model, inputs, *, target, **options) -> Explanation`` and a decorator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from .._errors import did_you_mean
from ..rules.composites import GradientComposite, resolve_composite
from ._validate import validate_call
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
            indices, or a callable ``output -> tensor of shape (batch,)``. For an output of shape ``(batch,)``
            (one score per sample) the target is ``None`` (or 0): the score is the output itself; ``None``
            also explains the single class of a ``(batch, 1)`` output. ``bool`` and ``str`` targets are
            rejected (pass the class index; Hugging Face models: ``model.config.label2id[name]``).
        method: ``"gradient"``, ``"lrp"`` (with ``composite=``), or any name in ``relprop.METHODS``.
        **options: method options, e.g. ``composite="epsilon_plus_flat"``, ``epsilon=1e-6``, ``gamma=0.25``,
            ``low=``/``high=`` (z-box bounds), ``layers=["layer4"]`` (layer relevance).
    """
    fn = METHODS.get(method)
    if fn is None:
        hint = did_you_mean(method, METHODS) if isinstance(method, str) else ""
        raise ValueError(f"unknown method {method!r}. Available: {', '.join(sorted(METHODS))}.{hint}")
    # Everything checkable before the model runs is checked here, for every method (also user-registered
    # ones), with the same messages; methods that run the model themselves check the output too.
    validate_call(model, inputs, target)
    _check_options(method, fn, options)
    try:
        with torch.inference_mode(False):
            return fn(model, inputs, target=target, **options)
    except (RuntimeError, TypeError) as err:
        _note_inputs(err, method, inputs)
        raise


def _check_options(method: str, fn: Callable[..., Explanation], options: dict[str, Any]) -> None:
    """An option the method does not take is one TypeError naming the close ones and every option, before the
    model runs (Python's own "unexpected keyword argument" named neither). Methods taking ``**options`` check
    theirs themselves (``lrp``: the composite's)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: left to the call
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    known = sorted(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    known = [k for k in known if k not in ("model", "inputs", "target")]
    for key in options:
        if key not in known:
            raise TypeError(
                f"method={method!r} takes no option {key!r}.{did_you_mean(key, known)} "
                f"Its options: {', '.join(known) or '(none)'}"
            )


def _note_inputs(err: BaseException, method: str, inputs: Inputs) -> None:
    """Add the input shapes and dtypes to an error raised by the model (a torch shape or dtype error names
    neither the method nor which input was wrong)."""
    if type(err).__module__.startswith("relprop"):
        return  # relprop's own errors already say what is wrong
    from ._validate import _named_leaves

    leaves = [(n, t) for n, t in _named_leaves(inputs) if isinstance(t, torch.Tensor)]
    shown = ", ".join(f"{n}: {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}" for n, t in leaves[:4])
    note = f"relprop: raised while explaining with method={method!r} on {shown}"
    ints = [n for n, t in leaves if not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)]
    if ints:
        note += (
            f". {', '.join(ints)} hold integers: fine for token ids that feed an embedding; images and features must "
            "be float (.float() and the model's normalisation)"
        )
    err.add_note(note)


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
