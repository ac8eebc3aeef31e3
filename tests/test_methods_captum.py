"""Numerical agreement with Captum on a residual CNN and a small ViT, and the import swap."""

import pytest
import torch

import relprop
from methods_models import res_cnn, vit
from relprop import captum as R

C = pytest.importorskip("captum.attr")
pytestmark = pytest.mark.filterwarnings("ignore")

MODELS = {"cnn": res_cnn, "vit": vit}
_cache = {}


def model(name):
    if name not in _cache:
        _cache[name] = MODELS[name]()
    return _cache[name]


def close(a, c):
    a = a[0] if isinstance(a, tuple) else a
    c = c[0] if isinstance(c, tuple) else c
    torch.testing.assert_close(a.detach(), c.detach(), rtol=1e-4, atol=1e-5 * float(c.abs().max()) + 1e-12)


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_saliency_input_x_gradient(name):
    m, x, t, _ = model(name)
    close(R.Saliency(m).attribute(x, target=t), C.Saliency(m).attribute(x, target=t))
    close(R.Saliency(m).attribute(x, target=t, abs=False), C.Saliency(m).attribute(x, target=t, abs=False))
    close(R.InputXGradient(m).attribute(x, target=t), C.InputXGradient(m).attribute(x, target=t))


@pytest.mark.parametrize("name", ["cnn", "vit"])
@pytest.mark.parametrize(
    "method", ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_middle", "riemann_right"]
)
def test_integrated_gradients(name, method):
    m, x, t, b = model(name)
    ref = C.IntegratedGradients(m).attribute(x, b, target=t, n_steps=8, method=method)
    close(R.IntegratedGradients(m).attribute(x, b, target=t, n_steps=8, method=method, internal_batch_size=7), ref)
    # the traced-graph engine gives the same numbers as the autograd fast path
    e = relprop.explain(
        m,
        x,
        target=t,
        method="integrated_gradients",
        baselines=b,
        n_steps=8,
        approximation=method,
        internal_batch_size=7,
        engine="graph",
    )
    close(e.attributions, ref)


@pytest.mark.parametrize("name", ["cnn", "vit"])
@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_same_seed(name, nt_type):
    m, x, t, _ = model(name)
    torch.manual_seed(3)
    ours = R.NoiseTunnel(R.Saliency(m)).attribute(
        x, nt_type=nt_type, nt_samples=5, nt_samples_batch_size=2, stdevs=0.2, target=t
    )
    torch.manual_seed(3)
    ref = C.NoiseTunnel(C.Saliency(m)).attribute(
        x, nt_type=nt_type, nt_samples=5, nt_samples_batch_size=2, stdevs=0.2, target=t
    )
    close(ours, ref)


def test_noise_tunnel_over_integrated_gradients():
    m, x, t, b = model("cnn")
    torch.manual_seed(1)
    ours = R.NoiseTunnel(R.IntegratedGradients(m)).attribute(
        x, nt_samples=3, stdevs=0.3, target=t, n_steps=4, baselines=b
    )
    torch.manual_seed(1)
    ref = C.NoiseTunnel(C.IntegratedGradients(m)).attribute(
        x, nt_samples=3, stdevs=0.3, target=t, n_steps=4, baselines=b
    )
    close(ours, ref)


def test_deeplift_cnn():
    m, x, t, b = model("cnn")
    close(R.DeepLift(m).attribute(x, b, target=t), C.DeepLift(m).attribute(x, b, target=t))
    close(
        R.DeepLift(m, multiply_by_inputs=False).attribute(x, b, target=t),
        C.DeepLift(m, multiply_by_inputs=False).attribute(x, b, target=t),
    )


def test_deeplift_vit_captum_scope():
    # Captum rescales only hooked module types (none in a timm ViT: GELU, functional softmax): scope="captum".
    m, x, t, b = model("vit")
    ours = relprop.explain(m, x, target=t, method="deeplift", baselines=b, scope="captum").attributions
    close(ours, C.DeepLift(m).attribute(x, b, target=t))


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_guided_backprop_deconvnet(name):
    m, x, t, _ = model(name)
    close(R.GuidedBackprop(m).attribute(x, target=t), C.GuidedBackprop(m).attribute(x, target=t))
    close(R.Deconvolution(m).attribute(x, target=t), C.Deconvolution(m).attribute(x, target=t))


def test_gradcam_cnn():
    m, x, t, _ = model("cnn")
    for layer in (m.block.c2, m.block, m.conv):
        close(R.LayerGradCam(m, layer).attribute(x, target=t), C.LayerGradCam(m, layer).attribute(x, target=t))
    close(
        R.LayerGradCam(m, m.block).attribute(x, target=t, attribute_to_layer_input=True, relu_attributions=True),
        C.LayerGradCam(m, m.block).attribute(x, target=t, attribute_to_layer_input=True, relu_attributions=True),
    )
    close(R.GuidedGradCam(m, m.block.c2).attribute(x, target=t), C.GuidedGradCam(m, m.block.c2).attribute(x, target=t))
    # by name through explain
    e = relprop.explain(m, x, target=t, method="gradcam", layer="block.c2")
    close(e.attributions, C.LayerGradCam(m, m.block.c2).attribute(x, target=t))


