"""``record(..., release=policy)`` and ``relprop.plan(..., release=policy)``: outputs the tape does not hold
are recomputed where a rule reads them, so every explanation is bit-equal to one from a recording that
holds everything -- with the most aggressive policy (release every node it can) on a ResNet with batch
norm and in-place ReLUs, a decoder with eager attention, a train-mode batch norm, and a forward full of
in-place writes, views and dead temporaries whose memory (and ids) new tensors get."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from torch import nn

import relprop
from model_zoo import resnet18_random_norms
from relprop.methods.core import run_backward
from relprop.rules.composites import GradientComposite, resolve_composite
from relprop.trace import record


def _all(node) -> bool:
    return True


def _all_but_factories(node) -> bool:
    return bool(node.inputs) and not node.packet.endswith("_like")


def _scores(node) -> bool:  # an attention-like policy: products of two activations
    return node.packet in ("mm", "bmm", "mul") and sum(v.is_activation for v in node.inputs) == 2


def _explain(model, inputs, target, composite, release):
    comp = GradientComposite() if composite == "gradient" else resolve_composite(composite, {})

    def recorder(m, args, kwargs, post=None, **_):  # this test's policy, not the one run_backward asks for
        graph = record(m, args, kwargs, post=post, release=release)
        held = record(m, args, kwargs, post=post)
        # (the point: the policy did release outputs, beyond what in-place writes drop anyway)
        assert _dropped(graph) > _dropped(held), "nothing released"
        return graph

    return run_backward(
        model,
        inputs,
        target=target,
        composite=comp,
        method="gradient" if composite == "gradient" else "lrp",
        times_output=composite != "gradient",
        recorder=recorder,
    )


def _dropped(graph) -> int:
    return sum(v.producer is not None and v.data is None for v in graph.values)


def _equal(a: relprop.Explanation, b: relprop.Explanation) -> None:
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y), (x - y).abs().max()
    assert torch.equal(a.output, b.output) and torch.equal(a.score, b.score)


def _resnet():
    m = resnet18_random_norms()
    return m, [torch.randn(2, 3, 32, 32) for _ in range(3)], torch.tensor([1, 3])


def _decoder():
    pytest.importorskip("transformers")
    import model_zoo

    torch.manual_seed(0)
    m = model_zoo.qwen2(intermediate=64)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 50, (1, 12), generator=g)} for _ in range(3)]
    return m, batches, lambda out: out.logits[:, -1, 7]


class _InPlace(nn.Module):
    """Released products written in place, viewed, partly overwritten; temporaries that die and whose
    memory the next same-sized tensors (constants made in the forward) get."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 6))
        self.v = nn.Parameter(torch.randn(6, 3))

    def forward(self, x):
        h = x
        for _ in range(3):
            t = (h @ self.w) * h  # released (mm, mul of two activations)
            del h
            z = torch.zeros_like(t)  # a constant, likely at the address of a dead temporary
            z += t.relu()
            t.mul_(0.5)  # in place into a released tensor
            t[:, :2] = z[:, :2]  # a partial write
            h = t.view(t.shape[0], 6) + z.tanh()
            del t, z
        return h @ self.v


def test_resnet_lrp_equal_bits():
    policy = _all  # (no product of two activations in a ResNet)
    m, batches, target = _resnet()
    for composite in ("epsilon", "epsilon_plus_flat", "gradient"):
        _equal(
            _explain(m, batches[0], target, composite, policy),
            relprop.explain(
                m,
                batches[0],
                target=target,
                method="lrp" if composite != "gradient" else "gradient",
                **({"composite": composite} if composite != "gradient" else {}),
            ),
        )


@pytest.mark.parametrize("policy", [_all, _scores], ids=["release_all", "release_products"])
def test_decoder_attnlrp_equal_bits(policy):
    m, batches, target = _decoder()
    for b in batches[:2]:
        _equal(
            _explain(m, b, target, "attnlrp", policy),
            relprop.explain(m, b, target=target, method="lrp", composite="attnlrp"),
        )


def test_in_place_writes_views_and_reused_memory_equal_bits():
    m = _InPlace()
    for seed in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
        for composite in ("epsilon", "gradient"):
            kw = {"composite": composite} if composite != "gradient" else {}
            want = relprop.explain(m, x, target=1, method="lrp" if kw else "gradient", **kw)
            _equal(_explain(m, x, 1, composite, _all), want)


def test_train_mode_batch_norm_gradient_equal_bits():
    m, batches, target = _resnet()
    m.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = relprop.explain(m, batches[0], target=target)
        got = _explain(m, batches[0], target, "gradient", _all)
    _equal(got, want)


