"""Method properties: completeness, models Captum gets wrong, NormGrad's definition, input structures, errors."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relprop
from methods_models import TokenModel, res_cnn

pytestmark = pytest.mark.filterwarnings("ignore")


def _score(m, x, t):
    with torch.no_grad():
        return m(x)[torch.arange(x.shape[0]), t]


def test_completeness_deeplift_and_integrated_gradients():
    m, x, t, b = res_cnn()
    delta = _score(m, x, t) - _score(m, b, t)
    dl = relprop.explain(m, x, target=t, method="deeplift", baselines=b).attributions
    torch.testing.assert_close(dl.flatten(1).sum(1), delta, rtol=1e-4, atol=1e-5)
    ig = relprop.explain(m, x, target=t, method="integrated_gradients", baselines=b, n_steps=64).attributions
    torch.testing.assert_close(ig.flatten(1).sum(1), delta, rtol=1e-3, atol=1e-4)


def test_captum_deeplift_maxpool_after_relu_is_wrong():
    """Captum's hooks lose completeness for ReLU -> MaxPool (its own delta != 0); the graph rules keep it."""
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 2)).eval()
    x, b = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8) * 0.1
    _, d_captum = captum.DeepLift(m).attribute(x, b, target=0, return_convergence_delta=True)
    ours = relprop.explain(m, x, target=0, method="deeplift", baselines=b).attributions
    d_ours = ours.flatten(1).sum(1) - (
        _score(m, x, torch.zeros(2, dtype=torch.long)) - _score(m, b, torch.zeros(2, dtype=torch.long))
    )
    assert d_captum.abs().max() > 1e-3
    assert d_ours.abs().max() < 1e-5


