"""What a plan's signature walks: every module under each of its names, every parameter and buffer, once per call.

``plan._signature`` walks the modules once (their flags and hooks, their parameters and buffers together); these
tests pin what that walk must see, so that a shortcut that skips a shared module, a tied parameter or the buffers
goes red, and check that each kind of change still makes the plan record again, with the same result as
``relprop.explain`` on the same batch.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

import relprop

mod = importlib.import_module("relprop.plan")


class _Shared(nn.Module):
    """A submodule used under two names, a parameter tied under two names, a buffer read by the forward, a None
    buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a  # the same module under a second name
        self.head = nn.Linear(6, 3)
        self.tail = nn.Linear(6, 3)
        self.tail.weight = self.head.weight  # one parameter under two names
        self.register_buffer("scale", torch.full((6,), 0.5))
        self.register_buffer("nothing", None)

    def forward(self, x):
        h = torch.relu(self.a(x) * self.scale)
        return self.head(self.b(h)) + self.tail(h)


def _same(got, want) -> None:
    assert torch.equal(got.attributions, want.attributions)


def test_signature_sees_every_name_of_every_parameter_buffer_and_module():
    torch.manual_seed(0)
    m = _Shared().eval()
    x = torch.randn(2, 6)
    sig, live = mod._signature(m, (x,), {}, None)
    names = [n for n, _ in m.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in m.named_buffers(remove_duplicate=False)]
    assert sorted(live) == sorted(names)  # tied and shared names included, the None buffer not
    assert {"b.weight", "tail.weight", "scale"} <= set(live)
    assert all(live[n] is t for n, t in [*m.named_parameters(remove_duplicate=False), *m.named_buffers()])
    assert sorted(t[0] for t in sig[2]) == sorted(names)
    ids = [t[0] for t in sig[1]]
    assert set(ids) == {id(s) for s in m.modules()}
    assert ids.count(id(m.a)) == 2  # under both of its names


def test_each_change_the_walk_sees_records_again_with_explains_result():
    torch.manual_seed(0)
    m = _Shared().eval()
    xs = [torch.randn(2, 6) for _ in range(6)]
    p = relprop.plan(m, xs[0], target=1, composite="epsilon")
    _same(p.explain(xs[1]), relprop.explain(m, xs[1], target=1, method="lrp", composite="epsilon"))
    assert p.rerecords == 0 and p.replays == 1
    with torch.no_grad():
        m.scale.mul_(3)  # a buffer edited in place (its version counter)
    _same(p.explain(xs[2]), relprop.explain(m, xs[2], target=1, method="lrp", composite="epsilon"))
    assert p.rerecords == 1 and "parameters or buffers" in (p.last_reason or "")
    with torch.no_grad():
        m.tail.weight.mul_(2)  # the tied parameter, edited through its second name
    _same(p.explain(xs[3]), relprop.explain(m, xs[3], target=1, method="lrp", composite="epsilon"))
    assert p.rerecords == 2 and "parameters or buffers" in (p.last_reason or "")
    m.b.register_forward_hook(lambda mod_, i, o: o * 2)  # a hook on the shared module, through its second name
    _same(p.explain(xs[4]), relprop.explain(m, xs[4], target=1, method="lrp", composite="epsilon"))
    assert p.rerecords == 3 and "modules" in (p.last_reason or "")
    _same(p.explain(xs[5]), relprop.explain(m, xs[5], target=1, method="lrp", composite="epsilon"))
    assert p.rerecords == 3 and p.last_reason is None  # unchanged since: replayed
