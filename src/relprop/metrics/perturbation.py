"""Perturbation-based faithfulness metrics: pixel flipping, region
perturbation (MoRF / LeRF), ABPC, insertion / deletion.

Everything is vectorised: for a batch of ``B`` samples and ``S`` perturbation
steps, the ``B * (S + 1)`` perturbed copies are built with one masked
``torch.where`` per chunk and evaluated ``batch_size`` at a time.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from ._utils import (
    TargetLike,
    check_attributions,
    check_inputs,
    check_positive_int,
    check_target_range,
    check_targets,
    forward,
    nanmean,
    progress_bar,
    trapezoid,
)

BaselineLike = Union[str, float, int, torch.Tensor, np.ndarray, Callable[[torch.Tensor], Any]]

_SCALAR_BASELINES = ("zero", "black", "white")
_TENSOR_BASELINES = ("blur", "noise")
_ALL_BASELINES = _SCALAR_BASELINES + ("mean",) + _TENSOR_BASELINES


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
    positive (larger is better) for a faithful explanation.
    """

    scores: torch.Tensor
    value: float
    morf: PerturbationResult
    lerf: PerturbationResult

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

    @property
    def difference(self) -> float:
        """Mean insertion AUC minus mean deletion AUC (larger is better)."""
        return self.mean_insertion_auc - self.mean_deletion_auc

    def plot(self, ax=None, **kwargs):
        from .plots import plot_insertion_deletion

        return plot_insertion_deletion(self, ax=ax, **kwargs)


