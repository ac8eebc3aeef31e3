"""What a perturbed unit is replaced by: a number, the sample's min/max, Quantus' drifting mean,
a blurred copy, noise, a user tensor or callable, or (for tokens) a token id.

:func:`resolve` turns any of these into a :class:`Fill` the engine understands: one value per
sample (``"scalar"``), one per sample and step (``"step"``, the drifting mean), or one per element
(``"tensor"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from ._units import Units, spatial_shape

BaselineLike = Union[str, float, int, torch.Tensor, np.ndarray, Callable[[torch.Tensor], Any]]

SCALAR_BASELINES = ("zero", "black", "white")
TENSOR_BASELINES = ("blur", "noise")
ALL_BASELINES = SCALAR_BASELINES + ("mean",) + TENSOR_BASELINES


@dataclass
class Fill:
    """``kind``: ``"scalar"`` (value ``(B,)``), ``"step"`` (``(B, S)``) or ``"tensor"`` (``(B, F)``)."""

    kind: str
    value: torch.Tensor

    def values(self, rows: torch.Tensor | slice, step_of_elem: torch.Tensor, n_steps: int, dtype) -> torch.Tensor:
        """Fill of every element of the given sample rows (an index or a slice; broadcastable to
        ``(len(rows), F)``)."""
        if self.kind == "scalar":
            return self.value[rows][:, None].to(dtype)
        if self.kind == "step":
            return self.value[rows].gather(1, step_of_elem.long().clamp(max=max(n_steps - 1, 0)))
        return self.value[rows]

    def as_tensor(self, batch: int, features: int) -> Fill:
        """The same fill as a per-element tensor (insertion starts from it)."""
        if self.kind != "scalar":
            return self
        return Fill("tensor", self.value[:, None].expand(batch, features))


@dataclass(frozen=True)
class Baseline:
    """A baseline with its options: ``Baseline("blur", blur_sigma=4)``, ``Baseline(0.5)``."""

    kind: BaselineLike = "black"
    blur_sigma: float = 2.0
    noise_std: float | None = None
    seed: int | None = 0

    def resolve(self, x: torch.Tensor) -> tuple[str, Fill | None]:
        return resolve(self.kind, x, blur_sigma=self.blur_sigma, noise_std=self.noise_std, seed=self.seed)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the spatial axes (replicate padding), kernel radius ``ceil(3 sigma)``."""
    spatial, _ = spatial_shape(x)
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    y = x.unsqueeze(1) if x.dim() == 2 else x
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
        pad_arg: list[int] = []
        for ax in reversed(range(nd)):
            pad_arg += [radius, radius] if ax == axis else [0, 0]
        y = conv(F.pad(y, pad_arg, mode="replicate"), w, groups=c)
    return y.reshape(x.shape)


def example_seeds(seed: int, examples: Sequence[int]) -> list[int]:
    """One seed per example from (``seed``, example index), for :func:`noise`: an example's noise then does
    not depend on the other examples of its batch, so a run split into shards draws what the whole batch
    draws (``relprop compare --engine ray``)."""
    return [int(np.random.SeedSequence([int(seed), int(e)]).generate_state(1, np.uint64)[0]) for e in examples]


def noise(x: torch.Tensor, seed: int | Sequence[int] | None = 0, std: float | None = None) -> torch.Tensor:
    """The ``"noise"`` baseline, ``(B, F)``: Gaussian noise with each sample's mean and std (or ``std``).
    ``seed``: one generator for the whole batch (an int), or one seed per sample (each row drawn from its
    own generator, e.g. :func:`example_seeds`)."""
    b = x.shape[0]
    xf = x.reshape(b, -1)
    if seed is None or isinstance(seed, (int, np.integer)):
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        z = torch.randn(xf.shape, generator=g, dtype=torch.float64)
    else:
        seeds = [int(v) for v in seed]
        if len(seeds) != b:
            raise ValueError(f"noise: {len(seeds)} seeds for a batch of {b}")
        rows = [
            torch.randn(xf.shape[1], generator=torch.Generator().manual_seed(v), dtype=torch.float64) for v in seeds
        ]
        z = torch.stack(rows) if rows else torch.zeros(xf.shape, dtype=torch.float64)
    mean = xf.mean(1, keepdim=True)
    sd = xf.std(1, keepdim=True) if std is None else torch.full_like(mean, float(std))
    return mean + sd * z.to(device=x.device, dtype=x.dtype)


