"""Gradient-family methods: saliency, input x gradient, guided backprop, DeconvNet, DeepLIFT.

Each is a rule set over the traced graph plus a few lines: the propagation is the engine's, only
the rules at some ops differ (guided/deconv ReLU, DeepLIFT rescale) and the final product with the
input (or input minus baseline).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..rules.base import PreparedGraph
from ..rules.composites import GradientComposite
from ..rules.deeplift import DeepLiftComposite
from ..rules.guided import deconvnet_composite, guided_backprop_composite
from ..trace import record
from ._common import Backward, backward, baseline_specs, format_baselines, is_float, leaves, rebuild
from ._convergence import convergence_delta, reference_score, warn_if_not_converged
from ._validate import score
from .core import Explanation, sources_of, split_inputs
from .explain import register_method


def _finish(b: Backward, inputs, values, method: str) -> Explanation:
    return dataclasses.replace(b.expl, attributions=rebuild(inputs, values), method=method)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


@register_method("saliency")
def saliency(model, inputs, *, target, abs=True, layers=None, keep_graph=False) -> Explanation:
    """Gradient of the target score, absolute by default (Captum's ``Saliency``, ``abs=True``).

    Token inputs: the sum over the hidden dim of the (absolute) gradient at the embedding output.
    """
    _check_bool("abs", abs)
    b = backward(
        model,
        inputs,
        target=target,
        composite=GradientComposite(),
        method="saliency",
        layers=layers,
        keep_graph=keep_graph,
    )
    out = []
    for i, x in enumerate(leaves(inputs)):
        if is_float(x):
            out.append(b.grads[i].abs() if abs else b.grads[i])
        else:
            out.append(_token_abs(b, i, x.shape) if abs else b.token_scores(i, None, x.shape))
    return _finish(b, inputs, out, "saliency")


def _token_abs(b: Backward, i: int, shape) -> torch.Tensor:
    total = torch.zeros(shape, device=b.expl.output.device)
    for _, g in b.grads[i]:
        total = total + g.abs().sum(-1).reshape(shape)
    return total


@register_method("input_x_gradient")
def input_x_gradient(model, inputs, *, target, layers=None, keep_graph=False) -> Explanation:
    """Input times gradient (token inputs: embedding times gradient, summed over hidden)."""
    b = backward(
        model,
        inputs,
        target=target,
        composite=GradientComposite(),
        method="input_x_gradient",
        layers=layers,
        keep_graph=keep_graph,
    )
    out = [
        x * b.grads[i] if is_float(x) else b.token_scores(i, lambda e: e, x.shape) for i, x in enumerate(leaves(inputs))
    ]
    return _finish(b, inputs, out, "input_x_gradient")


@register_method("guided_backprop")
def guided_backprop(model, inputs, *, target, layers=None, keep_graph=False) -> Explanation:
    """Guided backpropagation: the gradient with ``relu(g * (x > 0))`` at every ReLU op (functional too)."""
    b = backward(
        model,
        inputs,
        target=target,
        composite=guided_backprop_composite(),
        method="guided_backprop",
        layers=layers,
        keep_graph=keep_graph,
    )
    out = [b.grads[i] if is_float(x) else b.token_scores(i, None, x.shape) for i, x in enumerate(leaves(inputs))]
    return _finish(b, inputs, out, "guided_backprop")


@register_method("deconvnet", "deconvolution")
def deconvnet(model, inputs, *, target, layers=None, keep_graph=False) -> Explanation:
    """DeconvNet: the gradient with ``relu(g)`` at every ReLU op (functional too)."""
    b = backward(
        model,
        inputs,
        target=target,
        composite=deconvnet_composite(),
        method="deconvnet",
        layers=layers,
        keep_graph=keep_graph,
    )
    out = [b.grads[i] if is_float(x) else b.token_scores(i, None, x.shape) for i, x in enumerate(leaves(inputs))]
    return _finish(b, inputs, out, "deconvnet")


@register_method("deeplift")
def deeplift(
    model,
    inputs,
    *,
    target,
    baselines=None,
    eps=1e-10,
    multiply_by_inputs=True,
    scope="all",
    exact=None,
    layers=None,
    keep_graph=False,
    verify_replay=True,
) -> Explanation:
    """DeepLIFT with the rescale rule (Shrikumar et al. 2017), as Captum's ``DeepLift``.

    Args:
        baselines: reference input(s): ``None`` (zeros; token id 0), a number, a tensor broadcastable to the
            input, one per input tensor (tuple) or a dict for dict inputs. An integer input without a baseline
            that feeds no embedding lookup (an attention mask, position ids) is held at its own value.
        eps: where ``|x - x0| < eps`` a nonlinearity uses its gradient.
        multiply_by_inputs: ``(x - x0) * multiplier`` (True, default) or the multipliers alone.
        scope: ``"all"`` rescales every nonlinear op of the graph; ``"captum"`` only ops inside the module
            types Captum hooks (ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus, MaxPool, Softmax).
        exact: rules that sum to delta through products of activations (gates, attention, RMS norms' scale),
            functional softmax and layer norm, where Captum's do not (T5, zero baseline: attributions summing to
            1e14 for f(x) - f(x0) = 0.4 with Captum's); ``None``: on for ``scope="all"`` (but Captum's own rule at
            ``nn.Softmax`` modules), off for ``"captum"``; ``True``: also at ``nn.Softmax`` modules.
        verify_replay: check the baseline pass (the recorded ops replayed on the baselines) against a plain forward
            on the baselines, one more forward pass, and record the baselines node by node where they differ. On by
            default: a value the model reads into Python without an ATen op (``.numpy()``, ``.tolist()``) is invisible
            to the replay, which then reuses the input's value and explains another function, with a
            ``convergence_delta`` that agrees with it. ``False`` saves the forward where no such read exists.

    Token inputs: ``(emb(x) - emb(x0)) * multiplier`` summed over the hidden dim.
    """
    _check_bool("multiply_by_inputs", multiply_by_inputs)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps: expected a non-negative number, got {eps!r}")
    xs = leaves(inputs)
    base = format_baselines(inputs, baselines)
    given = baseline_specs(inputs, baselines)

    def resolve(graph) -> list[torch.Tensor]:
        # An integer input given no baseline that feeds no embedding lookup (an attention mask, position ids)
        # is not attributed: it is held at its own value, as Captum's additional_forward_args. Zeroing it
        # (token id 0's default) masked every token and sent the model down another path (BERT refused it).
        out = list(base)
        for i, (_, src) in enumerate(sources_of(graph)):
            if i < len(xs) and given[i] is None and not is_float(xs[i]) and not src:
                out[i] = xs[i]
        return out

    def on(base_values):
        return split_inputs(rebuild(inputs, base_values))

    # Reference activations: replay the recorded ops on the baseline; when a value Python code may branch
    # on (``.item()``, ``bool(t)``) changes, or an op fails, a second recording aligned node by node.
    comp = DeepLiftComposite(
        lambda b: record(model, *on(b)),
        baselines=resolve,
        verify_forward=(lambda b: _plain_forward(model, *on(b))) if verify_replay else None,
        # a callable target appends its own ops to the recording on the inputs only
        allow_appended_ops=callable(target) and not isinstance(target, torch.Tensor),
        eps=float(eps),
        scope=scope,
        exact=exact,
    )
    b = backward(
        model,
        inputs,
        target=target,
        composite=comp,
        method="deeplift",
        layers=layers,
        keep_graph=True,  # for the prepared graph's reference values
        hold_values=keep_graph,
    )
    prepared = b.expl.prepared
    if prepared is None:  # keep_graph=True keeps it
        raise RuntimeError("internal: deeplift's backward kept no prepared graph")
    summed = []  # (x - x0) * multiplier: the attributions, also where multiply_by_inputs=False returns multipliers
    for i, x in enumerate(xs):
        if is_float(x):
            summed.append((x - base[i]) * b.grads[i])
        else:
            total = torch.zeros(x.shape, device=x.device)
            for emb, g in b.grads[i]:
                total = total + ((emb - _reference_of(prepared, emb)) * g).sum(-1).reshape(x.shape)
            summed.append(total)
    out = (
        summed
        if multiply_by_inputs
        else [b.grads[i] if is_float(x) else b.token_scores(i, None, x.shape) for i, x in enumerate(xs)]
    )
    fx = b.expl.score
    idx = b.expl.target

    def baseline_score() -> torch.Tensor:
        # only where the reference activations miss the explained output (a callable target's ops, recorded twice)
        args, kwargs = on(resolve(prepared.graph))
        return score(_plain_forward(model, args, kwargs), target, fx.shape[0])[0]

    fx0 = reference_score(prepared, b.expl.output, idx, baseline_score)
    delta = convergence_delta(summed, fx, fx0)
    warn_if_not_converged(delta, fx, fx0, fx.dtype)
    e = dataclasses.replace(_finish(b, inputs, out, "deeplift"), convergence_delta=delta)
    if not keep_graph:
        e = dataclasses.replace(e, graph=None, prepared=None)
    return e


def _plain_forward(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


def _reference_of(prepared: PreparedGraph, tensor: torch.Tensor) -> torch.Tensor:
    """The reference (baseline) value of the recorded ``tensor``, from the prepared graph's notes."""
    for node in prepared.graph.nodes:
        for j, v in enumerate(node.outputs):
            if v is not None and v.tensor is tensor:
                ref = prepared.notes_of(node).reference
                if ref is None:
                    raise RuntimeError(f"internal: no DeepLIFT reference recorded for {node!r}")
                return ref[1][j]
    raise RuntimeError("internal: embedding output not found in the graph")
