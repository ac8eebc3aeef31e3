"""Concurrent use of one model: relprop never mutates it and one thread's recording never sees another's.

The interleavings are forced with barriers inside the model's forward (not left to luck): both
threads are inside their forward passes at the same time, at the same layer.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import relprop
from relprop.rules import Composite, Epsilon, Flat, base_families


class Sync(nn.Module):
    """Waits at a barrier when one is set (the test sets it only for the concurrent part)."""

    def __init__(self):
        super().__init__()
        self.barrier: threading.Barrier | None = None

    def forward(self, x):
        if self.barrier is not None:
            self.barrier.wait(timeout=30)
        return x


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), Sync(), nn.Linear(8, 8), nn.ReLU(), Sync(), nn.Linear(8, 3)).eval()


def _composite() -> Composite:
    # Rules scoped by module name: a module path recorded wrongly changes the result.
    return Composite(base_families(), first=Flat(), module_names={"3": Epsilon(0.5), "6": Epsilon(1e-3)})


def _explain(model, x):
    e = relprop.explain(model, x, target=1, method="lrp", composite=_composite(), layers=["3"])
    g = relprop.trace(model, x)
    paths = [n.module for n in g.nodes]
    return e.attributions, e.layers["3"], paths


def _set_barrier(model, barrier):
    for m in model.modules():
        if isinstance(m, Sync):
            m.barrier = barrier


def _run_threads(*fns):
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_two_threads_explaining_one_model_get_single_threaded_results():
    model = _model()
    xs = [torch.randn(4, 6), torch.randn(4, 6)]
    expected = [_explain(model, x) for x in xs]
    flags = [p.requires_grad for p in model.parameters()]
    # Each thread runs explain (2 forwards through the barriers: explain, trace) several times; the
    # barrier (2 parties) makes both threads be inside the same layers at once, every time.
    _set_barrier(model, threading.Barrier(2))
    results: dict[int, list] = {0: [], 1: []}

    def worker(i):
        def run():
            for _ in range(3):
                results[i].append(_explain(model, xs[i]))

        return run

    try:
        _run_threads(worker(0), worker(1))
    finally:
        _set_barrier(model, None)
    for i in (0, 1):
        assert len(results[i]) == 3
        for attr, layer, paths in results[i]:
            assert torch.equal(attr, expected[i][0])
            assert torch.equal(layer, expected[i][1])
            assert paths == expected[i][2]
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_frozen_parameters_stay_frozen_and_trainable_stay_trainable():
    model = _model()
    model[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    relprop.explain(model, torch.randn(2, 6), target=0, method="lrp", composite="epsilon")
    relprop.explain(model, torch.randn(2, 6), target=0, method="gradient")
    assert [p.requires_grad for p in model.parameters()] == flags


def test_training_thread_never_crashes_while_another_thread_explains():
    """A training loop on the same model keeps working (its parameters keep requires_grad)."""
    model = _model()
    x = torch.randn(4, 6)
    expected = _explain(model, x)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay, so results are comparable
    barrier = threading.Barrier(2)
    _set_barrier(model, barrier)
    steps = 6

    def train():
        for _ in range(steps):
            loss = model(torch.randn(8, 6)).pow(2).mean()  # passes the barriers together with explain
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is not None for p in model.parameters())
            opt.step()

    got: list[torch.Tensor] = []

    def explain():
        for _ in range(steps):
            e = relprop.explain(model, x, target=1, method="lrp", composite=_composite(), layers=["3"])
            got.append(e.attributions)

    try:
        _run_threads(train, explain)
    finally:
        _set_barrier(model, None)
    assert len(got) == steps and all(torch.equal(a, expected) for a in got)
    assert all(p.requires_grad for p in model.parameters())


class Mix(nn.Module):
    """Records one op, lets the other thread enter a module of the same model, records another op."""

    def __init__(self):
        super().__init__()
        self.barriers: list[threading.Barrier] | None = None

    def forward(self, x):
        y = x * 2
        if self.barriers is not None:
            self.barriers[0].wait(timeout=30)  # the other thread now enters ``aux``...
            self.barriers[1].wait(timeout=30)  # ...and is inside it
        z = y + 1  # recorded while the other thread is inside ``aux``
        if self.barriers is not None:
            self.barriers[2].wait(timeout=30)  # only now may it leave ``aux``
        return z


class Aux(nn.Module):
    def __init__(self):
        super().__init__()
        self.barriers: list[threading.Barrier] | None = None

    def forward(self, x):
        if self.barriers is not None:
            self.barriers[1].wait(timeout=30)
            self.barriers[2].wait(timeout=30)
        return x


class MixNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.mix, self.aux, self.head = nn.Linear(4, 4), Mix(), Aux(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.mix(self.lin(x)))


def test_module_hooks_ignore_other_threads():
    """Another thread inside a module of the same model while this one records: no op gets its path."""
    model = MixNet().eval()
    x = torch.randn(2, 4)
    expected = [n.module for n in relprop.trace(model, x).nodes]
    assert [n.module for n in relprop.trace(model, x).nodes if n.packet in ("mul", "add")] == ["mix", "mix"]
    barriers = [threading.Barrier(2) for _ in range(3)]
    model.mix.barriers = model.aux.barriers = barriers

    def side():
        barriers[0].wait(timeout=30)
        with torch.no_grad():
            model.aux(torch.zeros(1))

    got = []
    try:
        _run_threads(side, lambda: got.append([n.module for n in relprop.trace(model, x).nodes]))
    finally:
        model.mix.barriers = model.aux.barriers = None
    assert got == [expected]


@pytest.mark.parametrize("method", ["gradient", "lrp"])
def test_token_model_with_frozen_weights_is_not_mutated(method):
    torch.manual_seed(0)
    emb = nn.Embedding(20, 8)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(8 * 5, 3)).eval()
    model.requires_grad_(False)
    ids = torch.randint(0, 20, (2, 5))
    opts = {"composite": "epsilon"} if method == "lrp" else {}
    e = relprop.explain(model, ids, target=1, method=method, **opts)
    assert not any(p.requires_grad for p in model.parameters())
    # gradient at the embedding output, summed over features (relprop's token convention)
    out = emb(ids).detach().requires_grad_(True)
    ref = torch.autograd.grad(model[2](model[1](out))[:, 1].sum(), out)[0].sum(-1)
    if method == "gradient":
        torch.testing.assert_close(e.attributions, ref)
    else:
        assert e.attributions.shape == ids.shape
