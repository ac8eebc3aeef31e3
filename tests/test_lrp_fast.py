"""The LRP fast paths equal the plain computation they replace.

* ``linear.ratio`` / ``linear.times`` write into a new tensor of their own instead of allocating another:
  equal bits to ``rel / stabilize(z)`` and ``x * g``, and they never write into a view, an input or a
  tensor of another dtype.
* The epsilon rule on a node with a merged batch norm scales the relevance quotient by the norm's
  factor and uses the model's weight, instead of building the merged weight: equal to the merged-weight
  computation (to rounding: float64 1e-12, float32 1e-5), and the merged weight is never built.
* A plan's replay runs the recording's in-place writes (``relu_`` after a norm, ``out += identity``) in
  place: equal bits to a recording, and never on memory another value, an input or a view holds.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import relprop
from relprop import canonical
from relprop.rules import linear
from relprop.rules.linear import ratio, stabilize, times


def _z(dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    z = torch.randn(4, 5, 6, dtype=dtype)
    z[0, 0, :3] = 0.0
    z[0, 1, :3] = -0.0
    z[1, 0, 0] = torch.finfo(dtype).tiny / 4  # subnormal
    return z


# ------------------------------------------------------------------------ ratio / times
@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ratio_equals_plain_division(eps, dtype):
    z = _z(dtype)
    rel = torch.randn_like(z)
    rel[0, 0, 0], rel[0, 1, 1], rel[1, 0, 0] = float("inf"), float("nan"), -3.0  # at zero/subnormal outputs
    got, want = ratio(rel, z, eps), rel / stabilize(z, eps)
    assert torch.equal(got.signbit()[~want.isnan()], want.signbit()[~want.isnan()])
    assert got.dtype == want.dtype
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
    assert got.data_ptr() not in (rel.data_ptr(), z.data_ptr())


def test_ratio_promotes_like_plain_division():
    z = _z(torch.float32)
    rel = torch.randn(4, 5, 6, dtype=torch.float64)  # float64 / float32: the result is float64, not written into d
    got = ratio(rel, z, 1e-6)
    assert got.dtype == torch.float64 and torch.equal(got, rel / stabilize(z, 1e-6))
    rel_b = torch.randn(5, 6)  # broadcast relevance
    assert torch.equal(ratio(rel_b, z, 1e-6), rel_b / stabilize(z, 1e-6))


def test_times_equals_product_and_writes_only_what_it_owns():
    torch.manual_seed(1)
    x, g = torch.randn(3, 4), torch.randn(3, 4)
    want = x * g
    g0, x0 = g.clone(), x.clone()
    assert torch.equal(times(x, g.clone(), owned=True), want)
    assert torch.equal(times(x, g, owned=False), want) and torch.equal(g, g0)  # not owned: untouched
    scale = torch.randn(3, 1)
    assert torch.equal(times(scale, g.clone(), owned=True), scale * g)  # broadcast operand
    big = torch.randn(2, 3, 4)  # g would have to grow: not in place
    assert torch.equal(times(big, g, owned=True), big * g) and torch.equal(g, g0)
    g64 = torch.randn(3, 4, dtype=torch.float64)  # promotion to the other operand's dtype: not in place
    got = times(g64, g, owned=True)
    assert got.dtype == torch.float64 and torch.equal(got, g64 * g) and torch.equal(g, g0)
    base = torch.randn(3, 8)
    view = base[:, :4]
    b0 = base.clone()
    assert torch.equal(times(x, view, owned=True), x * view) and torch.equal(base, b0)  # views are never written
    assert torch.equal(times(x, x, owned=True), x0 * x0) and torch.equal(x, x0)  # x itself is never written


# ------------------------------------------------------------------------ epsilon on merged batch norms
class _ConvBnNet(nn.Module):
    """conv(+bias) -> BN -> ReLU, grouped conv -> BN, linear -> BN1d -> linear: every kind of merge."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.b3 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu_(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h))) + h
        h = nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.fc2(torch.relu(self.b3(self.fc1(h))))


