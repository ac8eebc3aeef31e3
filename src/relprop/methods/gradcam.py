"""Grad-CAM and Guided Grad-CAM at any layer (Selvaraju et al. 2017), as Captum's ``LayerGradCam`` and
``GuidedGradCam``, including transformer token grids.

The layer is a module name (or the module itself). Its output activation and the gradient there come
from one traced backward pass (``layers=``). A token layout ``(batch, tokens, channels)`` is turned
into a patch grid ``(batch, channels, h, w)`` first: prefix tokens (class, register/distillation
tokens) are dropped and the rest reshaped to a square (or ``reshape=(h, w)``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from .._errors import did_you_mean
from ..graph import Graph, Value
from ..rules.composites import GradientComposite
from .core import Explanation, module_value, run_backward
from .explain import register_method


def layer_name(model, layer: Any, argname: str = "layer") -> str:
    """A module name from a name or a module of ``model``."""
    if isinstance(layer, str):
        if isinstance(model, torch.nn.Module):
            names = dict(model.named_modules())
            if layer not in names:
                hint = did_you_mean(layer, [n for n in names if n], n=3)
                raise ValueError(f"{argname}: no module named '{layer}' in the model.{hint}")
        return layer
    if isinstance(layer, torch.nn.Module) and isinstance(model, torch.nn.Module):
        for n, m in model.named_modules():
            if m is layer:
                return n
        raise ValueError(f"{argname}: the given {type(layer).__name__} module is not part of the model")
    raise ValueError(f"{argname}: expected a module name (str) or a submodule of the model, got {type(layer).__name__}")


def module_input_value(graph: Graph, name: str) -> Value:
    """The first activation entering module ``name`` from outside (its input)."""
    prefix = name + "."
    inside = lambda n: n.module == name or n.module.startswith(prefix)  # noqa: E731
    produced: set[int] = set()
    for node in graph.nodes:
        if not inside(node):
            continue
        for v in node.inputs:
            if v.is_activation and v.is_float and v.index not in produced:
                return v
        produced.update(v.index for v in node.outputs if v is not None)
    raise ValueError(f"layer: module '{name}' has no activation input in the forward pass")


def to_grid(t: torch.Tensor, reshape: Any = "auto", prefix_tokens: int | None = None) -> torch.Tensor:
    """``(B, N, C)`` token activations -> ``(B, C, h, w)``; other layouts unchanged (``reshape=False``: never)."""
    if not (reshape in ("auto", False, None) or (isinstance(reshape, (tuple, list)) and len(reshape) == 2)):
        raise ValueError(f"reshape: expected 'auto', False or (h, w), got {reshape!r}")
    if reshape is False or reshape is None or t.dim() != 3:
        return t
    b, n, c = t.shape
    if reshape == "auto":
        if prefix_tokens is None:
            s = math.isqrt(n)
            while s > 0 and n - s * s > 16:
                s -= 1
            prefix = n - s * s
        else:
            prefix = prefix_tokens
            s = math.isqrt(n - prefix)
            if s * s != n - prefix:
                raise ValueError(f"prefix_tokens: {n} tokens minus {prefix} is not a square grid; pass reshape=(h, w)")
        h = w = s
    else:
        if not (isinstance(reshape, (tuple, list)) and len(reshape) == 2):
            raise ValueError(f"reshape: expected 'auto', False or (h, w), got {reshape!r}")
        h, w = int(reshape[0]), int(reshape[1])
        prefix = n - h * w if prefix_tokens is None else prefix_tokens
        if prefix < 0 or n - prefix != h * w:
            raise ValueError(f"reshape: a {h}x{w} grid does not fit {n} tokens (prefix_tokens={prefix_tokens})")
    return t[:, prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2)


def layer_gradient(
    model, inputs, *, target, layer, attribute_to_layer_input=False, composite=None, method="gradcam"
) -> tuple[torch.Tensor, torch.Tensor, Explanation]:
    """(gradient, activation) at the output (or input) of module ``layer``, and the explanation."""
    name = layer_name(model, layer)
    comp = composite or GradientComposite()
    holder: dict = {}

    def extra(graph):
        v = module_input_value(graph, name) if attribute_to_layer_input else module_value(graph, name)
        holder["v"] = v
        return [v]

    e = run_backward(
        model, inputs, target=target, composite=comp, method=method, times_output=False, extra_values=extra
    )
    v = holder["v"]
    return e.at_values[v.index], v.tensor, e


def grad_cam_map(grad: torch.Tensor, act: torch.Tensor, relu_attributions: bool, attr_dim_summation: bool = True):
    weights = grad.mean(dim=tuple(range(2, grad.dim())), keepdim=True) if grad.dim() > 2 else grad
    cam = weights * act
    if attr_dim_summation:
        cam = cam.sum(1, keepdim=True)
    return F.relu(cam) if relu_attributions else cam


@register_method("gradcam", "grad_cam")
def gradcam(
    model,
    inputs,
    *,
    target,
    layer,
    attribute_to_layer_input=False,
    relu_attributions=False,
    attr_dim_summation=True,
    reshape="auto",
    prefix_tokens=None,
    interpolate=None,
) -> Explanation:
    """Grad-CAM at module ``layer``: channel weights = spatial mean of the gradient; map = sum_c w_c A_c.

    As Captum's ``LayerGradCam``: the map has the layer's spatial shape, one channel, and no ReLU unless
    ``relu_attributions=True``. Token layers are reshaped to their patch grid (``reshape``, ``prefix_tokens``).
    ``interpolate="nearest"|"bilinear"|...`` upsamples the map to the (first) input's spatial size.
    """
    grad, act, e = layer_gradient(
        model, inputs, target=target, layer=layer, attribute_to_layer_input=attribute_to_layer_input
    )
    grad, act = to_grid(grad, reshape, prefix_tokens), to_grid(act, reshape, prefix_tokens)
    cam = grad_cam_map(grad, act, relu_attributions, attr_dim_summation)
    if interpolate is not None:
        x = _first_float(inputs)
        cam = F.interpolate(cam, tuple(x.shape[2:]), mode=interpolate)
    name = layer_name(model, layer)
    return dataclasses.replace(
        e, attributions=cam, method="gradcam", layers={name: grad}, activations={name: act}, graph=None, at_values={}
    )


def _first_float(inputs):
    from ._common import is_float, leaves

    for x in leaves(inputs):
        if is_float(x):
            return x
    raise ValueError("inputs: no float input to upsample the map to")


@register_method("guided_gradcam", "guided_grad_cam")
def guided_gradcam(
    model,
    inputs,
    *,
    target,
    layer,
    interpolate_mode="nearest",
    attribute_to_layer_input=False,
    reshape="auto",
    prefix_tokens=None,
) -> Explanation:
    """Guided Grad-CAM: guided backprop times the (ReLU'd) Grad-CAM map upsampled to each input (Captum's
    ``GuidedGradCam``)."""
    from ..trace import training_warned
    from ._common import is_float, leaves, rebuild
    from ._validate import warn_training
    from .gradients import guided_backprop

    warn_training(
        model, "guided_gradcam", "Grad-CAM and guided backprop run a forward pass each, with its own dropout masks"
    )
    with training_warned():  # one warning for the call, not one per recording
        grad, act, _ = layer_gradient(
            model, inputs, target=target, layer=layer, attribute_to_layer_input=attribute_to_layer_input
        )
        cam = grad_cam_map(to_grid(grad, reshape, prefix_tokens), to_grid(act, reshape, prefix_tokens), True)
        gb = guided_backprop(model, inputs, target=target)
    out = []
    for x, a in zip(leaves(inputs), gb.tensors()):
        if is_float(x) and x.dim() > 2:
            out.append(a * F.interpolate(cam, tuple(x.shape[2:]), mode=interpolate_mode))
        else:  # as Captum: no spatial dims to upsample the map to
            warnings.warn(
                "guided_gradcam: cannot interpolate the Grad-CAM map to an input without spatial dims; "
                "returning an empty tensor for it",
                stacklevel=2,
            )
            out.append(torch.empty(0, device=x.device))
    return dataclasses.replace(gb, attributions=rebuild(inputs, out), method="guided_gradcam")
