"""LRP-0 conserves relevance on bias-free ReLU networks; epsilon/AttnLRP rules conserve where they should."""

import pytest
import torch
import torch.nn as nn

import relprop


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(), nn.Linear(32, 5, bias=False)
    ).eval()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4, bias=False),
    ).eval()


class Residual(nn.Module):
    """Functional residual adds and a reused ReLU: structures module-hook tools get wrong."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16, bias=False)
        self.b = nn.Linear(16, 16, bias=False)
        self.relu = nn.ReLU()
        self.head = nn.Linear(16, 3, bias=False)

    def forward(self, x):
        h = self.relu(self.a(x))
        h = h + self.relu(self.b(h))
        return self.head(torch.cat([h[:, :8], h[:, 8:]], dim=1))


def _check(model, x, composite="lrp0"):
    e = relprop.explain(model, x, target=1, method="lrp", composite=composite)
    sums = e.attributions.flatten(1).sum(1)
    torch.testing.assert_close(sums, e.score, rtol=1e-4, atol=1e-4)
    return e


def test_lrp0_conserves_mlp():
    _check(_mlp(), torch.randn(4, 20))


def test_lrp0_conserves_cnn():
    _check(_cnn(), torch.randn(3, 3, 12, 12))


def test_lrp0_conserves_functional_residual():
    _check(Residual().eval(), torch.randn(5, 16))


def test_seed_is_target_logit():
    model = _mlp()
    x = torch.randn(2, 20)
    e = relprop.explain(model, x, target=torch.tensor([0, 4]), method="lrp", composite="lrp0")
    torch.testing.assert_close(e.score, model(x)[[0, 1], [0, 4]].detach())


def test_epsilon_absorbs_with_bias_but_lrp0_matches_gradient_x_input_on_linear_relu():
    """On bias-free ReLU nets LRP-0 equals gradient x input (a known identity)."""
    model = _mlp()
    x = torch.randn(3, 20)
    lrp = relprop.explain(model, x, target=2, method="lrp", composite="lrp0").attributions
    grad = relprop.explain(model, x, target=2, method="gradient").attributions
    torch.testing.assert_close(lrp, grad * x, rtol=1e-4, atol=1e-5)


class CosineHead(nn.Module):
    """Cosine similarity to a fixed reference: the norms are normalisers, held constant by LRP."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(10, 16, bias=False), nn.ReLU(), nn.Linear(16, 8, bias=False))
        self.register_buffer("ref", torch.randn(8))

    def forward(self, x):
        return torch.nn.functional.cosine_similarity(self.body(x), self.ref[None], dim=-1)


@pytest.mark.parametrize("composite", ["lrp0", "attnlrp"])
def test_cosine_similarity_conserves(composite):
    model = CosineHead().eval()
    x = torch.randn(3, 10)
    e = relprop.explain(model, x, target=lambda s: s, method="lrp", composite=composite)
    torch.testing.assert_close(e.attributions.sum(1), e.score, rtol=1e-4, atol=1e-5)


def test_rmsnorm_pattern_is_identity():
    class RMS(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6, bias=False)
            self.w = nn.Parameter(torch.rand(6) + 0.5)
            self.out = nn.Linear(6, 2, bias=False)

        def forward(self, x):
            h = self.lin(x).float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.out(self.w * h)

    torch.manual_seed(0)
    e = relprop.explain(RMS().eval(), torch.randn(4, 6), target=0, method="lrp", composite="lrp0")
    torch.testing.assert_close(e.attributions.sum(1), e.score, rtol=1e-4, atol=1e-5)
