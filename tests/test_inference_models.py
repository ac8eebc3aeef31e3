"""A model built under ``torch.inference_mode()``: a one-line error in the model's terms, the model untouched.

relprop records the forward with autograd on (``trace.record``); PyTorch refuses to save an inference tensor for
backward, and its own message names neither the model nor the fix.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


@pytest.mark.parametrize("method, opts", [("gradient", {}), ("lrp", {"composite": "epsilon"})])
def test_parameters_made_under_inference_mode_are_named(method, opts):
    with torch.inference_mode():
        model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"inference_mode\(\) \('0\.weight' and 3 more\).*outside torch"):
        relprop.explain(model, x, target=1, method=method, **opts)
    assert all(p.is_inference() for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_inputs_made_under_inference_mode_are_explained_as_others():
    model, x = _model(), torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        xi = x.clone()
    got = relprop.explain(model, xi, target=1, method="gradient").attributions
    assert torch.equal(got, relprop.explain(model, x, target=1, method="gradient").attributions)