def _bn_net(dtype):
    torch.manual_seed(0)
    m = _ConvBnNet().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.3, 2.0)
                mod.weight.uniform_(-1.5, 1.5)  # negative factors too
                mod.bias.normal_(0, 0.3)
    return m.to(dtype), torch.randn(3, 3, 8, 8, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("composite", ["epsilon", "lrp0", "epsilon_plus_flat"])
def test_epsilon_on_merged_batch_norm_equals_merged_weights(monkeypatch, dtype, tol, composite):
    m, x = _bn_net(dtype)
    built = []
    merge_call = canonical._MergeBatchNorm.__call__

    def counting(self, *a):
        built.append(self.kind)
        return merge_call(self, *a)

    monkeypatch.setattr(canonical._MergeBatchNorm, "__call__", counting)
    fast = relprop.explain(m, x, target=torch.tensor([0, 3, 1]), method="lrp", composite=composite)
    fast_built = list(built)
    monkeypatch.setattr(linear, "merged_scale", lambda node: None)  # the plain path: merged weights
    built.clear()
    plain = relprop.explain(m, x, target=torch.tensor([0, 3, 1]), method="lrp", composite=composite)
    assert sorted(built) == ["conv", "conv", "dense"]  # the plain path merges all three norms
    # the fast paths never build a whole merged weight: epsilon scales the quotient, z+ and flat build blocks of
    # their modified weights from the model's weights (tests/test_lrp_blocks.py)
    assert fast_built == []
    a, b = fast.attributions, plain.attributions
    assert b.abs().max() > 0
    assert (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max()


# ------------------------------------------------------------------------ in-place writes in a replay
class _InPlace(nn.Module):
    """In-place writes the replay may repeat (relu_ after BN, += after a norm) and one it must not (through a view)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.b2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.b1(self.c1(x)).relu_()
        y = self.b2(self.c2(h))
        y += h  # add_ into a norm output
        y = y.relu_()
        z = y.flatten(2).mul_(0.5)  # a write through a view: never replayed in place
        return self.fc(z.mean(2))


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat"])
def test_plan_replays_in_place_writes(composite):
    torch.manual_seed(0)
    m = _InPlace().eval()
    xs = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    p = relprop.plan(m, xs[0], target=1, method="lrp", composite=composite)
    steps = p._template.steps
    inplace = [s.node.packet for s in steps if s.inplace is not None]
    # The norms are merged: the replay holds their outputs (relprop.plan._norm_swaps), so the relu_ and += that
    # overwrote them run out of place; the relu_ on the sum runs in place. Never the mul through the view.
    assert inplace == ["relu"] and len(p._template.held_norms) == 2, inplace
    for x in xs:
        x0 = x.clone()
        got = p.explain(x)
        want = relprop.explain(m, x, target=1, method="lrp", composite=composite)
        assert torch.equal(got.attributions, want.attributions)
        assert torch.equal(got.output, want.output)
        assert torch.equal(x, x0)  # the caller's batch is never written
    assert p.rerecords == 0 and p.replays == 3


def test_plan_in_place_replay_on_resnet_matches_recording():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=7).eval()
    xs = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    p = relprop.plan(m, xs[0], target=3, method="lrp", composite="epsilon")
    # every relu_ after a +=; the relu_ and += that overwrote a merged norm's output run out of place (the replay
    # holds the 20 norm outputs instead of their inputs: relprop.plan._norm_swaps)
    assert sum(s.inplace is not None for s in p._template.steps) == 8 and len(p._template.held_norms) == 20
    for x in xs:
        assert torch.equal(
            p.explain(x).attributions, relprop.explain(m, x, target=3, method="lrp", composite="epsilon").attributions
        )
    g = relprop.plan(m, xs[0], target=3, method="gradient")
    assert sum(s.inplace is not None for s in g._template.steps) >= 17 and not g._template.held_norms  # every one
    xx = xs[1].clone().requires_grad_()
    want = torch.autograd.grad(m(xx)[:, 3].sum(), xx)[0]
    torch.testing.assert_close(g.explain(xs[1]).attributions, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stabilize_zero_epsilon_equals_masked_fill(dtype):
    z = _z(dtype)
    want = z.masked_fill(z.abs() < torch.finfo(dtype).tiny, float("inf"))
    got = stabilize(z, 0.0)
    assert got.dtype == dtype and torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    zg = z.clone().requires_grad_()  # autograd on: no out= (same values)
    assert torch.equal(stabilize(zg, 0.0).detach(), want)


# ------------------------------------------------------------------------ direct VJP kernels of routing ops
class _Routing(nn.Module):
    def forward(self, x):  # x: (2, 4, 6)
        a = x.unsqueeze(1).expand(-1, 3, -1, -1)  # GQA's repeat_kv
        b = a.clone()
        c = b[:, 1:, :, ::2]  # slices with a start and a step
        d = c.select(1, -1)
        e = torch.cat([d, d * 2, x[..., 2:5]], dim=-1)  # rotary halves
        f = x[:, :1].squeeze(1).unsqueeze(0)
        g = x[:, -2:].expand(3, -1, -1, -1)  # expand with new leading dims
        per_sample = e.sum((1, 2)) + f.sum((0, 2)) + (g * g).sum((0, 2, 3)) + b[:, :, 0].sum((1, 2))
        return per_sample.unsqueeze(1)


def test_routing_vjp_kernels_equal_autograd():
    from relprop.rules.vjps import VJPS, RecordedInputs, autograd_vjp
    from relprop.trace import record

    torch.manual_seed(0)
    graph = record(_Routing().eval(), (torch.randn(2, 4, 6),), {})
    seen = set()
    for node in graph.nodes:
        if node.packet not in ("expand", "clone", "slice", "select", "cat", "squeeze", "unsqueeze"):
            continue
        tensors = RecordedInputs(node)
        wrt = [i for i, v in enumerate(node.inputs) if v.is_float]
        grads = [torch.randn_like(node.outputs[0].tensor)]
        got = VJPS[node.packet](node, grads, tensors, wrt)
        want = autograd_vjp(node, grads, tensors, wrt)
        assert got is not None, node
        for i in wrt:
            assert got[i].shape == want[i].shape and torch.equal(got[i], want[i]), (node, i)
        seen.add(node.packet)
    assert seen == {"expand", "clone", "slice", "select", "cat", "squeeze", "unsqueeze"}, seen


def test_gradient_through_routing_equals_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6)
    xx = x.clone().requires_grad_()
    want = torch.autograd.grad(_Routing()(xx)[:, 0].sum(), xx)[0]
    got = relprop.explain(_Routing().eval(), x, target=0, method="gradient").attributions
    assert torch.equal(got, want)


def test_softmax_rule_fast_path_equals_plain_expression():
    from relprop.rules.attention import _softmax_input_relevance

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    x.masked_fill_(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))  # causal mask
    x[0, 0, 0, 0], x[0, 0, 1, 0] = float("nan"), float("inf")  # every kind of non-finite score
    s, r = torch.softmax(x, -1), torch.randn(2, 3, 5, 5)
    x0, r0 = x.clone(), r.clone()
    g = r - s * r.sum(-1, keepdim=True)
    want = torch.where(torch.isfinite(x), x * g, torch.zeros_like(g))
    got = _softmax_input_relevance(x, s, r, -1)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()  # the NaN row stays NaN
    assert torch.equal(got.nan_to_num().signbit(), want.nan_to_num().signbit())
    torch.testing.assert_close(x, x0, rtol=0, atol=0, equal_nan=True)  # inputs untouched
    assert torch.equal(r, r0)
    r64 = r.double()  # float64 relevance, float32 scores: the plain expression (promotes)
    g64 = r64 - s * r64.sum(-1, keepdim=True)
    want64 = torch.where(torch.isfinite(x), x * g64, torch.zeros_like(g64))
    torch.testing.assert_close(_softmax_input_relevance(x, s, r64, -1), want64, rtol=0, atol=0, equal_nan=True)
