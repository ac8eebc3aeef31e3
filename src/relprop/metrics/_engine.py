"""The one perturbation engine behind pixel flipping, region perturbation, ABPC, insertion/deletion
and the token metrics.

A *schedule* says at which step each input element is replaced (``step_of_elem[b, e]``; a value
``>= n_steps`` means never). :func:`evaluate_steps` builds the ``B * (S + 1)`` perturbed copies on the
model's device, a chunk at a time with one masked ``torch.where``, and evaluates each chunk in one
forward pass; copies identical to the previous step are not evaluated again. How many copies a chunk
holds is the caller's ``batch_size`` or measured in the call (:mod:`._chunks`). Scores stay on the
device until the end: the loop syncs with the host only while it measures chunk sizes.
:func:`run_schedule` goes from attributions to curves: units, ranking, schedule, baseline, evaluation.
The public functions in :mod:`.perturbation` and :mod:`.tokens` only choose the units, the schedule
and how to shape the result.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ._chunks import MAX_START, ChunkPlan
from ._units import Units, rank_units, step_of_elements
from ._utils import check_target_range, forward_on_device, model_device, progress_bar, synchronize
from .baselines import BaselineLike, Fill, drifting_mean, resolve

#: ``fn(perturbed_inputs, sample_rows) -> logits``: inputs and rows on the evaluation device, logits
#: left there; rows index the original batch (for side inputs such as a text model's attention mask).
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: a chunk of ``(sample, step)`` copies that did not fit in the device's memory
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
#: elements per row block when finding the steps that change nothing
_BLOCK_ELEMENTS = 1 << 24
#: a chunk whose samples have at least this many copies each on average builds each sample's copies from
#: its one row (broadcast); shorter runs gather the rows instead (fewer, larger ops). Same values either way.
_MIN_RUN = 4
#: ATen's grain size (``at::internal::GRAIN_SIZE``): element-wise ops over fewer elements stay on one thread
_GRAIN = 32768


def _runs(starts: list[int], pos: int, n: int) -> list[tuple[int, int, int]]:
    """``(sample, first, end)`` of each sample's copies among pairs ``pos .. pos + n`` (``starts[s]``: where
    sample ``s``'s copies begin; the pairs are sorted by sample)."""
    end = pos + n
    s = bisect.bisect_right(starts, pos) - 1
    out = []
    while pos < end:
        while starts[s + 1] <= pos:  # samples with no copies left to evaluate
            s += 1
        hi = min(end, starts[s + 1])
        out.append((s, pos, hi))
        pos = hi
    return out


def evaluation_device(model, x: torch.Tensor) -> torch.device:
    """Where the copies are built and evaluated: the model's device (the inputs' for a plain callable)."""
    return model_device(model) if isinstance(model, torch.nn.Module) else x.device


def model_forward(model, device: torch.device) -> ForwardFn:
    """A float-input model as a :data:`ForwardFn` (no gradients, scores left on ``device``)."""
    return lambda xp, rows: forward_on_device(model, xp, device)


@dataclass
class Curves:
    """Target logit, target probability and argmax prediction per copy: ``(B, n_steps + 1)`` each;
    ``batch_size`` the copies per forward pass most of the work ran at."""

    logit: torch.Tensor
    prob: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    baseline: str = ""
    batch_size: int = 0


