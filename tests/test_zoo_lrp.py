"""LRP runs on every zoo architecture: finite relevance that actually reaches the inputs."""

import pytest
import torch

import relprop
from model_zoo import ZOO, build


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "attnlrp", "cp_lrp"])
@pytest.mark.parametrize("name", ZOO)
def test_lrp_reaches_inputs(name, composite):
    _, model, inputs, target = build(name)
    e = relprop.explain(model, inputs, target=target, method="lrp", composite=composite)
    att = [a for a in e.tensors() if a.is_floating_point()]
    assert all(torch.isfinite(a).all() for a in att)
    if e.score.abs().max() > 1e-6:  # torchvision's ViT head is zero-initialised: nothing to explain there
        assert sum(a.abs().sum() for a in att) > 0, "no relevance reached the inputs"
