"""Every named LRP composite that Zennit 0.5.1 can express agrees with it (its canonizers, its rules).

Zennit applies rules per module (a layer map); relprop applies them per ATen op. On CNNs built from
modules both describe the same computation, so the attributions must agree to rounding in float64.
The models:

* torchvision's VGG-16-BN layout (quarter width, small classifier head) and ResNet-18: the standard cases, where
  every non-first convolution sees non-negative inputs (ReLU/max-pool outputs);
* ``signed``: a small CNN whose non-first convolutions see *negative* inputs (after SiLU, after a batch
  norm with no activation, after tanh), so z+/alpha-beta/gamma's negative-input terms are value-checked
  (relprop skips them when an input has no negative entry; this model makes sure they are right when
  they run).

Batch norms get ``eps=0``: Zennit's merge keeps BN's eps (it sets ``running_var=1``), so only with eps=0
are both merges exact (REFERENCES.md). Seeds are fixed; no test depends on the other.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
    layer_map_base,
)
from zennit.rules import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZPlus
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Linear as AnyLinear

import relprop


def _zennit(model, x, target, composite):
    with Gradient(model=model, composite=composite) as attributor:
        out = model(x)
        seed = torch.zeros_like(out)
        seed[:, target] = out[:, target]  # relprop starts from the target logit
        _, rel = attributor(x, seed)
    return rel


def _everywhere(rule_factory):
    """Zennit's spelling of a relprop composite that puts one rule on every conv and dense layer."""
    return lambda canonizer: LayerMapComposite(layer_map_base() + [(AnyLinear, rule_factory())], canonizers=canonizer)


#: relprop composite (name, explain options) -> Zennit composite built from a list of canonizers.
ZENNIT = {
    "epsilon": ({}, _everywhere(Epsilon)),
    "gamma": ({}, _everywhere(lambda: Gamma(gamma=0.25))),
    "zplus": ({}, _everywhere(ZPlus)),
    "alpha_beta": ({}, _everywhere(lambda: AlphaBeta(alpha=2.0, beta=1.0))),
    "alpha_beta[3,2]": ({"alpha": 3.0, "beta": 2.0}, _everywhere(lambda: AlphaBeta(alpha=3.0, beta=2.0))),
    "flat": ({}, _everywhere(Flat)),
    "wsquare": ({}, _everywhere(WSquare)),
    "epsilon_plus": ({}, lambda c: EpsilonPlus(canonizers=c)),
    "epsilon_plus_flat": ({}, lambda c: EpsilonPlusFlat(canonizers=c)),
    "epsilon_gamma_box": ({"low": -3.0, "high": 3.0}, lambda c: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=c)),
    "epsilon_alpha2_beta1": ({}, lambda c: EpsilonAlpha2Beta1(canonizers=c)),
    "epsilon_alpha2_beta1_flat": ({}, lambda c: EpsilonAlpha2Beta1Flat(canonizers=c)),
}


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0  # see the module docstring
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model


def _signed_cnn() -> nn.Module:
    """Non-first convolutions fed by SiLU, by a bare batch norm and by tanh: inputs of both signs."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),  # sees the batch norm's signed output directly
        nn.Tanh(),
        nn.Conv2d(12, 12, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(12, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _vgg16_bn() -> nn.Module:
    """torchvision's VGG-16-BN layout (13 convs, 5 max-pools, BN after every conv) at a quarter of the
    width, with a narrow head: the same rules on the same layer types, ~16x cheaper in float64."""
    from torchvision.models.vgg import VGG, cfgs, make_layers

    model = VGG(make_layers([c if c == "M" else c // 4 for c in cfgs["D"]], batch_norm=True), num_classes=10)
    model.classifier = nn.Sequential(
        nn.Linear(128 * 7 * 7, 32),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(32, 10),
    )
    return model


MODELS = {
    # name: (builder, zennit canonizers, image size)
    "vgg16_bn": (_vgg16_bn, lambda: [VGGCanonizer()], 32),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), lambda: [ResNetCanonizer()], 32),
    "signed": (_signed_cnn, lambda: [SequentialMergeBatchNorm()], 16),
}


@functools.cache
def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(MODELS[arch][0]()).eval().double()


def _input(arch: str) -> torch.Tensor:
    size = MODELS[arch][2]
    return torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("composite", list(ZENNIT))
def test_matches_zennit(arch, composite):
    model, x = _model(arch), _input(arch)
    options, zennit_composite = ZENNIT[composite]
    name = composite.split("[")[0]
    ours = relprop.explain(model, x, target=3, method="lrp", composite=name, **options).attributions
    theirs = _zennit(model, x, 3, zennit_composite(MODELS[arch][1]()))
    assert theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9 * theirs.abs().max().item())


def test_signed_model_runs_the_negative_input_terms():
    """The ``signed`` model really feeds negative values into non-first convolutions (else the z+ /
    alpha-beta parity above would not cover the negative-input branch)."""
    model, x = _model("signed"), _input("signed")
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append(bool((i[0] < 0).any())))
        for m in list(model.modules())[1:]
        if isinstance(m, nn.Conv2d)
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    assert seen[1:4] == [True, True, True]  # conv 2, 3, 4 see signed inputs (conv 1 sees the image)


def test_alpha_beta_differs_from_zplus_on_signed_inputs():
    """Guard against a parity that holds for the wrong reason: beta > 0 must change the result."""
    model, x = _model("signed"), _input("signed")
    ab = relprop.explain(model, x, target=3, method="lrp", composite="alpha_beta").attributions
    zp = relprop.explain(model, x, target=3, method="lrp", composite="zplus").attributions
    assert (ab - zp).abs().max() > 1e-3 * zp.abs().max()


def test_zennit_bn_eps_difference_is_small_in_float32():
    """With BN's eps kept (the default), Zennit's merged model differs slightly; numbers stay close."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    ours = relprop.explain(model, x, target=1, method="lrp", composite="epsilon_plus_flat").attributions
    theirs = _zennit(model, x, 1, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]))
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0)
    assert cos > 0.999
