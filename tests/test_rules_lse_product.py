"""logsumexp as a reduction, the product rule's stabiliser, and non-finite errors that name the cause
(issue 8, finding 7 and "the rest of the audit's list"; audit D11, D12)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import relprop
from relprop.rules.composites import NAMES

COMPOSITES = [n for n in NAMES if n != "epsilon_gamma_box"] + ["epsilon_gamma_box"]


class LSEHead(nn.Module):
    """Bias-free ReLU net whose output is ``logsumexp`` of its logits: one score per sample."""

    def __init__(self, dims=-1, keepdim=False):
        super().__init__()
        self.l1 = nn.Linear(6, 8, bias=False)
        self.l2 = nn.Linear(8, 10, bias=False)
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x):
        z = self.l2(torch.relu(self.l1(x)))
        if self.dims != -1:
            z = z.view(-1, 2, 5)
        y = torch.logsumexp(z, self.dims, keepdim=self.keepdim)
        return y.reshape(y.shape[0], -1).sum(1)


def _lse_model(**kw):
    torch.manual_seed(0)
    return LSEHead(**kw).double().eval(), torch.randn(4, 6, dtype=torch.float64)


@pytest.mark.parametrize("kw", [{}, {"keepdim": True}, {"dims": (1, 2)}, {"dims": 2}])
def test_logsumexp_gradient_equals_autograd(kw):
    model, x = _lse_model(**kw)
    g = relprop.explain(model, x, target=None, method="gradient").attributions
    xx = x.clone().requires_grad_()
    torch.testing.assert_close(g, torch.autograd.grad(model(xx).sum(), xx)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"keepdim": True}, {"dims": (1, 2)}])
def test_lrp0_conserves_through_a_logsumexp_head(kw):
    """Bias-free ReLU net + logsumexp: LRP-0 must conserve the score exactly (the rule's shares sum to 1)."""
    model, x = _lse_model(**kw)
    e = relprop.explain(model, x, target=None, method="lrp", composite="lrp0")
    torch.testing.assert_close(e.attributions.sum(1), model(x).detach(), rtol=1e-10, atol=1e-10)


def test_logsumexp_rule_splits_by_softmax_weights():
    """The rule's definition: ``R_z = softmax(z) * R_y`` for ``y = logsumexp(z)``."""
    model, x = _lse_model()
    e = relprop.explain(model, x, target=None, method="lrp", composite="lrp0", layers=["l2"])
    z = model.l2(torch.relu(model.l1(x))).detach()
    y = torch.logsumexp(z, -1)
    torch.testing.assert_close(e.layers["l2"], torch.softmax(z, -1) * y[:, None], rtol=1e-12, atol=1e-12)


def test_logsumexp_is_not_an_elementwise_nonlinearity():
    from relprop.rules.base import family_of

    model, x = _lse_model()
    graph = relprop.trace(model, x)
    (node,) = [n for n in graph.nodes if n.packet == "logsumexp"]
    assert family_of(node) == "smoothmax"
    cov = relprop.coverage(model, x, composite="attnlrp")
    assert "SoftmaxShare" in str(cov)


@pytest.mark.parametrize("kw", [{}, {"keepdim": True}, {"dims": (1, 2)}, {"dims": 2}])
def test_deeplift_sums_to_delta_through_logsumexp(kw):
    """DeepLIFT's completeness through a logsumexp head (bias-free ReLU net: rescale is exact elsewhere)."""
    model, x = _lse_model(**kw)
    x0 = torch.randn_like(x) * 0.3
    x0[0] = x[0]  # a sample equal to its reference: the derivative limit
    e = relprop.explain(model, x, target=None, method="deeplift", baselines=x0)
    torch.testing.assert_close(e.attributions.sum(1), (model(x) - model(x0)).detach(), rtol=1e-10, atol=1e-10)


def test_logsumexp_deeplift_multiplier_is_the_derivative_at_the_reference():
    from relprop.rules.reduction import logsumexp_multiplier

    model, x = _lse_model()
    graph = relprop.trace(model, x)
    (node,) = [n for n in graph.nodes if n.packet == "logsumexp"]
    z = torch.randn(3, 10, dtype=torch.float64) * 30  # large logits: no overflow
    y = torch.logsumexp(z, -1)
    g = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(logsumexp_multiplier(node, g, z, y, z, y, 1e-10), torch.softmax(z, -1))
    z0 = z + torch.randn_like(z)
    m = logsumexp_multiplier(node, g, z, y, z0, torch.logsumexp(z0, -1), 1e-10)
    torch.testing.assert_close((m * (z - z0)).sum(-1), y - torch.logsumexp(z0, -1))


class LogSoftmaxNet(nn.Module):
    """A hand-written log-softmax head (``z - z.logsumexp(-1, keepdim=True)``), bias-free."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 8, bias=False)
        self.l2 = nn.Linear(8, 5, bias=False)

    def forward(self, x):
        z = self.l2(torch.relu(self.l1(x)))
        return z - z.logsumexp(-1, keepdim=True)


@pytest.mark.parametrize("composite", COMPOSITES)
def test_hand_written_log_softmax_runs_under_every_composite(composite):
    torch.manual_seed(0)
    model = LogSoftmaxNet().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    e = relprop.explain(model, x, target=torch.tensor([0, 2, 4]), method="lrp", composite=composite)
    assert e.attributions.shape == x.shape and torch.isfinite(e.attributions).all()


def test_hand_written_log_softmax_lrp0_conserves():
    torch.manual_seed(0)
    model = LogSoftmaxNet().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    e = relprop.explain(model, x, target=1, method="lrp", composite="lrp0")
    torch.testing.assert_close(e.attributions.sum(1), e.score, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------ product stabiliser
class ProductNet(nn.Module):
    """``relu(a) * (b + 2)`` before the first conv, and a confident head: the audit's D12 program, with the
    two factors taken from different channels (``relu(x) * (x + 2)`` of one tensor is a univariate
    element-wise function, which the region pass treats as one nonlinearity)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        with torch.no_grad():
            self.fc.weight.mul_(3000)

    def forward(self, x):
        h = torch.relu(x[:, :3]) * (x[:, 3:] + 2)
        return self.fc(torch.relu(self.conv(h)).flatten(1))


@pytest.mark.parametrize("composite", COMPOSITES)
def test_product_with_exact_zeros_is_finite_under_every_composite(composite):
    torch.manual_seed(0)
    model = ProductNet().eval()
    x = torch.randn(2, 6, 6, 6)
    e = relprop.explain(model, x, target=0, method="lrp", composite=composite)
    assert torch.isfinite(e.attributions).all()
    # Where the product is exactly 0 (a < 0), nothing can be attributed through it to either factor: the
    # only path from a and b to the output goes through the product.
    zero = x[:, :3] < 0
    assert (e.attributions[:, :3][zero] == 0).all() and (e.attributions[:, 3:][zero] == 0).all()
    assert e.attributions.abs().sum() > 0


def test_zero_outputs_absorb_relevance_with_no_stabiliser():
    """``stabilize(z, 0)``: the quotient R / z is 0 where z is 0 (or subnormal), finite everywhere."""
    from relprop.rules.linear import stabilize

    z = torch.tensor([0.0, -0.0, 1e-40, -2.0, 3.0])
    r = torch.tensor([1.0, 1.0, 1.0, 4.0, 3.0])
    torch.testing.assert_close(r / stabilize(z, 0.0), torch.tensor([0.0, 0.0, 0.0, -2.0, 1.0]))
    torch.testing.assert_close(stabilize(z, 0.5), torch.tensor([0.5, -0.5, 0.5, -2.5, 3.5]))


# ------------------------------------------------------------------------------------ non-finite messages
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval(), torch.randn(2, 4)


def test_non_finite_weights_are_named():
    model, x = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(relprop.PropagationError, match="parameter '2.weight' already holds NaN"):
        relprop.explain(model, x, target=0, method="lrp")


def test_non_finite_forward_names_the_op():
    class Overflow(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(torch.exp(100 * x))

    with pytest.raises(relprop.PropagationError, match=r"forward pass itself.*exp"):
        relprop.explain(Overflow().eval(), torch.full((2, 4), 10.0), target=0, method="lrp")


def test_rule_dividing_by_a_zero_output_is_named_with_the_real_cause():
    def naive(ctx):  # the z-rule with no stabiliser at all
        return [ctx.inputs[0] * (ctx.rel / ctx.out), None]

    class Gate(nn.Module):
        def forward(self, a, b):
            return a * b

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.gate = Gate()
            self.flat = nn.Linear(4, 3)

        def forward(self, x):  # Flat (the first linear layer) puts relevance on the product's zeros too
            return self.flat(torch.relu(self.lin(self.gate(torch.relu(x), x + 2))))

    from relprop.rules import Composite, Epsilon, Flat, base_families

    torch.manual_seed(0)
    fam = base_families()
    fam.update(dense=Epsilon(1e-6), conv=Epsilon(1e-6))
    comp = Composite(fam, first=Flat(), ops={"mul": naive})
    x = torch.randn(2, 4)
    with pytest.raises(relprop.PropagationError) as info:
        relprop.explain(Net().eval(), x, target=0, method="lrp", composite=comp)
    msg = str(info.value)
    assert "aten.mul.Tensor" in msg and "module 'gate' (Gate)" in msg
    assert "exactly 0" in msg and "try a larger epsilon" not in msg