def _bad(baseline) -> ValueError:
    return ValueError(f"baseline must be one of {ALL_BASELINES}, a number, a tensor or a callable, got {baseline!r}")


def resolve(
    baseline: BaselineLike, x: torch.Tensor, *, blur_sigma: float = 2.0, noise_std: float | None = None, seed=0
) -> tuple[str, Fill | None]:
    """(description, fill); ``fill`` is ``None`` for the drifting ``"mean"`` (see :func:`drifting_mean`)."""
    b = x.shape[0]
    xf = x.reshape(b, -1)
    if isinstance(baseline, bool):
        raise _bad(baseline)
    if isinstance(baseline, (int, float, np.integer, np.floating)):
        return repr(float(baseline)), Fill("scalar", torch.full((b,), float(baseline), dtype=x.dtype))
    if isinstance(baseline, str):
        name = baseline.lower()
        if name == "zero":
            return name, Fill("scalar", torch.zeros(b, dtype=x.dtype))
        if name == "black":
            return name, Fill("scalar", xf.min(1).values)
        if name == "white":
            return name, Fill("scalar", xf.max(1).values)
        if name == "mean":
            return name, None
        if name == "blur":
            return name, Fill("tensor", gaussian_blur(x, blur_sigma).reshape(b, -1))
        if name == "noise":
            return name, Fill("tensor", noise(x, seed, noise_std))
        raise _bad(baseline)
    if callable(baseline):
        value, desc = baseline(x.clone()), getattr(baseline, "__name__", "callable")
    else:
        value, desc = baseline, "tensor"
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
    return desc, Fill("tensor", t)


def drifting_mean(x: torch.Tensor, units: Units, step_of_unit: torch.Tensor, n_steps: int) -> Fill:
    """Quantus' ``"mean"``: before each step the fill is the mean of the current (edge-padded) perturbed
    input. Computed with running sums per step instead of re-materialising every copy."""
    b = x.shape[0]
    if any(lo or hi for lo, hi in units.pads):
        spatial, _ = spatial_shape(x)
        y = x.reshape(b, -1, *spatial) if x.dim() > 2 else x.reshape(b, 1, *spatial)
        pad_arg: list[int] = []
        for lo, hi in reversed(units.pads):
            pad_arg += [lo, hi]
        xp = F.pad(y.to(torch.float64), pad_arg, mode="replicate")
        # the padded grid has no padding of its own: reuse the patch geometry on it
        from ._units import make_units

        uid = make_units(xp, units.patch_size, pad=False).uid
        xp = xp.reshape(b, -1)
    else:
        xp = x.reshape(b, -1).to(torch.float64)
        uid = units.uid
    n_total = xp.shape[1]
    unit_sum = torch.zeros(b, units.n_units, dtype=torch.float64).index_add_(1, uid, xp)
    unit_cnt = torch.bincount(uid, minlength=units.n_units).to(torch.float64)
    s_idx = step_of_unit.clamp(max=n_steps)  # steps >= n_steps are never perturbed: dump bin
    step_sum = torch.zeros(b, n_steps + 1, dtype=torch.float64).scatter_add_(1, s_idx, unit_sum)
    step_cnt = torch.zeros(b, n_steps + 1, dtype=torch.float64).scatter_add_(
        1, s_idx, unit_cnt.expand(b, -1).contiguous()
    )
    total = xp.sum(1).numpy()
    ss, sc = step_sum.numpy(), step_cnt.numpy()
    fills = np.empty((b, max(n_steps, 1)))
    for s in range(n_steps):
        m = total / n_total
        fills[:, s] = m
        total = total - ss[:, s] + sc[:, s] * m
    return Fill("step", torch.from_numpy(fills).to(x.dtype))
