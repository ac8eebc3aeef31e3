"""One validation path for every method's inputs, targets and outputs (issue 8, findings 6-7; audit D7, D8, D13).

Every test is parametrised over the methods, so a method that skips the shared checks (as integrated
gradients and occlusion did: NaN maps and ZeroDivisionError) fails here.
"""

from __future__ import annotations

import pathlib
import warnings

import pytest
import torch
import torch.nn as nn

import relprop
from relprop._errors import did_you_mean

METHODS = {
    "gradient": {},
    "lrp": {"composite": "epsilon"},
    "saliency": {},
    "input_x_gradient": {},
    "integrated_gradients": {"n_steps": 4},
    "noise_tunnel": {"nt_samples": 2, "stdevs": 0.1},
    "deeplift": {},
    "guided_backprop": {},
    "occlusion": {"sliding_window_shapes": (3, 2, 2), "strides": 2},
    "gradcam": {"layer": "conv"},
}
ALL = list(METHODS)
#: Methods that need a module layer (not applicable to a plain function model).
NEEDS_LAYER = {"gradcam"}


class Net(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


class Head(nn.Module):
    """``Net`` followed by a function of its logits (a regression head, an argmax...)."""

    def __init__(self, fn, classes: int = 5):
        super().__init__()
        self.net = Net(classes)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.net(x))


def _net():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 3, 6, 6)


