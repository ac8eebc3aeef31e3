"""The decoder fast paths of the rule pass equal the plain computation they replace.

* Direct VJP kernels (``mul`` of two activations, ``clone(memory_format=...)``) give autograd's bits.
* The uniform rule's ``x * c`` pass-through reads shapes only: a score tensor the rule does not need
  is neither read nor recomputed.
* Eager attention's score chain ``softmax(q @ k^T * c + mask)`` explained in one step
  (``rules.attention.ScoreChain``) equals the rules applied node by node (float64 1e-12, float32 1e-5),
  zero sets included (zero queries, ``-inf`` masks, subnormal scores); anything else falls back to them.
* ``attention.release_scores`` (a recording's release policy) drops the scaled and masked scores during the
  forward: explanations equal bits to a recording that holds them (recomputed where read).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop
from relprop import graph as graph_module
from relprop.rules.vjps import VJPS, RecordedInputs, autograd_vjp
from relprop.trace import record


class _Products(nn.Module):
    def forward(self, x):
        a = torch.tanh(x)  # [2, 4, 6]
        b = x.mean(1, keepdim=True)  # [2, 1, 6]: broadcast against a
        c = x[:, :, :1]  # [2, 4, 1]
        y = a * x + a * b + c * a + x * x
        z = y.transpose(1, 2).contiguous()  # clone(memory_format=contiguous_format)
        return (z * 0.5).sum((1, 2)).unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mul_and_clone_vjp_kernels_equal_autograd(dtype):
    torch.manual_seed(0)
    graph = record(_Products().eval(), (torch.randn(2, 4, 6, dtype=dtype),), {})
    seen = []
    for node in graph.nodes:
        if node.packet not in ("mul", "clone"):
            continue
        tensors = RecordedInputs(node)
        wrt = [i for i, v in enumerate(node.inputs) if v.is_float]
        grads = [torch.randn_like(node.outputs[0].tensor)]
        got = VJPS[node.packet](node, grads, tensors, wrt)
        want = autograd_vjp(node, grads, tensors, wrt)
        assert got is not None, node
        for i in wrt:
            assert got[i].shape == want[i].shape and torch.equal(got[i], want[i]), (node, i)
        seen.append((node.packet, tuple(v.shape for v in node.inputs), tuple(node.kwargs)))
    assert ("clone", (torch.Size([2, 6, 4]),), ("memory_format",)) in seen
    assert sum(p == "mul" for p, _, _ in seen) == 5  # same shapes, both broadcasts, x * x, z * 0.5


def test_mul_vjp_declines_mixed_dtypes():
    class M(nn.Module):
        def forward(self, x):
            return (x * x.double()).sum(1, keepdim=True)

    graph = record(M().eval(), (torch.randn(2, 3),), {})
    node = next(n for n in graph.nodes if n.packet == "mul")
    g = [torch.ones(2, 3, dtype=torch.float64)]
    assert VJPS["mul"](node, g, RecordedInputs(node), [0, 1]) is None


def test_uniform_scalar_product_reads_no_data(monkeypatch):
    from relprop.rules.base import RuleContext
    from relprop.rules.elementwise import Uniform

    class Scores(nn.Module):
        def forward(self, x):
            return torch.softmax((x @ x.transpose(-1, -2)) * 0.125, -1).sum(-1)

    torch.manual_seed(0)
    graph = record(Scores().eval(), (torch.randn(2, 5, 4),), {})
    node = next(n for n in graph.nodes if n.packet == "mul")
    r = torch.randn(node.first_output.shape)
    recomputed = []
    monkeypatch.setattr(graph_module, "recompute", recomputed.append)
    node.inputs[0].data = node.first_output.data = None  # released score tensors
    res = Uniform()(RuleContext(node, [r], [True]))
    assert res[0] is r and not recomputed


# ------------------------------------------------------------------------ score chain
class _Eager(nn.Module):
    """Eager attention as Hugging Face writes it: (q @ k^T) * c + mask, softmax, @ v."""

    def __init__(self, d=8, heads=2, mask="causal", twice=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.heads, self.mask, self.twice = heads, mask, twice

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.mask == "bias":  # the inputs' own rows: q_3 . k_2 = 0 with nonzero factors (see the test)
            q, k = q + split(x), k + split(x)
        if self.mask != "plain":  # a zero query: scores of exactly 0
            q = q * (torch.arange(t, device=x.device) != 1).to(x.dtype)[:, None]
        w = torch.matmul(q, k.transpose(2, 3)) * (d // self.heads) ** -0.5
        fill = float("-inf") if self.mask == "inf" else torch.finfo(x.dtype).min
        mask = torch.full((t, t), fill, dtype=x.dtype).triu(1)[None, None]
        if self.mask == "bias":
            mask = mask + torch.linspace(-1, 1, t * t, dtype=x.dtype).view(1, 1, t, t)
        z = w + mask
        a = torch.softmax(z, dim=-1)
        out = torch.matmul(a, v)
        if self.twice:
            out = out + w.mean(-1, keepdim=True)  # the scaled scores have a second consumer
        return out.transpose(1, 2).reshape(b, t, d).sum(1)


def _chain_vs_plain(monkeypatch, model, x, **kw):
    from relprop.rules import attention

    hits = []
    real = attention.ScoreChain.relevance

    def spy(self, r, s):
        hits.append(self.product)
        return real(self, r, s)

    monkeypatch.setattr(attention.ScoreChain, "relevance", spy)
    fused = relprop.explain(model, x, target=0, method="lrp", composite="attnlrp", **kw)
    monkeypatch.setattr(attention.SoftmaxRule, "through", None)
    plain = relprop.explain(model, x, target=0, method="lrp", composite="attnlrp", **kw)
    return fused, plain, len(hits)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("mask", ["plain", "causal", "inf", "bias"])
def test_score_chain_equals_rules_node_by_node(monkeypatch, dtype, tol, mask):
    torch.manual_seed(0)
    model = _Eager(mask=mask).to(dtype).eval()
    x = torch.randn(2, 5, 8, dtype=dtype)
    if mask != "plain":  # plain: every score finite and normal (on CPU, the chain then makes no masks)
        x[1, 3] = torch.finfo(dtype).tiny / 8  # subnormal activations, a row of subnormal scores
    if mask == "bias":  # q_3 . k_2 = 0 exactly where the mask is not 0: only the product's own zero set absorbs
        for lin in (model.q, model.k):
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
        x[0, 3, :4], x[0, 2, :4] = torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.25])
    from relprop.rules import attention

    normal = []
    real = attention._normal
    monkeypatch.setattr(attention, "_normal", lambda a: normal.append(real(a)) or normal[-1])
    fused, plain, hits = _chain_vs_plain(monkeypatch, model, x)
    assert hits == 1
    assert (normal == [True, True]) == (mask == "plain")  # the mask-free branch exactly when nothing is absorbed
    torch.testing.assert_close(
        fused.attributions, plain.attributions, rtol=tol, atol=tol * plain.attributions.abs().max()
    )
    assert not torch.equal(fused.attributions, torch.zeros_like(fused.attributions))


def test_score_chain_on_qwen2_equals_rules_node_by_node(monkeypatch):
    model, ids = _qwen2(tokens=9)
    target = lambda out: out.logits[:, -1, 3]  # noqa: E731
    from relprop.rules import attention

    hits = []
    real = attention.ScoreChain.relevance
    monkeypatch.setattr(attention.ScoreChain, "relevance", lambda self, r, s: hits.append(1) or real(self, r, s))
    fused = relprop.explain(model, {"input_ids": ids}, target=target, method="lrp", composite="attnlrp")
    monkeypatch.setattr(attention.SoftmaxRule, "through", None)
    plain = relprop.explain(model, {"input_ids": ids}, target=target, method="lrp", composite="attnlrp")
    assert len(hits) == 2  # one per layer
    f, p = fused.attributions["input_ids"], plain.attributions["input_ids"]
    torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5 * p.abs().max())


def test_score_chain_falls_back_to_the_rules(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    # The masked scores feed a second op: the chain is not taken, every rule runs (equal bits).
    fused, plain, hits = _chain_vs_plain(monkeypatch, _Eager(twice=True).double().eval(), x)
    assert hits == 0 and torch.equal(fused.attributions, plain.attributions)


def test_softmax_rule_on_finite_scores_equals_plain_expression(monkeypatch):
    from relprop.rules import attention

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    x.masked_fill_(torch.ones(5, 5, dtype=torch.bool).triu(1), torch.finfo(x.dtype).min)  # HF's finite mask
    s, r = torch.softmax(x, -1), torch.randn(2, 3, 5, 5)
    g = r - s * r.sum(-1, keepdim=True)
    want = torch.where(torch.isfinite(x), x * g, torch.zeros_like(g))
    finite = []
    real = attention._finite
    monkeypatch.setattr(attention, "_finite", lambda t: finite.append(real(t)) or finite[-1])
    assert torch.equal(attention._softmax_input_relevance(x, s, r, -1), want)
    x[0, 0, 0, 0] = float("nan")  # then the masks are made (the NaN row stays NaN, as the plain expression)
    s = torch.softmax(x, -1)
    g = r - s * r.sum(-1, keepdim=True)
    want = torch.where(torch.isfinite(x), x * g, torch.zeros_like(g))
    torch.testing.assert_close(attention._softmax_input_relevance(x, s, r, -1), want, rtol=0, atol=0, equal_nan=True)
    assert finite == [True, False]


def _qwen2(tokens=20):
    pytest.importorskip("transformers")
    import model_zoo

    torch.manual_seed(0)
    return model_zoo.qwen2(), torch.randint(0, 50, (2, tokens))


@pytest.mark.parametrize("composite", ["attnlrp", "epsilon"])
def test_released_scores_give_equal_bits(composite):
    import functools

    from relprop.methods.core import run_backward
    from relprop.rules.attention import release_scores
    from relprop.rules.composites import resolve_composite

    model, ids = _qwen2()  # 20 tokens, head dim 8: the scores (20 x 20) outweigh q and k (2 x 20 x 8)
    target = lambda out: out.logits[:, -1, 3]  # noqa: E731
    graph = record(model, (), {"input_ids": ids}, post=target, release=release_scores)
    released = [n.packet for n in graph.nodes if n.outputs and n.outputs[0] is not None and n.outputs[0].data is None]
    # per layer: q @ k^T (bmm, and matmul's view of it), * scaling, + causal mask
    assert sorted(released) == sorted(["bmm", "_unsafe_view", "mul", "add"] * 2)
    comp = resolve_composite(composite, {})
    kw = dict(target=target, composite=comp, method="lrp", times_output=True)

    def hold_all(m, args, kwargs, post=None, **_):  # run_backward asks for release_scores by default
        return record(m, args, kwargs, post=post)

    held = run_backward(model, {"input_ids": ids}, recorder=hold_all, **kw).attributions["input_ids"]
    rec = functools.partial(record, release=release_scores)
    freed = run_backward(model, {"input_ids": ids}, recorder=rec, **kw).attributions["input_ids"]
    assert torch.equal(freed, held)
    default = relprop.explain(
        model, {"input_ids": ids}, target=target, method="lrp", composite=composite
    )  # releases them
    assert torch.equal(default.attributions["input_ids"], held)
    small = _qwen2(tokens=9)  # scores smaller than q and k together: nothing to gain, nothing released
    graph = record(small[0], (), {"input_ids": small[1]}, post=target, release=release_scores)
    assert all(v.data is not None for n in graph.nodes for v in n.outputs if v is not None)


@pytest.mark.parametrize("noted", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask", ["plain", "causal", "inf", "bias"])
def test_released_score_chain_equals_held_scores(monkeypatch, dtype, mask, noted):
    # With q @ k^T released, the chain reads the notes the recording took of z1 and z3 (Value.normal); without
    # them (noted=False) it recomputes z1 and, on CPU, checks z1 and z3 in one buffer (z3 made in place).
    # Either way: equal bits to a recording that holds every score, zero sets included; the notes (or the in-place
    # check) answer True exactly when nothing is absorbed (else the general path runs, on the intact z1 or a second
    # recomputation).
    from relprop.methods.core import run_backward
    from relprop.rules import attention
    from relprop.rules.composites import resolve_composite

    if not noted:
        monkeypatch.setattr(attention, "note_normal", lambda t: None)
    torch.manual_seed(0)
    model, t = _Eager(mask=mask).to(dtype).eval(), 24  # scores (4 x 24 x 24) outweigh q and k: released
    x = torch.randn(2, t, 8, dtype=dtype)
    if mask != "plain":
        x[1, 3] = torch.finfo(dtype).tiny / 8  # subnormal activations, a row of subnormal products
    if mask == "bias":
        for lin in (model.q, model.k):
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
        x[0, 3, :4], x[0, 2, :4] = torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.25])
    graph = record(model, (x,), {}, release=attention.release_scores)
    assert any(n.packet == "bmm" and n.first_output.data is None for n in graph.nodes)
    notes = [n.first_output.normal for n in graph.nodes if n.packet in ("bmm", "add") and n.first_output.data is None]
    # z1, z3 (bias: z1's zeros lie where the mask is not 0, z3 has none)
    assert notes == ([mask == "plain", mask in ("plain", "bias")] if noted else [None, None])
    answers: list[bool] = []
    real = attention.ScoreChain._all_normal_in_place

    def spy(self):
        got = real(self)
        answers.append(got[0])
        return got

    monkeypatch.setattr(attention.ScoreChain, "_all_normal_in_place", spy)
    released = relprop.explain(model, x, target=0, method="lrp", composite="attnlrp")

    def hold_all(m, args, kwargs, post=None, **_):
        return record(m, args, kwargs, post=post)

    kw = dict(target=0, composite=resolve_composite("attnlrp", {}), method="lrp", times_output=True)
    held = run_backward(model, x, recorder=hold_all, **kw)
    # (held scores: the general path; noted normal scores: no check at all)
    assert answers == ([False] if noted and mask == "plain" else [mask == "plain" and not noted, False])
    assert torch.equal(released.attributions, held.attributions)
    assert not torch.equal(held.attributions, torch.zeros_like(held.attributions))
