"""Conservation / completeness: does the attribution sum equal the explained
output (or the output minus the output at a reference input)?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._utils import (
    TargetLike,
    as_float_tensor,
    check_attributions,
    check_inputs,
    check_positive_int,
    check_target_range,
    check_targets,
    forward_chunked,
    pearson,
)


@dataclass
class ConservationResult:
    """Per-sample ``attribution_sum`` vs ``output`` (target logit, minus the
    reference output when a baseline was given)."""

    attribution_sum: torch.Tensor
    output: torch.Tensor
    reference_output: torch.Tensor | None
    target: torch.Tensor

    @property
    def difference(self) -> torch.Tensor:
        return self.attribution_sum - self.output

    @property
    def abs_error(self) -> torch.Tensor:
        return self.difference.abs()

    @property
    def relative_error(self) -> torch.Tensor:
        return self.abs_error / self.output.abs().clamp_min(1e-12)

    @property
    def mean_abs_error(self) -> float:
        return float(self.abs_error.mean())

    @property
    def mean_relative_error(self) -> float:
        return float(self.relative_error.mean())

    @property
    def correlation(self) -> float:
        """Pearson correlation across samples of sum and output (NaN if < 2 samples)."""
        if self.output.numel() < 2:
            return float("nan")
        return float(pearson(self.attribution_sum[None], self.output[None])[0])

    def plot(self, ax=None, **kwargs):
        from .plots import plot_conservation

        return plot_conservation(self, ax=ax, **kwargs)


def conservation(
    model: torch.nn.Module,
    inputs,
    attributions,
    target: TargetLike = None,
    *,
    baseline: None | str | float | torch.Tensor | np.ndarray = None,
    softmax: bool = False,
    batch_size: int = 256,
) -> ConservationResult:
    """Compare ``attributions.sum()`` per sample with the target output.

    ``baseline=None`` compares with ``f(x)_t``; ``"zero"``, a number or a
    tensor broadcastable to the inputs compares with ``f(x)_t - f(baseline)_t``
    (completeness, as for Integrated Gradients / DeepLIFT). ``softmax`` uses
    probabilities instead of logits. ``target`` defaults to the predicted class.
    """
    x = check_inputs(inputs)
    check_attributions(attributions, x)
    t = check_targets(target, x.shape[0])
    bs = check_positive_int(batch_size, "batch_size")
    out = forward_chunked(model, x, bs)
    if t is None:
        t = out.argmax(1)
    check_target_range(t, out.shape[1])

    def score(o: torch.Tensor) -> torch.Tensor:
        if softmax:
            o = torch.softmax(o, 1)
        return o.gather(1, t[:, None])[:, 0].to(torch.float64)

    y = score(out)
    ref = None
    if baseline is not None:
        if isinstance(baseline, str):
            if baseline.lower() != "zero":
                raise ValueError(f"baseline must be None, 'zero', a number or a tensor, got {baseline!r}")
            xb = torch.zeros_like(x)
        else:
            b = as_float_tensor(baseline, "baseline", allow_int=True).to(x.dtype)
            try:
                xb = torch.broadcast_to(b, x.shape).clone()
            except RuntimeError as exc:
                raise ValueError(
                    f"baseline must broadcast to the inputs' shape {tuple(x.shape)}, got {tuple(b.shape)}"
                ) from exc
        ref = score(forward_chunked(model, xb, bs))
        y = y - ref
    # Use the un-broadcast attributions for the sum (a channel-1 map counts once).
    raw = as_float_tensor(attributions, "attributions", allow_int=True)
    s = raw.reshape(raw.shape[0], -1).to(torch.float64).sum(1).cpu()
    return ConservationResult(attribution_sum=s, output=y, reference_output=ref, target=t)
