"""Methods on a model that writes in place into a tensor autograd saves (``torch.relu(h).mul_(3)``).

Autograd refuses to differentiate such a model (the saved ReLU output is at version 1); relprop's recorded
gradient handles it. Oracles: Captum and ``torch.autograd`` on an out-of-place twin with the same weights
(``torch.relu(h) * 3``), which computes the same function.

* integrated gradients (``engine="auto"``, the default) falls back to the recorded gradient: equal to Captum's
  IG on the twin; ``engine="autograd"`` raises one clear error naming the fix;
* the noise tunnel over IG, Grad-CAM and NormGrad (recorded gradients) give the twin's numbers;
* ``keep_graph=True``: every value of ``Explanation.graph`` holds its data, also the ReLU output the model
  overwrote (before: ``.data`` was None there), equal to the twin's activation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprop
from relprop.methods.integrated import InPlaceAutogradError

C = pytest.importorskip("captum.attr")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Net(nn.Module):
    """conv -> ReLU -> x3 (in place or not) -> conv -> mean -> linear."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = h.mul_(3) if self.inplace else h * 3
        return self.fc(F.relu(self.c2(h)).mean((2, 3)))


class WritesIntoInput(Net):
    """Writes into its own input first (autograd refuses this at the forward pass, for a leaf requiring grad)."""

    def forward(self, x):
        x.mul_(2) if self.inplace else None
        return super().forward(x if self.inplace else x * 2)


def _pair(cls=Net):
    torch.manual_seed(0)
    inplace = cls(inplace=True).eval()
    twin = cls(inplace=False).eval()
    twin.load_state_dict(inplace.state_dict())
    return inplace, twin, torch.randn(2, 3, 8, 8), torch.tensor([0, 2])


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_autograd_refuses_the_model_itself():
    """The premise: plain autograd (and so Captum) cannot differentiate the in-place model."""
    m, _, x, t = _pair()
    with pytest.raises(RuntimeError, match="inplace operation"):
        C.IntegratedGradients(m).attribute(x, target=t, n_steps=4)


@pytest.mark.parametrize("cls", [Net, WritesIntoInput], ids=["saved-output", "input"])
def test_integrated_gradients_on_an_inplace_model_equals_captum_on_the_twin(cls):
    m, twin, x, t = _pair(cls)
    x0 = x.clone()
    ref = C.IntegratedGradients(twin).attribute(x, target=t, n_steps=8)
    got = relprop.explain(m, x, target=t, method="integrated_gradients", n_steps=8)  # engine="auto"
    close(got.attributions, ref)
    assert torch.equal(x, x0)  # the user's input is not written into
    # the fallback is relprop's recorded gradient: the same numbers as the graph engine asked for outright
    graph = relprop.explain(m, x, target=t, method="integrated_gradients", n_steps=8, engine="graph")
    assert torch.equal(got.attributions, graph.attributions)
    # and the autograd engine on the twin (the fast path the fallback replaces) agrees bit for bit
    auto = relprop.explain(twin, x, target=t, method="integrated_gradients", n_steps=8, engine="autograd")
    assert torch.equal(got.attributions, auto.attributions)


def test_autograd_engine_says_what_to_do():
    m, _, x, t = _pair()
    with pytest.raises(InPlaceAutogradError, match=r"engine='graph' or 'auto'.*out of place") as info:
        relprop.explain(m, x, target=t, method="integrated_gradients", n_steps=4, engine="autograd")
    assert "output 0 of Relu" in str(info.value)  # autograd's own detail: which saved tensor was overwritten
    assert not m.training and all(p.grad is None and p.requires_grad for p in m.parameters())


def test_noise_tunnel_over_integrated_gradients_on_an_inplace_model():
    m, twin, x, t = _pair()
    torch.manual_seed(3)
    got = relprop.explain(m, x, target=t, method="smoothgrad", base_method="integrated_gradients", n_steps=4)
    torch.manual_seed(3)
    ref = C.NoiseTunnel(C.IntegratedGradients(twin)).attribute(
        x, nt_type="smoothgrad", nt_samples=5, stdevs=1.0, target=t, n_steps=4
    )
    close(got.attributions, ref)


def test_gradcam_and_normgrad_on_an_inplace_model():
    m, twin, x, t = _pair()
    got = relprop.explain(m, x, target=t, method="gradcam", layer="c2")
    close(got.attributions, C.LayerGradCam(twin, twin.c2).attribute(x, target=t))
    # NormGrad at a conv: ||unfolded input patch|| * ||gradient at the output||, the gradient from autograd
    ng = relprop.explain(m, x, target=t, method="normgrad", layers=["c2"], combine="none")
    xg = x.clone()
    store = {}
    handle = twin.c2.register_forward_hook(lambda mod, i, o: store.update(a=i[0], o=o))
    out = twin(xg)
    handle.remove()
    (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), store["o"])
    cols = F.unfold(store["a"], 3, padding=1).norm(dim=1).reshape(2, 1, 8, 8)
    close(ng.attributions, (cols * g.flatten(2).norm(dim=1).reshape(2, 1, 8, 8)).detach())


@pytest.mark.parametrize("method", ["gradient", "lrp", "saliency", "deeplift"])
def test_kept_graph_holds_every_value_also_one_the_model_overwrote(method):
    m, _, x, t = _pair()
    e = relprop.explain(m, x, target=t, method=method, keep_graph=True)
    assert e.graph is not None
    assert [v for v in e.graph.values if v.data is None] == []
    # the overwritten ReLU output holds the ReLU's value (not the x3 the model wrote over it)
    (relu,) = [v for v in e.graph.values if v.producer is not None and v.producer.op_name == "aten.relu.default"][:1]
    with torch.no_grad():
        assert torch.equal(relu.data, torch.relu(m.c1(x)))


def test_normgrad_combination_without_spatial_input_is_one_clear_error():
    """A dense model's NormGrad maps have no spatial size to upsample to (was a bare StopIteration)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"combine: 'sum' .* no float input has spatial dims; pass size="):
        relprop.explain(m, x, target=0, method="normgrad", layers=["0", "2"])
    one = relprop.explain(m, x, target=0, method="normgrad", layers=["0"], combine="none")
    a = m[0](x)  # the virtual identity layer's map of a dense layer: |a| * |gradient at a|
    (g,) = torch.autograd.grad(m[2](m[1](a))[:, 0].sum(), a)
    close(one.attributions, (a.abs() * g.abs()).detach())


def test_deeplift_on_an_inplace_model_equals_the_twin_and_sums_to_the_difference():
    """DeepLIFT's reference pass replays the recorded ops (cloning what an in-place op writes): the in-place model
    gets the twin's multipliers, and with ReLUs only the attributions sum to ``f(x) - f(0)``."""
    m, twin, x, t = _pair()
    got = relprop.explain(m, x, target=t, method="deeplift").attributions
    ref = relprop.explain(twin, x, target=t, method="deeplift").attributions
    close(got, ref)
    with torch.no_grad():
        delta = (twin(x) - twin(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(got.sum((1, 2, 3)), delta, rtol=1e-5, atol=1e-6)
