"""Conservation and complexity metrics against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from relprop import metrics as M


@pytest.fixture()
def linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    return lin


def test_conservation_linear_model_hand_computed(linear):
    x = torch.randn(4, 6)
    t = torch.tensor([0, 1, 2, 1])
    w = linear.weight.detach()
    a = x * w[t]  # input x gradient of a linear model: sums to W x (output minus bias)
    raw = M.conservation(linear, x, a, t)
    expected_out = (x @ w.T + linear.bias.detach())[torch.arange(4), t].double()
    torch.testing.assert_close(raw.output, expected_out)
    torch.testing.assert_close(raw.attribution_sum, (x * w[t]).sum(1).double())
    # without a reference the error is exactly the (missing) bias
    torch.testing.assert_close(raw.difference, -linear.bias.detach()[t].double(), atol=1e-6, rtol=0)
    assert raw.mean_abs_error == pytest.approx(float(linear.bias.detach()[t].abs().mean()), abs=1e-6)
    # with the zero baseline, f(x) - f(0) = W x: complete
    comp = M.conservation(linear, x, a, t, baseline="zero")
    assert comp.mean_abs_error < 1e-5
    torch.testing.assert_close(comp.reference_output, linear.bias.detach()[t].double())
    assert comp.correlation == pytest.approx(1.0, abs=1e-6)


def test_conservation_tensor_baseline_and_default_target(linear):
    x = torch.randn(5, 6)
    base = torch.full((6,), 0.25)
    out = linear(x).detach()
    t = out.argmax(1)
    a = (x - base) * linear.weight.detach()[t]
    res = M.conservation(linear, x.numpy(), a.numpy(), baseline=base)
    assert torch.equal(res.target, t)
    assert res.mean_abs_error < 1e-5
    # a channel-1 map counts once, not once per broadcast channel
    img = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 2 * 2, 2))
    xi = torch.randn(3, 2, 2, 2)
    ai = torch.ones(3, 1, 2, 2)
    assert torch.all(M.conservation(img, xi, ai, 0).attribution_sum == 4.0)


def test_sparseness_hand_computed():
    n = 10
    onehot = torch.zeros(2, n)
    onehot[:, 3] = 5.0
    uniform = torch.full((1, n), 2.0)
    s1 = M.sparseness(onehot).scores
    s2 = M.sparseness(uniform).scores
    # Gini of one non-zero among n (eps negligible): (n - 1) / n
    np.testing.assert_allclose(s1.numpy(), (n - 1) / n, atol=1e-6)
    assert abs(float(s2[0])) < 1e-12
    # [1, 2, 3, 4]: sum_k (2k - 5) a_k / (4 * 10) = (-3 + -2 + 3 + 12) / 40 = 0.25
    assert float(M.sparseness(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), eps=0).scores[0]) == pytest.approx(0.25)
    # sign is ignored with abs=True
    assert float(M.sparseness(torch.tensor([[-4.0, 1.0, 3.0, -2.0]]), eps=0).scores[0]) == pytest.approx(0.25)


def test_complexity_hand_computed():
    n = 16
    uniform = torch.ones(1, 1, 4, 4)
    onehot = torch.zeros(1, 1, 4, 4)
    onehot[0, 0, 1, 2] = -3.0
    assert float(M.complexity(uniform).scores[0]) == pytest.approx(math.log(n), abs=1e-9)
    assert float(M.complexity(onehot).scores[0]) == pytest.approx(0.0, abs=1e-9)
    # p = [0.5, 0.25, 0.25] -> H = 1.5 log 2
    two = torch.tensor([[2.0, -1.0, 1.0]])
    assert float(M.complexity(two).scores[0]) == pytest.approx(1.5 * math.log(2), abs=1e-9)
    res = M.complexity(torch.cat([uniform, onehot]))
    assert res.mean == pytest.approx(math.log(n) / 2, abs=1e-9)


def test_complexity_matches_quantus():
    quantus = pytest.importorskip("quantus")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 6, 6, generator=g).numpy()
    a = torch.randn(4, 1, 6, 6, generator=g).numpy()
    y = np.zeros(4, dtype=int)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 2)).eval()
    qs = quantus.Sparseness(disable_warnings=True, normalise=False)(model=model, x_batch=x, y_batch=y, a_batch=a.copy())
    qc = quantus.Complexity(disable_warnings=True, normalise=False)(model=model, x_batch=x, y_batch=y, a_batch=a.copy())
    np.testing.assert_allclose(M.sparseness(a).scores.numpy(), qs, atol=1e-5)
    np.testing.assert_allclose(M.complexity(a).scores.numpy(), qc, atol=1e-5)


def test_conservation_and_complexity_plots(linear):
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.randn(4, 6)
    assert M.conservation(linear, x, x, 0).plot() is not None
    assert M.sparseness(x).plot() is not None
    plt.close("all")
