"""DeepLIFT's convergence delta (``Explanation.convergence_delta``) and the warning when it is not ~0.

Summation to delta is DeepLIFT's defining property; where the rules are not exact (products of activations,
normalisation layers, softmax) a random T5 gave attribution sums of 1e14 for ``f(x) - f(x0)`` ~ 0.4, silently.
Oracles: Captum's ``return_convergence_delta`` on models where both rule sets are the same (also where the delta
is far from 0), and the attribution sums against two plain forward passes (``f(x) - f(x0)``) per example.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import relprop
from model_zoo import build
from relprop.methods import DeepLiftDeltaWarning
from relprop.methods._common import leaves, rebuild
from relprop.methods._validate import score

C = pytest.importorskip("captum.attr")


def _explain(model, inputs, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = relprop.explain(model, inputs, method="deeplift", **kw)
    return e, [w for w in caught if issubclass(w.category, DeepLiftDeltaWarning)]


def _oracle_delta(model, inputs, base, target, attributions):
    """sum(attributions) - (f(x) - f(x0)) per example, in float64, from plain forward passes."""

    def f(x):
        with torch.no_grad():
            out = model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) else model(x)
        return score(out, target, leaves(inputs)[0].shape[0])[0].double()

    total = sum(a.double().reshape(a.shape[0], -1).sum(1) for a in leaves(attributions))
    return total - (f(inputs) - f(rebuild(inputs, base)))


class SigmoidGate(nn.Module):
    """``h * sigmoid(h)``: Captum rescales the hooked Sigmoid and takes the gradient of the product, as relprop."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.s = nn.Sigmoid()
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h * self.s(h))


class ReluCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.r = nn.ReLU()
        self.f = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        return self.f(self.r(self.c(x)).flatten(1))


@pytest.mark.parametrize("make", [ReluCnn, lambda: nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 4))])
def test_relu_nets_delta_is_captums_and_zero_no_warning(make):
    torch.manual_seed(0)
    m = make().eval()
    shape = (3, 3, 8, 8) if isinstance(m, ReluCnn) else (3, 7)
    x, b = torch.randn(shape), torch.randn(shape) * 0.2
    e, caught = _explain(m, x, target=2, baselines=b)
    _, delta = C.DeepLift(m).attribute(x, b, target=2, return_convergence_delta=True)
    torch.testing.assert_close(e.convergence_delta, delta.detach().float(), rtol=0, atol=1e-5)
    oracle = _oracle_delta(m, x, [b], 2, e.attributions)
    assert oracle.abs().max() < 1e-5 and e.convergence_delta.abs().max() < 1e-5
    assert caught == []
    # the delta is that of (x - x0) * multiplier also where the multipliers are returned
    m_only, caught = _explain(m, x, target=2, baselines=b, multiply_by_inputs=False)
    assert caught == [] and torch.equal(m_only.convergence_delta, e.convergence_delta)


def test_max_pool_sums_to_delta():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3)).eval()
    x, b = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8) * 0.2
    e, caught = _explain(m, x, target=1, baselines=b)
    oracle = _oracle_delta(m, x, [b], 1, e.attributions)
    assert caught == [] and oracle.abs().max() < 1e-5
    torch.testing.assert_close(e.convergence_delta.double(), oracle, rtol=0, atol=1e-5)


