"""Element-wise regions: a written-out activation is one nonlinearity for LRP (``relprop.regions``).

The reference for every activation is the identity rule of AttnLRP/LXT: the relevance at the
activation's input equals the relevance at its output. Rule by rule (before regions) ``gelu_new``'s
last multiply got the product rule and its ``1 +`` kept a share, so the two differed by a factor of
about 1/2; the checks below compare the two relevances exactly and fail on that behaviour.
"""

import math

import pytest
import torch
from torch import nn
from transformers.activations import FastGELUActivation, GELUActivation, NewGELUActivation, QuickGELUActivation

import relprop
from relprop.regions import elementwise_regions, expression, find_elementwise_regions

GELU_NEW_OPS = ["mul", "pow", "mul", "add", "mul", "tanh", "add", "mul"]


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class BloomGelu(nn.Module):
    """BLOOM's GELU (``bloom_gelu_forward``), as its eval-mode forward computes it."""

    def forward(self, x):
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class Mish(nn.Module):
    def forward(self, x):
        return x * torch.tanh(nn.functional.softplus(x))


class HardSwishWritten(nn.Module):
    def forward(self, x):
        return x * nn.functional.relu6(x + 3.0) / 6.0


class ReluMask(nn.Module):
    def forward(self, x):
        return x * (x > 0).to(x.dtype)


# written-out activation, torch's own single-op version (None: no single op)
ACTIVATIONS = {
    "gelu_new": (NewGELUActivation, lambda: nn.GELU(approximate="tanh")),
    "gelu_fast": (FastGELUActivation, lambda: nn.GELU(approximate="tanh")),
    "gelu_python": (lambda: GELUActivation(use_gelu_python=True), nn.GELU),
    "swish": (Swish, nn.SiLU),
    "quick_gelu": (QuickGELUActivation, None),
    "bloom_gelu": (BloomGelu, lambda: nn.GELU(approximate="tanh")),
    "mish": (Mish, nn.Mish),
    "hardswish": (HardSwishWritten, nn.Hardswish),
    "relu_mask": (ReluMask, nn.ReLU),
}


def _mlp(act: nn.Module, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), act, nn.Linear(16, 3)).double().eval()
    with torch.no_grad():
        model[0].bias.normal_(0, 1.0)  # pre-activations on both sides of 0, some below -0.675
    return model


@pytest.fixture
def x():
    return torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2