def test_released_tensors_are_not_held_by_the_tape():
    alive: list[bool] = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            s = x @ x.transpose(0, 1)  # the "scores": a product of two activations
            ref = weakref.ref(s)
            p = torch.softmax(s, -1)  # (autograd saves softmax's output, not its input)
            del s
            alive.append(ref() is not None)  # still held after the model dropped it?
            return self.lin(p @ x)

    m, x = Probe().eval(), torch.randn(5, 8)
    record(m, (x,), {})
    released = record(m, (x,), {}, release=_scores)
    assert alive == [True, False]  # held by the tape without a policy; freed during the forward with one
    scores = [v for v in released.values if v.producer is not None and v.producer.packet == "mm" and v.data is None]
    assert scores, "the product was not released"
    assert torch.equal(scores[0].tensor, x @ x.transpose(0, 1))  # recomputed on demand, same bits


@pytest.mark.parametrize("build", [_resnet, _decoder], ids=["resnet", "decoder"])
def test_plan_with_release_replays_equal_bits_and_frees_what_was_released(build):
    m, batches, target = build()
    composite = "attnlrp" if build is _decoder else "epsilon"
    p = relprop.plan(m, batches[0], target=target, composite=composite, release=_all)
    held = relprop.plan(m, batches[0], target=target, composite=composite)

    def freed(plan) -> set[int]:
        assert plan._template is not None
        return {i for step in plan._template.steps for i in step.free}

    # The replay frees what the recording did not hold (after its last use in the forward), and more of it.
    assert freed(held) < freed(p) and len(freed(p)) > 2 * len(freed(held))
    # The replay still checks every op output's strides against the recording, released ones included.
    tpl = p._template
    assert tpl is not None and all(tpl.strides[v.index] is not None for v in tpl.graph.values if v.producer is not None)
    for b in batches:
        _equal(p.explain(b), relprop.explain(m, b, target=target, method="lrp", composite=composite))
    assert p.rerecords == 0 and p.replays == len(batches), p.last_reason


@pytest.mark.parametrize("kind", ["ste", "reverse", "two", "scaled", "saved_only"])
def test_custom_autograd_functions_equal_bits(kind):
    # A Function's inputs are found by their autograd edges, released tensors included.
    from test_trace_semantics import FnNet

    torch.manual_seed(0)
    m, x = FnNet(kind).eval(), torch.randn(5, 4)
    _equal(_explain(m, x, 1, "gradient", _all), relprop.explain(m, x, target=1, method="gradient"))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_model_equal_bits(reentrant):
    # torch.utils.checkpoint is recorded through (a reentrant one by re-running the block with grad).
    from test_checkpoint import _pair

    plain, ck = _pair(reentrant)
    x = torch.randn(4, 8)
    for composite in ("epsilon", "gradient"):
        kw = {"composite": composite} if composite != "gradient" else {}
        want = relprop.explain(plain, x, target=1, method="lrp" if kw else "gradient", **kw)
        _equal(_explain(ck, x, 1, composite, _all), want)


_VIEWS = {"view", "_unsafe_view", "expand", "transpose", "slice", "unsqueeze", "select", "t", "alias", "detach"}


@pytest.mark.parametrize("build", [_decoder, _InPlace], ids=["decoder", "in_place"])
def test_released_views_recompute_the_recorded_bits(build):
    # Views of released tensors are released too (their storage is then held by no value of the tape); each
    # released value, read back, is the held recording's tensor: same bits, shape and strides.
    if build is _decoder:
        m, batches, target = _decoder()
        args, kwargs, post = (), batches[0], target
    else:
        m, args, kwargs, post = build(), (torch.randn(4, 6),), {}, None
    # (Not factories' outputs (``arange``, ``zeros_like``): autograd's make_variable gives a factory's output that
    # the tape holds an extra recorded ``detach``, so the two graphs would not align value by value.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (_InPlace is in training mode: no dropout or batch norm in it)
        released = record(m, args, kwargs, post=post, release=_all_but_factories)
        held = record(m, args, kwargs, post=post)
    assert [n.op for n in released.nodes] == [n.op for n in held.nodes]
    views = [v for v in released.values if v.producer is not None and v.producer.packet in _VIEWS and v.data is None]
    assert len(views) > 5, "no view was released"
    compared = 0
    for v, w in zip(released.values, held.values):
        assert (v.shape, v.dtype, v.strides) == (w.shape, w.dtype, w.strides)
        if v.producer is not None and v.data is None and w.data is not None:
            t = v.tensor
            assert torch.equal(t, w.data) and t.stride() == w.data.stride(), v
            compared += 1
    assert compared > len(views)


def test_untracked_alias_write_into_a_released_tensor_is_refused():
    # `y.detach().clamp_()` into an activation that requires grad: refused as when the tape holds y (autograd
    # keeps y's old derivative for the new content), although the released y is no longer the tape's.
    from relprop.trace import TraceError

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x) * 2
            y.detach().clamp_(min=0)
            return y.sum(1)

    for policy in (None, _all):
        with pytest.raises(TraceError, match="alias autograd does not track"):
            record(M().eval(), (torch.randn(3, 4),), {}, release=policy)
