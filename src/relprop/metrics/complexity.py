"""Complexity of attribution maps, as in Quantus: Gini-index sparseness
(Chalasani et al., 2020) and entropy complexity (Bhatt et al., 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._utils import as_float_tensor


@dataclass
class ComplexityResult:
    """Per-sample ``scores`` and their ``mean``; ``name`` says which measure."""

    name: str
    scores: torch.Tensor
    mean: float

    def plot(self, ax=None, **kwargs):
        from .plots import plot_complexity

        return plot_complexity(self, ax=ax, **kwargs)


def _flat(attributions, name: str = "attributions") -> torch.Tensor:
    a = as_float_tensor(attributions, name, allow_int=True)
    if a.dim() < 2:
        raise ValueError(f"{name} must be batched with shape (batch, ...), got shape {tuple(a.shape)}")
    if torch.isnan(a).any() or torch.isinf(a).any():
        raise ValueError(f"{name} contain NaN or infinite values")
    return a.reshape(a.shape[0], -1).to(torch.float64).cpu()


def sparseness(attributions, *, abs: bool = True, eps: float = 1e-7) -> ComplexityResult:
    """Gini index of each map (Quantus ``Sparseness``): 0 for a uniform map,
    close to 1 for a map with a single non-zero entry (higher = sparser).

    ``G = sum_k (2k - n - 1) a_(k) / (n * sum_k a_(k))`` over the ascending
    sorted ``|a| + eps``.
    """
    a = _flat(attributions)
    if abs:
        a = a.abs()
    elif (a < 0).any():
        raise ValueError("attributions must be non-negative for sparseness with abs=False")
    a = torch.sort(a + eps, dim=1).values
    n = a.shape[1]
    k = torch.arange(1, n + 1, dtype=torch.float64)
    g = ((2 * k - n - 1) * a).sum(1) / (n * a.sum(1))
    return ComplexityResult("sparseness", g, float(g.mean()))


def complexity(attributions, *, eps: float = 1e-12) -> ComplexityResult:
    """Entropy of the normalised absolute map (Quantus ``Complexity``):
    ``-sum p log(p + eps)`` with ``p = |a| / sum |a|``; ``log(n)`` for a
    uniform map, 0 for a single non-zero entry (lower = simpler)."""
    a = _flat(attributions).abs()
    total = a.sum(1, keepdim=True)
    if (total == 0).any():
        raise ValueError("attributions must not be all zero for a sample (entropy undefined)")
    p = a / total
    h = -(p * torch.log(p + eps)).sum(1)
    return ComplexityResult("complexity", h, float(h.mean()))
