"""Class sensitivity (Rebuffi et al., 2020, "There and Back Again:
Revisiting Backpropagation Saliency Methods").

A class-sensitive explanation method should produce different maps for the
most and the least likely class. We report the per-sample similarity
(Spearman rank correlation by default) between the two maps: low similarity
means high class sensitivity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._utils import (
    as_float_tensor,
    check_inputs,
    check_positive_int,
    forward,
    nanmean,
    resolve_similarity,
)

ExplainFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ClassSensitivityResult:
    """``similarity[b]`` between the maps for ``top_class[b]`` and
    ``bottom_class[b]``; ``sensitivity = 1 - similarity``. ``top_maps`` and
    ``bottom_maps`` are the two explanations, flattened to ``(batch, n)``."""

    top_class: torch.Tensor
    bottom_class: torch.Tensor
    similarity: torch.Tensor
    mean_similarity: float
    top_maps: torch.Tensor
    bottom_maps: torch.Tensor
    similarity_name: str

    @property
    def sensitivity(self) -> torch.Tensor:
        return 1.0 - self.similarity

    @property
    def mean_sensitivity(self) -> float:
        return 1.0 - self.mean_similarity

    def plot(self, ax=None, **kwargs):
        from .plots import plot_class_sensitivity

        return plot_class_sensitivity(self, ax=ax, **kwargs)


def _explain(explain_fn: ExplainFn, model, x: torch.Tensor, t: torch.Tensor, name: str) -> torch.Tensor:
    out = explain_fn(model, x, t)
    a = as_float_tensor(out, f"{name} output", allow_int=True)
    if a.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must return one explanation per sample ({x.shape[0]}), got shape {tuple(a.shape)}")
    if torch.isnan(a).any():
        raise ValueError(f"{name} returned attributions containing NaN")
    return a.reshape(a.shape[0], -1).to(torch.float64).cpu()


def class_sensitivity(
    model: torch.nn.Module,
    inputs,
    explain_fn: ExplainFn,
    *,
    similarity: str | Callable = "spearman",
    abs: bool = False,
    batch_size: int = 256,
) -> ClassSensitivityResult:
    """Compare ``explain_fn(model, x, top_class)`` with ``explain_fn(model, x, bottom_class)``.

    ``explain_fn(model, inputs, targets) -> tensor`` (batched) computes the
    explanations. ``similarity`` is ``"spearman"``, ``"pearson"``,
    ``"cosine"`` or a callable on two ``(B, N)`` tensors returning ``(B,)``.
    ``abs`` compares absolute maps.
    """
    if not callable(explain_fn):
        raise ValueError(
            f"explain_fn must be a callable (model, inputs, targets) -> tensor, got {type(explain_fn).__name__}"
        )
    x = check_inputs(inputs)
    bs = check_positive_int(batch_size, "batch_size")
    sim = resolve_similarity(similarity)
    tops, bots, tmaps, bmaps = [], [], [], []
    for i in range(0, x.shape[0], bs):
        xb = x[i : i + bs]
        out = forward(model, xb)
        top = out.argmax(1)
        bot = out.argmin(1)
        tm = _explain(explain_fn, model, xb, top, "explain_fn")
        bm = _explain(explain_fn, model, xb, bot, "explain_fn")
        tops.append(top)
        bots.append(bot)
        tmaps.append(tm)
        bmaps.append(bm)
    top_maps = torch.cat(tmaps)
    bottom_maps = torch.cat(bmaps)
    if abs:
        s = sim(top_maps.abs(), bottom_maps.abs())
    else:
        s = sim(top_maps, bottom_maps)
    return ClassSensitivityResult(
        top_class=torch.cat(tops),
        bottom_class=torch.cat(bots),
        similarity=s,
        mean_similarity=nanmean(s),
        top_maps=top_maps,
        bottom_maps=bottom_maps,
        similarity_name=similarity if isinstance(similarity, str) else getattr(similarity, "__name__", "callable"),
    )
