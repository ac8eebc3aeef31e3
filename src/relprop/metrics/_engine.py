"""The one perturbation engine behind pixel flipping, region perturbation, ABPC, insertion/deletion
and the token metrics.

A *schedule* says at which step each input element is replaced (``step_of_elem[b, e]``; a value
``>= n_steps`` means never). :func:`evaluate_steps` builds the ``B * (S + 1)`` perturbed copies with one
masked ``torch.where`` per chunk and evaluates them ``batch_size`` at a time; copies identical to the
previous step are not evaluated again. :func:`run_schedule` goes from attributions to curves: units,
ranking, schedule, baseline, evaluation. The public functions in :mod:`.perturbation` and
:mod:`.tokens` only choose the units, the schedule and how to shape the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ._units import Units, rank_units, step_of_elements
from ._utils import check_target_range, forward, progress_bar
from .baselines import BaselineLike, Fill, drifting_mean, resolve

#: ``fn(perturbed_inputs, sample_rows) -> logits``: rows index the original batch (for side inputs
#: such as a text model's attention mask).
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_forward(model) -> ForwardFn:
    """A float-input model as a :data:`ForwardFn` (no gradients, on the model's device)."""
    return lambda xp, rows: forward(model, xp)


@dataclass
class Curves:
    """Target logit, target probability and argmax prediction per copy: ``(B, n_steps + 1)`` each."""

    logit: torch.Tensor
    prob: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    baseline: str = ""


def predicted_target(fn: ForwardFn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    b = x.shape[0]
    return torch.cat(
        [fn(x[i : i + batch_size], torch.arange(i, min(b, i + batch_size))).argmax(1) for i in range(0, b, batch_size)]
    )


def evaluate_steps(
    fn: ForwardFn,
    x: torch.Tensor,
    step_of_elem: torch.Tensor,
    n_steps: int,
    fill: Fill,
    target: torch.Tensor | None,
    batch_size: int,
    progress: bool = False,
    desc: str = "",
    insertion: bool = False,
) -> Curves:
    """Evaluate the model on every ``(sample, step)`` copy.

    Copy ``k`` of sample ``b`` has element ``e`` replaced by the fill iff ``step_of_elem[b, e] < k``
    (``k = 0..n_steps``). With ``insertion`` the roles flip: the copy starts from the fill and gets
    the input back in the same order.
    """
    b = x.shape[0]
    feat_shape = tuple(x.shape[1:])
    xf = x.reshape(b, -1)
    n_points = n_steps + 1
    if target is None:  # explain the predicted class
        target = predicted_target(fn, x, batch_size)
    se_all = step_of_elem.to(torch.int16 if n_points < 32000 else torch.int32)  # less memory traffic

    def fill_values(rows: torch.Tensor, se: torch.Tensor) -> torch.Tensor:
        return fill.values(rows, se, n_steps, x.dtype)

    # Steps that change nothing (e.g. replacing background pixels that already equal the baseline)
    # give the same copy as the previous step: evaluate only copies that differ, reuse the rest.
    needed = torch.ones(b, n_points, dtype=torch.bool)
    if n_steps:
        changes = torch.zeros(b, n_points, dtype=torch.int64)
        for sl in range(0, b, max(1, batch_size)):
            rows = torch.arange(sl, min(b, sl + max(1, batch_size)))
            se = se_all[rows]
            diff = fill_values(rows, se) != xf[rows]
            changes[rows] = torch.zeros(len(rows), n_points, dtype=torch.int64).scatter_add_(
                1, se.long().clamp(max=n_steps), diff.long()
            )
        needed[:, 1:] = changes[:, :n_steps] > 0
    pairs = needed.nonzero()
    logits = torch.zeros(b, n_points, dtype=torch.float64)
    probs = torch.zeros(b, n_points, dtype=torch.float64)
    preds = torch.zeros(b, n_points, dtype=torch.long)
    checked = False
    with progress_bar(pairs.shape[0], progress, desc) as bar:
        for start in range(0, pairs.shape[0], batch_size):
            rows = pairs[start : start + batch_size, 0]
            ki = pairs[start : start + batch_size, 1]
            se = se_all[rows]
            mask = se < ki[:, None]
            base, fv = xf[rows], fill_values(rows, se)
            xp = torch.where(mask, base, fv) if insertion else torch.where(mask, fv, base)
            out = fn(xp.reshape(-1, *feat_shape), rows)
            if not checked:
                check_target_range(target, out.shape[1])
                checked = True
            t = target[rows]
            logits[rows, ki] = out.gather(1, t[:, None])[:, 0].to(torch.float64)
            probs[rows, ki] = torch.softmax(out, dim=1).gather(1, t[:, None])[:, 0].to(torch.float64)
            preds[rows, ki] = out.argmax(1)
            bar.update(len(rows))
    src = torch.where(needed, torch.arange(n_points).expand(b, n_points), torch.zeros((), dtype=torch.long))
    src = torch.cummax(src, dim=1).values
    return Curves(logits.gather(1, src), probs.gather(1, src), preds.gather(1, src), target)


def run_schedule(
    fn: ForwardFn,
    x: torch.Tensor,
    scores: np.ndarray,
    units: Units,
    order: str,
    step_of_rank: np.ndarray,
    n_steps: int,
    baseline: BaselineLike | Fill,
    target: torch.Tensor | None,
    batch_size: int,
    *,
    seed: int | None = 0,
    blur_sigma: float = 2.0,
    noise_std: float | None = None,
    insertion: bool = False,
    progress: bool = False,
    desc: str = "",
) -> Curves:
    """Rank ``units`` by ``scores`` (``(B, U)``) in ``order``, replace them by ``baseline`` on the schedule
    ``step_of_rank`` (rank -> step) and evaluate every step.

    Insertion starts from the baseline; a drifting ``"mean"`` then is the clean input's mean.
    """
    rank = rank_units(scores, order, seed)
    step_of_unit, soe = step_of_elements(rank, step_of_rank, units.uid)
    fill: Fill | None
    if isinstance(baseline, Fill):
        desc_b, fill = "fill", baseline
    else:
        desc_b, fill = resolve(baseline, x, blur_sigma=blur_sigma, noise_std=noise_std, seed=seed)
    if fill is None:
        if insertion:
            fill = Fill("scalar", x.reshape(x.shape[0], -1).mean(1))
        else:
            fill = drifting_mean(x, units, step_of_unit, n_steps)
    if insertion:
        fill = fill.as_tensor(x.shape[0], int(np.prod(x.shape[1:])))
    curves = evaluate_steps(fn, x, soe, n_steps, fill, target, batch_size, progress, desc, insertion=insertion)
    curves.baseline = desc_b
    return curves


def area_between(morf: torch.Tensor, lerf: torch.Tensor) -> torch.Tensor:
    """The one ABPC: per-sample ``sum`` of the trapezoid gap between the LeRF and MoRF score curves over
    steps ``k = 1..S`` (``dx = 1``), i.e. Quantus' ``auc(MoRF drops) - auc(LeRF drops)``. Both curves are
    ``(B, S + 1)`` with the clean score at ``k = 0``."""
    from ._utils import trapezoid

    return trapezoid((lerf - morf)[:, 1:].to(torch.float64))


def area_between_per_step(morf: torch.Tensor, lerf: torch.Tensor) -> torch.Tensor:
    """:func:`area_between` divided by the number of trapezoid intervals: the mean gap between the
    curves, comparable across step counts (a single step: the gap after it)."""
    gaps = (lerf - morf)[:, 1:].to(torch.float64)
    if gaps.shape[1] < 2:
        return gaps[:, 0] if gaps.shape[1] else torch.zeros(gaps.shape[0], dtype=torch.float64)
    return area_between(morf, lerf) / (gaps.shape[1] - 1)