@pytest.mark.parametrize("composite", ["attnlrp", "epsilon", "cp_lrp", "epsilon_plus_flat"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_written_out_activation_gets_identity_rule(name, composite, x):
    written, native = ACTIVATIONS[name]
    model = _mlp(written())
    e = relprop.explain(model, x, target=1, method="lrp", composite=composite, layers=["0", "1"])
    # Identity rule on the whole function: what arrives at its output reaches its input unchanged.
    torch.testing.assert_close(e.layers["0"], e.layers["1"], rtol=0, atol=0)
    assert e.layers["1"].abs().max() > 0
    if native is not None:  # the same model with torch's one-op activation: same relevance
        reference = nn.Sequential(model[0], native(), model[2]).eval()
        r = relprop.explain(reference, x, target=1, method="lrp", composite=composite)
        torch.testing.assert_close(e.attributions, r.attributions, rtol=1e-6, atol=1e-7 * r.attributions.abs().max())


def test_gelu_new_region_is_visible(x):
    model = _mlp(NewGELUActivation())
    cov = relprop.coverage(model, x, "attnlrp")
    assert len(cov.regions) == 1
    desc, count, module = cov.regions[0]
    assert (count, module) == (1, "1")
    assert desc.endswith(": " + ", ".join(GELU_NEW_OPS))
    assert desc.startswith("elementwise x*0.5*(tanh((x+x^3*0.044715)*0.79788)+1)")
    text = str(cov)
    assert "regions" in text and "mul, pow, mul, add, mul, tanh, add, mul" in text
    # Totals count recorded op calls: the region's 8 ops, not 1.
    plain = relprop.coverage(model, x, "gradient")
    assert cov.total == plain.total
    assert "mul, pow, mul, add, mul, tanh, add, mul" in find_elementwise_regions(relprop.trace(model, x)).summary()


def test_regions_only_for_lrp_and_gradient_stays_exact(x):
    model = _mlp(NewGELUActivation())
    assert not relprop.coverage(model, x, "gradient").regions
    g = relprop.explain(model, x, target=1, method="gradient").attributions
    xx = x.clone().requires_grad_(True)
    model(xx)[:, 1].sum().backward()
    torch.testing.assert_close(g, xx.grad, rtol=0, atol=1e-15)


def test_gradient_rule_on_a_region_is_the_exact_vjp(x):
    """A region's VJP re-runs its inner ops under autograd: a gradient rule on it is exact."""
    from relprop.rules.composites import GRADIENT

    model = _mlp(NewGELUActivation())
    e = relprop.explain(
        model, x, target=1, method="lrp", composite="epsilon", rules={"elementwise": GRADIENT}, layers=["0", "1"]
    )
    h = model[0](x).detach().requires_grad_(True)
    (dgelu,) = torch.autograd.grad(model[1](h), h, e.layers["1"])
    torch.testing.assert_close(e.layers["0"], dgelu, rtol=1e-12, atol=1e-15)


def test_recorded_graph_is_not_modified(x):
    graph = relprop.trace(_mlp(NewGELUActivation()), x)
    nodes = list(graph.nodes)
    producers = [v.producer for v in graph.values]
    new = find_elementwise_regions(graph)
    assert graph.nodes == nodes and [v.producer for v in graph.values] == producers
    assert len(new.nodes) == len(nodes) - len(GELU_NEW_OPS) + 1
    (node,) = [n for n in new.nodes if n.region is not None]
    assert [n.packet for n in node.region.nodes] == GELU_NEW_OPS
    assert node.inputs == [graph.nodes[1].outputs[0]] and node.module == "1"
    # The region re-computes its function exactly.
    h = node.inputs[0].tensor
    torch.testing.assert_close(node.run([h]), NewGELUActivation()(h), rtol=0, atol=0)


# ------------------------------------------------------------------------------- what stays out


class SwiGLU(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the activation written out or not."""

    def __init__(self, written: bool):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3, bias=False)
        self.written = written

    def forward(self, x):
        g, u = self.gate(x), self.up(x)
        a = g * torch.sigmoid(g) if self.written else nn.functional.silu(g)
        return self.down(a * u)


class GatedGelu(nn.Module):
    """T5 v1.1 / Flan-T5 ``T5DenseGatedActDense``: ``wo(gelu_new(wi_0(x)) * wi_1(x))``."""

    def __init__(self):
        super().__init__()
        self.wi_0, self.wi_1, self.wo = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3, bias=False)
        self.act = NewGELUActivation()

    def forward(self, x):
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


@pytest.mark.parametrize("written", [True, False])
def test_swiglu_product_keeps_uniform_rule(written, x):
    torch.manual_seed(0)
    model = SwiGLU(written).double().eval()
    graph = relprop.trace(model, x)
    regions = elementwise_regions(graph)
    if written:
        (op,) = regions
        assert [n.packet for n in op.nodes] == ["sigmoid", "mul"] and expression(op.nodes, op.inputs[0]) == (
            "x*sigmoid(x)"
        )
    else:
        assert regions == []
    e = relprop.explain(model, x, target=1, method="lrp", composite="attnlrp", layers=["gate", "up"])
    # Uniform rule on silu(g) * u: each factor gets half of every term; identity through silu(g).
    torch.testing.assert_close(e.layers["gate"], e.layers["up"], rtol=1e-12, atol=1e-15)
    total = e.layers["gate"].sum() + e.layers["up"].sum()
    torch.testing.assert_close(total, e.score.sum(), rtol=1e-10, atol=0)  # bias-free down: conserved


def test_gated_gelu_region_is_the_activation_only(x):
    torch.manual_seed(0)
    model = GatedGelu().double().eval()
    (op,) = elementwise_regions(relprop.trace(model, x))
    assert [n.packet for n in op.nodes] == GELU_NEW_OPS
    e = relprop.explain(model, x, target=1, method="lrp", composite="attnlrp", layers=["wi_0", "wi_1", "act"])
    torch.testing.assert_close(e.layers["wi_0"], e.layers["act"], rtol=0, atol=0)
    torch.testing.assert_close(e.layers["wi_0"], e.layers["wi_1"], rtol=1e-12, atol=1e-15)


class ScaledBiased(nn.Module):
    """LayerScale and a bias after a written-out GELU: both are parameters and keep their own rules."""

    def __init__(self):
        super().__init__()
        self.act = NewGELUActivation()
        self.gamma = nn.Parameter(torch.linspace(-1.0, 2.0, 16))
        self.beta = nn.Parameter(torch.linspace(0.5, -0.5, 16))

    def forward(self, h):
        return self.act(h) * self.gamma + self.beta


def test_bias_and_layerscale_end_the_region(x):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), ScaledBiased(), nn.Linear(16, 3)).double().eval()
    (op,) = elementwise_regions(relprop.trace(model, x))
    assert [n.packet for n in op.nodes] == GELU_NEW_OPS
    e = relprop.explain(model, x, target=1, method="lrp", composite="attnlrp", layers=["0", "1.act", "1"])
    torch.testing.assert_close(e.layers["0"], e.layers["1.act"], rtol=0, atol=0)
    # Outside the region: x * gamma passes its relevance, the bias add keeps its proportional share.
    a = e.activations["1.act"]
    s = a * model[1].gamma
    expected = e.layers["1"] * s / (s + model[1].beta)
    torch.testing.assert_close(e.layers["1.act"], expected, rtol=1e-10, atol=1e-15)


class Params(nn.Module):
    """``x * sigmoid(beta * x)`` with a learned ``beta``: the parameter ends the region."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class FanOut(nn.Module):
    """The sigmoid is used by the product and by another branch: it cannot hide inside a region."""

    def forward(self, x):
        s = torch.sigmoid(x)
        return x * s + s.sum(-1, keepdim=True)


class Outer(nn.Module):
    """``x[:, None] * x[None]``: two views of ``x`` are two variables, not an element-wise function."""

    def forward(self, x):
        return torch.tanh(x[:, None] * x[None]).sum(1)


class Affine(nn.Module):
    def forward(self, x):
        return (x * 2.0 + 1.0).to(torch.float64) - 0.5


class Lone(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


class Square(nn.Module):
    def forward(self, x):
        return x * x + 1.0


class Buffered(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.full((16,), 0.25, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x - self.shift)


@pytest.mark.parametrize(
    "module,ops",
    [
        (Params(), []),
        (FanOut(), []),
        (Affine(), []),
        (Lone(), []),
        (Buffered(), []),
        (Square(), ["mul", "add"]),
        (Outer(), []),
    ],
)
def test_what_joins_a_region(module, ops, x):
    model = nn.Sequential(nn.Linear(6, 16), module).double().eval()
    regions = elementwise_regions(relprop.trace(model, x))
    assert [[n.packet for n in op.nodes] for op in regions] == ([ops] if ops else [])


def test_written_out_rmsnorm_normaliser_still_found(x):
    """``x * rsqrt(mean(x^2) + eps)``: ``rsqrt(. + eps)`` becomes a region, the normaliser is still held constant."""

    class RMSNorm(nn.Module):
        def forward(self, h):
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), RMSNorm(), nn.Linear(16, 3)).double().eval()
    (op,) = elementwise_regions(relprop.trace(model, x))
    assert [n.packet for n in op.nodes] == ["add", "rsqrt"]
    e = relprop.explain(model, x, target=1, method="lrp", composite="attnlrp", layers=["0", "1"])
    torch.testing.assert_close(e.layers["0"], e.layers["1"], rtol=1e-12, atol=1e-15)


def test_rules_for_inner_ops_keep_them_single(x):
    """A rule set that names an op keeps that op a single node (its rule would otherwise be bypassed)."""
    from relprop.rules.elementwise import Identity

    model = _mlp(NewGELUActivation())
    cov = relprop.coverage(model, x, "attnlrp", rules={"tanh": Identity()})
    assert ("aten.tanh.default", 1, "Identity()") in cov.rows
    # What is left on either side of the tanh: the polynomial inside it is still one function of x.
    assert [d.split(": ")[1] for d, _, _ in cov.regions] == ["pow, mul, add, mul"]


def test_module_boundaries_are_kept(x):
    """Ops in different modules never share a region (``layers=`` and module-scoped rules see the same units)."""

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Tanh()

        def forward(self, h):
            return h * self.act(h) + 1.0

    model = nn.Sequential(nn.Linear(6, 16), Outer()).double().eval()
    assert elementwise_regions(relprop.trace(model, x)) == []


def test_expression():
    model = _mlp(GELUActivation(use_gelu_python=True))
    (op,) = elementwise_regions(relprop.trace(model, torch.randn(2, 6, dtype=torch.float64)))
    assert op.name == f"x*0.5*(erf(x/{math.sqrt(2.0):.5g})+1)"
    assert str(op) == f"region.elementwise.{op.name}"


# --------------------------------------------------------------- custom autograd Functions (BLOOM)


def _bloom_forward(x):
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class FusedGelu(torch.autograd.Function):
    """BLOOM's ``GeLUFunction``: the forward above, its analytic derivative as backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _bloom_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        return g * (0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t))


class WrongBackward(FusedGelu):
    @staticmethod
    def backward(ctx, g):
        return 2 * FusedGelu.backward(ctx, g)


class Applied(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


def test_function_with_its_derivative_as_backward_is_a_nonlinearity(x):
    model = _mlp(Applied(FusedGelu))
    cov = relprop.coverage(model, x, "attnlrp")
    assert [(c, d.split(":")[0]) for d, c, _ in cov.regions] == [(1, "autograd_function FusedGelu")]
    e = relprop.explain(model, x, target=1, method="lrp", composite="attnlrp", layers=["0", "1"])
    torch.testing.assert_close(e.layers["0"], e.layers["1"], rtol=0, atol=0)
    plain = relprop.explain(_mlp(BloomGelu()), x, target=1, method="lrp", composite="attnlrp")
    torch.testing.assert_close(e.attributions, plain.attributions, rtol=1e-10, atol=1e-14)


def test_function_with_another_backward_still_needs_a_rule(x):
    from relprop.rules import NoRuleError

    with pytest.raises(NoRuleError, match="WrongBackward"):
        relprop.explain(_mlp(Applied(WrongBackward)), x, target=1, method="lrp", composite="attnlrp")


def test_bloom_gelu_is_one_nonlinearity():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).double().eval()
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    mlp = "transformer.h.1.mlp"
    e = relprop.explain(
        model,
        ids,
        target=lambda o: o.logits[:, -1, 5],
        method="lrp",
        composite="attnlrp",
        layers=[f"{mlp}.dense_h_to_4h", f"{mlp}.gelu_impl"],
    )
    assert e.layers[f"{mlp}.gelu_impl"].abs().max() > 0
    torch.testing.assert_close(e.layers[f"{mlp}.dense_h_to_4h"], e.layers[f"{mlp}.gelu_impl"], rtol=0, atol=0)


def test_region_ending_in_a_cast_passes_relevance_in_the_input_dtype():
    class SwishToDouble(nn.Module):
        def forward(self, h):
            return (h * torch.sigmoid(h)).to(torch.float64)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), SwishToDouble(), nn.Linear(16, 3).double()).eval()
    x = torch.randn(5, 6)
    (op,) = elementwise_regions(relprop.trace(model, x))
    assert [n.packet for n in op.nodes] == ["sigmoid", "mul", "_to_copy"]
    e = relprop.explain(model, x, target=1, method="lrp", composite="epsilon", layers=["0", "1"])
    assert e.layers["0"].dtype == torch.float32 and e.layers["1"].dtype == torch.float64
    torch.testing.assert_close(e.layers["0"], e.layers["1"].float(), rtol=0, atol=0)