def _snapshot(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def _assert_same(model: nn.Module, snap) -> None:
    state, flags, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes


def _explain(model, x, method, target=0, **extra):
    if method == "gradcam" and isinstance(model, Head):
        extra.setdefault("layer", "net.conv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return relprop.explain(model, x, target=target, method=method, **{**METHODS[method], **extra})


# --------------------------------------------------------------------------------------------- inputs
def _nan(x):
    x = x.clone()
    x[0, 1, 2, 3] = float("nan")
    return x


BAD_INPUTS = {
    "nan": (_nan, "NaN"),
    "inf": (lambda x: x.clone().fill_(float("inf")), "infinite"),
    "empty batch": (lambda x: x[:0], "empty batch"),
    "meta device": (lambda x: torch.empty_like(x, device="meta"), "meta"),
    "uint8 image": (lambda x: (x * 50).clamp(0, 255).to(torch.uint8), r"uint8.*\.float\(\)"),
    "numpy array": (lambda x: x.numpy(), "numpy.*torch.from_numpy"),
    "0-d tensor": (lambda x: x[0, 0, 0, 0], "batch dimension"),
    "float64 input": (
        lambda x: x.double(),
        r"^inputs: dtype torch.float64 but the model's parameters are torch.float32; convert the inputs with "
        r"x.to\(torch.float32\) \(on the CLI: --dtype float32\)$",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("method", ALL)
def test_bad_inputs_raise_before_the_model_runs(method, case):
    model, x = _net()
    snap = _snapshot(model)
    make, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        _explain(model, make(x), method)
    assert model.calls == 0  # rejected before any forward pass: nothing to restore
    _assert_same(model, snap)


def test_plan_rejects_an_input_in_another_dtype_and_keeps_replaying():
    model, x = _net()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"^inputs: dtype torch.float64 but .* torch.float32; .*x.to"):
        relprop.plan(model, x.double(), target=0)
    p = relprop.plan(model, x, target=0)
    calls = model.calls
    with pytest.raises(ValueError, match=r"^inputs\[0\]: dtype torch.float16 but"):
        p.explain((x.half(),))
    assert model.calls == calls and p.records == 1
    _assert_same(model, snap)
    p.explain(x)
    assert p.replays == 1 and p.rerecords == 0


class _Mixed(nn.Module):
    """float32 layer, then a float64 one: the model casts between them (parameters in two dtypes)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2).double()

    def forward(self, x):
        return self.b(torch.relu(self.a(x.float())).double())


class _Declared(nn.Module):
    """Declares a ``dtype`` and casts float inputs to it at the entry (as Hugging Face vision models do)."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x.to(self.dtype))


@pytest.mark.parametrize(
    "model, x",
    [
        (_Mixed(), torch.randn(2, 4, dtype=torch.float64)),
        (nn.Softmax(-1), torch.randn(2, 4, dtype=torch.float64)),  # no parameters
        (nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 2)), torch.tensor([[1, 2], [3, 4]])),
    ],
    ids=["mixed", "no parameters", "token ids"],
)
def test_dtype_check_leaves_models_it_cannot_judge_to_run(model, x):
    got = relprop.explain(model.eval(), x, target=1, method="gradient")
    assert got.output.shape[0] == 2 and torch.isfinite(got.output).all()


def test_a_declared_dtype_does_not_skip_the_check():
    """A model declaring a ``dtype`` (Hugging Face models) gets the one-line error too: most such models
    (BERT's inputs_embeds, ResNet, ConvNeXt) fail in the forward with torch's message, and one that casts at
    its entry (ViT) would compute in float32 what the caller passed as float64."""
    with pytest.raises(ValueError, match=r"^inputs: dtype torch.float64 but the model's parameters are torch.float32"):
        relprop.explain(_Declared().eval(), torch.randn(2, 4, dtype=torch.float64), target=1, method="gradient")


@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift", "occlusion"])
def test_non_finite_baselines_rejected(method):
    model, x = _net()
    b = torch.zeros_like(x)
    b[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="baselines.*NaN"):
        _explain(model, x, method, baselines=b)


@pytest.mark.parametrize("method", ["integrated_gradients", "noise_tunnel", "occlusion"])
def test_inputs_with_different_batch_sizes_rejected_where_the_batch_is_repeated(method):
    class Two(nn.Module):
        def forward(self, x, y):
            return x.flatten(1)[:, :3] + y.sum()

    with pytest.raises(ValueError, match=r"inputs\[1\]: batch size 1 differs"):
        _explain(Two(), (torch.randn(2, 3, 2, 2), torch.randn(1, 3, 2, 2)), method)


# --------------------------------------------------------------------------------------------- targets
BAD_TARGETS = {
    "bool": (True, "bool True"),
    "bool tensor": (torch.tensor([True, False]), "bool tensor"),
    "0-d bool tensor": (torch.tensor(True), "bool tensor"),
    "numpy bool": (__import__("numpy").bool_(True), "bool"),
    "str": ("cat", "string 'cat'.*class index"),
    "float": (1.0, "integer class indices"),
    "float tensor": (torch.tensor([0.0, 1.0]), "integer class indices"),
    "wrong length": (torch.tensor([0, 1, 2]), "one per sample"),
    "list of bools": ([True, False], "int class indices"),
    "out of range": (7, "out of range"),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
@pytest.mark.parametrize("method", ALL)
def test_bad_targets_raise_clear_errors(method, case):
    model, x = _net()
    snap = _snapshot(model)
    target, match = BAD_TARGETS[case]
    with pytest.raises(ValueError, match=match):
        _explain(model, x, method, target=target)
    if case != "out of range":  # only the range needs the output
        assert model.calls == 0
    _assert_same(model, snap)


def test_str_target_points_to_the_label_lookup():
    model, x = _net()
    model.config = type("Config", (), {"label2id": {"cat": 0, "dog": 1}})()
    with pytest.raises(ValueError, match=r"config.label2id\['dog'\] is 1"):
        relprop.explain(model, x, target="dog")
    with pytest.raises(ValueError, match="Did you mean 'dog'"):
        relprop.explain(model, x, target="dgo")


@pytest.mark.parametrize("method", ALL)
def test_numpy_integer_and_per_sample_list_targets_work(method):
    import numpy as np

    model, x = _net()
    torch.manual_seed(0)  # noise tunnel draws noise: the same for both
    a = _explain(model, x, method, target=np.int64(3))
    torch.manual_seed(0)
    b = _explain(model, x, method, target=[3, 3])
    torch.testing.assert_close(a.tensors()[0], b.tensors()[0])
    assert a.target.tolist() == [3, 3]


# --------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("method", ALL)
def test_integer_argmax_output_is_rejected(method):
    model = Head(lambda z: z.argmax(-1, keepdim=True)).eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="dtype torch.int64.*argmax"):
        _explain(model, x, method)


@pytest.mark.parametrize("method", ALL)
def test_callable_target_of_wrong_shape_is_rejected(method):
    model, x = _net()
    with pytest.raises(ValueError, match=r"a callable target must return a tensor of shape \(batch,\)"):
        _explain(model, x, method, target=lambda out: out[:, :2])


def test_callable_target_message_exists_once():
    src = pathlib.Path(relprop.__file__).parent
    text = "".join(p.read_text() for p in src.rglob("*.py"))
    assert text.count("a callable target must return a tensor of shape") == 1


def _per_sample(z):
    return z[:, 2] - z[:, 0]


@pytest.mark.parametrize("target", [None, 0, -1])
@pytest.mark.parametrize("method", ALL)
def test_batch_shaped_output_is_one_score_per_sample(method, target):
    """A ``(batch,)`` output: target None or 0 explains the output itself, as the same score in a
    ``(batch, 1)`` head or through a callable target does."""
    torch.manual_seed(0)
    flat = Head(_per_sample).eval()
    column = Head(lambda z: _per_sample(z)[:, None]).eval()
    column.load_state_dict(flat.state_dict())
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(1)
    e = _explain(flat, x, method, target=target)
    torch.manual_seed(1)
    ref = _explain(column, x, method, target=0)
    torch.testing.assert_close(e.tensors()[0], ref.tensors()[0])
    torch.testing.assert_close(e.score, ref.score.reshape(-1))
    if method != "noise_tunnel":  # its score is the mean over the noisy copies
        torch.testing.assert_close(e.score, _per_sample(flat.net(x)).detach())


@pytest.mark.parametrize("method", ["gradient", "integrated_gradients", "occlusion"])
def test_batch_shaped_output_rejects_other_targets(method):
    model = Head(_per_sample).eval()
    with pytest.raises(ValueError, match=r"one score per sample.*None or 0"):
        _explain(model, torch.randn(2, 3, 6, 6), method, target=1)


@pytest.mark.parametrize("method", ["gradient", "lrp", "integrated_gradients", "occlusion"])
def test_target_none_needs_a_single_class(method):
    model, x = _net()
    with pytest.raises(ValueError, match="target: required.*5 classes"):
        _explain(model, x, method, target=None)


def test_batch_shaped_output_gradient_equals_autograd():
    torch.manual_seed(0)
    model = Head(_per_sample).eval()
    x = torch.randn(3, 3, 6, 6)
    e = relprop.explain(model, x, target=None, method="gradient")
    xx = x.clone().requires_grad_()
    torch.testing.assert_close(e.attributions, torch.autograd.grad(model(xx).sum(), xx)[0])
    lrp = relprop.explain(model, x, target=None, method="lrp", composite="epsilon")
    assert lrp.attributions.shape == x.shape and torch.isfinite(lrp.attributions).all()


@pytest.mark.parametrize("method", ["gradient", "integrated_gradients", "occlusion"])
def test_output_rows_must_match_the_batch(method):
    class Pooled(nn.Module):
        def forward(self, x):
            return x.flatten(1).mean(0, keepdim=True)[:, :4]  # one row for the whole batch

    with pytest.raises(ValueError, match="1 rows.*for a batch of"):
        _explain(Pooled(), torch.randn(2, 3, 6, 6), method)


def test_model_error_names_the_inputs():
    model, _ = _net()
    with pytest.raises(RuntimeError) as info:
        relprop.explain(model, torch.randn(2, 5, 6, 6), target=0)
    assert "method='gradient'" in "\n".join(info.value.__notes__)
    ids = torch.randint(0, 5, (2, 3, 6, 6))
    with pytest.raises(RuntimeError) as info:
        relprop.explain(model, ids, target=0)
    assert "hold integers" in "\n".join(info.value.__notes__)


# --------------------------------------------------------------------------------------------- train mode
class DropNet(nn.Module):
    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(self.bn(self.conv(x)).relu().mean((2, 3))))