def evaluate_steps(
    fn: ForwardFn,
    x: torch.Tensor,
    step_of_elem: torch.Tensor,
    n_steps: int,
    fill: Fill,
    target: torch.Tensor | None,
    batch_size: int | None,
    progress: bool = False,
    desc: str = "",
    insertion: bool = False,
    device: torch.device | None = None,
) -> Curves:
    """Evaluate the model on every ``(sample, step)`` copy.

    Copy ``k`` of sample ``b`` has element ``e`` replaced by the fill iff ``step_of_elem[b, e] < k``
    (``k = 0..n_steps``). With ``insertion`` the roles flip: the copy starts from the fill and gets
    the input back in the same order. ``batch_size``: copies per forward pass, ``None`` to measure the
    fastest (:class:`~._chunks.ChunkPlan`). Everything runs on ``device`` (default: the inputs').
    Results are on the CPU.
    """
    dev = x.device if device is None else torch.device(device)
    b = x.shape[0]
    feat_shape = tuple(x.shape[1:])
    xf = x.reshape(b, -1).to(dev)
    n_points = n_steps + 1
    se_all = step_of_elem.to(dev, torch.int16 if n_points < 32000 else torch.int32)  # less memory traffic
    fill = Fill(fill.kind, fill.value.to(dev))

    def fill_values(rows: torch.Tensor | slice, se: torch.Tensor) -> torch.Tensor:
        return fill.values(rows, se, n_steps, x.dtype)

    # Steps that change nothing (e.g. replacing background pixels that already equal the baseline)
    # give the same copy as the previous step: evaluate only copies that differ, reuse the rest.
    needed = torch.ones(b, n_points, dtype=torch.bool, device=dev)
    if n_steps:
        changes = torch.zeros(b, n_points, dtype=torch.int64, device=dev)
        block = max(1, _BLOCK_ELEMENTS // max(1, xf.shape[1]))
        for sl in range(0, b, block):
            rows = torch.arange(sl, min(b, sl + block), device=dev)
            se = se_all[rows]
            diff = fill_values(rows, se) != xf[rows]
            changes[rows] = torch.zeros(len(rows), n_points, dtype=torch.int64, device=dev).scatter_add_(
                1, se.long().clamp(max=n_steps), diff.long()
            )
        needed[:, 1:] = changes[:, :n_steps] > 0
    logits = torch.zeros(b, n_points, dtype=torch.float64, device=dev)
    probs = torch.zeros(b, n_points, dtype=torch.float64, device=dev)
    preds = torch.zeros(b, n_points, dtype=torch.long, device=dev)

    def record(out: torch.Tensor, rows: torch.Tensor, ki: torch.Tensor | int, t: torch.Tensor) -> None:
        logits[rows, ki] = out.gather(1, t[:, None])[:, 0].to(torch.float64)
        probs[rows, ki] = torch.softmax(out, dim=1).gather(1, t[:, None])[:, 0].to(torch.float64)
        preds[rows, ki] = out.argmax(1)

    # explain the predicted class: the clean input's argmax, found first; its scores are copy 0's
    # (with insertion, copy 0 is all fill: evaluated with the rest)
    explained = target is None
    if explained and not insertion:
        needed[:, 0] = False
    # the one host sync outside measuring: which copies there are. The pairs come sorted by sample;
    # starts[s] is where sample s's copies begin among them.
    needed_host = needed.cpu()
    pairs = needed_host.nonzero().to(dev)
    starts = [0, *torch.cumsum(needed_host.sum(1), 0).tolist()]
    plan = ChunkPlan(pairs.shape[0], batch_size, start=b, features=xf.shape[1])
    if target is None:
        tdev = torch.zeros(b, dtype=torch.long, device=dev)
    else:
        tdev = target.to(dev)
    checked = target is None
    clock = time.process_time if dev.type == "cpu" else time.perf_counter  # see ._chunks

    buf: torch.Tensor | None = None
    # copies per op when building a run: ops over fewer elements than ATen's grain size run on the calling
    # thread, so on a CPU the copies are built without waking the thread pool between forward passes (on a
    # loaded machine each wake-up costs a thread's time slice); larger rows are built a run per op
    piece = _GRAIN // max(1, xf.shape[1]) if dev.type == "cpu" else 0

    def run_chunk(pos: int, n: int, rows: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        nonlocal buf
        runs = _runs(starts, pos, n)
        if len(runs) * _MIN_RUN > n:  # short runs: gather the rows' inputs
            se = se_all[rows]
            mask = se < ki[:, None]
            base, fv = xf[rows], fill_values(rows, se)
            xp = torch.where(mask, base, fv) if insertion else torch.where(mask, fv, base)
        else:  # long runs: each sample's copies from its one row, broadcast (no gathered copies of it)
            if buf is None or buf.shape[0] < n:  # one buffer, rewritten whole by every chunk
                buf = torch.empty(n, xf.shape[1], dtype=xf.dtype, device=dev)
            xp = buf[:n]
            for s, lo, hi in runs:
                se, base = se_all[s : s + 1], xf[s : s + 1]
                fv = fill_values(slice(s, s + 1), se)
                gone, kept = (base, fv) if insertion else (fv, base)
                step = piece if piece > 1 else hi - lo
                for i in range(lo - pos, hi - pos, step):
                    j = min(i + step, hi - pos)
                    torch.where(se < ki[i:j, None], gone, kept, out=xp[i:j])
        return fn(xp.reshape(-1, *feat_shape), rows)

    with progress_bar(pairs.shape[0] + (b if explained else 0), progress, desc) as bar:
        if explained:
            size = batch_size or min(b, MAX_START)
            for sl in range(0, b, size):
                rows = torch.arange(sl, min(b, sl + size), device=dev)
                out = fn(xf[rows].reshape(-1, *feat_shape), rows)
                tdev[rows] = out.argmax(1)
                if not insertion:
                    record(out, rows, 0, tdev[rows])
                bar.update(len(rows))
        pos = 0
        while pos < plan.total:
            n = plan.next()
            timed = plan.measuring
            if timed:
                synchronize(dev)
                t0 = clock()
            too_big = False
            rows, ki = pairs[pos : pos + n, 0], pairs[pos : pos + n, 1]
            try:
                out = run_chunk(pos, n, rows, ki)
            except _OOM:
                if not plan.too_big():
                    raise
                too_big = True  # the chunk's tensors are freed with the exception, after this block
            if too_big:
                buf = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if not checked and target is not None:
                check_target_range(target, out.shape[1])
                checked = True
            record(out, rows, ki, tdev[rows])
            seconds = None
            if timed:
                synchronize(dev)
                seconds = clock() - t0
            plan.record(n, seconds)
            pos += n
            bar.update(n)
    src = torch.where(
        needed, torch.arange(n_points, device=dev).expand(b, n_points), torch.zeros((), dtype=torch.long, device=dev)
    )
    src = torch.cummax(src, dim=1).values
    return Curves(
        logits.gather(1, src).cpu(),
        probs.gather(1, src).cpu(),
        preds.gather(1, src).cpu(),
        tdev.cpu(),
        batch_size=plan.size,
    )


def run_schedule(
    fn: ForwardFn,
    x: torch.Tensor,
    scores: np.ndarray,
    units: Units,
    order: str,
    step_of_rank: np.ndarray,
    n_steps: int,
    baseline: BaselineLike | Fill,
    target: torch.Tensor | None,
    batch_size: int | None,
    *,
    device: torch.device | None = None,
    seed: int | None = 0,
    blur_sigma: float = 2.0,
    noise_std: float | None = None,
    insertion: bool = False,
    progress: bool = False,
    desc: str = "",
) -> Curves:
    """Rank ``units`` by ``scores`` (``(B, U)``) in ``order``, replace them by ``baseline`` on the schedule
    ``step_of_rank`` (rank -> step) and evaluate every step.

    Insertion starts from the baseline; a drifting ``"mean"`` then is the clean input's mean. The ranking
    is NumPy's (ties break as Quantus breaks them), once per call; the copies are built on ``device``.
    """
    dev = x.device if device is None else torch.device(device)
    xc = x.detach().cpu()  # baselines are made once per call on the CPU (a callable gets CPU inputs)
    rank = rank_units(scores, order, seed)
    step_of_unit, soe = step_of_elements(rank, step_of_rank, units.uid, dev)
    fill: Fill | None
    if isinstance(baseline, Fill):
        desc_b, fill = "fill", baseline
    else:
        desc_b, fill = resolve(baseline, xc, blur_sigma=blur_sigma, noise_std=noise_std, seed=seed)
    if fill is None:
        if insertion:
            fill = Fill("scalar", xc.reshape(x.shape[0], -1).mean(1))
        else:
            fill = drifting_mean(xc, units, step_of_unit, n_steps)
    if insertion:
        fill = fill.as_tensor(x.shape[0], int(np.prod(x.shape[1:])))
    curves = evaluate_steps(
        fn, x, soe, n_steps, fill, target, batch_size, progress, desc, insertion=insertion, device=dev
    )
    curves.baseline = desc_b
    return curves


def area_between(morf: torch.Tensor, lerf: torch.Tensor) -> torch.Tensor:
    """The one ABPC: per-sample ``sum`` of the trapezoid gap between the LeRF and MoRF score curves over
    steps ``k = 1..S`` (``dx = 1``), i.e. Quantus' ``auc(MoRF drops) - auc(LeRF drops)``. Both curves are
    ``(B, S + 1)`` with the clean score at ``k = 0``."""
    from ._utils import trapezoid

    return trapezoid((lerf - morf)[:, 1:].to(torch.float64))


def area_between_per_step(morf: torch.Tensor, lerf: torch.Tensor) -> torch.Tensor:
    """:func:`area_between` divided by the number of trapezoid intervals: the mean gap between the
    curves, comparable across step counts (a single step: the gap after it)."""
    gaps = (lerf - morf)[:, 1:].to(torch.float64)
    if gaps.shape[1] < 2:
        return gaps[:, 0] if gaps.shape[1] else torch.zeros(gaps.shape[0], dtype=torch.float64)
    return area_between(morf, lerf) / (gaps.shape[1] - 1)