class Functional(nn.Module):
    """torch.relu twice, one nn.ReLU reused twice, torch.exp: what Captum's module hooks cannot handle."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (
            nn.Conv2d(3, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
        )
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, use_exp=True):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        h = self.act(self.c3(h))
        h = self.act(self.c4(h))
        h = h.mean((2, 3))
        if use_exp:
            h = torch.exp(0.5 * h)
        return self.fc(h)


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class Modular(nn.Module):
    def __init__(self, f: Functional, use_exp=True):
        super().__init__()
        self.c1, self.c2, self.c3, self.c4, self.fc = f.c1, f.c2, f.c3, f.c4, f.fc
        self.r1, self.r2, self.r3, self.r4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.exp = Exp() if use_exp else None

    def forward(self, x):
        h = self.r4(self.c4(self.r3(self.c3(self.r2(self.c2(self.r1(self.c1(x))))))))
        h = h.mean((2, 3))
        if self.exp is not None:
            h = self.exp(0.5 * h)
        return self.fc(h)


class NoExp(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x, use_exp=False)


def test_functional_and_reused_relu_same_as_separate_modules():
    torch.manual_seed(0)
    f = Functional().eval()
    mod = Modular(f).eval()
    x, b, t = torch.randn(2, 3, 10, 10), torch.randn(2, 3, 10, 10) * 0.1, torch.tensor([0, 2])
    for method, opts in [("deeplift", {"baselines": b}), ("guided_backprop", {}), ("deconvnet", {})]:
        a = relprop.explain(f, x, target=t, method=method, **opts).attributions
        r = relprop.explain(mod, x, target=t, method=method, **opts).attributions
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
    # exp is rescaled too: completeness holds
    dl = relprop.explain(f, x, target=t, method="deeplift", baselines=b).attributions
    torch.testing.assert_close(dl.flatten(1).sum(1), _score(f, x, t) - _score(f, b, t), rtol=1e-4, atol=1e-6)
    captum = pytest.importorskip("captum.attr")
    # Where Captum can run (separate ReLU modules, no exp), the functional model matches it
    nf, nm = NoExp(f).eval(), Modular(f, use_exp=False).eval()
    torch.testing.assert_close(
        relprop.explain(nf, x, target=t, method="deeplift", baselines=b).attributions,
        captum.DeepLift(nm).attribute(x, b, target=t),
        rtol=1e-4,
        atol=1e-7,
    )
    torch.testing.assert_close(
        relprop.explain(f, x, target=t, method="guided_backprop").attributions,
        captum.GuidedBackprop(mod).attribute(x, target=t),
        rtol=1e-4,
        atol=1e-7,
    )


def test_normgrad_matches_definition():
    m, x, t, _ = res_cnn()
    layers = ["stem", "conv", "block.c1", "block.c2"]
    e = relprop.explain(m, x, target=t, method="normgrad", layers=layers)
    store = {}
    hooks = []
    for name in layers:
        mod = dict(m.named_modules())[name]

        def hook(module, inp, out, name=name):
            store[name] = (inp[0], out)
            out.retain_grad()

        hooks.append(mod.register_forward_hook(hook))
    xg = x.clone().requires_grad_()
    out = m(xg)
    out[torch.arange(3), t].sum().backward()
    for h in hooks:
        h.remove()
    for name in layers:
        mod = dict(m.named_modules())[name]
        a, y = store[name]
        cols = F.unfold(a.detach(), mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        g = y.grad.flatten(2)  # (B, Cout, L)
        # Frobenius norm of the outer product g_u x_u^T, computed as such
        outer = torch.einsum("bol,bil->bloi", g, cols)
        ref = outer.flatten(2).norm(dim=2).reshape(y.shape[0], 1, *y.shape[2:])
        torch.testing.assert_close(e.layers[name], ref, rtol=1e-4, atol=1e-8)
    assert e.attributions.shape == (3, 1, 16, 16)
    assert e.attributions.max() <= 1 + 1e-6


@pytest.mark.parametrize(
    "method,opts",
    [
        ("saliency", {}),
        ("input_x_gradient", {}),
        ("integrated_gradients", {"n_steps": 5}),
        ("deeplift", {}),
        ("guided_backprop", {}),
        ("deconvnet", {}),
        ("occlusion", {"sliding_window_shapes": (1,)}),
        ("smoothgrad", {"nt_samples": 2, "stdevs": 0.1}),
    ],
)
def test_token_inputs_and_dict(method, opts):
    torch.manual_seed(0)
    m = TokenModel().eval()
    ids = torch.randint(1, 11, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    e = relprop.explain(
        m, {"input_ids": ids, "attention_mask": mask}, target=torch.tensor([0, 2]), method=method, **opts
    )
    assert set(e.attributions) == {"input_ids", "attention_mask"}
    assert e.attributions["input_ids"].shape == (2, 5)
    assert torch.isfinite(e.attributions["input_ids"]).all()


def test_token_completeness_in_embedding_space():
    torch.manual_seed(0)
    m = TokenModel().eval()
    ids, t = torch.randint(1, 11, (2, 5)), torch.tensor([0, 2])
    delta = _score(m, ids, t) - _score(m, torch.zeros_like(ids), t)
    ig = relprop.explain(m, ids, target=t, method="integrated_gradients", n_steps=32).attributions
    torch.testing.assert_close(ig.sum(1), delta, rtol=1e-3, atol=1e-5)
    dl = relprop.explain(m, ids, target=t, method="deeplift").attributions
    torch.testing.assert_close(dl.sum(1), delta, rtol=1e-4, atol=1e-6)


class TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(3, 6), nn.Linear(6, 5)

    def forward(self, x, y):
        return self.out(torch.relu(self.a(x) + self.b(y)))


@pytest.mark.parametrize(
    "method,opts",
    [
        ("saliency", {}),
        ("input_x_gradient", {}),
        ("integrated_gradients", {"n_steps": 6}),
        ("deeplift", {}),
        ("guided_backprop", {}),
        ("deconvnet", {}),
        ("occlusion", {"sliding_window_shapes": ((1,), (1,))}),
        ("noise_tunnel", {"base_method": "saliency", "nt_samples": 2}),
    ],
)
def test_multiple_inputs_dict_equals_tuple(method, opts):
    torch.manual_seed(0)
    m = TwoInput().eval()
    x, y, t = torch.randn(3, 4), torch.randn(3, 3), torch.tensor([0, 4, 2])
    torch.manual_seed(1)
    a = relprop.explain(m, (x, y), target=t, method=method, **opts).attributions
    torch.manual_seed(1)
    d = relprop.explain(m, {"x": x, "y": y}, target=t, method=method, **opts).attributions
    assert isinstance(a, tuple) and isinstance(d, dict)
    torch.testing.assert_close(a[0], d["x"])
    torch.testing.assert_close(a[1], d["y"])


@pytest.mark.parametrize(
    "method,opts,word",
    [
        ("integrated_gradients", {"n_steps": 0}, "n_steps"),
        ("integrated_gradients", {"approximation": "simpson"}, "approximation"),
        ("integrated_gradients", {"baselines": torch.zeros(5)}, "baselines"),
        ("integrated_gradients", {"internal_batch_size": -1}, "internal_batch_size"),
        ("noise_tunnel", {"nt_type": "smooth"}, "nt_type"),
        ("noise_tunnel", {"base_method": "nope"}, "base_method"),
        ("noise_tunnel", {"stdevs": "big"}, "stdevs"),
        ("occlusion", {}, "sliding_window_shapes"),
        ("occlusion", {"sliding_window_shapes": (3, 40, 4)}, "sliding_window_shapes"),
        ("occlusion", {"sliding_window_shapes": (3, 4, 4), "strides": (1, 8, 8)}, "strides"),
        ("gradcam", {"layer": "blok"}, "layer"),
        ("gradcam", {"layer": "block", "reshape": 7}, "reshape"),
        ("normgrad", {"layers": "stem"}, "layers"),
        ("normgrad", {"combine": "max"}, "combine"),
        ("deeplift", {"scope": "some"}, "scope"),
        ("saliency", {"abs": "yes"}, "abs"),
    ],
)
def test_errors_name_the_argument(method, opts, word):
    m, x, t, _ = res_cnn()
    with pytest.raises(ValueError, match=word):
        relprop.explain(m, x, target=t, method=method, **opts)


def test_activation_profiles_and_plot(tmp_path):
    m, x, t, _ = res_cnn()
    data = [(x, t), (x + 0.1, torch.tensor([0, 0, 4]))]
    p = relprop.activation_profiles(m, "block", data)
    assert p.means.shape == (5, 8)
    assert p.counts.tolist() == [3, 1, 0, 1, 1]
    # direct computation for class 0 (samples 0 of batch 1, and all three of batch 2... labels [0,0,4])
    acts = []
    h = m.block.register_forward_hook(lambda mod, i, o: acts.append(o.mean((2, 3))))
    with torch.no_grad():
        m(x), m(x + 0.1)
    h.remove()
    ref0 = torch.stack([acts[0][0], acts[1][0], acts[1][1]]).mean(0)
    torch.testing.assert_close(p.means[0], ref0, rtol=1e-5, atol=1e-6)
    pred = relprop.activation_profiles(m, m.block, [x], by="prediction")
    assert pred.counts.sum() == 3
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    ax = p.plot()
    ax.figure.savefig(tmp_path / "profiles.png")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -torch.relu(self.lin(x))


def test_deeplift_detects_control_flow_on_baseline():
    with pytest.raises(ValueError, match="baselines"):
        relprop.explain(Branchy(), torch.ones(1, 4), target=0, method="deeplift")
