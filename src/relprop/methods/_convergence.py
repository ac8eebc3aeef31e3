"""DeepLIFT's convergence delta: how far the attributions are from summing to ``f(x) - f(x0)``.

Summation to delta is DeepLIFT's defining property: the attributions of every input add up to the change of the
explained score between the baseline and the input. Captum's rules keep it through linear ops and elementwise
nonlinearities only; where the model multiplies two activations (gates, attention, ``h * rsqrt(mean(h^2))`` in
normalisation layers) or goes through a softmax they are not exact, and with a zero baseline a normalisation
layer's scale at the reference (``1 / sqrt(eps)``, ~1000) can magnify the error without bound: a random T5 gave
attribution sums of 1e14 for ``f(x) - f(x0)`` of 0.4 (relprop's ``exact`` rules, the default, sum to delta there;
ops without a DeepLIFT rule, such as fused attention kernels, still take the gradient). An explanation like that must not come
back without a sign, so every DeepLIFT result carries the delta per example
(``Explanation.convergence_delta``, Captum's ``return_convergence_delta``) and a warning names it when it is
larger than :data:`RTOL` of ``|f(x) - f(x0)|``.

Both terms are at hand without another forward pass: ``f(x)`` is the explained score and ``f(x0)`` the same
score read from the reference activations DeepLIFT computed anyway (a plain forward on the baselines only where
the reference does not cover the explained output: a callable target's ops on a second recording).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from ..rules.base import HALF, PreparedGraph
from ._validate import indexed_score

#: Relative tolerance of the warning: ``|delta| <= RTOL * |f(x) - f(x0)|`` (plus the rounding of the model's
#: dtype, :func:`tolerance`).
RTOL = 1e-2
#: Rounding allowance in units of the model dtype's machine epsilon times ``|f(x)| + |f(x0)|``: a half-precision
#: forward pass rounds both scores (and the activations the attributions are read from) to its precision.
ULPS = 8


class DeepLiftDeltaWarning(UserWarning):
    """DeepLIFT's attributions do not sum to ``f(x) - f(x0)`` within :data:`RTOL` (see ``convergence_delta``)."""


def reference_score(
    prepared: PreparedGraph, output: torch.Tensor, idx: torch.Tensor | None, forward: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``f(x0)`` per example: the explained score on the reference activations of the node that made ``output``
    (the explained output tensor; a callable target's score itself when ``idx`` is None), else ``forward()``."""
    ref = None
    for v in prepared.graph.output_values:
        if v.producer is None:
            continue
        t = v.tensor
        if t.data_ptr() != output.data_ptr() or t.shape != output.shape:
            continue
        notes = prepared.notes_of(v.producer).reference
        if notes is not None:
            j = next(i for i, o in enumerate(v.producer.outputs) if o is v)
            ref = notes[1][j]
        break
    if ref is None:
        return forward()
    return ref if idx is None else indexed_score(ref, idx)


def convergence_delta(attributions: Sequence[torch.Tensor], fx: torch.Tensor, fx0: torch.Tensor) -> torch.Tensor:
    """``sum(attributions) - (f(x) - f(x0))`` per example, accumulated in float32 at least (as Captum's sign)."""
    acc = torch.promote_types(fx.dtype, torch.float32)
    total = torch.zeros(fx.shape[0], dtype=acc, device=fx.device)
    for a in attributions:
        total = total + a.to(acc).reshape(a.shape[0], -1).sum(1)
    return total - (fx.to(acc) - fx0.to(acc))


def tolerance(fx: torch.Tensor, fx0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest ``|delta|`` per example that counts as summing to delta."""
    acc = torch.promote_types(fx.dtype, torch.float32)
    a, b = fx.to(acc), fx0.to(acc)
    eps = torch.finfo(dtype if dtype in HALF or dtype == torch.float64 else torch.float32).eps
    return RTOL * (a - b).abs() + ULPS * eps * (a.abs() + b.abs())


def warn_if_not_converged(delta: torch.Tensor, fx: torch.Tensor, fx0: torch.Tensor, dtype: torch.dtype) -> None:
    """One :class:`DeepLiftDeltaWarning` naming the worst example, when any exceeds :func:`tolerance`."""
    over = delta.abs() - tolerance(fx, fx0, dtype)
    if not bool((over > 0).any()) and bool(torch.isfinite(delta).all()):
        return
    i = int(torch.nan_to_num(delta.abs(), nan=float("inf")).argmax())
    diff = float(fx[i]) - float(fx0[i])
    warnings.warn(
        f"deeplift: the attributions do not sum to f(x) - f(x0): their sum minus f(x) - f(x0) is {float(delta[i]):.4g} "
        f"for f(x) - f(x0) = {diff:.4g} (example {i}; {int((over > 0).sum())} of {delta.numel()} examples beyond "
        f"{RTOL:g} of |f(x) - f(x0)|); the explanation does not account for the output change. Rules that are not "
        "exact break it: with exact=False or scope='captum', products of two activations (gates, attention, "
        "h * rsqrt(mean(h^2) + eps) in normalisation layers), softmax and layer norms (the gradient at x); always, ops "
        "with no DeepLIFT rule that combine several activations (fused scaled_dot_product_attention, ...). A zero "
        "baseline through a normalisation layer (its scale 1/sqrt(eps) at the reference) can magnify that without "
        "bound. A baseline the model reads differently from the input breaks it with any rules: token id 0 that is "
        "the pad token (a sequence classifier then pools another position), a mask the baseline changes; pass a "
        "baseline the model treats like the input (baselines=, e.g. another token id). "
        "Per-example values: Explanation.convergence_delta. Try exact=True (also replaces Captum's softmax rule on nn.Softmax modules), "
        "attn_implementation='eager' for fused attention, a baseline the model normalises like real data (the mean "
        "embedding, a blurred image), or method='integrated_gradients' (whose delta shrinks with n_steps)",
        DeepLiftDeltaWarning,
        stacklevel=4,
    )
