"""relprop.plan in training mode without a private autograd setter: a recording bumps the version counter
of a buffer the forward writes in place (batch norm's ``num_batches_tracked``; the write itself goes to a
private copy), and the plan tells such bumps from the user's edits by the buffer's content."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import relprop


def _train_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).train()


@pytest.fixture(autouse=True)
def _no_private_setter(monkeypatch):
    # Neither the recording nor the plan may reset the user's version counters through torch's private setter.
    def refuse(*args, **kwargs):
        raise AssertionError("torch._C._autograd._unsafe_set_version_counter called")

    monkeypatch.setattr(torch._C._autograd, "_unsafe_set_version_counter", refuse, raising=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*training mode")
        yield


def _explain(m, x):
    return relprop.explain(m, x, target=0, method="gradient")


def test_train_mode_plan_replays_across_other_recordings_with_equal_bits():
    m, x = _train_bn(), torch.randn(2, 3, 8, 8)
    nbt = m[1].num_batches_tracked
    p = relprop.plan(m, x, method="gradient", target=0)
    for i in range(3):
        b = torch.randn_like(x)
        v = nbt._version
        want = _explain(m, b)  # a recording: bumps the counter, the content stays 0
        assert nbt._version == v + 1 and int(nbt) == 0
        got = p.explain(b)
        assert torch.equal(got.attributions, want.attributions)
        assert p.rerecords == 0 and p.replays == i + 1, p.last_reason
        assert not p.replayable or p._template is not None and "1.num_batches_tracked" in p._template.bumped


def test_train_mode_verify_replays_and_finds_no_mismatch():
    m, x = _train_bn(), torch.randn(2, 3, 8, 8)
    p = relprop.plan(m, x, method="gradient", target=0, verify=True)
    for _ in range(3):
        b = torch.randn_like(x)
        assert torch.equal(p.explain(b).attributions, _explain(m, b).attributions)
    assert p.mismatches == 0 and p.rerecords == 0 and p.replays == 3, p.last_reason


def test_user_edits_of_a_bumped_buffer_or_the_running_stats_record_again():
    m, x = _train_bn(), torch.randn(2, 3, 8, 8)
    bn = m[1]
    p = relprop.plan(m, x, method="gradient", target=0)
    p.explain(x)
    assert p.replays == 1 and p.rerecords == 0
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)  # a real edit of a buffer the recordings bump: the content differs
    assert torch.equal(p.explain(x).attributions, _explain(m, x).attributions)
    assert p.rerecords == 1 and "parameters or buffers" in p.last_reason
    with torch.no_grad():
        bn.running_mean.add_(0.5)  # never bumped by a recording: any bump is an edit
    p.explain(x)
    assert p.rerecords == 2 and "parameters or buffers" in p.last_reason
    with torch.no_grad():
        bn.num_batches_tracked.add_(1).sub_(1)  # bumped, content written back: nothing a replay reads changed
    assert torch.equal(p.explain(x).attributions, _explain(m, x).attributions)
    assert p.rerecords == 2 and p.replays == 2, p.last_reason


def test_eval_mode_edits_are_still_seen_by_the_version_counter():
    m, x = _train_bn().eval(), torch.randn(2, 3, 8, 8)
    p = relprop.plan(m, x, method="lrp", target=0)
    assert p._template is not None and not p._template.bumped  # an eval forward writes nothing
    with torch.no_grad():
        m[1].running_var.mul_(1.0)  # same content, but not a tensor any recording bumps: records again
    p.explain(x)
    assert p.rerecords == 1