# ---------------------------------------------------------------------------
# Units (patches) and ordering
# ---------------------------------------------------------------------------
def _quantus_padding(dim: int, patch: int) -> tuple[int, int]:
    rem = dim % patch
    if rem == 0:
        return (0, 0)
    total = patch - rem
    return (total // 2, total - total // 2)


def _spatial_shape(x: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """Spatial shape and channel count: ``(B, F)`` has no channel axis; ``(B, C, ...)`` does."""
    if x.dim() == 2:
        return tuple(x.shape[1:]), 1
    return tuple(x.shape[2:]), int(x.shape[1])


@dataclass
class _Units:
    uid: torch.Tensor  # (F,) unit id of each flattened element
    n_units: int
    pads: tuple[tuple[int, int], ...]
    patch_size: int
    padded_shape: tuple[int, ...] = field(default=())


def _make_units(x: torch.Tensor, patch_size: int, pad: bool, name: str = "patch_size") -> _Units:
    spatial, channels = _spatial_shape(x)
    pads = []
    grid = []
    for d in spatial:
        if patch_size > d:
            raise ValueError(f"{name}={patch_size} is larger than the input's spatial size {spatial}")
        if d % patch_size and not pad:
            raise ValueError(
                f"{name}={patch_size} must divide the spatial size {spatial} of inputs; pass pad=True to pad "
                f"the grid (centred, like Quantus) instead"
            )
        lo_hi = _quantus_padding(d, patch_size)
        pads.append(lo_hi)
        grid.append((d + lo_hi[0] + lo_hi[1]) // patch_size)
    coords = torch.meshgrid(*[torch.arange(d) for d in spatial], indexing="ij")
    uid = torch.zeros(spatial, dtype=torch.long)
    for c, (lo, _), g in zip(coords, pads, grid):
        uid = uid * g + (c + lo) // patch_size
    if x.dim() > 2:
        uid = uid.unsqueeze(0).expand(channels, *spatial)
    n_units = int(np.prod(grid))
    padded = tuple(d + lo + hi for d, (lo, hi) in zip(spatial, pads))
    return _Units(
        uid=uid.reshape(-1).contiguous(), n_units=n_units, pads=tuple(pads), patch_size=patch_size, padded_shape=padded
    )


def _feature_units(x: torch.Tensor) -> _Units:
    n = int(np.prod(x.shape[1:]))
    return _Units(uid=torch.arange(n), n_units=n, pads=(), patch_size=1, padded_shape=tuple(x.shape[1:]))


def _unit_scores(a_flat: torch.Tensor, units: _Units) -> np.ndarray:
    """Sum attributions per unit -> (B, U) numpy array."""
    if units.n_units == a_flat.shape[1] and torch.equal(units.uid, torch.arange(units.n_units)):
        return a_flat.cpu().numpy()
    sums = torch.zeros(a_flat.shape[0], units.n_units, dtype=torch.float64)
    sums.index_add_(1, units.uid, a_flat.to(torch.float64))
    return sums.numpy()


def _rank_units(scores: np.ndarray, order: str, seed: int | None) -> np.ndarray:
    """Return ``rank[b, u]`` (0 = perturbed first)."""
    b, u = scores.shape
    if order == "morf":
        perm = np.argsort(-scores, axis=-1)
    elif order == "lerf":
        perm = np.argsort(scores, axis=-1)
    elif order == "random":
        rng = np.random.default_rng(seed)
        perm = np.stack([rng.permutation(u) for _ in range(b)])
    else:  # pragma: no cover - validated earlier
        raise ValueError(order)
    rank = np.empty_like(perm)
    np.put_along_axis(rank, perm, np.arange(u)[None, :].repeat(b, 0), axis=-1)
    return rank


def _check_order(order: str) -> str:
    if not isinstance(order, str) or order.lower() not in ("morf", "lerf", "random"):
        raise ValueError(f"order must be 'morf', 'lerf' or 'random', got {order!r}")
    return order.lower()


# ---------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------
def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    spatial, channels = _spatial_shape(x)
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    if x.dim() == 2:
        y = x.unsqueeze(1)
    else:
        y = x
    c = y.shape[1]
    y = y.reshape(y.shape[0], c, *spatial)
    nd = len(spatial)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
    if conv is None:
        raise ValueError(f"baseline='blur' supports 1-3 spatial dims, inputs have {nd}")
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = 2 * radius + 1
        w = k.reshape(1, 1, *shape).expand(c, 1, *shape)
        padding = [0] * nd
        padding[axis] = radius
        pad_arg = []
        for ax in reversed(range(nd)):
            pad_arg += [padding[ax], padding[ax]]
        y = conv(F.pad(y, pad_arg, mode="replicate" if nd <= 3 else "constant"), w, groups=c)
    return y.reshape(x.shape)


@dataclass
class _Fill:
    kind: str  # "scalar" | "step" | "tensor"
    value: torch.Tensor  # (B,), (B, S) or (B, F)


def _resolve_baseline(
    baseline: BaselineLike,
    x: torch.Tensor,
    *,
    blur_sigma: float,
    noise_std: float | None,
    seed: int | None,
) -> tuple[str, _Fill | None]:
    """Return (description, fill). ``fill`` is None for the drifting ``"mean"``."""
    b = x.shape[0]
    xf = x.reshape(b, -1)
    if isinstance(baseline, bool):
        raise ValueError(
            f"baseline must be one of {_ALL_BASELINES}, a number, a tensor or a callable, got {baseline!r}"
        )
    if isinstance(baseline, (int, float, np.integer, np.floating)):
        return repr(float(baseline)), _Fill("scalar", torch.full((b,), float(baseline), dtype=x.dtype))
    if isinstance(baseline, str):
        name = baseline.lower()
        if name == "zero":
            return name, _Fill("scalar", torch.zeros(b, dtype=x.dtype))
        if name == "black":
            return name, _Fill("scalar", xf.min(1).values)
        if name == "white":
            return name, _Fill("scalar", xf.max(1).values)
        if name == "mean":
            return name, None
        if name == "blur":
            return name, _Fill("tensor", _gaussian_blur(x, blur_sigma).reshape(b, -1))
        if name == "noise":
            g = torch.Generator().manual_seed(0 if seed is None else int(seed))
            noise = torch.randn(xf.shape, generator=g, dtype=torch.float64).to(x.dtype)
            mean = xf.mean(1, keepdim=True)
            std = xf.std(1, keepdim=True) if noise_std is None else torch.full_like(mean, float(noise_std))
            return name, _Fill("tensor", mean + std * noise)
        raise ValueError(
            f"baseline must be one of {_ALL_BASELINES}, a number, a tensor or a callable, got {baseline!r}"
        )
    if callable(baseline):
        value = baseline(x.clone())
        desc = getattr(baseline, "__name__", "callable")
    else:
        value = baseline
        desc = "tensor"
    try:
        t = torch.as_tensor(
            value.detach().cpu() if isinstance(value, torch.Tensor) else np.asarray(value), dtype=x.dtype
        )
        t = torch.broadcast_to(t, x.shape).reshape(b, -1).clone()
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"baseline must broadcast to the inputs' shape {tuple(x.shape)}, got {getattr(value, 'shape', type(value))}"
        ) from exc
    if not torch.isfinite(t).all():
        raise ValueError("baseline contains NaN or infinite values")
    return desc, _Fill("tensor", t)


def _drifting_mean_fill(x: torch.Tensor, units: _Units, step_of_unit: torch.Tensor, n_steps: int) -> _Fill:
    """Quantus' ``"mean"``: before each step the fill value is the mean of the
    current (edge-padded) perturbed input. Computed with a running sum."""
    b = x.shape[0]
    if any(lo or hi for lo, hi in units.pads):
        spatial, channels = _spatial_shape(x)
        y = x.reshape(b, -1, *spatial) if x.dim() > 2 else x.reshape(b, 1, *spatial)
        pad_arg = []
        for lo, hi in reversed(units.pads):
            pad_arg += [lo, hi]
        xp = F.pad(y.to(torch.float64), pad_arg, mode="replicate")
        grid = [d // units.patch_size for d in units.padded_shape]
        coords = torch.meshgrid(*[torch.arange(d) for d in units.padded_shape], indexing="ij")
        uid = torch.zeros(units.padded_shape, dtype=torch.long)
        for c, g in zip(coords, grid):
            uid = uid * g + c // units.patch_size
        uid = uid.unsqueeze(0).expand(xp.shape[1], *units.padded_shape).reshape(-1)
        xp = xp.reshape(b, -1)
    else:
        xp = x.reshape(b, -1).to(torch.float64)
        uid = units.uid
    n_total = xp.shape[1]
    unit_sum = torch.zeros(b, units.n_units, dtype=torch.float64).index_add_(1, uid, xp)
    unit_cnt = torch.bincount(uid, minlength=units.n_units).to(torch.float64)
    # Aggregate per step (steps >= n_steps are never perturbed: dump bin).
    s_idx = step_of_unit.clamp(max=n_steps)
    step_sum = torch.zeros(b, n_steps + 1, dtype=torch.float64).scatter_add_(1, s_idx, unit_sum)
    step_cnt = torch.zeros(b, n_steps + 1, dtype=torch.float64).scatter_add_(
        1, s_idx, unit_cnt.expand(b, -1).contiguous()
    )
    total = xp.sum(1).numpy()
    ss = step_sum.numpy()
    sc = step_cnt.numpy()
    fills = np.empty((b, max(n_steps, 1)))
    for s in range(n_steps):
        m = total / n_total
        fills[:, s] = m
        total = total - ss[:, s] + sc[:, s] * m
    return _Fill("step", torch.from_numpy(fills).to(x.dtype))


# ---------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------
def _evaluate_steps(
    model: torch.nn.Module,
    x: torch.Tensor,
    step_of_elem: torch.Tensor,
    n_steps: int,
    fill: _Fill,
    target: torch.Tensor | None,
    batch_size: int,
    progress: bool,
    desc: str,
    insertion: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluate the model on every ``(sample, step)`` copy.

    Copy ``k`` of sample ``b`` has element ``e`` replaced by the fill value iff
    ``step_of_elem[b, e] < k`` (``k = 0..n_steps``). With ``insertion`` the
    roles flip: the copy starts from the fill and gets the input back.

    Returns target logits, target probabilities, argmax predictions (all
    ``(B, n_steps + 1)``) and the target actually used.
    """
    b = x.shape[0]
    feat_shape = tuple(x.shape[1:])
    xf = x.reshape(b, -1)
    n_points = n_steps + 1
    if target is None:  # explain the predicted class
        target = torch.cat([forward(model, x[i : i + batch_size]).argmax(1) for i in range(0, b, batch_size)])
    # Compact step indices: less memory traffic when building the copies.
    se_all = step_of_elem.to(torch.int16 if n_points < 32000 else torch.int32)

    def fill_values(bi: torch.Tensor, se: torch.Tensor) -> torch.Tensor:
        if fill.kind == "scalar":
            return fill.value[bi][:, None].to(x.dtype)
        if fill.kind == "step":
            return fill.value[bi].gather(1, se.long().clamp(max=max(n_steps - 1, 0)))
        return fill.value[bi]

    # Steps that change nothing (e.g. replacing background pixels that already
    # equal the baseline) give the same copy as the previous step: evaluate
    # the model only on copies that differ and reuse the outputs otherwise.
    needed = torch.ones(b, n_points, dtype=torch.bool)
    if n_steps:
        changes = torch.zeros(b, n_points, dtype=torch.int64)
        for sl in range(0, b, max(1, batch_size)):
            bi = torch.arange(sl, min(b, sl + max(1, batch_size)))
            se = se_all[bi]
            diff = fill_values(bi, se) != xf[bi]
            changes[bi] = torch.zeros(len(bi), n_points, dtype=torch.int64).scatter_add_(1, se.long(), diff.long())
        needed[:, 1:] = changes[:, :n_steps] > 0
    pairs = needed.nonzero()
    total = pairs.shape[0]
    logits = torch.zeros(b, n_points, dtype=torch.float64)
    probs = torch.zeros(b, n_points, dtype=torch.float64)
    preds = torch.zeros(b, n_points, dtype=torch.long)
    checked = False
    with progress_bar(total, progress, desc) as bar:
        for start in range(0, total, batch_size):
            bi = pairs[start : start + batch_size, 0]
            ki = pairs[start : start + batch_size, 1]
            se = se_all[bi]
            mask = se < ki[:, None]
            base = xf[bi]
            fv = fill_values(bi, se)
            xp = torch.where(mask, base, fv) if insertion else torch.where(mask, fv, base)
            out = forward(model, xp.reshape(-1, *feat_shape))
            if not checked:
                check_target_range(target, out.shape[1])
                checked = True
            t = target[bi]
            logits[bi, ki] = out.gather(1, t[:, None])[:, 0].to(torch.float64)
            probs[bi, ki] = torch.softmax(out, dim=1).gather(1, t[:, None])[:, 0].to(torch.float64)
            preds[bi, ki] = out.argmax(1)
            bar.update(len(bi))
    src = torch.where(needed, torch.arange(n_points).expand(b, n_points), torch.zeros((), dtype=torch.long))
    src = torch.cummax(src, dim=1).values
    logits, probs, preds = logits.gather(1, src), probs.gather(1, src), preds.gather(1, src)
    return logits, probs, preds, target


def _prepare(model, inputs, attributions, target, batch_size, abs_):
    if not isinstance(model, torch.nn.Module) and not callable(model):
        raise ValueError(f"model must be a torch.nn.Module (or callable), got {type(model).__name__}")
    x = check_inputs(inputs)
    a = check_attributions(attributions, x)
    if abs_:
        a = a.abs()
    t = check_targets(target, x.shape[0])
    bs = check_positive_int(batch_size, "batch_size")
    return x, a, t, bs


def _step_of_elem(rank: np.ndarray, step_of_rank: np.ndarray, uid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    step_of_unit = torch.from_numpy(step_of_rank[rank]).long()
    return step_of_unit, step_of_unit[:, uid]


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
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
    batch_size: int = 256,
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
    inputs, or a callable ``f(inputs) -> tensor``.

    ``target`` defaults to the predicted class; ``labels`` (for the accuracy
    curve) default to ``target``.
    """
    x, a, t, bs = _prepare(model, inputs, attributions, target, batch_size, abs)
    order = _check_order(order)
    patch_size = check_positive_int(patch_size, "patch_size")
    units = _make_units(x, patch_size, pad) if x.dim() > 2 or patch_size > 1 else _feature_units(x)
    u = units.n_units
    n_steps = u if steps is None else check_positive_int(steps, "steps")
    if n_steps > u:
        raise ValueError(f"steps must be at most the number of patches ({u}), got {n_steps}")
    rank = _rank_units(_unit_scores(a.reshape(a.shape[0], -1), units), order, seed)
    step_of_rank = (np.arange(u) * n_steps) // u
    step_of_unit, soe = _step_of_elem(rank, step_of_rank, units.uid)
    desc, fill = _resolve_baseline(baseline, x, blur_sigma=blur_sigma, noise_std=noise_std, seed=seed)
    if fill is None:
        fill = _drifting_mean_fill(x, units, step_of_unit, n_steps)
    logit, prob, pred, t = _evaluate_steps(model, x, soe, n_steps, fill, t, bs, progress, "perturbation curve")
    lab = check_targets(labels, x.shape[0], "labels")
    lab = t if lab is None else lab
    counts = np.bincount(step_of_rank, minlength=n_steps)
    fractions = torch.from_numpy(np.concatenate([[0.0], np.cumsum(counts) / u]))
    return PerturbationCurve(
        fractions=fractions,
        logit=logit,
        prob=prob,
        correct=pred == lab[:, None],
        target=t,
        labels=lab,
        order=order,
        baseline=desc,
        patch_size=patch_size,
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
    batch_size: int = 256,
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
    """
    x, a, t, bs = _prepare(model, inputs, attributions, target, batch_size, abs)
    if x.dim() != 4:
        raise ValueError(f"inputs must be images shaped (batch, channels, height, width), got shape {tuple(x.shape)}")
    order = _check_order(order)
    patch_size = check_positive_int(patch_size, "patch_size")
    regions = check_positive_int(regions, "regions")
    units = _make_units(x, patch_size, pad)
    u = units.n_units
    n_steps = min(regions, u)
    rank = _rank_units(_unit_scores(a.reshape(a.shape[0], -1), units), order, seed)
    step_of_rank = np.minimum(np.arange(u), n_steps)
    step_of_unit, soe = _step_of_elem(rank, step_of_rank, units.uid)
    desc, fill = _resolve_baseline(baseline, x, seed=seed, **_baseline_kw(baseline_options))
    if fill is None:
        fill = _drifting_mean_fill(x, units, step_of_unit, n_steps)
    logit, prob, _, t = _evaluate_steps(model, x, soe, n_steps, fill, t, bs, progress, "region perturbation")
    score = prob if softmax else logit
    drops = score[:, :1] - score[:, 1:]
    auc = trapezoid(drops)
    return PerturbationResult(
        kind="region_perturbation",
        scores=drops,
        auc=auc,
        mean_auc=nanmean(auc),
        clean_score=score[:, 0].clone(),
        target=t,
        order=order,
        baseline=desc,
        softmax=softmax,
        patch_size=patch_size,
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
    batch_size: int = 256,
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
    x, a, t, bs = _prepare(model, inputs, attributions, target, batch_size, abs)
    order = _check_order(order)
    fis = check_positive_int(features_in_step, "features_in_step")
    units = _feature_units(x)
    u = units.n_units
    if fis > u:
        raise ValueError(f"features_in_step must be at most the number of features ({u}), got {fis}")
    n_steps = math.ceil(u / fis)
    rank = _rank_units(a.reshape(a.shape[0], -1).cpu().numpy(), order, seed)
    step_of_rank = np.arange(u) // fis
    step_of_unit, soe = _step_of_elem(rank, step_of_rank, units.uid)
    desc, fill = _resolve_baseline(baseline, x, seed=seed, **_baseline_kw(baseline_options))
    if fill is None:
        fill = _drifting_mean_fill(x, units, step_of_unit, n_steps)
    logit, prob, _, t = _evaluate_steps(model, x, soe, n_steps, fill, t, bs, progress, "pixel flipping")
    score = prob if softmax else logit
    curves = score[:, 1:].clone()
    auc = trapezoid(curves)
    return PerturbationResult(
        kind="pixel_flipping",
        scores=curves,
        auc=auc,
        mean_auc=nanmean(auc),
        clean_score=score[:, 0].clone(),
        target=t,
        order=order,
        baseline=desc,
        softmax=softmax,
        features_in_step=fis,
    )


def _baseline_kw(options: dict) -> dict:
    allowed = {"blur_sigma", "noise_std"}
    bad = set(options) - allowed
    if bad:
        raise TypeError(f"unexpected keyword argument(s): {sorted(bad)}")
    return {"blur_sigma": options.get("blur_sigma", 2.0), "noise_std": options.get("noise_std")}


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
    batch_size: int = 256,
    progress: bool = False,
    **baseline_options,
) -> ABPCResult:
    """Area between the LeRF and MoRF perturbation curves (Samek et al., 2016).

    Same arguments as :func:`region_perturbation` except ``order``.
    ``ABPC = area(LeRF score curve) - area(MoRF score curve)``; on Quantus'
    drop curves this is ``auc(MoRF drops) - auc(LeRF drops)``. ``.scores`` is
    per sample, ``.value`` the dataset mean (higher = more faithful).
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
    lerf = region_perturbation(model, inputs, attributions, morf.target, order="lerf", **kw)
    per_sample = morf.auc - lerf.auc
    return ABPCResult(scores=per_sample, value=nanmean(per_sample), morf=morf, lerf=lerf)


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
    batch_size: int = 256,
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
    x, a, t, bs = _prepare(model, inputs, attributions, target, batch_size, abs)
    patch_size = check_positive_int(patch_size, "patch_size")
    units = _make_units(x, patch_size, pad) if x.dim() > 2 or patch_size > 1 else _feature_units(x)
    u = units.n_units
    n_steps = u if steps is None else check_positive_int(steps, "steps")
    if n_steps > u:
        raise ValueError(f"steps must be at most the number of patches ({u}), got {n_steps}")
    rank = _rank_units(_unit_scores(a.reshape(a.shape[0], -1), units), "morf", seed)
    step_of_rank = (np.arange(u) * n_steps) // u
    step_of_unit, soe = _step_of_elem(rank, step_of_rank, units.uid)

    def fill_for(bl):
        _, f = _resolve_baseline(bl, x, blur_sigma=blur_sigma, noise_std=None, seed=seed)
        return f

    dfill = fill_for(deletion_baseline)
    if dfill is None:
        dfill = _drifting_mean_fill(x, units, step_of_unit, n_steps)
    _, dprob, _, t = _evaluate_steps(model, x, soe, n_steps, dfill, t, bs, progress, "deletion")
    ifill = fill_for(insertion_baseline)
    if ifill is None:  # "mean": per-sample mean of the clean input
        ifill = _Fill("scalar", x.reshape(x.shape[0], -1).mean(1))
    if ifill.kind == "scalar":
        ifill = _Fill("tensor", ifill.value[:, None].expand(x.shape[0], int(np.prod(x.shape[1:]))))
    _, iprob, _, _ = _evaluate_steps(model, x, soe, n_steps, ifill, t, bs, progress, "insertion", insertion=True)
    counts = np.bincount(step_of_rank, minlength=n_steps)
    fractions = torch.from_numpy(np.concatenate([[0.0], np.cumsum(counts) / u]))
    iauc = trapezoid(iprob, fractions)
    dauc = trapezoid(dprob, fractions)
    return InsertionDeletionResult(
        fractions=fractions,
        insertion=iprob,
        deletion=dprob,
        insertion_auc=iauc,
        deletion_auc=dauc,
        mean_insertion_auc=nanmean(iauc),
        mean_deletion_auc=nanmean(dauc),
    )