def test_gradcam_vit_token_grid():
    from captum._utils.gradient import compute_layer_gradients_and_eval

    m, x, t, _ = model("vit")
    layer = m.blocks[-1]
    grads, acts = compute_layer_gradients_and_eval(m, layer, (x,), t)
    grid = lambda a: a[:, 1:].reshape(a.shape[0], 4, 4, -1).permute(0, 3, 1, 2)  # noqa: E731  cls token dropped
    g, a = grid(grads[0]), grid(acts[0])
    ref = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)
    e = relprop.explain(m, x, target=t, method="gradcam", layer="blocks.1")
    assert e.attributions.shape == (2, 1, 4, 4)
    close(e.attributions, ref)
    ggc = relprop.explain(m, x, target=t, method="guided_gradcam", layer="blocks.1").attributions
    gb = C.GuidedBackprop(m).attribute(x, target=t)
    close(ggc, gb * torch.nn.functional.interpolate(torch.relu(ref), (32, 32), mode="nearest"))


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_occlusion(name):
    m, x, t, _ = model(name)
    kw = dict(sliding_window_shapes=(3, 6, 6), strides=(3, 4, 4), target=t, baselines=0.3)
    close(R.Occlusion(m).attribute(x, perturbations_per_eval=8, **kw), C.Occlusion(m).attribute(x, **kw))


def test_import_swap_same_numbers():
    m, x, t, b = model("cnn")

    def user_code(attr):  # written against Captum's API
        out = {}
        out["sal"] = attr.Saliency(m).attribute(x, target=t)
        out["ixg"] = attr.InputXGradient(m).attribute(x, target=t)
        out["ig"] = attr.IntegratedGradients(m).attribute(x, baselines=b, target=t, n_steps=5)
        out["dl"] = attr.DeepLift(m).attribute(x, baselines=b, target=t)
        out["gbp"] = attr.GuidedBackprop(m).attribute(x, target=t)
        out["dec"] = attr.Deconvolution(m).attribute(x, target=t)
        out["gc"] = attr.LayerGradCam(m, m.block).attribute(x, target=t)
        out["ggc"] = attr.GuidedGradCam(m, m.block).attribute(x, target=t)
        out["occ"] = attr.Occlusion(m).attribute(x, sliding_window_shapes=(3, 8, 8), strides=8, target=t)
        torch.manual_seed(0)
        out["nt"] = attr.NoiseTunnel(attr.Saliency(m)).attribute(x, nt_type="vargrad", nt_samples=3, target=t)
        out["tuple"] = attr.IntegratedGradients(m).attribute((x,), baselines=(b,), target=t, n_steps=5)
        return out

    ours, ref = user_code(R), user_code(C)
    for k in ref:
        assert type(ours[k]) is type(ref[k]), k
        close(ours[k], ref[k])


def test_convergence_delta_like_captum():
    m, x, t, b = model("cnn")
    _, d_ours = R.IntegratedGradients(m).attribute(x, b, target=t, n_steps=30, return_convergence_delta=True)
    _, d_ref = C.IntegratedGradients(m).attribute(x, b, target=t, n_steps=30, return_convergence_delta=True)
    torch.testing.assert_close(d_ours, d_ref, rtol=1e-3, atol=1e-5)


# --- Captum's conventions, with cases taken from Captum's own test suite (captum 0.9, tests/attr/) -------------
from captum.testing.helpers.basic_models import (  # noqa: E402
    BasicModel_ConvNet_One_Conv,
    BasicModel_MultiLayer,
    BasicModel_MultiLayer_MultiInput,
)


def test_occlusion_per_input_int_strides():
    """tests/attr/test_occlusion.py::test_multi_input_ablation_with_baselines: strides=(2, 1, 2), one int per input."""
    net = BasicModel_MultiLayer_MultiInput()
    inp1 = torch.tensor([[23.0, 100.0, 0.0], [20.0, 50.0, 30.0]])
    inp2 = torch.tensor([[20.0, 50.0, 30.0], [0.0, 100.0, 0.0]])
    inp3 = torch.tensor([[0.0, 100.0, 10.0], [2.0, 10.0, 3.0]])
    expected = (
        [[444.0, 444.0, 444.0], [328.0, 328.0, 328.0]],
        [[68.0, 188.0, 108.0], [-12.0, 388.0, -12.0]],
        [[368.0, 368.0, 24.0], [0.0, 0.0, -12.0]],
    )
    kw = dict(
        baselines=(torch.tensor([[1.0, 4, 7], [3.0, 6, 9]]), 3.0, torch.tensor([[4.0], [6]])),
        additional_forward_args=(1,),
        sliding_window_shapes=((3,), (1,), (2,)),
        strides=(2, 1, 2),
        target=0,
    )
    for ppe in (1, 2, 4):
        got = R.Occlusion(net).attribute((inp1, inp2, inp3), perturbations_per_eval=ppe, **kw)
        assert isinstance(got, tuple) and len(got) == 3
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, torch.tensor(e))
    for g, c in zip(got, C.Occlusion(net).attribute((inp1, inp2, inp3), **kw)):
        torch.testing.assert_close(g, c)


