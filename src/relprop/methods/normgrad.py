"""NormGrad (Rebuffi et al. 2020, "There and Back Again: Revisiting Backpropagation Saliency Methods").

For a convolution ``y = W * x``, the gradient of the score w.r.t. the weights is a sum over output
locations of outer products ``g_u x_u^T`` (``g_u``: output gradient at ``u``, ``x_u``: the unfolded input
patch feeding it). NormGrad's saliency at ``u`` is the Frobenius norm of that outer product,
``||g_u|| * ||x_u||``. For a module that is not a convolution the "virtual identity layer" is used:
``||g_u|| * ||a_u||`` with ``a`` the module output. One backward pass gives every layer's map;
``combine`` merges them (upsampled to the input, each normalised per sample) as the paper's
multi-layer combination.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..rules.composites import GradientComposite
from .core import Explanation, module_value, run_backward
from .explain import register_method
from .gradcam import layer_name, to_grid

COMBINE = ("none", "sum", "product")


def _conv_node(graph, name):
    for node in graph.nodes:
        if node.module == name and node.packet == "convolution":
            return node
    return None


def conv_normgrad(node, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||unfold(x)_u|| * ||g_u||`` per output location of a (2-d) convolution node."""
    w = node.inputs[1].tensor
    stride, padding, dilation = node.args[3], node.args[4], node.args[5]
    k = tuple(w.shape[2:])
    gn = g.flatten(2).norm(dim=1) if g.dim() > 2 else g.abs()
    if x.dim() == 4:
        cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)  # (B, Cin*k*k, L)
        xn = cols.norm(dim=1)
    elif x.dim() == 3:
        cols = F.unfold(
            x.unsqueeze(2),
            (1,) + k,
            dilation=(1,) + tuple(dilation),
            padding=(0,) + tuple(padding),
            stride=(1,) + tuple(stride),
        )
        xn = cols.norm(dim=1)
    else:
        raise ValueError("layers: NormGrad supports 1-d and 2-d convolutions")
    return (xn * gn).reshape((g.shape[0], 1) + tuple(g.shape[2:]))


@register_method("normgrad")
def normgrad(
    model,
    inputs,
    *,
    target,
    layers: Sequence[str] | None = None,
    combine="sum",
    reshape="auto",
    prefix_tokens=None,
    size=None,
) -> Explanation:
    """NormGrad maps at ``layers`` (module names; default: every ``nn.Conv2d``) and their combination.

    ``Explanation.layers[name]`` holds each layer's map ``(B, 1, h, w)``; ``attributions`` is the combination
    (``combine="sum"``: mean of the per-sample max-normalised maps upsampled bilinearly to the input size;
    ``"product"``: their geometric mean; ``"none"``: the single layer's map when one layer is given).
    """
    if combine not in COMBINE:
        raise ValueError(f"combine: expected one of {', '.join(COMBINE)}, got {combine!r}")
    if layers is None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError("layers: required for a model that is not an nn.Module")
        layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        if not layers:
            raise ValueError("layers: the model has no nn.Conv2d; name the layers to use")
    elif isinstance(layers, str) or not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"layers: expected a non-empty list of module names, got {layers!r}")
    names = [layer_name(model, n, "layers") for n in layers]
    if combine == "none" and len(names) != 1:
        raise ValueError("combine: 'none' needs exactly one layer")
    picked: dict = {}

    def extra(graph):
        vals = []
        for n in names:
            node = _conv_node(graph, n)
            v = node.outputs[0] if node is not None else module_value(graph, n)
            picked[n] = (node, v)
            vals.append(v)
        return vals

    e = run_backward(
        model,
        inputs,
        target=target,
        composite=GradientComposite(),
        method="normgrad",
        times_output=False,
        extra_values=extra,
    )
    maps = {}
    for n in names:
        node, v = picked[n]
        g = e.at_values[v.index]
        if node is not None:
            maps[n] = conv_normgrad(node, node.inputs[0].tensor, g)
        else:
            a, gg = to_grid(v.tensor, reshape, prefix_tokens), to_grid(g, reshape, prefix_tokens)
            maps[n] = (
                (a.flatten(2).norm(dim=1) * gg.flatten(2).norm(dim=1)).reshape((a.shape[0], 1) + tuple(a.shape[2:]))
                if a.dim() > 2
                else (a.abs() * gg.abs())
            )
    if combine == "none":
        combined = maps[names[0]]
    else:
        if size is None:
            from ._common import is_float, leaves

            x = next((t for t in leaves(inputs) if is_float(t) and t.dim() > 2), None)
            if x is None:
                raise ValueError(
                    f"combine: '{combine}' upsamples every layer's map to the input's spatial size, and no float "
                    "input has spatial dims; pass size=(h, w), or one layer with combine='none'"
                )
            size = tuple(x.shape[2:])
        ups = []
        for m in maps.values():
            u = F.interpolate(m, size, mode="bilinear", align_corners=False) if m.dim() == 4 else m
            ups.append(u / u.flatten(1).amax(1).clamp_min(1e-12).view(-1, *([1] * (u.dim() - 1))))
        st = torch.stack(ups)
        combined = st.mean(0) if combine == "sum" else st.clamp_min(1e-12).log().mean(0).exp()
    return dataclasses.replace(
        e, attributions=combined, method="normgrad", layers=maps, activations={}, graph=None, at_values={}
    )
