"""explain(): input structures, targets, layer relevance, errors, and the model left untouched."""

import pytest
import torch
import torch.nn as nn

import relprop
from methods_models import TokenModel


class TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(3, 6)
        self.out = nn.Linear(6, 5)

    def forward(self, x, y):
        return self.out(torch.relu(self.a(x) + self.b(y)))


def _grad(model, args, target):
    args = [a.detach().clone().requires_grad_() for a in args]
    out = model(*args)
    return torch.autograd.grad(out[torch.arange(out.shape[0]), target].sum(), args)


def test_tuple_inputs_and_per_sample_targets():
    model = TwoInput().eval()
    x, y = torch.randn(3, 4), torch.randn(3, 3)
    t = torch.tensor([0, 4, 2])
    e = relprop.explain(model, (x, y), target=t, method="gradient")
    assert isinstance(e.attributions, tuple) and len(e.attributions) == 2
    for ours, ref in zip(e.attributions, _grad(model, [x, y], t)):
        torch.testing.assert_close(ours, ref)


def test_dict_inputs_keep_structure():
    model = TwoInput().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    e = relprop.explain(model, {"x": x, "y": y}, target=1, method="gradient")
    assert set(e.attributions) == {"x", "y"}
    ref = _grad(model, [x, y], torch.tensor([1, 1]))
    torch.testing.assert_close(e.attributions["y"], ref[1])


def test_callable_target():
    model = TwoInput().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    e = relprop.explain(model, (x, y), target=lambda out: out[:, 1] - out[:, 2], method="gradient")
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = model(xx, yy)
    g = torch.autograd.grad((out[:, 1] - out[:, 2]).sum(), xx)[0]
    torch.testing.assert_close(e.attributions[0], g)


def test_token_inputs_give_one_score_per_token():
    model = TokenModel().eval()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    e = relprop.explain(model, {"input_ids": ids, "attention_mask": mask}, target=0, method="lrp", composite="lrp0")
    assert e.attributions["input_ids"].shape == ids.shape
    # The masked token contributes nothing; LRP-0 through tanh (identity rule) and the mean: conservation
    # up to the bias's share.
    assert e.attributions["input_ids"][1, 3] == 0
    emb = model.emb(ids) * mask[..., None]
    g = relprop.explain(
        lambda e_: model.lin(torch.tanh(e_).mean(1)), emb, target=0, method="lrp", composite="lrp0"
    ).attributions
    torch.testing.assert_close(e.attributions["input_ids"], g.sum(-1))


def test_layer_relevance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 2, bias=False)).eval()
    x = torch.randn(3, 5)
    e = relprop.explain(model, x, target=1, method="lrp", composite="lrp0", layers=["1"])
    assert e.layers["1"].shape == (3, 7)
    torch.testing.assert_close(e.layers["1"].sum(1), e.score, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        relprop.explain(model, x, target=1, method="lrp", layers=["nope"])


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(target=7), "out of range"),
        (dict(target=torch.tensor([0, 1, 2])), "one per sample"),
        (dict(target=1.5), "integer class indices"),
        (dict(target=None), "required"),
        (dict(target=0, method="lrpp"), "Did you mean 'lrp'"),
        (dict(target=0, method="lrp", composite="epsilon_plus_flatt"), "Did you mean 'epsilon_plus_flat'"),
    ],
)
def test_bad_arguments_raise_clear_errors(bad, match):
    model = TwoInput().eval()
    with pytest.raises(ValueError, match=match):
        relprop.explain(model, (torch.randn(2, 4), torch.randn(2, 3)), **bad)


def test_nan_input_rejected_and_model_untouched():
    model = TwoInput().train()
    model.b.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(2, 4)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        relprop.explain(model, (x, torch.randn(2, 3)), target=0)
    assert [p.requires_grad for p in model.parameters()] == flags and model.training


def test_model_untouched_when_forward_raises():
    model = TwoInput().eval()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError):
        relprop.explain(model, (torch.randn(2, 5), torch.randn(2, 3)), target=0)  # wrong feature size
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not model.training
    assert not torch.nn.modules.module._global_forward_hooks and not torch.nn.modules.module._global_forward_pre_hooks


