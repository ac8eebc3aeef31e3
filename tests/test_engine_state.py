"""The engine keeps no state between calls: no stale caches, no notes written into shared graphs,
stateless composites, one table of backward kernels that equals autograd on any operands."""

from __future__ import annotations

import copy
import gc
import threading
import weakref

import pytest
import torch
from torch import nn

import relprop
from relprop.methods.core import seed_for, target_indices
from relprop.rules import named_composite
from relprop.rules.base import PreparedGraph, vjp
from relprop.rules.vjps import VJPS, RecordedInputs, autograd_vjp


# ------------------------------------------------------------------------------ batch-norm merge
def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )
    with torch.no_grad():  # non-trivial statistics, so every edit below changes the merged weights
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _lrp(model, x):
    return relprop.explain(model, x, target=1, method="lrp", composite="epsilon").attributions


@pytest.mark.parametrize(
    "edit",
    [
        lambda net: net[1].weight.data.mul_(2),
        lambda net: net[4].running_var.data.mul_(3),
        lambda net: net[1].running_mean.add_(0.3),
        lambda net: net[0].weight.data.mul_(-1),
        lambda net: net[3].weight.data.copy_(torch.randn_like(net[3].weight)),
    ],
    ids=["bn_weight_data", "running_var_data", "running_mean_inplace", "conv_weight_data", "conv_weight_copy"],
)
def test_batch_norm_merge_sees_in_place_edits(edit):
    """Edits through ``.data`` keep the pointer and version counter: a cache keyed on those went stale."""
    net = _bn_net()
    x = torch.randn(2, 3, 8, 8)
    before = _lrp(net, x)
    edit(net)
    after = _lrp(net, x)
    fresh = _lrp(copy.deepcopy(net), x)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)
    assert not torch.allclose(after, before), "the edit should change the explanation"


def test_explaining_keeps_no_model_alive():
    net = _bn_net()
    x = torch.randn(2, 3, 8, 8)
    _lrp(net, x)
    relprop.explain(net, x, target=1, method="lrp", composite="epsilon_plus_flat")
    ref = weakref.ref(net[0].weight)
    ptrs = {p.data_ptr() for p in net.parameters()} | {b.data_ptr() for b in net.buffers()}
    del net
    gc.collect()
    assert ref() is None, "a parameter of the deleted model is still referenced"
    alive = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.data_ptr() in ptrs]
    assert not alive, f"{len(alive)} tensors still share storage with the deleted model"


