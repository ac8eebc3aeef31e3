"""Activation profiles: per-class mean activation of every unit of a layer over a data set.

The global technique of the COVID-19 chest X-ray interpretability study: run the data through the
model, record a layer's output, reduce each unit (channel) to one number per sample (spatial mean),
and average per class (true label or predicted class). The result shows which units respond to
which class; :func:`plot_activation_profiles` draws it as a heat map (matplotlib imported lazily).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .gradcam import layer_name


@dataclass
class ActivationProfiles:
    """``means[c, u]``: mean activation of unit ``u`` over the samples of class ``c``."""

    layer: str
    means: torch.Tensor
    counts: torch.Tensor
    classes: list = field(default_factory=list)

    def plot(self, **kwargs):
        return plot_activation_profiles(self, **kwargs)


def _batch(item: Any):
    if isinstance(item, dict):
        x = {k: v for k, v in item.items() if k not in ("label", "labels", "target", "targets", "y")}
        y = next((item[k] for k in ("label", "labels", "target", "targets", "y") if k in item), None)
        return x, y
    if isinstance(item, (tuple, list)):
        if len(item) < 2:
            return item[0], None
        return item[0], item[1]
    return item, None


def activation_profiles(
    model,
    layer,
    dataloader: Iterable,
    *,
    by: str = "label",
    num_classes: int | None = None,
    reduce: str = "mean",
    max_batches: int | None = None,
) -> ActivationProfiles:
    """Per-class mean activation of each unit of ``layer`` over ``dataloader``.

    Args:
        layer: module name or module. Its output is reduced to ``(batch, units)``: channels of a
            ``(B, C, ...)`` map (spatial ``reduce``: ``"mean"`` or ``"max"``), features of ``(B, F)``, or the
            hidden units of ``(B, tokens, H)`` token outputs (mean over tokens).
        dataloader: yields ``(inputs, labels)`` pairs (or dicts with a ``label(s)`` key, or bare inputs with
            ``by="prediction"``).
        by: ``"label"`` (the data set's labels) or ``"prediction"`` (the model's predicted class).
    """
    if by not in ("label", "prediction"):
        raise ValueError(f"by: expected 'label' or 'prediction', got {by!r}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce: expected 'mean' or 'max', got {reduce!r}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError("model: expected an nn.Module")
    name = layer_name(model, layer)
    module = dict(model.named_modules())[name]
    store: dict = {}

    def hook(_m, _i, out):
        store["a"] = out[0] if isinstance(out, (tuple, list)) else out

    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for b, item in enumerate(dataloader):
                if max_batches is not None and b >= max_batches:
                    break
                x, y = _batch(item)
                out = model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) else model(x)
                from .core import select_output

                logits = select_output(out)
                if by == "prediction":
                    y = logits.argmax(-1)
                elif y is None:
                    raise ValueError("dataloader: yields no labels; pass by='prediction'")
                y = torch.as_tensor(y).long().reshape(-1)
                a = store["a"].float()
                if a.dim() > 2:
                    if a.dim() == 3 and not (getattr(module, "out_channels", None) == a.shape[1]):
                        units = a.mean(1)  # (B, tokens, H)
                    else:
                        flat = a.flatten(2)
                        units = flat.mean(2) if reduce == "mean" else flat.amax(2)
                else:
                    units = a
                k = num_classes or logits.shape[-1]
                if sums is None or counts is None:
                    sums = torch.zeros(k, units.shape[1], dtype=torch.float64)
                    counts = torch.zeros(k, dtype=torch.float64)
                sums.index_add_(0, y, units.double())
                counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    finally:
        handle.remove()
    if sums is None or counts is None:
        raise ValueError("dataloader: yielded no batches")
    means = (sums / counts.clamp_min(1).unsqueeze(1)).float()
    return ActivationProfiles(name, means, counts.long(), list(range(means.shape[0])))


def plot_activation_profiles(
    profiles: ActivationProfiles, ax=None, class_names=None, sort_units: bool = True, cmap: str = "viridis"
):
    """Heat map of ``profiles.means`` (classes x units), units sorted by their preferred class."""
    import matplotlib.pyplot as plt

    m = profiles.means
    order = torch.arange(m.shape[1])
    if sort_units and m.shape[0] > 0:
        pref = m.argmax(0)
        order = torch.argsort(pref.double() * 1e9 - m.max(0).values.double())
    if ax is None:
        _, ax = plt.subplots(figsize=(min(16, 2 + m.shape[1] / 8), 1 + m.shape[0] / 3))
    im = ax.imshow(m[:, order].numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(m.shape[0]))
    ax.set_yticklabels(class_names or profiles.classes)
    ax.set_xlabel(f"units of {profiles.layer}" + (" (sorted by preferred class)" if sort_units else ""))
    ax.set_ylabel("class")
    ax.figure.colorbar(im, ax=ax, label="mean activation")
    return ax
