"""The perturbation engine builds a chunk's copies two ways: gathering each copy's sample row (short runs of
copies per sample), or from each sample's one row broadcast over its run of copies (long runs; on a CPU in
pieces below ATen's grain size). All give the same bits as each other and as a plain per-copy loop, for every fill kind, insertion, samples whose copies
all repeat the clean input (no copies to evaluate) and chunks that cut runs anywhere."""

import pytest
import torch

from relprop.metrics import _engine
from relprop.metrics.baselines import Fill

B, C, H, W, S = 6, 2, 5, 5, 9
F = C * H * W


def _model():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(C, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * H * W, 5)
    ).eval()


def _case(kind):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(B, C, H, W, generator=g)
    x[2] = 0.0  # every step of sample 2 replaces zeros by a zero fill: nothing to evaluate for it
    se = torch.randint(0, S + 2, (B, F), generator=g)
    fills = {
        "scalar": Fill("scalar", torch.zeros(B)),
        "step": Fill("step", torch.rand(B, S, generator=g)),
        "tensor": Fill("tensor", torch.rand(B, F, generator=g)),
    }
    return x, se, fills[kind]


def _copy(x, se, fill, b, k, insertion):
    """Copy k of sample b, element by element from the definition."""
    xf = x.reshape(B, F)[b]
    if fill.kind == "scalar":
        fv = fill.value[b].expand(F)
    elif fill.kind == "step":
        fv = fill.value[b][se[b].clamp(max=S - 1)]
    else:
        fv = fill.value[b]
    gone = se[b] < k
    return torch.where(gone, xf, fv) if insertion else torch.where(gone, fv, xf)


def test_runs_of_each_sample():
    starts = [0, 3, 3, 3, 10, 11]  # samples 1 and 2 have no copies
    owner = [0] * 3 + [3] * 7 + [4]
    for pos in range(11):
        for n in range(1, 12 - pos):
            got = _engine._runs(starts, pos, n)
            assert [i for s, lo, hi in got for i in range(lo, hi)] == list(range(pos, pos + n))
            assert all(owner[i] == s for s, lo, hi in got for i in range(lo, hi))
            assert all(hi > lo for _, lo, hi in got) and len({s for s, _, _ in got}) == len(got)


@pytest.mark.parametrize("kind", ["scalar", "step", "tensor"])
@pytest.mark.parametrize("insertion", [False, True])
def test_both_ways_of_building_copies_give_equal_bits(kind, insertion, monkeypatch):
    model = _model()
    x, se, fill = _case(kind)
    fn = _engine.model_forward(model, torch.device("cpu"))
    seen: dict[str, list[torch.Tensor]] = {}

    def recording(name):
        def f(xp, rows):
            seen[name].append(xp.clone())
            return fn(xp, rows)

        return f

    results = {}
    # gathered rows; whole runs per op (rows above the grain size); runs cut in pieces of 3 copies
    for name, min_run, grain in (("gather", 10**9, 1), ("runs", 0, F), ("pieces", 0, 3 * F)):
        monkeypatch.setattr(_engine, "_MIN_RUN", min_run)
        monkeypatch.setattr(_engine, "_GRAIN", grain)
        for bs in (1, 4, 7, 13, B * (S + 1)):
            key = f"{name}@{bs}"
            seen[key] = []
            results[key] = _engine.evaluate_steps(recording(key), x, se, S, fill, None, bs, insertion=insertion)
    for bs in (1, 4, 7, 13, B * (S + 1)):
        a = results[f"gather@{bs}"]
        for other in ("runs", "pieces"):
            b = results[f"{other}@{bs}"]
            for field in ("logit", "prob", "pred", "target"):
                assert torch.equal(getattr(a, field), getattr(b, field)), (bs, other, field)
            # the forward passes saw the same inputs, and every input is the copy the definition gives
            ga, gb = seen[f"gather@{bs}"], seen[f"{other}@{bs}"]
            assert len(ga) == len(gb) and all(torch.equal(p, q) for p, q in zip(ga, gb))
    copies = torch.cat(seen[f"pieces@{B * (S + 1)}"][1:]).reshape(-1, F)  # after the clean pass for the target
    needed, per_sample = [], [0] * B
    for b in range(B):
        prev = _copy(x, se, fill, b, 0, insertion)
        for k in range(S + 1):
            cur = _copy(x, se, fill, b, k, insertion)
            if (k == 0 and insertion) or (k > 0 and not torch.equal(cur, prev)):
                needed.append(cur)
                per_sample[b] += 1
            prev = cur
    assert torch.equal(copies, torch.stack(needed))
    if kind == "scalar" and not insertion:
        assert per_sample[2] == 0  # a sample without copies sits between the others' runs
