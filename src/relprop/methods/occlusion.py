"""Occlusion (Zeiler & Fergus 2014) as Captum's ``Occlusion``: a window slides over each input with the
given strides, the covered part is replaced by the baseline, and each element's attribution is the
mean drop of the target score over the windows covering it. Windows are evaluated in batches
(``perturbations_per_eval`` windows per forward pass), with no gradient and no hooks.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from ._common import check_positive_int, expand_target, format_baselines, leaves, rebuild
from ._validate import score as target_score
from ._validate import select_output, updating_norms, validate_call, warn_training
from .core import Explanation, split_inputs
from .explain import register_method


def _per_input(name: str, value: Any, xs: list[torch.Tensor], default=None) -> list[tuple[int, ...]]:
    """One tuple of ints per input (dims after the batch)."""
    if value is None:
        if default is None:
            raise ValueError(f"{name}: required (a tuple of ints per input: the window size over the non-batch dims)")
        value = default
    if isinstance(value, int) and not isinstance(value, bool):
        return [(value,) * (x.dim() - 1) for x in xs]
    if (
        isinstance(value, (tuple, list))
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        if len(xs) != 1:
            if all(x.dim() - 1 == len(value) for x in xs):
                return [tuple(value)] * len(xs)
            raise ValueError(f"{name}: {len(xs)} inputs need one tuple per input")
        value = [tuple(value)]
    if not isinstance(value, (tuple, list)) or len(value) != len(xs):
        raise ValueError(f"{name}: expected one tuple of ints per input ({len(xs)}), got {value!r}")
    out = []
    for x, v in zip(xs, value):
        v = (v,) * (x.dim() - 1) if isinstance(v, int) else tuple(v)
        if len(v) != x.dim() - 1 or not all(isinstance(i, int) and i >= 1 for i in v):
            raise ValueError(
                f"{name}: expected {x.dim() - 1} positive ints for an input of shape {tuple(x.shape)}, got {v!r}"
            )
        out.append(v)
    return out


def _score(model, inputs, target, rows: int):
    """(score per sample, explained output, class indices) of one forward pass on ``inputs``."""
    args, kwargs = split_inputs(inputs)
    raw = model(*args, **kwargs)
    s, idx = target_score(raw, target, rows)
    return s, (s if idx is None else select_output(raw)), idx


@register_method("occlusion")
def occlusion(
    model, inputs, *, target, sliding_window_shapes=None, strides=None, baselines=None, perturbations_per_eval=None
) -> Explanation:
    """Occlusion attribution, as Captum's ``Occlusion.attribute``.

    Args:
        sliding_window_shapes: window size over the non-batch dims (e.g. ``(3, 8, 8)`` for images), one tuple
            per input for several inputs.
        strides: step of the window per dim (int or tuple; default 1), one per input for several inputs.
        baselines: what the window is replaced by: ``None`` (zeros; token id 0), a number, a tensor, one per
            input (tuple) or a dict.
        perturbations_per_eval: windows per forward pass (``None``: as many as fit in about 256 rows).

    The model runs as it is, under ``torch.no_grad()``: a batch norm in training mode would update its
    running statistics at every pass, so that is refused (call ``model.eval()``); active dropout gets a
    warning, since every pass (and every row of it) draws its own mask and the score differences then
    contain dropout noise.
    """
    batch = validate_call(model, inputs, target, same_batch=True)
    norms = updating_norms(model)
    if norms:
        raise ValueError(
            f"occlusion: the model is in training mode and its batch norms ({', '.join(norms[:3])}) would update "
            "their running statistics at every forward pass; call model.eval()"
        )
    warn_training(model, "occlusion", "every forward pass (and every row of it) draws its own dropout mask")
    xs = leaves(inputs)
    windows = _per_input("sliding_window_shapes", sliding_window_shapes, xs)
    steps = _per_input("strides", strides, xs, default=1)
    base = format_baselines(inputs, baselines)
    if perturbations_per_eval is None:
        perturbations_per_eval = max(1, 256 // batch)
    check_positive_int("perturbations_per_eval", perturbations_per_eval)
    for x, w, s in zip(xs, windows, steps):
        dims = tuple(x.shape[1:])
        if any(wi > di for wi, di in zip(w, dims)):
            raise ValueError(f"sliding_window_shapes: window {w} exceeds the input dims {dims}")
        if any(si > wi and di != wi for si, wi, di in zip(s, w, dims)):
            raise ValueError(f"strides: stride {s} larger than the window {w}")
    with torch.no_grad():
        ref, shown, idx = _score(model, inputs, target, batch)
        out = []
        for i, (x, w, s) in enumerate(zip(xs, windows, steps)):
            dims = tuple(x.shape[1:])
            counts = [math.ceil((d - wi) / si) + 1 for d, wi, si in zip(dims, w, s)]
            # feature k: dim 0 varies fastest (Captum's numbering)
            starts = [
                tuple(c * si for c, si in zip(reversed(combo), s))
                for combo in itertools.product(*[range(c) for c in reversed(counts)])
            ]
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            total = torch.zeros((batch,) + dims, dtype=dtype, device=x.device)
            weight = torch.zeros(dims, dtype=total.dtype, device=x.device)
            for j in range(0, len(starts), perturbations_per_eval):
                chunk = starts[j : j + perturbations_per_eval]
                p = len(chunk)
                mask = torch.zeros((p,) + dims, dtype=torch.bool, device=x.device)
                for q, st in enumerate(chunk):
                    mask[(q,) + tuple(slice(a, a + wi) for a, wi in zip(st, w))] = True
                m = mask.unsqueeze(1)
                ablated = torch.where(m, base[i].unsqueeze(0), x.unsqueeze(0)).reshape((p * batch,) + dims)
                others = [ablated if k == i else y.repeat(p, *([1] * (y.dim() - 1))) for k, y in enumerate(xs)]
                tgt = expand_target(target, batch, p)
                score = _score(model, rebuild(inputs, others), tgt, p * batch)[0].reshape(p, batch)
                diff = (ref.unsqueeze(0) - score).to(total.dtype)
                mf = mask.to(total.dtype)
                total += torch.einsum("pb,p...->b...", diff, mf)
                weight += mf.sum(0)
            out.append((total / weight).to(x.dtype if x.is_floating_point() else total.dtype))
    return Explanation(
        attributions=rebuild(inputs, out), output=shown.detach(), target=idx, score=ref, method="occlusion"
    )