# ------------------------------------------------------------------ one recording, many rule sets
class TinyAttention(nn.Module):
    """Attention, an RMSNorm (a normaliser) and a gated MLP: everything the graph passes mark."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.norm_w = nn.Parameter(torch.rand(d) + 0.5)
        self.gate = nn.Linear(d, 2 * d, bias=False)
        self.up = nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d, bias=False)
        self.head = nn.Linear(d, 3, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
        h = x + a @ v
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w
        h = h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
        return self.head(h.mean(1))


def _propagate(graph, composite_name: str, target: int = 1) -> torch.Tensor:
    comp = named_composite(composite_name)
    prepared = comp.prepare(graph)
    out_v = prepared.graph.output_values[0]
    seed = seed_for(out_v.tensor, target_indices(target, out_v.tensor), True)
    src = prepared.graph.inputs[0]
    rel = relprop.propagate(prepared, comp.resolver(prepared), {out_v: seed}, [src])
    return rel[src.index]


def _meta_snapshot(graph):
    return [dict(n.meta) for n in graph.nodes]


def test_one_recording_explained_with_several_composites():
    torch.manual_seed(0)
    model = TinyAttention().eval()
    x = torch.randn(2, 5, 8)
    shared = relprop.trace(model, x)
    meta = _meta_snapshot(shared)
    names = ["cp_lrp", "attnlrp", "epsilon", "cp_lrp"]
    got = [_propagate(shared, name) for name in names]
    assert _meta_snapshot(shared) == meta, "preparing a graph wrote into its nodes"
    for name, g in zip(names, got):
        fresh = _propagate(relprop.trace(model, x), name)
        torch.testing.assert_close(g, fresh, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
        api = relprop.explain(model, x, target=1, method="lrp", composite=name).attributions
        torch.testing.assert_close(g, api, rtol=1e-6, atol=1e-7)
    # the rule sets really differ here, so the comparison above can fail
    assert not torch.allclose(got[0], got[1])


def test_prepare_returns_notes_not_node_edits():
    torch.manual_seed(0)
    model = TinyAttention().eval()
    graph = relprop.trace(model, torch.randn(2, 5, 8))
    cp = named_composite("cp_lrp").prepare(graph)
    plain = named_composite("attnlrp").prepare(graph)
    assert isinstance(cp, PreparedGraph)
    held = {i for i, n in cp.notes.items() if n.constant_operands}
    held_plain = {i for i, n in plain.notes.items() if n.constant_operands}
    assert held_plain and held_plain < held, "CP-LRP holds the attention weights and gates constant on top"
    assert all("constant_operands" not in n.meta and "family" not in n.meta for n in graph.nodes)


def _first_layer_net(extra_first: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4)] if extra_first else []
    return nn.Sequential(nn.Flatten(), *layers, nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()


def test_composite_holds_no_state_between_graphs():
    """The first-layer rule belongs to the prepared graph, not to the composite (which used to remember
    the graph prepared last)."""
    comp = named_composite("epsilon_plus_flat")
    g1 = relprop.trace(_first_layer_net(False), torch.randn(2, 4))
    g2 = relprop.trace(_first_layer_net(True), torch.randn(2, 1, 2, 2))
    p1 = comp.prepare(g1)
    p2 = comp.prepare(g2)
    for p in (p1, p2):
        firsts = [n for n in p.graph.nodes if comp.rule_for(p, n) is comp.first]
        assert len(firsts) == 1 and firsts[0].index == p.first_node
    assert p1.first_node != p2.first_node


def test_concurrent_explanations_with_one_composite_match_sequential():
    """Threads share one composite object; a barrier makes each prepare before any propagates."""
    comp = named_composite("epsilon_plus_flat")
    nets = [_first_layer_net(False), _first_layer_net(True)]
    xs = [torch.randn(3, 4), torch.randn(3, 1, 2, 2)]
    want = [relprop.explain(n, x, target=0, method="lrp", composite=comp).attributions for n, x in zip(nets, xs)]
    barrier = threading.Barrier(2)
    got: list = [None, None]

    class Synced(type(comp)):
        def prepare(self, graph):
            prepared = super().prepare(graph)
            barrier.wait(timeout=30)
            return prepared

    shared = copy.copy(comp)
    shared.__class__ = Synced

    def work(i):
        got[i] = relprop.explain(nets[i], xs[i], target=0, method="lrp", composite=shared).attributions

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ------------------------------------------------------------------------- one table of VJP kernels
class KernelNet(nn.Module):
    """One of each op with a VJP kernel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_nb = nn.Conv2d(4, 4, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(4).eval()
        self.lin = nn.Linear(16, 6)
        self.w = nn.Parameter(torch.randn(6, 5))

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.nn.functional.max_pool2d(h, 2, return_indices=False)
        h = self.bn(self.conv_nb(h.permute(0, 1, 3, 2)))
        h = h.mean(dim=(2, 3), keepdim=True).view(h.shape[0], -1).repeat(1, 4)
        h = self.lin(h)
        h = h.t().t() @ self.w
        h = torch.bmm(h.unsqueeze(1).transpose(1, 2), h.unsqueeze(1))
        return h.reshape(h.shape[0], -1) - h.sum((1, 2)).unsqueeze(1)


def test_vjp_kernels_equal_autograd_on_recorded_and_modified_operands():
    torch.manual_seed(0)
    model = KernelNet().eval()
    graph = relprop.trace(model, torch.randn(2, 3, 8, 8))
    seen = set()
    for node in graph.nodes:
        if node.packet not in VJPS or node.region is not None:
            continue
        floats = [i for i, v in enumerate(node.inputs) if v.is_float]
        grads = [torch.randn_like(v.tensor) if v is not None and v.is_float else None for v in node.outputs]
        recorded = [v.tensor for v in node.inputs]
        modified = [t.clamp(min=0) * 1.5 if t.is_floating_point() else t for t in recorded]
        for tensors in (None, modified):  # None: the recorded inputs
            for wrt in [floats] + [[i] for i in floats]:
                try:
                    want = autograd_vjp(node, grads, recorded if tensors is None else tensors, wrt)
                except RuntimeError:  # not differentiable there (batch-norm running statistics)
                    continue
                got = vjp(node, grads, tensors, wrt)
                for i in wrt:
                    torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-6, msg=lambda m: f"{node}: {m}")
        if VJPS[node.packet](node, grads, RecordedInputs(node), floats[:1]) is not None:
            seen.add(node.packet)
    assert {
        "convolution",
        "relu",
        "max_pool2d_with_indices",
        "permute",
        "mean",
        "view",
        "addmm",
        "t",
        "mm",
        "bmm",
        "native_batch_norm",
        "transpose",
        "sub",
    } <= seen, seen


def test_one_vjp_table():
    """The gradient rule and the linear rules have no backward shortcuts of their own."""
    import relprop.rules.base as base
    import relprop.rules.gradient as gradient
    import relprop.rules.linear as linear

    for mod in (base, gradient, linear):
        assert not hasattr(mod, "_FAST") and not hasattr(mod, "_VJP") and not hasattr(mod, "fast_vjp")
    assert "aten" not in vars(linear), "linear rules call ATen backward kernels themselves again"


# ------------------------------------------------------------------------------------------ DeepLIFT
class _Scale2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class _Branchy(nn.Module):
    """A custom Function (a region node per recording) and a Python scalar read from the data, which makes
    DeepLIFT's replay on the baseline untrusted, so the reference comes from a second recording."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(_Scale2.apply(self.a(x)))
        return self.b(h) / (1.0 + float(x.abs().max()))


def test_deeplift_reference_recording_matches_regions_and_takes_explicit_arguments():
    torch.manual_seed(0)
    model = _Branchy().eval()
    x = torch.randn(3, 4)
    base = torch.zeros_like(x)
    e = relprop.explain(model, x, target=1, method="deeplift", baselines=base)
    # Completeness along the recorded computation: the scalar read from the data is a constant of
    # the explained run (1 + max|x|), the region's backward doubles, the ReLU secant telescopes.
    with torch.no_grad():
        h, h0 = torch.relu(2 * model.a(x)), torch.relu(2 * model.a(base))
        expected = (h - h0) @ model.b.weight[1] / (1.0 + float(x.abs().max()))
    torch.testing.assert_close(e.attributions.sum(1), expected, rtol=1e-5, atol=1e-6)
    from relprop.rules.deeplift import DeepLiftComposite

    with pytest.raises(TypeError):
        DeepLiftComposite(lambda: None, [base])  # baselines= is keyword-only (and required)
