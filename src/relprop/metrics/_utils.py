"""Shared helpers for :mod:`relprop.metrics`: input validation, chunked
forward passes, rank correlation and progress bars.

Only torch and numpy are imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]
TargetLike = Union[int, Sequence[int], np.ndarray, torch.Tensor, None]


# ---------------------------------------------------------------------------
# Validation / conversion
# ---------------------------------------------------------------------------
def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def as_float_tensor(value: Any, name: str, *, allow_int: bool = False) -> torch.Tensor:
    """Convert ``value`` (tensor, array, nested list) to a detached floating tensor.

    Integer (or boolean) data raise a :class:`ValueError` naming ``name``
    unless ``allow_int`` is true.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"{name} must be a numeric array, got dtype object")
        t = torch.from_numpy(np.ascontiguousarray(value))
    else:
        try:
            t = torch.as_tensor(np.asarray(value))
        except Exception as exc:  # pragma: no cover - defensive
            raise ValueError(f"{name} must be a tensor or NumPy array, got {type(value).__name__}") from exc
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    if not t.is_floating_point():
        if not allow_int:
            raise ValueError(
                f"{name} must be a floating-point tensor/array (e.g. float32 images scaled as the model "
                f"expects), got integer/bool dtype {t.dtype}; convert it with .float() / .astype(np.float32)"
            )
        t = t.to(torch.get_default_dtype())
    return t


def check_inputs(inputs: Any, name: str = "inputs", *, min_dim: int = 2) -> torch.Tensor:
    x = as_float_tensor(inputs, name)
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must be batched with shape (batch, ...) of at least {min_dim} dims, got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} must contain at least one sample, got an empty batch")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_attributions(attributions: Any, x: torch.Tensor, name: str = "attributions") -> torch.Tensor:
    """Validate attributions and broadcast them to the shape of ``x``.

    Accepted shapes: exactly ``x.shape``; ``x.shape`` with the channel axis
    (axis 1) of size 1; or, for image batches ``(B, C, H, W)``, the channel
    axis dropped ``(B, H, W)``.
    """
    a = as_float_tensor(attributions, name, allow_int=True)
    xs = tuple(x.shape)
    ash = tuple(a.shape)
    if ash != xs:
        if a.dim() == x.dim() - 1 and x.dim() >= 3 and ash[0] == xs[0] and ash[1:] == xs[2:]:
            a = a.unsqueeze(1)
        elif not (a.dim() == x.dim() and ash[0] == xs[0] and ash[1] == 1 and ash[2:] == xs[2:]):
            raise ValueError(
                f"{name} must have the same shape as inputs {xs} (or that shape with a channel axis of size 1), "
                f"got shape {ash}"
            )
        a = a.expand(xs)
    if torch.isnan(a).any():
        raise ValueError(f"{name} contain NaN values; cannot rank features")
    if torch.isinf(a).any():
        raise ValueError(f"{name} contain infinite values; cannot rank features")
    return a


def check_targets(target: TargetLike, batch: int, name: str = "target") -> torch.Tensor | None:
    """Return a (batch,) int64 tensor of class indices (or None)."""
    if target is None:
        return None
    if isinstance(target, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer class index or a sequence of them, got a bool")
    if isinstance(target, (int, np.integer)):
        return torch.full((batch,), int(target), dtype=torch.long)
    if isinstance(target, torch.Tensor):
        t = target.detach().cpu()
    else:
        t = torch.as_tensor(np.asarray(target))
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"{name} must contain integer class indices, got non-integer values")
    elif t.dtype == torch.bool:
        raise ValueError(f"{name} must contain integer class indices, got dtype bool")
    t = t.long().reshape(-1)
    if t.numel() == 1 and batch != 1:
        t = t.expand(batch).clone()
    if t.numel() != batch:
        raise ValueError(f"{name} must have one class index per sample ({batch}), got {t.numel()}")
    return t


