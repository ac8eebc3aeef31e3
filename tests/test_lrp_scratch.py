"""The rule pass's scratch-memory fast paths give the bits of the plain computation.

* ``linear.stabilize`` writes ``copysign(eps, z) + z`` without filling a tensor with eps first;
* ``linear.ratio(..., scratch=True)`` makes the denominator and the quotient in a released output's own
  (recomputed) memory, chunk by chunk (``linear._stabilize_into``);
* ``propagate`` adds a fan-out's relevance into a tensor a rule owns (``RuleContext.own``) instead of a new one.

Each is compared with the pass where it is switched off (``out_is_scratch`` False, ``own`` a no-op), which
computes everything in new tensors as before these paths existed: ``torch.equal``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import relprop
from model_zoo import resnet18_random_norms
from relprop.rules import linear
from relprop.rules.base import RuleContext

propagate_mod = importlib.import_module("relprop.propagate")  # (the module: relprop.propagate is also a function)


def _resnet():
    m = resnet18_random_norms(negative_scales=True)
    return m, [torch.randn(2, 3, 48, 48) for _ in range(3)]


def _plain(monkeypatch):
    """Switch the fast paths off: no scratch output or relevance, no owned result, no in-place sum."""
    monkeypatch.setattr(RuleContext, "out_is_scratch", lambda self: False)
    monkeypatch.setattr(linear, "_stabilize_into", lambda z, eps: False)  # also for shares' own new outputs
    monkeypatch.setattr(RuleContext, "spare_relevance", lambda self: None)
    monkeypatch.setattr(RuleContext, "own", lambda self, t: t)
    monkeypatch.setattr(propagate_mod, "_owned", lambda *a: set())
    monkeypatch.setattr(propagate_mod, "_addable", lambda a, b: False)


def _spy(monkeypatch) -> dict[str, int]:
    """Count the fast paths taken: chunked in-place denominators and in-place fan-out sums."""
    seen = {"stabilized in place": 0, "added in place": 0, "product into the relevance": 0}
    into, addable, fits = linear._stabilize_into, propagate_mod._addable, linear._fits

    def spy_fits(out, x, g):
        ok = fits(out, x, g)
        seen["product into the relevance"] += ok
        return ok

    monkeypatch.setattr(linear, "_fits", spy_fits)

    def spy_into(z, eps):
        done = into(z, eps)
        seen["stabilized in place"] += done
        return done

    def spy_addable(a, b):
        ok = addable(a, b)
        seen["added in place"] += ok
        return ok

    monkeypatch.setattr(linear, "_stabilize_into", spy_into)
    monkeypatch.setattr(propagate_mod, "_addable", spy_addable)
    return seen


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat", "epsilon_gamma_box"])
def test_resnet_equal_bits_to_the_plain_pass(monkeypatch, composite):
    m, xs = _resnet()
    opts = {"method": "lrp", "composite": composite, "layers": ["layer1.0", "layer2"]}
    p = relprop.plan(m, xs[0], target=1, **{k: v for k, v in opts.items() if k != "layers"})
    seen = _spy(monkeypatch)
    fast = [relprop.explain(m, xs[0], target=1, **opts)] + [p.explain(x, layers=opts["layers"]) for x in xs[1:]]
    # the paths were taken (ResNet-18: 8 residual sums; the blocks' inputs fan out)
    assert seen["stabilized in place"] > 5 and seen["added in place"] >= 4, seen
    assert seen["product into the relevance"] >= 4, seen
    with monkeypatch.context() as mp:
        _plain(mp)
        plain = [relprop.explain(m, x, target=1, **opts) for x in xs]
    for a, b in zip(fast, plain):
        assert torch.equal(a.attributions, b.attributions)
        for name in opts["layers"]:
            assert torch.equal(a.layers[name], b.layers[name])
            assert torch.equal(a.activations[name], b.activations[name])


class _Sum(nn.Module):
    def forward(self, a, b):
        return a + b


class _Net(nn.Module):
    """conv -> (a + b) -> relu_ in place: the sum's output is released by the recording (overwritten)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3)
        self.sum = _Sum()

    def forward(self, x):
        return self.c3(torch.relu_(self.sum(self.c1(x), self.c2(x)))).mean((2, 3))


def test_a_wanted_released_value_is_not_scratch(monkeypatch):
    m, x = _Net().eval(), torch.randn(2, 3, 12, 12)
    seen = _spy(monkeypatch)
    free = relprop.explain(m, x, target=1, method="lrp", composite="epsilon")
    assert seen["stabilized in place"] == 1  # the sum's released output
    kept = relprop.explain(m, x, target=1, method="lrp", composite="epsilon", layers=["sum"])
    assert seen["stabilized in place"] == 1  # not the wanted sum's
    acts = []
    h = m.sum.register_forward_hook(lambda mod, i, o: acts.append(o.clone()))
    try:
        m(x)
    finally:
        h.remove()
    assert torch.equal(kept.activations["sum"], acts[0])
    with monkeypatch.context() as mp:
        _plain(mp)
        plain = relprop.explain(m, x, target=1, method="lrp", composite="epsilon", layers=["sum"])
    assert torch.equal(free.attributions, plain.attributions) and torch.equal(kept.attributions, plain.attributions)
    assert torch.equal(kept.layers["sum"], plain.layers["sum"])


