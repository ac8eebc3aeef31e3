"""A model's layers as they run (names, types, output shapes), and Grad-CAM's default layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import SpecError


def list_layers(model: nn.Module, inputs: Any) -> list[tuple[str, str, tuple[int, ...] | None]]:
    """``(name, type, output shape)`` of every named submodule, in the order their forward finishes.

    One forward pass with forward hooks on a model the caller owns for this call; the hooks are
    removed before returning, also on errors.
    """
    from ..methods.core import select_output

    order: list[tuple[str, str, tuple[int, ...] | None]] = []
    handles = []

    def hook(name):
        def fn(mod, args, out):
            try:
                t = select_output(out)
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else None
            except Exception:
                shape = None
            order.append((name, type(mod).__name__, shape))

        return fn

    try:
        for name, m in model.named_modules():
            if name:
                handles.append(m.register_forward_hook(hook(name)))
        with torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        for h in handles:
            h.remove()
    seen, out = set(), []
    for row in order:  # a module called twice appears once, at its first finish
        if row[0] not in seen:
            seen.add(row[0])
            out.append(row)
    return out


def default_cam_layer(model: nn.Module, inputs: Any) -> str:
    """Grad-CAM's default layer: the last spatial feature map of the model.

    That is the last module whose output is ``(B, C, H, W)`` with ``1 < H * W`` and ``H, W`` no larger
    than the input's (Captum's and the paper's choice: the last convolutional features; attention
    maps are larger than the input and excluded), unless a transformer follows it: then the output of
    the second-to-last block (a numbered module whose output ``(B, N, D)`` holds a square patch grid),
    i.e. the input of the last block, as pytorch-grad-cam advises for ViTs: after the last block only
    the class token reaches the head, so the patch tokens' gradients there are zero.
    """
    import math

    layers = list_layers(model, inputs)
    x = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    ih, iw = (x.shape[-2], x.shape[-1]) if x.dim() >= 4 else (None, None)
    spatial, blocks = None, []
    for pos, (name, _, s) in enumerate(layers):
        if s is None:
            continue
        if len(s) == 4 and s[-1] * s[-2] > 1 and (ih is None or iw is None or (s[-2] <= ih and s[-1] <= iw)):
            spatial = (pos, name)
        elif len(s) == 3 and name.split(".")[-1].isdigit():
            n = s[1]
            if any(n - p > 1 and math.isqrt(n - p) ** 2 == n - p for p in range(0, 9)):
                blocks.append((pos, name))
    if blocks:  # the outermost list of blocks (not the numbered layers inside each block's MLP)
        depth = min(name.count(".") for _, name in blocks)
        blocks = [b for b in blocks if b[1].count(".") == depth]
    tokens = blocks[-2] if len(blocks) >= 2 else (blocks[-1] if blocks else None)
    chosen = tokens if tokens and (spatial is None or tokens[0] > spatial[0]) else spatial
    if chosen is None:
        raise SpecError(
            "gradcam needs a layer with a spatial output (batch, channels, height, width) or a patch-token "
            "output, and this model has none; give one with gradcam:layer=NAME (relprop layers MODEL lists them)"
        )
    return chosen[1]