def test_missing_rule_names_op_module_and_fix():
    torch.library.define("relprop_test::mystery", "(Tensor x) -> Tensor")

    @torch.library.impl("relprop_test::mystery", "CompositeExplicitAutograd")
    def _mystery(x):
        return x * 2

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return torch.ops.relprop_test.mystery(self.inner(x))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = M()

        def forward(self, x):
            return self.block(x)

    with pytest.raises(relprop.NoRuleError, match=r"mystery.*'block'.*register_rule"):
        relprop.explain(Outer().eval(), torch.randn(2, 3), target=0, method="lrp")
    cov = relprop.coverage(Outer().eval(), torch.randn(2, 3), composite="epsilon")
    assert cov.fraction < 1.0 and cov.unsupported[0][1] == "block"


def test_declared_fallback_warns_and_user_rule_applies():
    torch.library.define("relprop_test::mystery2", "(Tensor x) -> Tensor")

    @torch.library.impl("relprop_test::mystery2", "CompositeExplicitAutograd")
    def _mystery2(x):
        return x * 3

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2, bias=False)

        def forward(self, x):
            return self.lin(torch.ops.relprop_test.mystery2(x))

    model = M().eval()
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match="mystery2.*fallback 'gradient'"):
        e = relprop.explain(model, x, target=0, method="lrp", composite="lrp0", fallback="gradient")
    # The gradient fallback sends 3 R back through y = 3x; a user rule R_x = R_y restores conservation.
    from relprop.rules import Identity

    e2 = relprop.explain(model, x, target=0, method="lrp", composite="lrp0", rules={"mystery2": Identity()})
    torch.testing.assert_close(e2.attributions.sum(1), e2.score, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(e.attributions, 3 * e2.attributions)


def test_parameter_gradients_match_autograd_and_lrp_weight_relevance():
    model = TwoInput().eval()
    x, y = torch.randn(3, 4), torch.randn(3, 3)
    e = relprop.explain(model, (x, y), target=2, method="gradient", params=True)
    out = model(x, y)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(out[:, 2].sum(), list(model.parameters()))
    assert set(e.params) == set(names)
    for n, g in zip(names, grads):
        torch.testing.assert_close(e.params[n], g)
    lrp = relprop.explain(model, (x, y), target=2, method="lrp", composite="epsilon", params=["out.weight"])
    assert lrp.params["out.weight"].shape == model.out.weight.shape
    # The weight relevance of the last layer distributes its output relevance over the weights (bias absorbs).
    assert lrp.params["out.weight"][2].abs().sum() > 0 and lrp.params["out.weight"][0].abs().sum() == 0
    with pytest.raises(ValueError, match="no parameter named 'out.wieght'"):
        relprop.explain(model, (x, y), target=2, method="gradient", params=["out.wieght"])


def test_token_ids_reshaped_before_the_embedding_still_get_scores():
    """CLIP-style: ids go through view() before the lookup; the lookup must still count as the input."""

    class Viewed(TokenModel):
        def forward(self, input_ids, attention_mask=None):
            return super().forward(input_ids.view(-1, input_ids.shape[-1]), attention_mask)

    torch.manual_seed(0)
    model = Viewed().eval()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    e = relprop.explain(model, {"input_ids": ids}, target=1, method="lrp", composite="lrp0")
    plain = TokenModel().eval()
    plain.load_state_dict(model.state_dict())
    ref = relprop.explain(plain, {"input_ids": ids}, target=1, method="lrp", composite="lrp0")
    assert e.attributions["input_ids"].abs().sum() > 0
    torch.testing.assert_close(e.attributions["input_ids"], ref.attributions["input_ids"])


def test_integer_images_get_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(2)).eval()
    model(torch.randn(1, 3, 5, 5))
    images = torch.randint(0, 255, (2, 3, 5, 5), dtype=torch.uint8)
    with pytest.raises((ValueError, RuntimeError), match="float|Float|dtype"):
        relprop.explain(model, images, target=0)


def test_an_option_the_method_does_not_take_is_one_error_naming_the_close_one_before_the_model_runs():
    """Python's own "unexpected keyword argument" named neither the close option nor the method's options
    (new-user review: ``n_step=`` for integrated gradients, ``keep_graph=`` where a method has none)."""
    calls = []
    m = torch.nn.Linear(4, 3).eval()
    m.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"takes no option 'n_step'\. Did you mean 'n_steps'\? Its options: .*n_steps"):
        relprop.explain(m, x, target=0, method="integrated_gradients", n_step=3)
    with pytest.raises(TypeError, match=r"method='integrated_gradients' takes no option 'keep_graph'"):
        relprop.explain(m, x, target=0, method="integrated_gradients", keep_graph=True)
    assert not calls  # refused before the model ran
    relprop.explain(m, x, target=0, method="integrated_gradients", n_steps=3)  # the real one still works
    assert calls
