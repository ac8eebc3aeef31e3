"""Notes of released attention scores (``Value.normal``) equal the plain computation they stand for.

* ``rules.attention._normal_by_parts`` (exponent bits) answers as the plain test ``isfinite(x) & |x| >= tiny``:
  zeros, subnormals, infinities, NaN payloads, in every slice, float32 and float64.
* Every note a recording or a plan's replay takes equals that test of the value's own contents (recomputed from
  its producer), also where a later op of the forward writes into the memory (notes are taken where the data is
  made, not where it is freed).
* AttnLRP with the notes equals the same pass without them (the recompute path) and a recording that holds every
  score, bit for bit, zero sets included; a plan recorded on a batch without zero sets and replayed on one with
  them (and the other way round) equals a fresh recording of that batch: a replay never uses the recording's
  notes.
* Without cheap read-backs (a GPU: a host sync each) no note is taken; taking notes records no op.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import relprop
from relprop.rules import attention, base
from relprop.trace import record

DTYPES = [torch.float32, torch.float64]
_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _plain(x: torch.Tensor) -> bool:
    """The definition: every element finite, with ``|x|`` at least the smallest normal number."""
    return bool(torch.isfinite(x).all()) and bool((x.abs() >= torch.finfo(x.dtype).tiny).all())


def _specials(dtype: torch.dtype) -> list[torch.Tensor]:
    fi = torch.finfo(dtype)
    zero, one = torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)
    tiny = torch.tensor(fi.tiny, dtype=dtype)
    values = [
        zero,
        -zero,
        tiny,
        -tiny,
        torch.nextafter(tiny, zero),  # the largest subnormal
        -torch.nextafter(tiny, zero),
        torch.nextafter(zero, one),  # the smallest subnormal
        torch.nextafter(tiny, one),
        torch.tensor(fi.max, dtype=dtype),
        torch.tensor(fi.min, dtype=dtype),
        torch.tensor(float("inf"), dtype=dtype),
        torch.tensor(float("-inf"), dtype=dtype),
        torch.tensor(float("nan"), dtype=dtype),
        -torch.tensor(float("nan"), dtype=dtype),
    ]
    bits, mant = (32, 23) if dtype == torch.float32 else (64, 52)
    ones = ((1 << (bits - 1 - mant)) - 1) << mant  # the exponent field, all ones
    for pattern in (ones | (1 << (mant - 1)) | 1, ones | 1):  # NaN payloads: quiet, signalling
        values.append(torch.tensor(pattern, dtype=_INT[dtype]).view(dtype))
    return values


@pytest.mark.parametrize("dtype", DTYPES)
def test_exponent_bits_check_equals_the_plain_test(dtype):
    torch.manual_seed(0)
    specials = _specials(dtype)
    assert sum(_plain(v.view(1)) for v in specials) == 5  # +-tiny, just above tiny, +-max
    assert sum(bool(torch.isnan(v)) for v in specials) == 4
    seen = set()
    for n in (1, 7, 64, 1001):
        for size in (1, 3, 64, 1 << 18):  # elements per slice
            for pos in sorted({0, n // 2, min(size, n - 1), n - 1}):
                for v in specials:
                    x = torch.randn(n, dtype=dtype).add_(torch.sign(torch.randn(n, dtype=dtype)) * 0.1)
                    x[pos] = v
                    want = _plain(x)
                    seen.add(want)
                    assert attention._normal_by_parts(x, size) == want, (n, size, pos, v)
            assert attention._normal_by_parts(torch.randn(n, dtype=dtype) + 5, size)
    assert seen == {True, False}
    # random bit patterns, exponent fields drawn from the edges (0, 1, max - 1, max) and the middle
    bits, mant = (32, 23) if dtype == torch.float32 else (64, 52)
    g = torch.Generator().manual_seed(1)
    top = (1 << (bits - mant - 1)) - 1
    for _ in range(300):
        exps = torch.tensor([0, 1, top - 1, top, top // 2])[torch.randint(0, 5, (5,), generator=g)]
        if torch.rand((), generator=g) < 0.5:
            exps = torch.randint(1, top, (5,), generator=g)  # all normal: the True answer, often
        m = torch.randint(0, 1 << min(mant, 62), (5,), generator=g, dtype=torch.int64)
        sign = torch.randint(0, 2, (5,), generator=g, dtype=torch.int64)
        raw = (sign << (bits - 1)) | (exps.to(torch.int64) << mant) | m
        if bits == 32:
            raw = torch.where(raw >= 2**31, raw - 2**32, raw)
        x = raw.to(_INT[dtype]).view(dtype)
        assert attention._normal_by_parts(x, 2) == _plain(x), x
    assert attention._normal_by_parts(torch.empty(0, dtype=dtype))


class _Attn(nn.Module):
    """Eager attention as Hugging Face writes it; q = k = the input per head (identity weights), so a batch can set
    scores to exactly 0 with nonzero factors. ``overwrite``: the masked scores are written over in place after the
    softmax (their memory then no longer holds them when the replay frees them: a zero there is 1 by then)."""

    def __init__(self, d=8, heads=2, mask="causal", overwrite=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        with torch.no_grad():
            self.q.weight.copy_(torch.eye(d))
            self.k.weight.copy_(torch.eye(d))
        self.heads, self.mask, self.overwrite = heads, mask, overwrite

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        w = torch.matmul(q, k.transpose(2, 3)) * (d // self.heads) ** -0.5
        fill = float("-inf") if self.mask == "inf" else torch.finfo(x.dtype).min
        z = w + torch.full((t, t), fill, dtype=x.dtype).triu(1)[None, None]
        a = torch.softmax(z, dim=-1)
        if self.overwrite:  # (a plan's replay runs this in place too: z's memory, z's last use)
            z.add_(1.0)
        out = torch.matmul(a, v)
        return out.transpose(1, 2).reshape(b, t, d).sum(1)


T = 24  # scores (2 x 2 x 24 x 24) outweigh q and k: released


def _batch(dtype, kind, seed=0):
    """``normal``: no zero set; ``zero``: q_3 . k_2 = 0 exactly (nonzero factors); ``subnormal``: a row of tiny
    inputs, subnormal scores; ``nan``: a NaN input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 8, dtype=dtype, generator=g).add_(0.5)
    if kind == "zero":
        x[0, 3, :4] = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=dtype)
        x[0, 2, :4] = torch.tensor([1.0, 1.0, 0.0, 0.25], dtype=dtype)
    elif kind == "subnormal":
        x[1, 5] = torch.finfo(dtype).tiny / 8
    elif kind == "nan":
        x[1, 4, 2] = float("nan")
    return x


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(_INT[a.dtype]), b.view(_INT[b.dtype]))