def test_gradient_fan_out_sums_leave_shared_tensors_alone():
    # add's gradient VJP hands one tensor to both operands: neither is owned, so no sum is written into it.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            u = h + h.relu()  # h fans out; the sum's VJP gives one tensor twice
            return self.b(u + h)

    m = Net().eval()
    x = torch.randn(4, 6, requires_grad=True)
    got = relprop.explain(m, x.detach(), target=1, method="gradient").attributions
    (want,) = torch.autograd.grad(m(x)[:, 1].sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    got = relprop.explain(m, x.detach(), target=1, method="lrp", composite="epsilon").attributions
    with pytest.MonkeyPatch.context() as mp:
        _plain(mp)
        want = relprop.explain(m, x.detach(), target=1, method="lrp", composite="epsilon").attributions
    assert torch.equal(got, want)


def test_owned_results_exclude_shared_views_and_arrived_relevance():
    from relprop.graph import Value

    node = type("N", (), {})()
    ctx = RuleContext(node, [], [])
    arrived = torch.randn(3, 4)
    mine, twice, view = torch.randn(3, 4), torch.randn(3, 4), torch.randn(6, 4)[:3]
    for t in (mine, twice, view, arrived):
        ctx.own(t)
    got = propagate_mod._owned(ctx, [mine, twice, twice, view[:], arrived], [arrived])
    assert got == {id(mine)}
    # _accumulate: the owned tensor takes the sum in place, a tensor that is not owned is never written.
    v = Value(0, None, "op")
    v.shape = torch.Size([3, 4])
    rel: dict = {}
    kept = arrived.clone()
    propagate_mod._accumulate(rel, v, arrived, None, set(), False)
    before = mine.clone()
    propagate_mod._accumulate(rel, v, mine, None, set(), True)
    assert rel[0] is mine and torch.equal(mine, before + kept) and torch.equal(arrived, kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stabilize_without_fill_and_in_place_equal_bits(dtype):
    special = torch.tensor([0.0, -0.0, 1e-7, -1e-7, float("inf"), -float("inf"), 1e-45, -1e-45, 3.0, -2.0], dtype=dtype)
    z = torch.cat([special, torch.randn(3 * linear.CHUNK + 17, dtype=dtype)])
    for eps in (1e-6, 0.25):
        want = torch.full_like(z, eps).copysign_(z).add_(z)
        assert torch.equal(linear.stabilize(z, eps), want)
        into = z.clone()
        assert linear._stabilize_into(into, eps)
        assert torch.equal(into, want)
        # channels-last memory, several chunks: the same element-wise values
        x = torch.randn(2, 8, 64, 65, dtype=dtype).to(memory_format=torch.channels_last)
        w = x.clone()
        assert linear._stabilize_into(w, eps) and w.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(w, torch.full_like(x, eps).copysign_(x).add_(x))
        rel = torch.randn_like(x)
        zz = x.clone()
        assert torch.equal(linear.ratio(rel, zz, eps, scratch=True), rel / linear.stabilize(x, eps))
    # Views, eps = 0 and non-dense tensors are left to the new-tensor path.
    assert not linear._stabilize_into(z[::2], 1e-6) and not linear._stabilize_into(z.clone(), 0.0)


@pytest.mark.parametrize("second", ["view", "slice"])
def test_a_result_sharing_memory_with_another_is_never_summed_into(second):
    """A user's rule may declare a result its own (ctx.own) and hand a view of it to another input; a later
    in-place fan-out sum into the owned tensor would then change the view's relevance too (engine review)."""
    from relprop.rules import Composite, Epsilon, base_families

    class Net(nn.Module):
        def forward(self, x):
            a, b = x * 2, x * 3
            return (a + b) + a  # a fans out: its relevance is summed, the inner add's share second

    def split(ctx, alias):
        r = ctx.own(ctx.relevance[0] * 0.5)
        other = r.view_as(r) if second == "view" else r[:]
        return [r, other if alias else other.clone()]

    x = torch.randn(2, 5)
    runs = []
    for alias in (True, False):
        fam = base_families()
        fam.update(dense=Epsilon(1e-6), conv=Epsilon(1e-6))
        inner = lambda ctx, alias=alias: split(ctx, alias)  # noqa: E731
        comp = Composite(fam, ops={"add": inner})
        runs.append(relprop.explain(Net().eval(), x, target=0, method="lrp", composite=comp).attributions)
    assert torch.equal(runs[0], runs[1])