@pytest.mark.parametrize("method", ["integrated_gradients", "noise_tunnel", "occlusion"])
def test_multi_forward_methods_warn_about_training_mode(method):
    model = DropNet().train()
    with pytest.warns(UserWarning, match="training mode.*dropout mask.*model.eval"):
        try:
            relprop.explain(model, torch.randn(2, 3, 6, 6), target=0, method=method, **METHODS[method])
        except relprop.TraceError:
            pass  # until the tracer records dropout masks (graph engine); the warning comes first


def test_no_training_warning_in_eval_mode():
    model = DropNet(bn=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relprop.explain(model, torch.randn(2, 3, 6, 6), target=0, method="integrated_gradients", n_steps=3)


@pytest.mark.parametrize("method,opts", [("occlusion", {}), ("integrated_gradients", {"engine": "autograd"})])
def test_methods_that_run_the_model_refuse_to_update_batch_norm_statistics(method, opts):
    model = DropNet(bn=True).train()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="batch norm.*running statistics.*model.eval"):
        _explain(model, torch.randn(2, 3, 6, 6), method, **opts)
    _assert_same(model, snap)


def test_integrated_gradients_autograd_engine_does_not_touch_requires_grad():
    """The autograd engine differentiates w.r.t. the inputs only: no parameter flag is switched off
    (another thread may be training the same model)."""
    seen = []

    class Spy(Net):
        def forward(self, x):
            seen.append(self.fc.weight.requires_grad)
            return super().forward(x)

    torch.manual_seed(0)
    model = Spy().eval()
    x = torch.randn(2, 3, 6, 6)
    e = relprop.explain(model, x, target=1, method="integrated_gradients", n_steps=8, engine="autograd")
    assert seen and all(seen)
    g = relprop.explain(model, x, target=1, method="integrated_gradients", n_steps=8, engine="graph")
    torch.testing.assert_close(e.attributions, g.attributions, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------- helpers
def test_did_you_mean():
    assert did_you_mean("lrpp", ["lrp", "gradient"]) == " Did you mean 'lrp'?"
    assert did_you_mean("zzz", ["lrp", "gradient"]) == ""
    assert did_you_mean("layer1", ["layer1.0", "layer2", "layer10"], n=3).startswith(" Did you mean 'layer")
    with pytest.raises(ValueError, match="Did you mean 'saliency'"):
        relprop.explain(Net().eval(), torch.randn(1, 3, 6, 6), target=0, method="salency")


@pytest.mark.parametrize("method", ["integrated_gradients", "noise_tunnel"])
def test_multi_forward_methods_in_training_mode_leave_buffers_untouched(method):
    """In training mode integrated gradients (engine 'auto' -> the graph) and the noise tunnel run through
    the tracer, whose forward never writes the model's buffers (batch-norm running statistics)."""
    torch.manual_seed(0)
    model = DropNet(bn=True).train()
    snap = _snapshot(model)
    with pytest.warns(UserWarning, match="training mode"):
        e = relprop.explain(model, torch.randn(2, 3, 6, 6), target=0, method=method, **METHODS[method])
    assert torch.isfinite(e.attributions).all()
    _assert_same(model, snap)


@pytest.mark.parametrize("method", ["gradient", "integrated_gradients", "occlusion"])
def test_model_on_the_meta_device_is_rejected(method):
    with torch.device("meta"):
        model = Net().eval()
    with pytest.raises(ValueError, match="parameter 'conv.weight' is on the 'meta' device"):
        _explain(model, torch.randn(2, 3, 6, 6), method)