def _noted(graph) -> list:
    return [v for v in graph.values if v.normal is not None]


def _check_notes(graph) -> int:
    """Every note equals the plain test of the value's contents (recomputed from its producer: ``v.tensor``)."""
    notes = _noted(graph)
    for v in notes:
        held = v.data
        assert v.normal == _plain(v.tensor), v
        v.data = held  # (leave the graph as it was)
    return len(notes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "zero", "subnormal", "nan"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_notes_equal_the_contents_recorded_and_replayed(dtype, kind, overwrite):
    torch.manual_seed(0)
    model = _Attn(overwrite=overwrite).to(dtype).eval()
    x = _batch(dtype, kind)
    graph = record(model, (x,), {}, release=attention.release_scores)
    assert _check_notes(graph) == 2  # q @ k^T and the masked scores
    expected = {"normal": [True, True], "zero": [False, False], "subnormal": [False, False], "nan": [False, False]}
    assert [v.normal for v in _noted(graph)] == expected[kind]
    # a replay on another batch notes its own values, right after each op ran
    p = relprop.plan(model, _batch(dtype, "normal", seed=3), target=0, composite="attnlrp")
    mod = sys.modules["relprop.plan"]
    _, live = mod._signature(model, (x,), {}, None)
    notes: dict = {}
    env, why = mod._replay(p._template, (x,), {}, live, notes)
    assert why is None and len(notes) == 2
    replayed = mod._instantiate(p._template, env, notes)
    assert _check_notes(replayed) == 2
    assert [v.normal for v in _noted(replayed)] == expected[kind]
    assert not _noted(mod._instantiate(p._template, env))  # no notes given: none (never the recording's)


def _explain_both(monkeypatch, model, x, **kw):
    """AttnLRP with the notes, then with note taking off (the recompute path); how often z1 was recomputed."""
    recomputed = []
    real = attention.ScoreChain._recomputed_z1
    monkeypatch.setattr(attention.ScoreChain, "_recomputed_z1", lambda self: recomputed.append(1) or real(self))
    noted = relprop.explain(model, x, target=0, method="lrp", composite="attnlrp", **kw).attributions
    with_notes = len(recomputed)
    monkeypatch.setattr(attention, "note_normal", lambda t: None)
    plain = relprop.explain(model, x, target=0, method="lrp", composite="attnlrp", **kw).attributions
    return noted, plain, with_notes, len(recomputed) - with_notes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "zero", "subnormal"])  # (a NaN input is refused by explain)