def test_occlusion_per_input_tuple_strides_on_convs():
    """tests/attr/test_occlusion.py::test_simple_multi_input_conv (second case)."""
    net = BasicModel_ConvNet_One_Conv()
    inp = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
    inp2 = torch.ones((1, 1, 4, 4))
    kw = dict(sliding_window_shapes=((1, 2, 3), (1, 1, 2)), strides=((1, 2, 1), (1, 1, 2)), target=0)
    got = R.Occlusion(net).attribute((inp, inp2), **kw)
    want = (
        [[[[17.0, 17.0, 17.0, 17.0], [17.0, 17.0, 17.0, 17.0], [64.0, 65.5, 65.5, 67.0], [64.0, 65.5, 65.5, 67.0]]]],
        [[[[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]]]],
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, torch.tensor(w))


@pytest.mark.parametrize("cls", ["Saliency", "InputXGradient", "IntegratedGradients", "DeepLift"])
def test_targets_index_dim_1_of_multidim_outputs(cls):
    """captum/testing/attr/helpers/test_config.py 'basic_multiple_tuple_target': output (4, 2, 2, 2),
    one tuple per example; and one tuple for all examples."""
    net = BasicModel_MultiLayer()
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    for target in ([(1, 0, 0), (0, 1, 1), (1, 1, 1), (0, 0, 0)], (1, 0, 1)):
        got = getattr(R, cls)(net).attribute(x, target=target, additional_forward_args=(None, True))
        want = getattr(C, cls)(net).attribute(x, target=target, additional_forward_args=(None, True))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # each example alone gives its row of the batch (Captum's TargetsMeta check)
    t = [(1, 0, 0), (0, 1, 1), (1, 1, 1), (0, 0, 0)]
    batch = getattr(R, cls)(net).attribute(x, target=t, additional_forward_args=(None, True))
    for i in range(4):
        one = getattr(R, cls)(net).attribute(x[i : i + 1], target=t[i], additional_forward_args=(None, True))
        torch.testing.assert_close(one[0], batch[i], rtol=1e-4, atol=1e-5)


def test_a_target_that_selects_several_outputs_is_refused():
    """tests/attr/test_targets.py::test_multi_target_error (Captum: AssertionError)."""
    net = BasicModel_MultiLayer()
    with pytest.raises(ValueError, match="selects 2 outputs per example"):
        R.IntegratedGradients(net).attribute(torch.zeros((1, 3)), additional_forward_args=(None, True), target=(1, 0))
    with pytest.raises(ValueError, match="2-d output"):
        R.Saliency(net).attribute(torch.zeros((2, 3)), additional_forward_args=(None, True), target=[0, 1])


def test_grad_cam_on_a_layer_that_returns_a_tuple():
    """tests/attr/layer/test_grad_cam.py::test_simple_multi_input_non_conv: ([[21.0]], [[21.0]])."""
    net = BasicModel_MultiLayer(multi_input_module=True)
    inp = torch.tensor([[0.0, 6.0, 0.0]], requires_grad=True)
    got = R.LayerGradCam(net, net.multi_relu).attribute(inp, target=0)
    assert isinstance(got, tuple) and len(got) == 2
    for g in got:
        torch.testing.assert_close(g.detach(), torch.tensor([[21.0]]))


def test_grad_cam_on_a_conv_block_returning_two_maps_matches_captum():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y.relu(), torch.tanh(2 * y)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.block = Block()
            self.fc = torch.nn.Linear(2 * 3 * 25, 4)

        def forward(self, x):
            a, b = self.block(x)
            return self.fc(torch.cat([a, b], 1).flatten(1))

    net = Net()
    x = torch.randn(3, 1, 5, 5)
    for relu in (False, True):
        got = R.LayerGradCam(net, net.block).attribute(x, target=2, relu_attributions=relu)
        want = C.LayerGradCam(net, net.block).attribute(x, target=2, relu_attributions=relu)
        assert isinstance(got, tuple) and len(got) == len(want) == 2
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w.detach(), rtol=1e-4, atol=1e-6)
