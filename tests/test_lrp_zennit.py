"""LRP composites agree with Zennit (its canonizers, its rules) on torchvision VGG-16 and ResNet-18."""

import pytest
import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite, layer_map_base
from zennit.rules import Epsilon
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Convolution

import relprop


def _zennit(model, x, target, composite):
    with Gradient(model=model, composite=composite) as attributor:
        out = model(x)
        seed = torch.zeros_like(out)
        seed[:, target] = out[:, target]  # relprop starts from the target logit
        _, rel = attributor(x, seed)
    return rel


def _composites(canonizer):
    return {
        "epsilon": lambda: LayerMapComposite(
            layer_map_base() + [(Convolution, Epsilon()), (torch.nn.Linear, Epsilon())], canonizers=[canonizer()]
        ),
        "epsilon_plus_flat": lambda: EpsilonPlusFlat(canonizers=[canonizer()]),
        "epsilon_gamma_box": lambda: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=[canonizer()]),
    }


def _model(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval().double()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            # Zennit's merge keeps BN's eps (it sets running_var=1), so with eps=0 both merges are exact.
            m.eps = 0.0
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("arch,canonizer,size", [("vgg16", VGGCanonizer, 32), ("resnet18", ResNetCanonizer, 48)])
@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat", "epsilon_gamma_box"])
def test_matches_zennit(arch, canonizer, size, composite):
    model = _model(arch)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = (
        relprop.explain(model, x, target=3, method="lrp", composite=composite, low=-3.0, high=3.0)
        if composite == "epsilon_gamma_box"
        else relprop.explain(model, x, target=3, method="lrp", composite=composite)
    )
    theirs = _zennit(model, x, 3, _composites(canonizer)[composite]())
    torch.testing.assert_close(ours.attributions, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    assert not (ours.attributions == 0).all()


def test_zennit_bn_eps_difference_is_small_in_float32():
    """With BN's eps kept (the default), Zennit's merged model differs slightly; numbers stay close."""
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    ours = relprop.explain(model, x, target=1, method="lrp", composite="epsilon_plus_flat").attributions
    theirs = _zennit(model, x, 1, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]))
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0)
    assert cos > 0.999
