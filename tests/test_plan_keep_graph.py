"""``Plan.explain(keep_graph=True)`` holds every value, as ``relprop.explain(keep_graph=True)`` does."""

from __future__ import annotations

import torch

import relprop
from relprop.rules.attention import release_scores
from relprop.trace import record


def _dropped(graph) -> set[int]:
    return {v.index for v in graph.values if v.producer is not None and v.data is None}


def test_kept_graph_holds_what_the_release_policy_would_drop():
    from test_plan_release import _decoder, _equal

    m, _, target = _decoder()
    g = torch.Generator().manual_seed(1)
    # 32 tokens: the scores (tokens x tokens per head) outgrow q and k, so release_scores drops them
    batches = [{"input_ids": torch.randint(0, 50, (1, 32), generator=g)} for _ in range(3)]
    p = relprop.plan(m, batches[0], target=target, composite="attnlrp")
    assert p.release is release_scores
    b = batches[1]
    got = p.explain(b, keep_graph=True)
    want = relprop.explain(m, b, target=target, method="lrp", composite="attnlrp", keep_graph=True)
    _equal(got, want)
    assert got.graph is not None and want.graph is not None
    # The plan's policy drops the attention scores; a kept graph holds them, like explain's.
    released = _dropped(record(m, (), dict(b), release=release_scores))
    assert _dropped(got.graph) == _dropped(want.graph) < released
    for v in got.graph.values:
        if v.index in released - _dropped(want.graph):
            assert torch.equal(v.data, want.graph.values[v.index].data)
    assert p.last_reason == "keep_graph=True: recorded holding every value"
    # The plan's own recording is untouched: the next batch replays.
    records, replays = p.records, p.replays
    _equal(p.explain(batches[2]), relprop.explain(m, batches[2], target=target, method="lrp", composite="attnlrp"))
    assert (p.records, p.replays) == (records, replays + 1) and p.last_reason is None
