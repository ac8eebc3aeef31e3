"""Perturbation units (patches, single features, tokens) and their ranking.

A *unit* is the group of input elements that is replaced together: an image patch (all channels
at once, on a grid that may be centre-padded as Quantus pads it), a single feature, or a token
position. Everything here is geometry and ordering; the evaluation lives in :mod:`._engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def quantus_padding(dim: int, patch: int) -> tuple[int, int]:
    """Centred padding that makes ``dim`` a multiple of ``patch`` (Quantus' convention)."""
    rem = dim % patch
    if rem == 0:
        return (0, 0)
    total = patch - rem
    return (total // 2, total - total // 2)


def spatial_shape(x: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """Spatial shape and channel count: ``(B, F)`` has no channel axis; ``(B, C, ...)`` does."""
    if x.dim() == 2:
        return tuple(x.shape[1:]), 1
    return tuple(x.shape[2:]), int(x.shape[1])


@dataclass
class Units:
    """``uid[e]`` is the unit of flattened element ``e``; ``pads`` the grid padding per spatial axis."""

    uid: torch.Tensor
    n_units: int
    pads: tuple[tuple[int, int], ...]
    patch_size: int
    padded_shape: tuple[int, ...] = field(default=())

    @property
    def is_identity(self) -> bool:
        return self.n_units == self.uid.numel() and torch.equal(self.uid, torch.arange(self.n_units))


def make_units(x: torch.Tensor, patch_size: int, pad: bool, name: str = "patch_size") -> Units:
    """Square patches of ``patch_size`` over the spatial axes of ``x`` (all channels of a patch together)."""
    spatial, channels = spatial_shape(x)
    pads, grid = [], []
    for d in spatial:
        if patch_size > d:
            raise ValueError(f"{name}={patch_size} is larger than the input's spatial size {spatial}")
        if d % patch_size and not pad:
            raise ValueError(
                f"{name}={patch_size} must divide the spatial size {spatial} of inputs; pass pad=True to pad "
                f"the grid (centred, like Quantus) instead"
            )
        lo_hi = quantus_padding(d, patch_size)
        pads.append(lo_hi)
        grid.append((d + lo_hi[0] + lo_hi[1]) // patch_size)
    coords = torch.meshgrid(*[torch.arange(d) for d in spatial], indexing="ij")
    uid = torch.zeros(spatial, dtype=torch.long)
    for c, (lo, _), g in zip(coords, pads, grid):
        uid = uid * g + (c + lo) // patch_size
    if x.dim() > 2:
        uid = uid.unsqueeze(0).expand(channels, *spatial)
    padded = tuple(d + lo + hi for d, (lo, hi) in zip(spatial, pads))
    return Units(uid.reshape(-1).contiguous(), int(np.prod(grid)), tuple(pads), patch_size, padded)


def feature_units(x: torch.Tensor) -> Units:
    """Every element its own unit (pixel flipping: channels separately, as in Quantus)."""
    n = int(np.prod(x.shape[1:]))
    return Units(torch.arange(n), n, (), 1, tuple(x.shape[1:]))


def units_for(x: torch.Tensor, patch_size: int, pad: bool) -> Units:
    """Patches for ``(B, C, *spatial)`` inputs or ``patch_size > 1``; single features otherwise."""
    return make_units(x, patch_size, pad) if x.dim() > 2 or patch_size > 1 else feature_units(x)


def unit_scores(a_flat: torch.Tensor, units: Units) -> np.ndarray:
    """Attributions summed per unit: a ``(B, U)`` array (padding counts as zero)."""
    if units.is_identity:
        return a_flat.detach().cpu().numpy()
    sums = torch.zeros(a_flat.shape[0], units.n_units, dtype=torch.float64)
    sums.index_add_(1, units.uid, a_flat.detach().cpu().to(torch.float64))
    return sums.numpy()


def check_order(order: str) -> str:
    if not isinstance(order, str) or order.lower() not in ("morf", "lerf", "random"):
        raise ValueError(f"order must be 'morf', 'lerf' or 'random', got {order!r}")
    return order.lower()


def rank_units(scores: np.ndarray, order: str, seed: int | None) -> np.ndarray:
    """``rank[b, u]`` (0 = perturbed first). ``numpy.argsort`` as Quantus calls it, so ties break identically."""
    b, u = scores.shape
    if order == "morf":
        perm = np.argsort(-scores, axis=-1)
    elif order == "lerf":
        perm = np.argsort(scores, axis=-1)
    elif order == "random":
        rng = np.random.default_rng(seed)
        perm = np.stack([rng.permutation(u) for _ in range(b)])
    else:  # pragma: no cover - validated by check_order
        raise ValueError(order)
    rank = np.empty_like(perm)
    np.put_along_axis(rank, perm, np.arange(u)[None, :].repeat(b, 0), axis=-1)
    return rank


def even_schedule(n_units: int, n_steps: int) -> np.ndarray:
    """``step_of_rank``: ``n_units`` ranked units in ``n_steps`` (nearly) equal groups."""
    return (np.arange(n_units) * n_steps) // n_units


def step_of_elements(
    rank: np.ndarray, step_of_rank: np.ndarray, uid: torch.Tensor, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(step of each unit ``(B, U)`` on the CPU, step of each flattened element ``(B, F)`` on ``device``)."""
    step_of_unit = torch.from_numpy(step_of_rank[rank]).long()
    dev = torch.device("cpu") if device is None else device
    return step_of_unit, step_of_unit.to(dev)[:, uid.to(dev)]


def fractions_of(step_of_rank: np.ndarray, n_steps: int, n_units: int) -> torch.Tensor:
    """Fraction of units replaced after each step, ``k = 0..n_steps``."""
    counts = np.bincount(np.minimum(step_of_rank, n_steps), minlength=n_steps + 1)[:n_steps]
    return torch.from_numpy(np.concatenate([[0.0], np.cumsum(counts) / n_units]))
