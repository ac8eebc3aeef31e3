"""The Quantus explain_func adapter."""

import warnings

import numpy as np
import pytest
import torch

import relprop
from relprop import metrics as M


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 3)
    ).eval()


def test_adapter_calls_relprop_explain(monkeypatch):
    calls = {}

    class Fake:
        def __init__(self, a):
            self.attributions = a

    def fake_explain(model, inputs, *, target, method, **options):
        calls.update(method=method, options=options, target=target, inputs=inputs)
        return Fake(inputs * 2)

    monkeypatch.setattr(relprop, "explain", fake_explain, raising=False)
    fn = M.quantus_explain_func(method="lrp", composite="epsilon")
    x = np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float32)
    out = fn(_model(), x, np.array([1, 2]), device="cpu", epsilon=1e-3)
    assert isinstance(out, np.ndarray) and out.shape == x.shape
    np.testing.assert_allclose(out, 2 * x)
    assert calls["method"] == "lrp"
    assert calls["options"] == {"composite": "epsilon", "epsilon": 1e-3}
    assert torch.equal(calls["target"], torch.tensor([1, 2]))
    assert isinstance(calls["inputs"], torch.Tensor)
    red = M.quantus_explain_func(method="lrp", reduce_channels=True)(_model(), np.repeat(x, 2, 1), [0, 0])
    assert red.shape == (2, 1, 8, 8)


def test_adapter_in_quantus_region_perturbation():
    quantus = pytest.importorskip("quantus")
    if not hasattr(relprop, "explain"):
        pytest.skip("relprop.explain is not available yet")
    model = _model()
    x = np.random.default_rng(1).random((3, 1, 8, 8)).astype(np.float32)
    y = np.array([0, 1, 2])
    fn = M.quantus_explain_func(method="gradient")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = quantus.RegionPerturbation(patch_size=4, regions_evaluation=4, disable_warnings=True)
        q = np.asarray(metric(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=fn))
    a = fn(model, x, y)
    ours = M.region_perturbation(model, x, a, y, patch_size=4, regions=4)
    np.testing.assert_allclose(ours.scores.numpy(), q, atol=1e-5)
