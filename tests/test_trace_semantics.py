"""The tape keeps autograd's semantics: custom autograd Functions, no-grad blocks, in-place and view ops,
recurrent modules, train mode and compiled models. Every check compares with ``torch.autograd.grad``
(or the out-of-place twin of a program) on the same model and inputs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import relprop
from relprop.rules import Identity, NoRuleError
from relprop.trace import TraceError


def autograd_gradient(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    out = model(x.clone())
    return torch.autograd.grad(out[:, target].sum(), x)[0]


def assert_gradient_matches(model, x, target=1, atol=1e-6):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # train-mode warnings are tested on their own
        got = relprop.explain(model, x, target=target, method="gradient").attributions
    ref = autograd_gradient(model, x, target)
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=atol)


# ------------------------------------------------------------------------ custom autograd Functions
class STE(torch.autograd.Function):
    """Straight-through estimator: round forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, g):
        return g


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam: float):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


class TwoByTwo(torch.autograd.Function):
    """Two inputs, two outputs, a backward that is not the derivative of the forward."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b, a + b.exp()

    @staticmethod
    def backward(ctx, g1, g2):
        a, b = ctx.saved_tensors
        return 3 * g1 * b + g2, g1 * a - 2 * g2


class Scaled(torch.autograd.Function):
    """Non-tensor arguments around the tensor one, and a tensor argument that does not require grad."""

    @staticmethod
    def forward(ctx, k: float, x, tag: str, c):
        ctx.k = k
        return x * k + c

    @staticmethod
    def backward(ctx, g):
        return None, g * (ctx.k + 1), None, None


class SavedOnly(torch.autograd.Function):
    """An input the forward never reads (only the backward does): found by its autograd edge."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g * 2, g.sum(0) * w