@pytest.mark.parametrize("opts", [{"scope": "captum"}, {"exact": False}])
def test_product_of_activations_is_flagged_per_example(opts):
    """``h * sigmoid(h)`` under Captum's rules (the gradient through the product): a real delta, flagged; the
    default (``exact``, :class:`relprop.rules.deeplift.ProductRule`) sums to delta on the same model."""
    torch.manual_seed(0)
    m = SigmoidGate().eval()
    x, b = torch.randn(4, 5) * 2, torch.randn(4, 5) * 0.1
    t = torch.tensor([0, 1, 2, 1])
    e, caught = _explain(m, x, target=t, baselines=b, **opts)
    oracle = _oracle_delta(m, x, [b], t, e.attributions)
    torch.testing.assert_close(e.convergence_delta.double(), oracle, rtol=1e-5, atol=1e-6)
    assert oracle.abs().max() > 0.05  # a real delta
    assert len(caught) == 1
    msg = str(caught[0].message)
    worst = int(oracle.abs().argmax())
    assert f"{float(e.convergence_delta[worst]):.4g}" in msg and "products of two activations" in msg
    assert "Explanation.convergence_delta" in msg
    e, caught = _explain(m, x, target=t, baselines=b)
    assert caught == [] and _oracle_delta(m, x, [b], t, e.attributions).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_resnet_no_warning_in_any_precision(dtype):
    _, m, x, t = build("tv_resnet18")
    m, x = m.to(dtype), x.to(dtype)
    e, caught = _explain(m, x, target=t)
    assert caught == [], caught and str(caught[0].message)
    assert e.convergence_delta.dtype == torch.float32
    oracle = _oracle_delta(m, x, [torch.zeros_like(x)], t, e.attributions)
    # the delta is computed from the half-precision scores, as the oracle: both small against the score change
    torch.testing.assert_close(
        e.convergence_delta.double(), oracle, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2
    )


def test_t5_zero_baseline_is_flagged_with_its_delta_per_example():
    """Captum's rules (``exact=False``) on a random T5 with a zero baseline: attribution sums of ~1e14 for
    ``f(x) - f(x0)`` ~ 0.4 (the norms' ``1/sqrt(eps)`` at the reference through the product rule): flagged."""
    _, m, inputs, t = build("hf_t5")
    e, caught = _explain(m, inputs, target=t, exact=False)
    base = [torch.zeros_like(x) if x.is_floating_point() else x for x in leaves(inputs)]
    oracle = _oracle_delta(m, inputs, base, t, e.attributions)
    torch.testing.assert_close(e.convergence_delta.double(), oracle, rtol=1e-3, atol=1e-3)
    assert len(caught) == 1 and "normalisation" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller
    diff = (oracle - e.convergence_delta.double()).abs()  # |f(x) - f(x0)|, roughly (rounding at 1e14)
    assert (e.convergence_delta.abs() > 1e6 * diff).all()


class Tokens(nn.Module):
    """Token ids -> embedding -> ReLU MLP, summed over positions: DeepLIFT is exact (token inputs counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids, mask):
        h = torch.relu(self.lin(self.emb(ids))) * mask[..., None]
        if bool(mask.all()):  # Python control flow: the reference comes from a second recording
            h = h + 0
        return self.out(h).sum(1)


def test_token_inputs_and_a_callable_target_on_a_second_recording():
    torch.manual_seed(0)
    m = Tokens().eval()
    ids = torch.randint(1, 20, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    target = lambda out: out[:, 1] * 2  # noqa: E731  (its ops exist on the inputs' recording only)
    e, caught = _explain(m, (ids, mask), target=target)
    oracle = _oracle_delta(m, (ids, mask), [torch.zeros_like(ids), mask], target, e.attributions)
    assert caught == [] and oracle.abs().max() < 1e-5
    torch.testing.assert_close(e.convergence_delta.double(), oracle, rtol=0, atol=1e-5)
    # a baseline whose score differs: still ~0 (the score change is accounted for, not ignored)
    assert (e.attributions[0].sum(1).abs() > 1e-3).all()


# ------------------------------------------------------------------------------- the exact rules (default)
def _double(inputs):
    if isinstance(inputs, dict):
        return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    return inputs.double()


@pytest.mark.parametrize(
    "name", ["hf_t5", "hf_bert", "hf_gpt2", "hf_qwen2", "hf_llama", "hf_vit", "timm_vit_tiny", "timm_convnext"]
)
def test_zoo_sums_to_delta_in_float64(name):
    """Every op of these models has a rule that sums to delta (products, RMS/layer norms, softmax): in float64 the
    attributions add up to the forward passes' ``f(x) - f(x0)`` to rounding, no warning. (Captum's rules:
    off by 36% (BERT) to 1e14 (T5); fused attention (Llama, timm ViT) took the gradient: 4% and 100%.)"""
    _, m, inputs, t = build(name)
    m, inputs = m.double(), _double(inputs)
    e, caught = _explain(m, inputs, target=t)
    base = [torch.zeros_like(x) if x.is_floating_point() else x for x in leaves(inputs)]
    oracle = _oracle_delta(m, inputs, base, t, e.attributions)
    diff = sum(a.reshape(a.shape[0], -1).sum(1) for a in leaves(e.attributions)) - oracle  # f(x) - f(x0)
    # 1e-6: Hugging Face's RMS norms compute in float32 whatever the model's dtype (Llama: 1.5e-7)
    assert (oracle.abs() < 1e-6 * diff.abs()).all(), (oracle, diff)
    torch.testing.assert_close(e.convergence_delta, oracle, rtol=0, atol=1e-6 * float(diff.abs().min()))
    assert caught == []


class RmsGate(nn.Module):
    """Linear -> RMS norm written out -> SiLU gate times an up projection -> bilinear ``q @ k^T`` -> functional
    softmax with a ``-inf`` mask -> ``@ v``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.g, self.u = nn.Linear(8, 8), nn.Linear(8, 8)
        self.q, self.k, self.v = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = torch.nn.functional.silu(self.g(h)) * self.u(h)
        s = self.q(h) @ self.k(h).transpose(-1, -2)
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return self.out(torch.softmax(s, -1) @ self.v(h)).sum(1)