def check_target_range(target: torch.Tensor, num_classes: int, name: str = "target") -> None:
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"{name} must be class indices in [0, {num_classes - 1}] for a model with {num_classes} outputs, "
            f"got values in [{int(target.min())}, {int(target.max())}]"
        )


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------
def forward_on_device(model: torch.nn.Module, x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Class scores ``(batch, classes)`` without gradients, left on the model's device (no host sync)."""
    with torch.no_grad():
        out = model(x.to(model_device(model) if device is None else device))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(
            f"model must return class scores of shape (batch, classes), got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    return out.detach()


def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return forward_on_device(model, x).cpu()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (to time it); nothing to wait for on the CPU."""
    if device.type == "cpu":
        return
    mod = getattr(torch, device.type, None)
    sync = getattr(mod, "synchronize", None)
    if callable(sync):
        if device.type == "cuda":
            sync(device)
        else:
            sync()


def forward_chunked(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [forward(model, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs, 0)


# ---------------------------------------------------------------------------
# Progress bar (optional tqdm)
# ---------------------------------------------------------------------------
class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def progress_bar(total: int, enabled: bool, desc: str = "") -> Iterator[Any]:
    bar: Any = _NullBar()
    if enabled:
        try:
            from tqdm.auto import tqdm  # lazy, optional

            bar = tqdm(total=total, desc=desc, leave=False)
        except ImportError:  # pragma: no cover - tqdm is optional
            bar = _NullBar()
    try:
        yield bar
    finally:
        bar.close()


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------
def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Row-wise average ranks (1-based, ties get their mean rank), like
    ``scipy.stats.rankdata(method='average')`` applied to each row of a 2-D tensor."""
    x = x.to(torch.float64)
    b, n = x.shape
    sv, idx = torch.sort(x, dim=1, stable=True)
    new_group = torch.ones_like(sv, dtype=torch.bool)
    new_group[:, 1:] = sv[:, 1:] != sv[:, :-1]
    gid = torch.cumsum(new_group.long(), dim=1) - 1  # (b, n) group id within row
    flat_gid = (gid + torch.arange(b).unsqueeze(1) * n).reshape(-1)
    pos = torch.arange(n, dtype=torch.float64).expand(b, n).reshape(-1)
    first = torch.full((b * n,), float("inf"), dtype=torch.float64).scatter_reduce(0, flat_gid, pos, "amin")
    last = torch.full((b * n,), -float("inf"), dtype=torch.float64).scatter_reduce(0, flat_gid, pos, "amax")
    avg = (first + last) / 2.0 + 1.0
    ranks_sorted = avg[flat_gid].reshape(b, n)
    ranks = torch.empty_like(ranks_sorted)
    ranks.scatter_(1, idx, ranks_sorted)
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of two (B, N) tensors (float64).

    Identical rows give exactly 1.0; constant rows give NaN.
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    da = a - a.mean(1, keepdim=True)
    db = b - b.mean(1, keepdim=True)
    cov = (da * db).sum(1)
    va = (da * da).sum(1)
    vb = (db * db).sum(1)
    denom = torch.sqrt(va * vb)
    r = cov / denom
    r = torch.where(denom > 0, r, torch.full_like(r, float("nan")))
    return r.clamp(-1.0, 1.0)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman rank correlation (ties handled with average ranks)."""
    return pearson(rankdata(a), rankdata(b))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    denom = torch.sqrt((a * a).sum(1) * (b * b).sum(1))
    r = (a * b).sum(1) / denom
    return torch.where(denom > 0, r, torch.full_like(r, float("nan"))).clamp(-1.0, 1.0)


SIMILARITIES = {"spearman": spearman, "pearson": pearson, "cosine": cosine}


def resolve_similarity(similarity: str | Callable) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if callable(similarity):

        def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            out = similarity(a, b)
            return torch.as_tensor(
                np.asarray(out) if not isinstance(out, torch.Tensor) else out, dtype=torch.float64
            ).reshape(-1)

        return fn
    if not isinstance(similarity, str) or similarity.lower() not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {sorted(SIMILARITIES)} or a callable, got {similarity!r}")
    return SIMILARITIES[similarity.lower()]


def trapezoid(y: torch.Tensor, x: torch.Tensor | None = None, dx: float = 1.0) -> torch.Tensor:
    """Trapezoid rule along the last axis (same rule as ``np.trapezoid``)."""
    y = y.to(torch.float64)
    if y.shape[-1] < 2:
        return torch.zeros(y.shape[:-1], dtype=torch.float64)
    if x is None:
        return torch.trapezoid(y, dx=dx, dim=-1)
    return torch.trapezoid(y, x.to(torch.float64), dim=-1)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def nanmean(t: torch.Tensor) -> float:
    t = t.to(torch.float64)
    m = torch.nanmean(t) if t.numel() else torch.tensor(float("nan"))
    return float(m)


def chunks(n: int, size: int) -> Iterable[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))