class FnNet(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.l1(x)
        if self.kind == "ste":
            h = STE.apply(h * 3)
        elif self.kind == "reverse":
            h = GradReverse.apply(h, 0.5)
        elif self.kind == "two":
            a, b = TwoByTwo.apply(h, self.l2(h))
            h = a + b
        elif self.kind == "scaled":
            h = Scaled.apply(2.0, h, "tag", torch.ones(6))
        elif self.kind == "saved_only":
            h = SavedOnly.apply(h, h.sum(0).tanh())
        return self.l3(torch.relu(h))


@pytest.mark.parametrize("kind", ["ste", "reverse", "two", "scaled", "saved_only"])
def test_custom_function_gradient_equals_autograd(kind):
    torch.manual_seed(0)
    assert_gradient_matches(FnNet(kind).eval(), torch.randn(5, 4))


@pytest.mark.parametrize(("kind", "name"), [("ste", "STE"), ("reverse", "GradReverse"), ("two", "TwoByTwo")])
def test_custom_function_is_one_region_node(kind, name):
    torch.manual_seed(0)
    g = relprop.trace(FnNet(kind).eval(), torch.randn(5, 4))
    regions = [n for n in g.nodes if n.region is not None and n.region.kind == "autograd_function"]
    assert [n.region.name for n in regions] == [name]
    assert regions[0].packet == name and regions[0].region.family == "autograd_function"
    assert all(v.is_activation for v in regions[0].outputs)


def test_lrp_through_custom_function_needs_a_rule_and_names_the_function():
    torch.manual_seed(0)
    model, x = FnNet("ste").eval(), torch.randn(5, 4)
    with pytest.raises(NoRuleError, match="STE"):
        relprop.explain(model, x, target=1, method="lrp", composite="epsilon")
    # With a rule for it: identity through the STE = LRP of the same net without it, on rounded inputs.
    e = relprop.explain(model, x, target=1, method="lrp", composite="epsilon", rules={"STE": Identity()})
    assert torch.isfinite(e.attributions).all() and e.attributions.abs().sum() > 0


def test_unmatched_function_input_raises_instead_of_guessing():
    external = torch.randn(6, requires_grad=True)  # neither a parameter nor used by recorded forward ops

    class Ignores(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g, g.sum(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 6)

        def forward(self, x):
            return Ignores.apply(self.l(x), external)

    with pytest.raises(TraceError, match="Ignores"):
        relprop.trace(Net().eval(), torch.randn(2, 4))


# ------------------------------------------------------------------------------- grad-mode blocks
class NoGradNet(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.l1(x)
        if self.mode == "no_grad":
            with torch.no_grad():
                s = h.std(0, keepdim=True) + 1  # a statistic treated as a constant
            h = h / s
        elif self.mode == "inference_mode":
            with torch.inference_mode():
                s = float(h.abs().mean()) + 1
            h = h * s
        elif self.mode == "inference_mode_tensor":  # an inference tensor used after the block
            with torch.inference_mode():
                s = h.abs().amax(1, keepdim=True) + 1
            h = h / s.clone()
        elif self.mode == "detach":
            h = h * h.detach().sigmoid()
        elif self.mode == "no_grad_inplace":  # as aten::cosine_similarity clamps its norms
            n = h.norm(dim=1, keepdim=True) * 1.0  # (norm saves its output: clamp a copy)
            with torch.no_grad():
                n.clamp_min_(1.5)
            h = h / n
        elif self.mode == "enable_grad_inside_no_grad":
            with torch.no_grad():
                c = h.mean()
                with torch.enable_grad():
                    h = h * 2
            h = h - c
        return self.l2(torch.tanh(h))


@pytest.mark.parametrize(
    "mode",
    ["no_grad", "inference_mode", "inference_mode_tensor", "detach", "no_grad_inplace", "enable_grad_inside_no_grad"],
)
def test_grad_mode_blocks_inside_forward(mode):
    torch.manual_seed(0)
    assert_gradient_matches(NoGradNet(mode).eval(), torch.randn(5, 4))


def test_inplace_write_autograd_does_not_differentiate_keeps_the_old_derivative():
    torch.manual_seed(0)
    g = relprop.trace(NoGradNet("no_grad_inplace").eval(), torch.randn(5, 4))
    regions = [n.region for n in g.nodes if n.region is not None and n.region.kind == "straight_through"]
    assert [r.name for r in regions] == ["clamp_min_"]
    cos = nn.Sequential(nn.Linear(4, 6))

    class Cos(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.ref = cos, torch.randn(6)

        def forward(self, x):
            return torch.nn.functional.cosine_similarity(self.body(x), self.ref[None], dim=-1)[:, None]

    assert_gradient_matches(Cos().eval(), torch.randn(3, 4), target=0)


def test_values_computed_under_no_grad_are_constants():
    torch.manual_seed(0)
    g = relprop.trace(NoGradNet("no_grad").eval(), torch.randn(5, 4))
    std = g.find(lambda n: n.packet == "std")
    assert len(std) == 1 and not std[0].outputs[0].is_activation
    assert std[0].inputs[0].producer.packet == "detach"


# ------------------------------------------------------------------- in-place and metadata-only ops
class MetaNet(nn.Module):
    def __init__(self, inplace: bool, kind: str):
        super().__init__()
        self.inplace, self.kind = inplace, kind
        self.l1, self.mid, self.l2 = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3, bias=False)

    def forward(self, x):
        y = torch.relu(self.l1(x)) * 1.0  # (relu saves its output for backward: write a copy)
        z = y + self.mid(x)  # y is used (the sum rule reads its data) before its metadata changes
        if self.kind == "t":
            y = y.t_() if self.inplace else y.t()
            h = z + y.t()
        elif self.kind == "transpose":
            y = y.transpose_(0, 1) if self.inplace else y.transpose(0, 1)
            h = z * y.transpose(1, 0)
        else:  # unsqueeze / squeeze
            if self.inplace:
                y.unsqueeze_(1)
                y = y * 3
                y.squeeze_(1)
            else:
                y = (y.unsqueeze(1) * 3).squeeze(1)
            h = z + y
        return self.l2(h)


@pytest.mark.parametrize("kind", ["t", "transpose", "squeeze"])
def test_metadata_only_inplace_equals_out_of_place_twin(kind):
    torch.manual_seed(0)
    x = torch.randn(5, 5)
    inplace, twin = MetaNet(True, kind).eval(), MetaNet(False, kind).eval()
    twin.load_state_dict(inplace.state_dict())
    assert_gradient_matches(inplace, x)
    for comp in ("epsilon", "zplus"):
        a = relprop.explain(inplace, x, target=1, method="lrp", composite=comp).attributions
        b = relprop.explain(twin, x, target=1, method="lrp", composite=comp).attributions
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------- recurrent modules
class Recurrent(nn.Module):
    def __init__(self, cls, batch_first: bool, bidirectional: bool):
        super().__init__()
        self.rnn = cls(4, 5, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
        self.batch_first = batch_first
        self.head = nn.Linear(5 * (2 if bidirectional else 1), 3)

    def forward(self, x):  # x: (batch, time, features)
        out = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.head(out[:, -1] if self.batch_first else out[-1])


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_gradient_equals_autograd(cls, batch_first, bidirectional):
    torch.manual_seed(0)
    assert_gradient_matches(Recurrent(cls, batch_first, bidirectional).eval(), torch.randn(2, 6, 4))


# ---------------------------------------------------------------------------------------- train mode
class TrainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.drop, self.l2 = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(self.drop(torch.relu(self.bn(self.l1(x)))))


def test_train_mode_records_the_forward_that_ran_and_never_writes_buffers():
    torch.manual_seed(0)
    model, x = TrainNet().train(), torch.randn(6, 4)
    model.bn.running_mean.normal_()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match=r"training mode.*model\.eval\(\)") as record:
        got = relprop.explain(model, x, target=1, method="gradient").attributions
    assert sum("training mode" in str(w.message) for w in record) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"buffer {k} was written"
    torch.manual_seed(3)  # the same dropout mask
    ref = autograd_gradient(model, x, 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # The dropout mask is a constant of the graph: recomputing dropped data does not draw again.
    torch.manual_seed(3)
    g = relprop.trace(model, x)
    assert not g.find(lambda n: n.packet in ("bernoulli", "bernoulli_", "native_dropout"))


def test_functional_dropout_and_buffer_writes_in_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)
            self.register_buffer("calls", torch.zeros(()))
            self.register_buffer("ema", torch.zeros(4))

        def forward(self, x):
            self.calls += 1
            h = self.l(x)
            with torch.no_grad():
                self.ema.mul_(0.9).add_(h.mean(0), alpha=0.1)
            h = torch.nn.functional.dropout(h, 0.3, training=True) + self.ema
            return h

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(3, 4)
    torch.manual_seed(5)
    got = relprop.explain(model, x, target=2, method="gradient").attributions
    assert model.calls.item() == 0 and torch.equal(model.ema, torch.zeros(4))
    # autograd on a copy (this forward writes its buffers); the same seed draws the same mask
    twin = copy.deepcopy(model)
    torch.manual_seed(5)
    ref = autograd_gradient(twin, x, 2)
    torch.testing.assert_close(got, ref)


def test_native_dropout_kernel_records_its_mask_as_a_constant():
    """``native_dropout`` (the kernel CUDA's dropout uses; callable on CPU): a product with the mask drawn."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h, _mask = torch.native_dropout(self.l1(x), 0.4, True)
            return self.l2(h)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(5, 4)
    torch.manual_seed(7)
    got = relprop.explain(model, x, target=1, method="gradient").attributions
    torch.manual_seed(7)
    torch.testing.assert_close(got, autograd_gradient(model, x, 1))
    torch.manual_seed(7)
    assert [n.packet for n in relprop.trace(model, x).nodes] == ["t", "addmm", "mul", "t", "addmm"]


def test_ops_random_only_in_training_are_plain_in_eval():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.Linear(4, 2)).eval(), torch.randn(6, 3)
    assert_gradient_matches(model, x)
    with pytest.warns(UserWarning, match="training mode"), pytest.raises(TraceError, match="rrelu_with_noise"):
        relprop.trace(model.train(), x)  # the noise has a derivative through the activation: refused


# ------------------------------------------------------------------------------ token models
def test_token_model_with_frozen_weights_gradient_equals_autograd():
    """Integer inputs only, all weights frozen: the embedding output requires grad inside the dispatch mode,
    so the attention takes its autograd kernels and the gradient is autograd's."""
    pytest.importorskip("transformers")
    from model_zoo import build
    from test_zoo_gradient import check_gradient

    _, model, inputs, target = build("hf_bert")
    model.requires_grad_(False)
    ids = torch.randint(0, 100, inputs["attention_mask"].shape)
    check_gradient(model, {"input_ids": ids, "attention_mask": inputs["attention_mask"]}, target)
    assert not any(p.requires_grad for p in model.parameters())


# -------------------------------------------------------------------------------- compiled models
def test_compiled_model_is_explained_through_its_original_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    compiled = torch.compile(model)
    assert (
        relprop.trace(compiled, torch.randn(2, 4)).params.keys()
        == relprop.trace(model, torch.randn(2, 4)).params.keys()
    )
    x = torch.randn(2, 4)
    a = relprop.explain(compiled, x, target=1, method="lrp", composite="epsilon").attributions
    b = relprop.explain(model, x, target=1, method="lrp", composite="epsilon").attributions
    assert torch.equal(a, b)


@pytest.mark.parametrize("alias", ["data", "detach"])
def test_inplace_write_through_untracked_alias_raises(alias):
    """``y.data.clamp_()`` / ``y.detach().clamp_()``: autograd keeps y's old derivative for the new
    content; relprop cannot record that, so it must refuse (it silently gave zero gradient and relevance)."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 2, bias=False)

        def forward(self, x):
            y = self.a(x) * 1
            (y.data if alias == "data" else y.detach()).clamp_(-0.1, 0.1)
            return self.b(y)

    m = M().double().eval()
    x = torch.randn(2, 3, dtype=torch.float64)
    for method in ("gradient", "lrp"):
        with pytest.raises(TraceError, match="alias autograd does not track"):
            relprop.explain(m, x, target=0, method=method)
