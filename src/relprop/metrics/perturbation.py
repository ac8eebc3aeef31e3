"""Perturbation-based faithfulness metrics: pixel flipping, region
perturbation (MoRF / LeRF), ABPC, insertion / deletion.

Everything is vectorised: for a batch of ``B`` samples and ``S`` perturbation
steps, the ``B * (S + 1)`` perturbed copies are built on the model's device with
one masked ``torch.where`` per chunk and evaluated ``batch_size`` at a time; by
default (``batch_size=None``) the chunk size that runs fastest is measured in the
call on the first chunks (see :mod:`._chunks`).

Quantus compatibility (``region_perturbation``, ``pixel_flipping``, ``abpc``)
----------------------------------------------------------------------------
* Patches tile the (optionally centre-padded) spatial grid in raster order,
  all channels of a patch together; a patch is ranked by the sum of its
  attributions (over channels and pixels, padding counts as zero).
* Ranking uses ``numpy.argsort`` of ``-scores`` (MoRF) / ``scores`` (LeRF),
  the same call Quantus makes, so ties are broken identically.
* Baseline names follow Quantus: ``"black"`` is the per-sample minimum of the
  input, ``"white"`` its maximum, ``"mean"`` the per-sample mean *recomputed
  on the progressively perturbed (edge-padded) input before every step*,
  exactly as Quantus does. ``"zero"`` (or any number) is a constant.
* Region-perturbation scores are drops ``f(x)_t - f(x_k)_t`` for ``k = 1..S``;
  pixel-flipping scores are the raw ``f(x_k)_t``; AUCs are trapezoid rules with
  ``dx = 1`` (what Quantus' ``calculate_auc`` does).

Layout: units and ranking in :mod:`._units`, baselines in :mod:`.baselines`, the
evaluation in :mod:`._engine` (shared with the token metrics in :mod:`.tokens`);
this module holds the result types and the public functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import _units
from ._engine import area_between, area_between_per_step, evaluation_device, model_forward, run_schedule
from ._utils import (
    TargetLike,
    check_attributions,
    check_inputs,
    check_positive_int,
    check_targets,
    nanmean,
    trapezoid,
)
from .baselines import ALL_BASELINES as _ALL_BASELINES  # noqa: F401 (re-exported for callers)
from .baselines import BaselineLike


# ---------------------------------------------------------------------------
# Result containers
# ---------------------------------------------------------------------------
@dataclass
class PerturbationCurve:
    """Curves from :func:`perturbation_curve`.

    ``fractions[k]`` is the fraction of units (patches/pixels) replaced after
    step ``k`` (``k = 0`` is the clean input). ``logit``/``prob`` hold the
    target logit/probability, ``correct`` whether the prediction still equals
    ``labels``; all are ``(batch, steps + 1)``.
    """

    fractions: torch.Tensor
    logit: torch.Tensor
    prob: torch.Tensor
    correct: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor
    order: str
    baseline: str
    patch_size: int
    batch_size: int = 0

    @property
    def accuracy(self) -> torch.Tensor:
        """Batch accuracy after each step, shape ``(steps + 1,)``."""
        return self.correct.to(torch.float64).mean(0)

    def auc(self, kind: str = "prob") -> torch.Tensor:
        """Per-sample area under the ``kind`` curve (``"prob"`` or ``"logit"``) over ``fractions`` in [0, 1]."""
        y = {"prob": self.prob, "logit": self.logit}.get(kind)
        if y is None:
            raise ValueError(f"kind must be 'prob' or 'logit', got {kind!r}")
        return trapezoid(y, self.fractions)

    @property
    def accuracy_auc(self) -> float:
        return float(trapezoid(self.accuracy, self.fractions))

    def plot(self, ax=None, kind: str = "prob", **kwargs):
        from .plots import plot_perturbation_curve

        return plot_perturbation_curve(self, ax=ax, kind=kind, **kwargs)


@dataclass
class PerturbationResult:
    """Quantus-compatible region-perturbation / pixel-flipping result.

    ``scores`` is ``(batch, steps)``: score drops for region perturbation,
    raw scores for pixel flipping (as in Quantus). ``auc`` is the per-sample
    trapezoid AUC of ``scores`` (dx = 1) and ``mean_auc`` its mean (Quantus'
    ``get_auc_score``). ``clean_score`` is the unperturbed target score.
    ``batch_size``: the copies per forward pass (the measured one when ``None`` was passed).
    """

    kind: str
    scores: torch.Tensor
    auc: torch.Tensor
    mean_auc: float
    clean_score: torch.Tensor
    target: torch.Tensor
    order: str
    baseline: str
    softmax: bool
    patch_size: int = 1
    features_in_step: int = 1
    batch_size: int = 0

    @property
    def score_curve(self) -> torch.Tensor:
        """Model score after ``k`` steps, ``k = 0..steps`` (``(batch, steps + 1)``)."""
        if self.kind == "region_perturbation":
            after = self.clean_score[:, None] - self.scores
        else:
            after = self.scores
        return torch.cat([self.clean_score[:, None], after], 1)

    def plot(self, ax=None, **kwargs):
        from .plots import plot_perturbation_result

        return plot_perturbation_result(self, ax=ax, **kwargs)


@dataclass
class ABPCResult:
    """Area between perturbation curves: ``area(LeRF score curve) - area(MoRF score curve)``.

    Computed on Quantus-style drops this equals ``auc(MoRF drops) - auc(LeRF drops)``;
    positive (larger is better) for a faithful explanation. ``per_step`` is the same area
    divided by the number of steps' intervals (the mean gap; comparable across step counts).
    ``morf``/``lerf`` are the two :class:`PerturbationResult` (images) or ``None`` (tokens).
    """

    scores: torch.Tensor
    value: float
    morf: PerturbationResult | None
    lerf: PerturbationResult | None
    per_step: torch.Tensor | None = None
    morf_curve: torch.Tensor | None = None
    lerf_curve: torch.Tensor | None = None

    @classmethod
    def from_curves(cls, morf_curve: torch.Tensor, lerf_curve: torch.Tensor, morf=None, lerf=None) -> ABPCResult:
        """The one ABPC definition, from ``(B, S + 1)`` score curves (clean score at step 0)."""
        scores = area_between(morf_curve, lerf_curve)
        return cls(
            scores=scores,
            value=nanmean(scores),
            morf=morf,
            lerf=lerf,
            per_step=area_between_per_step(morf_curve, lerf_curve),
            morf_curve=morf_curve,
            lerf_curve=lerf_curve,
        )

    @property
    def value_per_step(self) -> float:
        return nanmean(self.per_step) if self.per_step is not None else float("nan")

    def plot(self, ax=None, **kwargs):
        from .plots import plot_abpc

        return plot_abpc(self, ax=ax, **kwargs)


@dataclass
class InsertionDeletionResult:
    """Insertion / deletion curves of the target probability (Petsiuk et al., 2018)."""

    fractions: torch.Tensor
    insertion: torch.Tensor
    deletion: torch.Tensor
    insertion_auc: torch.Tensor
    deletion_auc: torch.Tensor
    mean_insertion_auc: float
    mean_deletion_auc: float

    @classmethod
    def from_curves(cls, fractions: torch.Tensor, insertion: torch.Tensor, deletion: torch.Tensor):
        """AUCs over the fraction of units replaced (``fractions``, from 0 to 1)."""
        iauc, dauc = trapezoid(insertion, fractions), trapezoid(deletion, fractions)
        return cls(fractions, insertion, deletion, iauc, dauc, nanmean(iauc), nanmean(dauc))

    @property
    def difference_per_sample(self) -> torch.Tensor:
        """Insertion AUC minus deletion AUC per sample (larger is better)."""
        return self.insertion_auc - self.deletion_auc

    @property
    def difference(self) -> float:
        """Mean insertion AUC minus mean deletion AUC (larger is better)."""
        return self.mean_insertion_auc - self.mean_deletion_auc

    def plot(self, ax=None, **kwargs):
        from .plots import plot_insertion_deletion

        return plot_insertion_deletion(self, ax=ax, **kwargs)


# ---------------------------------------------------------------------------
# Public API: each function only chooses units, schedule and result shape
# ---------------------------------------------------------------------------
def _prepare(model, inputs, attributions, target, batch_size, abs_):
    if not isinstance(model, torch.nn.Module) and not callable(model):
        raise ValueError(f"model must be a torch.nn.Module (or callable), got {type(model).__name__}")
    x = check_inputs(inputs)
    a = check_attributions(attributions, x)
    if abs_:
        a = a.abs()
    t = check_targets(target, x.shape[0])
    bs = None if batch_size is None else check_positive_int(batch_size, "batch_size")
    return x, a, t, bs, evaluation_device(model, x)


def _scores(a: torch.Tensor, units: _units.Units) -> np.ndarray:
    return _units.unit_scores(a.reshape(a.shape[0], -1), units)


def _even_steps(units: _units.Units, steps: int | None) -> tuple[int, np.ndarray]:
    u = units.n_units
    n_steps = u if steps is None else check_positive_int(steps, "steps")
    if n_steps > u:
        raise ValueError(f"steps must be at most the number of patches ({u}), got {n_steps}")
    return n_steps, _units.even_schedule(u, n_steps)


def _baseline_kw(options: dict) -> dict:
    bad = set(options) - {"blur_sigma", "noise_std"}
    if bad:
        raise TypeError(f"unexpected keyword argument(s): {sorted(bad)} (baseline options: blur_sigma, noise_std)")
    return {"blur_sigma": options.get("blur_sigma", 2.0), "noise_std": options.get("noise_std")}


def perturbation_curve(
    model: torch.nn.Module,
    inputs,
    attributions,
    target: TargetLike = None,
    *,
    order: str = "morf",
    patch_size: int = 1,
    steps: int | None = None,
    baseline: BaselineLike = "zero",
    labels: TargetLike = None,
    abs: bool = False,
    pad: bool = False,
    batch_size: int | None = None,
    blur_sigma: float = 2.0,
    noise_std: float | None = None,
    seed: int | None = 0,
    progress: bool = False,
) -> PerturbationCurve:
    """Pixel-flipping / region-perturbation curves of the target logit,
    probability and batch accuracy.

    Units are ``patch_size``-sized spatial patches (all channels together) of
    ``(B, C, *spatial)`` inputs, or single features of ``(B, F)`` inputs. They
    are ranked by summed attribution and replaced by ``baseline`` in ``steps``
    equal groups (default: one unit per step), ``order`` ``"morf"`` (most
    relevant first), ``"lerf"`` or ``"random"``.

    ``baseline``: ``"zero"``, ``"black"`` (per-sample min), ``"white"``
    (per-sample max), ``"mean"`` (Quantus' running mean), ``"blur"`` (Gaussian
    blur, ``blur_sigma``), ``"noise"`` (Gaussian noise with the sample's
    mean/std, or ``noise_std``), a number, a tensor broadcastable to the
    inputs, or a callable ``f(inputs) -> tensor`` (given the inputs on the CPU).

    ``target`` defaults to the predicted class; ``labels`` (for the accuracy
    curve) default to ``target``.
    """
    x, a, t, bs, dev = _prepare(model, inputs, attributions, target, batch_size, abs)
    order = _units.check_order(order)
    patch_size = check_positive_int(patch_size, "patch_size")
    units = _units.units_for(x, patch_size, pad)
    n_steps, schedule = _even_steps(units, steps)
    c = run_schedule(
        model_forward(model, dev), x, _scores(a, units), units, order, schedule, n_steps, baseline, t, bs,
        device=dev, seed=seed, blur_sigma=blur_sigma, noise_std=noise_std, progress=progress,
        desc="perturbation curve",
    )  # fmt: skip
    lab = check_targets(labels, x.shape[0], "labels")
    lab = c.target if lab is None else lab
    return PerturbationCurve(
        fractions=_units.fractions_of(schedule, n_steps, units.n_units),
        logit=c.logit,
        prob=c.prob,
        correct=c.pred == lab[:, None],
        target=c.target,
        labels=lab,
        order=order,
        baseline=c.baseline,
        patch_size=patch_size,
        batch_size=c.batch_size,
    )


def region_perturbation(
    model: torch.nn.Module,
    inputs,
    attributions,
    target: TargetLike = None,
    *,
    order: str = "morf",
    patch_size: int = 8,
    regions: int = 100,
    baseline: BaselineLike = "black",
    softmax: bool = True,
    abs: bool = False,
    pad: bool = False,
    batch_size: int | None = None,
    seed: int | None = 0,
    progress: bool = False,
    **baseline_options,
) -> PerturbationResult:
    """Region perturbation (Samek et al., 2016) with Quantus' conventions.

    Returns a :class:`PerturbationResult` whose ``.scores`` is
    ``(batch, regions)``: the target score (softmax probability if
    ``softmax`` else logit) of the clean input minus the score after the
    first ``k`` patches (ranked by summed attribution) were replaced by
    ``baseline``; ``.auc`` the per-sample trapezoid AUC of those curves and
    ``.mean_auc`` their mean (Quantus ``RegionPerturbation.get_auc_score``).
    ``regions`` is capped at the number of patches. ``pad=True`` allows a
    ``patch_size`` that does not divide the image (centred padding like Quantus).

    ``batch_size``: perturbed copies per forward pass. ``None`` (default) measures
    it in the call: the inputs' batch (at most 256), then twice that and so on
    while the time per copy drops by 10% or more (two chunks timed per size, the
    faster counts; every chunk timed is real work).
    The choice changes the scores only by float rounding; pass a number for
    bit-for-bit repeatable runs. The same holds for every perturbation metric.
    """
    x, a, t, bs, dev = _prepare(model, inputs, attributions, target, batch_size, abs)
    if x.dim() != 4:
        raise ValueError(f"inputs must be images shaped (batch, channels, height, width), got shape {tuple(x.shape)}")
    order = _units.check_order(order)
    patch_size = check_positive_int(patch_size, "patch_size")
    regions = check_positive_int(regions, "regions")
    units = _units.make_units(x, patch_size, pad)
    n_steps = min(regions, units.n_units)
    schedule = np.minimum(np.arange(units.n_units), n_steps)  # one patch per step, the rest never
    c = run_schedule(
        model_forward(model, dev), x, _scores(a, units), units, order, schedule, n_steps, baseline, t, bs,
        device=dev, seed=seed, progress=progress, desc="region perturbation",
        **_baseline_kw(baseline_options),
    )  # fmt: skip
    score = c.prob if softmax else c.logit
    drops = score[:, :1] - score[:, 1:]
    auc = trapezoid(drops)
    return PerturbationResult(
        kind="region_perturbation",
        scores=drops,
        auc=auc,
        mean_auc=nanmean(auc),
        clean_score=score[:, 0].clone(),
        target=c.target,
        order=order,
        baseline=c.baseline,
        softmax=softmax,
        patch_size=patch_size,
        batch_size=c.batch_size,
    )


def pixel_flipping(
    model: torch.nn.Module,
    inputs,
    attributions,
    target: TargetLike = None,
    *,
    order: str = "morf",
    features_in_step: int = 1,
    baseline: BaselineLike = "black",
    softmax: bool = True,
    abs: bool = False,
    batch_size: int | None = None,
    seed: int | None = 0,
    progress: bool = False,
    **baseline_options,
) -> PerturbationResult:
    """Pixel flipping (Bach et al., 2015) matching Quantus ``PixelFlipping``.

    Every input element (channels separately, as in Quantus) is a unit;
    ``features_in_step`` elements are replaced per step, in ``order``.
    ``.scores`` is ``(batch, ceil(n_features / features_in_step))``: the target
    score *after* each step (not a drop, as in Quantus); ``.auc`` its
    per-sample trapezoid AUC (Quantus ``return_auc_per_sample=True``) and
    ``.mean_auc`` the mean. Quantus only has MoRF; ``order="lerf"`` equals
    Quantus applied to negated attributions.
    """
    x, a, t, bs, dev = _prepare(model, inputs, attributions, target, batch_size, abs)
    order = _units.check_order(order)
    fis = check_positive_int(features_in_step, "features_in_step")
    units = _units.feature_units(x)
    if fis > units.n_units:
        raise ValueError(f"features_in_step must be at most the number of features ({units.n_units}), got {fis}")
    n_steps = math.ceil(units.n_units / fis)
    schedule = np.arange(units.n_units) // fis
    c = run_schedule(
        model_forward(model, dev), x, _scores(a, units), units, order, schedule, n_steps, baseline, t, bs,
        device=dev, seed=seed, progress=progress, desc="pixel flipping",
        **_baseline_kw(baseline_options),
    )  # fmt: skip
    score = c.prob if softmax else c.logit
    curves = score[:, 1:].clone()
    auc = trapezoid(curves)
    return PerturbationResult(
        kind="pixel_flipping",
        scores=curves,
        auc=auc,
        mean_auc=nanmean(auc),
        clean_score=score[:, 0].clone(),
        target=c.target,
        order=order,
        baseline=c.baseline,
        softmax=softmax,
        features_in_step=fis,
        batch_size=c.batch_size,
    )


def abpc(
    model: torch.nn.Module,
    inputs,
    attributions,
    target: TargetLike = None,
    *,
    patch_size: int = 8,
    regions: int = 100,
    baseline: BaselineLike = "black",
    softmax: bool = True,
    abs: bool = False,
    pad: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
    **baseline_options,
) -> ABPCResult:
    """Area between the LeRF and MoRF perturbation curves (Samek et al., 2016).

    Same arguments as :func:`region_perturbation` except ``order``.
    ``ABPC = area(LeRF score curve) - area(MoRF score curve)`` over steps ``1..S``
    (:func:`relprop.metrics._engine.area_between`, the one definition the token
    metric shares); on Quantus' drop curves this is ``auc(MoRF drops) - auc(LeRF drops)``.
    ``.scores`` is per sample, ``.value`` the dataset mean (higher = more faithful),
    ``.per_step`` the mean gap per step (comparable across step counts).
    """
    kw = dict(
        patch_size=patch_size,
        regions=regions,
        baseline=baseline,
        softmax=softmax,
        abs=abs,
        pad=pad,
        batch_size=batch_size,
        progress=progress,
        **baseline_options,
    )
    morf = region_perturbation(model, inputs, attributions, target, order="morf", **kw)
    kw["batch_size"] = morf.batch_size  # measured once for both orders
    lerf = region_perturbation(model, inputs, attributions, morf.target, order="lerf", **kw)
    return ABPCResult.from_curves(morf.score_curve, lerf.score_curve, morf=morf, lerf=lerf)


def insertion_deletion(
    model: torch.nn.Module,
    inputs,
    attributions,
    target: TargetLike = None,
    *,
    patch_size: int = 1,
    steps: int | None = None,
    deletion_baseline: BaselineLike = "zero",
    insertion_baseline: BaselineLike = "blur",
    abs: bool = False,
    pad: bool = False,
    batch_size: int | None = None,
    blur_sigma: float = 2.0,
    seed: int | None = 0,
    progress: bool = False,
) -> InsertionDeletionResult:
    """Insertion and deletion AUCs (Petsiuk et al., 2018) of the target probability.

    Deletion replaces units most-relevant first by ``deletion_baseline``;
    insertion starts from ``insertion_baseline`` and restores units
    most-relevant first. AUCs are over the fraction of units in [0, 1].
    Higher insertion AUC and lower deletion AUC are better.
    """
    x, a, t, bs, dev = _prepare(model, inputs, attributions, target, batch_size, abs)
    patch_size = check_positive_int(patch_size, "patch_size")
    units = _units.units_for(x, patch_size, pad)
    n_steps, schedule = _even_steps(units, steps)
    fn, scores = model_forward(model, dev), _scores(a, units)
    kw: dict[str, Any] = dict(device=dev, seed=seed, blur_sigma=blur_sigma, progress=progress)
    d = run_schedule(fn, x, scores, units, "morf", schedule, n_steps, deletion_baseline, t, bs, desc="deletion", **kw)
    i = run_schedule(
        fn, x, scores, units, "morf", schedule, n_steps, insertion_baseline, d.target, d.batch_size,
        insertion=True, desc="insertion", **kw,
    )  # fmt: skip
    return InsertionDeletionResult.from_curves(_units.fractions_of(schedule, n_steps, units.n_units), i.prob, d.prob)
