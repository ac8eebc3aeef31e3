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

from ._common import check_positive_int, format_baselines, leaves, rebuild
from .core import Explanation, select_output, split_inputs, target_indices
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


def _score(model, inputs, target, batch_rows: int, full: bool = False):
    args, kwargs = split_inputs(inputs)
    raw = model(*args, **kwargs)
    if callable(target) and not isinstance(target, torch.Tensor):
        s = target(raw)
        if not isinstance(s, torch.Tensor) or s.dim() != 1:
            raise ValueError("target: a callable target must return a tensor of shape (batch,)")
        return (s, s, None) if full else s
    out = select_output(raw)
    idx = target_indices(target, out)
    view = [out.shape[0]] + [1] * (out.dim() - 1)
    s = out.gather(-1, idx.view(view).expand(*out.shape[:-1], 1)).flatten(1).sum(1)
    return (s, out, idx) if full else s


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
    """
    xs = leaves(inputs)
    windows = _per_input("sliding_window_shapes", sliding_window_shapes, xs)
    steps = _per_input("strides", strides, xs, default=1)
    base = format_baselines(inputs, baselines)
    batch = xs[0].shape[0]
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
        ref, shown, idx = _score(model, inputs, target, batch, full=True)
        out = []
        for i, (x, w, s) in enumerate(zip(xs, windows, steps)):
            dims = tuple(x.shape[1:])
            counts = [math.ceil((d - wi) / si) + 1 for d, wi, si in zip(dims, w, s)]
            # feature k: dim 0 varies fastest (Captum's numbering)
            starts = [
                tuple(c * si for c, si in zip(reversed(combo), s))
                for combo in itertools.product(*[range(c) for c in reversed(counts)])
            ]
            total = torch.zeros((batch,) + dims, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            weight = torch.zeros(dims, dtype=total.dtype)
            for j in range(0, len(starts), perturbations_per_eval):
                chunk = starts[j : j + perturbations_per_eval]
                p = len(chunk)
                mask = torch.zeros((p,) + dims, dtype=torch.bool)
                for q, st in enumerate(chunk):
                    mask[(q,) + tuple(slice(a, a + wi) for a, wi in zip(st, w))] = True
                m = mask.unsqueeze(1)
                ablated = torch.where(m, base[i].unsqueeze(0), x.unsqueeze(0)).reshape((p * batch,) + dims)
                others = [ablated if k == i else y.repeat(p, *([1] * (y.dim() - 1))) for k, y in enumerate(xs)]
                tgt = target
                if isinstance(target, (torch.Tensor, list, tuple)) and torch.as_tensor(target).numel() > 1:
                    tgt = torch.as_tensor(target).reshape(-1).repeat(p)
                score = _score(model, rebuild(inputs, others), tgt, p * batch).reshape(p, batch)
                diff = (ref.unsqueeze(0) - score).to(total.dtype)
                mf = mask.to(total.dtype)
                total += torch.einsum("pb,p...->b...", diff, mf)
                weight += mf.sum(0)
            out.append((total / weight).to(x.dtype if x.is_floating_point() else total.dtype))
    return Explanation(
        attributions=rebuild(inputs, out), output=shown.detach(), target=idx, score=ref, method="occlusion"
    )
