"""A model in training mode gets exactly one warning per public call, also from methods that run other
methods or record several forwards (the noise tunnel over any base method, guided Grad-CAM); the silence
is per call and per thread (a context variable: ``relprop.trace.training_warned``)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import relprop
from relprop.trace import training_warned


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.ReLU(), nn.Linear(8, 3))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _training_warnings(recwarn) -> list[str]:
    return [str(w.message) for w in recwarn if "training mode" in str(w.message)]


CASES = [
    ("smoothgrad", {}),
    ("smoothgrad_sq", {"nt_samples": 3}),
    ("vargrad", {"nt_samples": 3}),
    ("noise_tunnel", {"base_method": "saliency"}),
    ("noise_tunnel", {"base_method": "lrp", "nt_samples": 4, "nt_samples_batch_size": 2}),  # two chunks
    ("noise_tunnel", {"base_method": "integrated_gradients", "n_steps": 3}),
    ("noise_tunnel", {"base_method": "occlusion", "sliding_window_shapes": (1,)}),
    ("guided_gradcam", {"layer": "0"}),
    ("noise_tunnel", {"base_method": "guided_gradcam", "layer": "0", "nt_samples": 2}),
]


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{o.get('base_method', '')}" for m, o in CASES])
def test_one_training_warning_per_call(method, options, recwarn):
    cam = "gradcam" in method or "gradcam" in str(options.get("base_method"))
    model, x = (_cnn(), torch.randn(2, 3, 8, 8)) if cam else (_mlp(), torch.randn(2, 4))
    relprop.explain(model.train(), x, method=method, target=0, **options)
    shown = _training_warnings(recwarn)
    assert len(shown) == 1, shown
    assert shown[0].startswith("guided_gradcam:" if method == "guided_gradcam" else "noise_tunnel:"), shown
    recwarn.clear()
    relprop.explain(model.eval(), x, method=method, target=0, **options)
    assert _training_warnings(recwarn) == []
    recwarn.clear()
    relprop.explain(model.train(), x, method="gradient", target=0)  # the silence ended with the call
    assert len(_training_warnings(recwarn)) == 1


def test_training_warned_silences_only_its_own_thread(recwarn):
    model, x = _mlp().train(), torch.randn(2, 4)
    with training_warned():
        other = threading.Thread(target=relprop.explain, args=(model, x), kwargs={"method": "gradient", "target": 0})
        other.start()
        other.join()
        assert len(_training_warnings(recwarn)) == 1  # the other thread warned
        relprop.explain(model, x, method="gradient", target=0)
        assert len(_training_warnings(recwarn)) == 1  # this one did not