@pytest.mark.parametrize("mask", ["causal", "inf"])
def test_explanations_with_notes_equal_the_recompute_path(monkeypatch, dtype, kind, mask):
    from relprop.methods.core import run_backward
    from relprop.rules.composites import resolve_composite

    torch.manual_seed(0)
    model = _Attn(mask=mask).to(dtype).eval()
    x = _batch(dtype, kind)
    noted, plain, recomputed_noted, recomputed_plain = _explain_both(monkeypatch, model, x)
    assert _same_bits(noted, plain)
    assert recomputed_plain >= 1  # without notes, q @ k^T is recomputed to find the zero sets
    # notes saying normal (no -inf mask either): nothing to redo; else the same path as without notes
    assert recomputed_noted == (0 if kind == "normal" and mask == "causal" else recomputed_plain)

    def hold_all(m, args, kwargs, post=None, **_):
        return record(m, args, kwargs, post=post)

    kw = dict(target=0, composite=resolve_composite("attnlrp", {}), method="lrp", times_output=True)
    held = run_backward(model, x, recorder=hold_all, **kw).attributions
    assert _same_bits(noted, held)
    assert torch.isfinite(noted).all() and not torch.equal(noted, torch.zeros_like(noted))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first,then", [("normal", "zero"), ("zero", "normal"), ("normal", "subnormal")])
def test_a_replay_takes_its_own_notes(dtype, first, then):
    torch.manual_seed(0)
    model = _Attn().to(dtype).eval()
    p = relprop.plan(model, _batch(dtype, first), target=0, composite="attnlrp")
    x = _batch(dtype, then, seed=1)
    got = p.explain(x).attributions
    assert p.replays == 1 and p.rerecords == 0
    want = relprop.explain(model, x, target=0, method="lrp", composite="attnlrp").attributions
    assert _same_bits(got, want)
    # the recording's notes would be wrong here: the explanation with them differs (the test can fail)
    if first == "normal" and then == "zero":
        stale = _with_template_notes(p, model, x)
        assert not _same_bits(stale, want)


def _with_template_notes(p, model, x):
    """The plan's explanation of ``x`` had the replay copied the recording's notes (the defect this guards)."""
    mod = sys.modules["relprop.plan"]
    real = mod._instantiate

    def copying(tpl, env, notes=None):
        g = real(tpl, env, notes)
        for v, old in zip(g.values, tpl.graph.values):
            v.normal = old.normal
        return g

    mod._instantiate = copying
    try:
        return p.explain(x).attributions
    finally:
        mod._instantiate = real


def test_qwen2_plan_with_notes_equals_explain(monkeypatch):
    pytest.importorskip("transformers")
    import model_zoo

    torch.manual_seed(0)
    model = model_zoo.qwen2()
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    target = lambda out: out.logits[:, -1, 3]  # noqa: E731
    p = relprop.plan(model, {"input_ids": ids}, target=target, method="lrp", composite="attnlrp")
    recomputed = []
    real = attention.ScoreChain._recomputed_z1
    monkeypatch.setattr(attention.ScoreChain, "_recomputed_z1", lambda self: recomputed.append(1) or real(self))
    for seed in (1, 2):
        other = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(seed))
        got = p.explain({"input_ids": other}).attributions["input_ids"]
        want = relprop.explain(model, {"input_ids": other}, target=target, method="lrp", composite="attnlrp")
        assert _same_bits(got, want.attributions["input_ids"])
    assert p.replays == 2 and not recomputed  # every layer's scores noted normal: no bmm recomputed
    monkeypatch.setattr(attention, "note_normal", lambda t: None)
    off = relprop.explain(model, {"input_ids": other}, target=target, method="lrp", composite="attnlrp")
    assert _same_bits(off.attributions["input_ids"], got) and len(recomputed) == 2  # one per layer


def test_no_notes_without_cheap_reads_and_no_recorded_ops(monkeypatch):
    torch.manual_seed(0)
    model = _Attn().eval()
    x = _batch(torch.float32, "normal")
    plain = record(model, (x,), {})
    graph = record(model, (x,), {}, release=attention.release_scores)
    assert [n.op_name for n in graph.nodes] == [n.op_name for n in plain.nodes]  # the check records nothing
    assert len(_noted(graph)) == 2
    want = relprop.explain(model, x, target=0, method="lrp", composite="attnlrp").attributions
    monkeypatch.setattr(base, "cheap_read", lambda t: False)  # as on a GPU: a read-back would be a host sync
    assert not _noted(record(model, (x,), {}, release=attention.release_scores))
    p = relprop.plan(model, x, target=0, composite="attnlrp")
    got = p.explain(x).attributions
    assert p.replays == 1 and _same_bits(got, want)