@pytest.mark.parametrize("zero", [True, False], ids=["zero-baseline", "random-baseline"])
def test_rms_gate_attention_sums_to_delta(zero):
    torch.manual_seed(0)
    m = RmsGate().double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    b = torch.zeros_like(x) if zero else torch.randn_like(x) * 0.5
    e, caught = _explain(m, x, target=1, baselines=b)
    oracle = _oracle_delta(m, x, [b], 1, e.attributions)
    assert torch.isfinite(e.attributions).all() and oracle.abs().max() < 1e-10 and caught == []
    old, caught = _explain(m, x, target=1, baselines=b, exact=False)
    assert _oracle_delta(m, x, [b], 1, old.attributions).abs().max() > 1e-3 and len(caught) == 1


def test_rms_scale_is_held_at_its_value_at_x_with_a_zero_baseline():
    """``w . (x * rsqrt(mean(x^2) + eps))`` from a zero baseline: ``x_i * w_i * rsqrt(mean(x^2) + eps)`` (LRP's LN
    rule, and complete), where the midpoint would carry the reference scale ``1 / sqrt(eps)`` = 1000."""

    class Rms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 7, dtype=torch.float64))

        def forward(self, x):
            return (self.w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).sum(-1, keepdim=True)

    torch.manual_seed(0)
    m = Rms()
    x = torch.randn(3, 7, dtype=torch.float64)
    e, _ = _explain(m, x, target=0)
    with torch.no_grad():
        expected = x * m.w * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(e.attributions, expected, rtol=1e-12, atol=1e-14)


def test_layer_norm_sums_to_delta_and_captum_scope_keeps_captums_rule():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2)).double().eval()
    with torch.no_grad():
        m[1].weight.normal_()
        m[1].bias.normal_()
    x, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64) * 0.3
    e, caught = _explain(m, x, target=1, baselines=b)
    assert _oracle_delta(m, x, [b], 1, e.attributions).abs().max() < 1e-12 and caught == []
    ours, _ = _explain(m, x, target=1, baselines=b, scope="captum")
    torch.testing.assert_close(ours.attributions, C.DeepLift(m).attribute(x, b, target=1), rtol=1e-9, atol=1e-12)


