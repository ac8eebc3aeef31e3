"""Metrics on a small CNN trained in the test on scikit-learn's offline digits.

The metrics must rank meaningful explanations above meaningless ones, and the
randomisation check must separate a model-independent map from the gradient.
"""

import copy

import pytest
import torch

from relprop import metrics as M

sklearn_datasets = pytest.importorskip("sklearn.datasets")


class DigitsCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc1 = torch.nn.Linear(32 * 4 * 4, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: one intra-op thread is as fast and immune to CPU contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(one_thread):
    digits = sklearn_datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        for _epoch in range(6):
            order = torch.randperm(len(xtr))
            for i in range(0, len(xtr), 64):
                idx = order[i : i + 64]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                loss.backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    assert acc > 0.93, f"test model only reached {acc:.3f} accuracy"
    return model, xte[:64], yte[:64]


def gradient(model, x, t):
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), x)
    return g


def input_x_gradient(model, x, t):
    return gradient(model, x, t) * x


def edge_detector(model, x, t):
    """Sobel gradient magnitude of the input: ignores the model entirely."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    k = torch.stack([kx, kx.T])[:, None]
    e = torch.nn.functional.conv2d(x.detach(), k, padding=1)
    return e.pow(2).sum(1, keepdim=True).sqrt()


def _abpc(model, x, t, a):
    return M.abpc(model, x, a, t, patch_size=1, regions=64, baseline="black").value


def _assert_ranks_above_meaningless(model, x, t, a, name):
    good = _abpc(model, x, t, a)
    rand = _abpc(model, x, t, torch.rand(a.shape, generator=torch.Generator().manual_seed(7)))
    flipped = _abpc(model, x, t, a.flip(-2))
    assert good > rand + 0.05, f"{name}: ABPC {good:.3f} not above random map {rand:.3f}"
    assert good > flipped + 0.05, f"{name}: ABPC {good:.3f} not above upside-down map {flipped:.3f}"
    assert good > 0


def test_abpc_input_x_gradient_beats_random_and_flipped(trained):
    model, x, y = trained
    _assert_ranks_above_meaningless(model, x, y, input_x_gradient(model, x, y), "input x gradient")


def test_abpc_lrp_beats_random_and_flipped(trained):
    relprop = pytest.importorskip("relprop")
    if not hasattr(relprop, "explain"):
        pytest.skip("relprop.explain is not available yet")
    model, x, y = trained
    a = relprop.explain(model, x, target=y, method="lrp", composite="epsilon").attributions
    assert a.shape == x.shape
    _assert_ranks_above_meaningless(model, x, y, a.detach(), "LRP epsilon")


def test_perturbation_curve_morf_drops_faster_than_lerf(trained):
    model, x, y = trained
    a = input_x_gradient(model, x, y)
    morf = M.perturbation_curve(model, x, a, y, order="morf", steps=8, baseline="zero")
    lerf = M.perturbation_curve(model, x, a, y, order="lerf", steps=8, baseline="zero")
    assert morf.accuracy_auc < lerf.accuracy_auc
    assert float(morf.auc("prob").mean()) < float(lerf.auc("prob").mean())


def test_randomisation_edge_detector_is_exactly_one(trained):
    model, x, y = trained
    res = M.model_parameter_randomisation(model, x[:32], edge_detector, y[:32])
    assert res.layers == ["fc2", "fc1", "conv2", "conv1"]
    assert torch.all(res.similarity == 1.0)


def test_randomisation_gradient_loses_similarity_and_model_untouched(trained):
    model, x, y = trained
    before = copy.deepcopy(model.state_dict())
    rng_before = torch.random.get_rng_state()
    res = M.model_parameter_randomisation(model, x[:32], gradient, y[:32])
    assert res.similarity.shape == (4, 32)
    assert res.final_similarity < 0.5
    assert float(res.mean_similarity.min()) < 0.5
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"parameter {k} of the user's model was modified"
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    # independent randomisation of only the top layer also changes the gradient
    ind = M.model_parameter_randomisation(model, x[:32], gradient, y[:32], layers=["fc2"], cascading=False)
    assert ind.final_similarity < 0.99


def test_class_sensitivity_gradient_vs_model_independent(trained):
    model, x, _ = trained
    grad = M.class_sensitivity(model, x[:32], gradient)
    edge = M.class_sensitivity(model, x[:32], edge_detector)
    assert torch.all(grad.top_class != grad.bottom_class)
    assert torch.all(edge.similarity == 1.0)  # same map whatever the class
    assert grad.mean_similarity < 0.5
    assert grad.mean_sensitivity > edge.mean_sensitivity
