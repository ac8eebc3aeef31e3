"""Adapter so Quantus users can evaluate relprop's explanation methods."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._utils import as_float_tensor, check_targets, model_device

# Keyword arguments Quantus passes to explain functions that are not options
# of relprop.explain.
_QUANTUS_KWARGS = {"device", "channel_first", "softmax", "model_predict_kwargs", "explain_func", "xai_lib", "method"}


def quantus_explain_func(
    method: str = "gradient", *, reduce_channels: bool = False, **options: Any
) -> Callable[..., np.ndarray]:
    """Return ``explain_func(model, inputs, targets, **kwargs) -> np.ndarray``
    (Quantus' signature) that calls
    ``relprop.explain(model, inputs, target=targets, method=method, **options).attributions``.

    Extra keyword arguments given by Quantus at call time are merged into
    ``options`` (Quantus-internal ones such as ``device`` are dropped).
    ``reduce_channels=True`` sums attributions over the channel axis keeping
    it (shape ``(B, 1, ...)``), like many Quantus examples expect.
    """
    if not isinstance(method, str):
        raise ValueError(f"method must be the name of a relprop method, got {method!r}")

    def explain_func(model: torch.nn.Module, inputs, targets, **kwargs: Any) -> np.ndarray:
        import relprop  # lazy: relprop imports metrics

        x = as_float_tensor(inputs, "inputs").to(model_device(model))
        t = check_targets(targets, x.shape[0], "targets")
        opts = dict(options)
        opts.update({k: v for k, v in kwargs.items() if k not in _QUANTUS_KWARGS})
        explanation = relprop.explain(model, x, target=t.to(x.device) if t is not None else None, method=method, **opts)
        a = explanation.attributions
        if not isinstance(a, torch.Tensor):
            a = torch.as_tensor(np.asarray(a))
        a = a.detach()
        if reduce_channels and a.dim() > 2:
            a = a.sum(1, keepdim=True)
        return a.cpu().numpy()

    explain_func.__name__ = f"relprop_{method}"
    return explain_func