class Attention(nn.Module):
    """Self-attention through the fused kernel (``fused=True``) or written out; grouped-query heads, a causal
    or a padding mask (bool or additive)."""

    def __init__(self, fused: bool, causal: bool, mask: str | None) -> None:
        super().__init__()
        self.fused, self.causal, self.mask = fused, causal, mask
        self.q, self.k, self.v = nn.Linear(8, 16), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(16, 3)

    def forward(self, x, keep):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 4).transpose(1, 2)
        k, v = (f(x).view(b, n, 2, 4).transpose(1, 2) for f in (self.k, self.v))
        mask = None
        if self.mask is not None:
            mask = keep[:, None, None, :].bool()
            if self.mask == "additive":
                mask = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, torch.finfo(x.dtype).min)
        if self.fused:
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=self.causal, enable_gqa=True
            )
        else:
            k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
            s = q @ k.transpose(-1, -2) / 2.0
            if self.causal:
                s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
            o = torch.softmax(s, -1) @ v
        return self.out(o.transpose(1, 2).reshape(b, n, 16)).sum(1)


@pytest.mark.parametrize(("causal", "mask"), [(True, None), (False, "bool"), (False, "additive")])
def test_fused_attention_equals_written_out_and_sums_to_delta(causal, mask):
    torch.manual_seed(0)
    fused = Attention(True, causal, mask).double().eval()
    eager = Attention(False, causal, mask).double().eval()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    keep = torch.ones(2, 5, dtype=torch.long)
    keep[1, 3:] = 0
    b = torch.randn_like(x) * 0.3
    e, caught = _explain(fused, (x, keep), target=1, baselines=(b, keep))
    w, _ = _explain(eager, (x, keep), target=1, baselines=(b, keep))
    assert any("scaled_dot_product" in n.packet for n in relprop.trace(fused, x, keep).nodes)
    torch.testing.assert_close(e.attributions[0], w.attributions[0], rtol=1e-9, atol=1e-12)
    oracle = _oracle_delta(fused, (x, keep), [b, keep], 1, e.attributions)
    assert oracle.abs().max() < 1e-10 and caught == []


def test_noise_tunnel_over_deeplift_carries_no_delta_of_its_noisy_copies():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 4)).eval()
    x = torch.randn(3, 7)
    assert relprop.explain(m, x, target=1, method="deeplift").convergence_delta.shape == (3,)
    e = relprop.explain(m, x, target=1, method="smoothgrad", base_method="deeplift", nt_samples=4, stdevs=0.1)
    assert e.convergence_delta is None


def test_exact_option_is_validated_before_the_model_runs():
    calls = []
    m = nn.Linear(3, 2)
    m.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="exact: expected True, False or None"):
        relprop.explain(m, torch.randn(2, 3), target=0, method="deeplift", exact="yes")
    assert calls == []


def test_nn_softmax_keeps_captums_rule_unless_exact_true():
    """Captum has a softmax rule of its own (``nn.Softmax`` modules, recentred, not exact): the default keeps it
    (numbers as Captum's rule set), ``exact=True`` replaces it and sums to delta (Swin: 1.3e-3 -> 3e-7)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.Softmax(-1), nn.Linear(4, 2)).double().eval()
    x, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64) * 0.3
    default, _ = _explain(m, x, target=1, baselines=b)
    captum, _ = _explain(m, x, target=1, baselines=b, exact=False)
    assert torch.equal(default.attributions, captum.attributions)
    assert _oracle_delta(m, x, [b], 1, default.attributions).abs().max() > 1e-6
    exact, caught = _explain(m, x, target=1, baselines=b, exact=True)
    assert _oracle_delta(m, x, [b], 1, exact.attributions).abs().max() < 1e-12 and caught == []
    _, swin, sx, st = build("timm_swin")
    e, caught = _explain(swin.double(), sx.double(), target=st, exact=True)
    oracle = _oracle_delta(swin, sx.double(), [torch.zeros_like(sx).double()], st, e.attributions)
    assert oracle.abs().max() < 1e-9 and caught == []


class Divisions(nn.Module):
    """``(h - mean) / sqrt(var + eps)`` written out (a normaliser by division) and ``a / (1 + b^2)``, broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(4, 1), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        c = h - h.mean(-1, keepdim=True)
        h = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.out(torch.tanh(h) / (1 + self.b(x) ** 2))


