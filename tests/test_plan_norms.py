"""A plan whose rule set merges batch norms holds each norm's output instead of its input
(``relprop.plan._norm_swaps``): explanations bit-equal to ``relprop.explain``'s (whose recording drops the norm
outputs that ``relu_``/``+=`` overwrite and recomputes them), no norm recomputed during the reverse pass, as many
tensors held as the recording holds (or fewer), the norm input recomputed with the recorded bits where something reads it,
and nothing swapped where a rule reads the norm input (the gradient, a composite that does not merge)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import relprop
from model_zoo import resnet18_random_norms
from relprop import graph as graph_module
from relprop.rules.composites import Composite, resolve_composite
from relprop.trace import record
from test_plan_release import _equal

_NORMS = ("_native_batch_norm_legit_no_training", "native_batch_norm")


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 32, 32, generator=g) for _ in range(n)]


def _norm_recomputes(monkeypatch) -> list[str]:
    """Records the producer of every value recomputed from here on."""
    seen: list[str] = []
    orig = graph_module.recompute

    def counting(v):
        seen.append(v.producer.packet if v.producer is not None else "?")
        return orig(v)

    monkeypatch.setattr(graph_module, "recompute", counting)
    return seen


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat", "epsilon_alpha2_beta1", "lrp0"])
def test_equal_bits_and_no_norm_recomputed(composite, monkeypatch):
    m = resnet18_random_norms(negative_scales=True)
    xs = _batches()
    target = torch.tensor([1, 3])
    p = relprop.plan(m, xs[0], target=target, method="lrp", composite=composite)
    assert len(p._template.held_norms) == 20  # every norm of ResNet-18
    seen = _norm_recomputes(monkeypatch)
    for x in xs:
        del seen[:]
        want = relprop.explain(m, x, target=target, method="lrp", composite=composite)
        assert [s for s in seen if s in _NORMS]  # the recording drops norm outputs and recomputes them...
        del seen[:]
        got = p.explain(x)
        assert not [s for s in seen if s in _NORMS], seen  # ...the replay holds them
        _equal(got, want)
    assert p.replays == len(xs) and p.rerecords == 0, p.last_reason


def test_replay_holds_as_many_tensors_as_the_recording_and_the_recorded_bits():
    m = resnet18_random_norms()
    x = _batches(1)[0]
    p = relprop.plan(m, x, target=1, method="lrp", composite="epsilon")
    mod = sys.modules["relprop.plan"]
    tpl = p._template
    _, live = mod._signature(m, (x,), {}, None)
    env, why = mod._replay(tpl, (x,), {}, live)
    assert why is None
    replayed = mod._instantiate(tpl, env)
    recorded = record(m, (x,), {})

    def held(graph) -> set[int]:
        return {v.index for v in graph.values if v.kind == "op" and v.data is not None}

    swapped_in = held(replayed) - held(recorded)
    swapped_out = held(recorded) - held(replayed)
    # 17 norm outputs were overwritten in place (relu_, +=) and are held instead of their inputs; the 3 downsample
    # norms' outputs (the skip paths) were held by the recording too: their inputs are simply not held.
    assert swapped_in < tpl.held_norms and len(swapped_in) == 17 and len(swapped_out) == 20
    assert held(replayed) == (held(recorded) - swapped_out) | tpl.held_norms
    for i in swapped_out:  # the norms' inputs: each one a convolution output read only by its norm
        v = recorded.values[i]
        assert v.producer.packet == "convolution" and len(v.consumers) == 1 and v.consumers[0].packet in _NORMS
    for i in swapped_in:  # the forward's own norm outputs: what the recording recomputes, bit for bit
        assert recorded.values[i].data is None
        assert torch.equal(replayed.values[i].data, recorded.values[i].tensor)
    for i in held(recorded) & held(replayed):
        assert torch.equal(replayed.values[i].data, recorded.values[i].data)


def test_layers_naming_merged_norms_equal_explain_and_merged_convs_are_refused():
    """The merged layer's output is the norm's: asked for by the norm's name it equals explain (activation = the
    model's norm output); a conv folded into its norm has no relevance of its own and is refused by name, in the
    plan as in explain (before, the conv's name silently gave the norm's output and relevance)."""
    m = resnet18_random_norms()
    xs = _batches(2)
    layers = ["bn1", "layer1.0.bn2", "layer2.0.downsample.1", "layer1.0"]
    p = relprop.plan(m, xs[0], target=2, method="lrp", composite="epsilon_plus_flat")
    for x in xs:
        got = p.explain(x, layers=layers)
        want = relprop.explain(m, x, target=2, method="lrp", composite="epsilon_plus_flat", layers=layers)
        _equal(got, want)
        seen = {}
        hooks = [
            m.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o.clone()))
            for n in layers
        ]
        try:
            with torch.no_grad():
                m(x)
        finally:
            for h in hooks:
                h.remove()
        for name in layers:
            assert torch.equal(got.activations[name], want.activations[name])
            assert torch.equal(got.layers[name], want.layers[name])
            assert torch.equal(got.activations[name], seen[name])
    assert p.replays == 2 and p.rerecords == 0
    for name, norm in (("conv1", "bn1"), ("layer2.0.downsample.0", "layer2.0.downsample.1")):
        for run in (
            lambda: p.explain(xs[0], layers=[name]),
            lambda: relprop.explain(m, xs[0], target=2, method="lrp", composite="epsilon_plus_flat", layers=[name]),
        ):
            with pytest.raises(ValueError, match=f"output of '{name}' is folded into '{norm}'.*canonize=False"):
                run()


def test_verify_compares_the_held_norm_outputs():
    m = resnet18_random_norms()
    xs = _batches(2)
    p = relprop.plan(m, xs[0], target=1, method="lrp", composite="epsilon", verify=True)
    for x in xs:
        _equal(p.explain(x), relprop.explain(m, x, target=1, method="lrp", composite="epsilon"))
    assert p.mismatches == 0 and p.replays == 2
    # A held norm output that differs from the recording's (recomputed there for the comparison) is found.
    mod = sys.modules["relprop.plan"]
    tpl = p._template
    _, live = mod._signature(m, (xs[1],), {}, None)
    env, _ = mod._replay(tpl, (xs[1],), {}, live)
    fresh = record(m, (xs[1],), {})
    assert mod._compare(tpl.graph, env, fresh, tpl.held_norms) is None
    i = min(tpl.held_norms)
    assert fresh.values[i].data is None  # the comparison recomputed it and dropped it again
    env[i] = env[i] + 1e-3
    diff = mod._compare(tpl.graph, env, fresh, tpl.held_norms)
    assert diff is not None and f"value {i} " in diff and "batch_norm" in diff
    assert fresh.values[i].data is None


def test_nothing_swapped_where_a_rule_reads_the_norm_input():
    m = resnet18_random_norms()
    xs = _batches(2)
    # The gradient: batch norm's VJP reads its input.
    g = relprop.plan(m, xs[0], target=1, method="gradient")
    assert not g._template.held_norms
    xx = xs[1].clone().requires_grad_()
    want = torch.autograd.grad(m(xx)[:, 1].sum(), xx)[0]
    torch.testing.assert_close(g.explain(xs[1]).attributions, want, rtol=1e-5, atol=1e-7)
    # An LRP rule set that does not merge the norms (their rule reads the norm input).
    comp = resolve_composite("epsilon", {})
    plain = Composite(comp.families, first=comp.first, canonize=False, name="epsilon unmerged")
    q = relprop.plan(m, xs[0], target=1, method="lrp", composite=plain)
    assert not q._template.held_norms
    for x in xs:
        _equal(q.explain(x), relprop.explain(m, x, target=1, method="lrp", composite=plain))


class _TwoReaders(nn.Module):
    """A convolution output read by its norm and by a skip path: the norm input must stay held."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.c1(x)
        h = self.b1(y).relu_() + y  # y: two readers
        z = self.b2(self.c2(h)).relu_()  # merged and swapped
        return self.fc(z.mean((2, 3)))


def test_a_norm_input_with_another_reader_stays_held():
    m = _TwoReaders().eval()
    with torch.no_grad():
        for b in (m.b1, m.b2):
            b.running_mean.normal_(0, 0.1)
            b.running_var.uniform_(0.5, 1.5)
    xs = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    p = relprop.plan(m, xs[0], target=1, method="lrp", composite="epsilon")
    tpl = p._template
    (z,) = tpl.held_norms
    assert tpl.graph.values[z].producer.module == "b2"
    for x in xs:
        _equal(p.explain(x), relprop.explain(m, x, target=1, method="lrp", composite="epsilon"))
    assert p.replays == 3 and p.rerecords == 0