class ConstantOverActivation(nn.Module):
    """``param / h`` (a broadcast parameter numerator) and ``buffer / h``: only the denominator is an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(4, 6), nn.Linear(6, 2)
        self.w = nn.Parameter(torch.randn(6))
        self.register_buffer("c", torch.randn(1, 6))

    def forward(self, x):
        h = nn.functional.softplus(self.a(x)) + 0.5
        return self.out(self.w / h + self.c / (h * h))


@pytest.mark.parametrize("make", [Divisions, ConstantOverActivation], ids=["a-over-b", "constant-over-h"])
@pytest.mark.parametrize("zero", [True, False], ids=["zero-baseline", "random-baseline"])
def test_divisions_sum_to_delta(make, zero):
    """``a / b`` of activations and ``param / h`` (which took the gradient at x and missed f(x) - f(x0): engine
    review, warned; the secant of 1 / h, ``-c / (h h0)``, is exact). Oracle: two plain forward passes, float64;
    the gradient rule (``exact=False``) misses."""
    torch.manual_seed(0)
    m = make().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    b = torch.zeros_like(x) if zero else torch.randn_like(x) * 0.5
    e, caught = _explain(m, x, target=0, baselines=b)
    assert _oracle_delta(m, x, [b], 0, e.attributions).abs().max() < 1e-12 and caught == []
    old, _ = _explain(m, x, target=0, baselines=b, exact=False)
    assert _oracle_delta(m, x, [b], 0, old.attributions).abs().max() > 1e-3


class _ReadsIntoNumpy(nn.Module):
    """Reads a value into Python without an ATen op (``.numpy()`` / ``.tolist()``): no replay can see it."""

    def __init__(self, how: str):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.how = how

    def forward(self, x):
        h = self.a(x)
        d = h.detach()
        c = float(d.numpy().max()) if self.how == "numpy" else max(max(r) for r in d.tolist())
        return torch.relu(h) * c


@pytest.mark.parametrize("how", ["numpy", "tolist"])
def test_a_value_read_outside_aten_is_not_reused_for_the_baseline(how):
    """The baseline pass replayed the recorded ops with the input's ``c`` (read via ``.numpy()``, unseen), so the
    attributions explained another function and the delta, read from that same replay, said ~0: silently wrong
    (true misses of 1-3 for f(x) - f(x0) ~ 0.7). The default checks the replay against a plain forward and records
    the baselines where they differ: the delta is the true one (two plain forwards), and ``verify_replay=False``
    shows the blind replay the default guards against."""
    torch.manual_seed(0)
    m = _ReadsIntoNumpy(how).double().eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    x0 = 2 * torch.randn_like(x)
    e, _ = _explain(m, x, target=0, baselines=x0)
    truth = _oracle_delta(m, x, [x0], 0, [e.attributions])
    torch.testing.assert_close(e.convergence_delta, truth, rtol=0, atol=1e-10)
    blind, _ = _explain(m, x, target=0, baselines=x0, verify_replay=False)
    assert blind.convergence_delta.abs().max() < 1e-10  # the replay agrees with itself...
    assert _oracle_delta(m, x, [x0], 0, [blind.attributions]).abs().max() > 0.1  # ...but not with the model


def test_a_pad_token_baseline_is_warned_with_its_cause_and_another_token_sums_to_delta():
    """Token id 0 as the default baseline is the pad token of a classifier pooling the last non-pad token: the
    baseline is pooled at another position, which no rule can account for (new-user review: the warning blamed
    the rules). The warning names that cause; a baseline of another token id sums to delta (two plain forwards)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, num_labels=3, pad_token_id=0)
    m = transformers.GPT2ForSequenceClassification(cfg).eval()
    ids = torch.randint(5, 100, (2, 8))
    e, caught = _explain(m, {"input_ids": ids}, target=2)
    assert len(caught) == 1 and "pad token" in str(caught[0].message)
    ok, none = _explain(m, {"input_ids": ids}, target=2, baselines=1)
    assert not none
    with torch.no_grad():
        diff = m(input_ids=ids).logits[:, 2] - m(input_ids=torch.ones_like(ids)).logits[:, 2]
    torch.testing.assert_close(ok.attributions["input_ids"].sum(1), diff, rtol=1e-4, atol=1e-6)
    assert e.convergence_delta.abs().min() > 10 * ok.convergence_delta.abs().max()
