"""The metrics of one model x method cell, per example, from :data:`relprop.report.scores.METRICS`.

Everything here calls :mod:`relprop.metrics` (the one perturbation engine; text models through
:func:`relprop.metrics.token_perturbation`), keeps every per-example value and reports the
perturbation settings it used, so the report can show them next to the numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .scores import METRICS

ExplainFn = Callable[[torch.nn.Module, Any, torch.Tensor], torch.Tensor]


def _list(t) -> list[float | None]:
    out = []
    for v in torch.as_tensor(t, dtype=torch.float64).reshape(-1).tolist():
        out.append(v if math.isfinite(v) else None)
    return out


def _pad(values: list, n: int) -> list:
    return list(values) + [None] * (n - len(values))


def not_run(settings) -> dict[str, str]:
    """Metric groups the settings switch off -> why, in words the report and the terminal show (a check
    that did not run is said to be off, not shown as an empty column)."""

    def get(name: str, default=None):
        return settings.get(name, default) if isinstance(settings, dict) else getattr(settings, name, default)

    out: dict[str, str] = {}
    if not get("sensitivity", True) or get("sensitivity_samples", 1) <= 0:
        out["sensitivity"] = (
            "the class-sensitivity check was not run: sensitivity_samples is 0 (--sensitivity-samples 0)"
        )
    why = None
    if get("randomisation_samples", 1) <= 0:
        why = "randomisation_samples is 0 (--randomisation-samples 0)"
    elif get("randomisation_layers", 1) <= 0:
        why = "randomisation_layers is 0 (--randomisation-layers 0)"
    elif not get("randomisation", True):
        why = "Settings.randomisation is False"
    if why:
        out["randomisation"] = f"the randomisation check was not run: {why}"
    return out


def wanted_groups(settings) -> set[str]:
    """The metric groups a cell computes (every group but those :func:`not_run` names)."""
    return {m.group for m in METRICS} - set(not_run(settings))


#: perturbed image copies per forward pass of compare's metrics. Kept at 256: at 1 torch thread the explain
#: batch size (32) ran 1.04x the bare forward passes on the zoo default's models where 256 ran 0.91-1.66x
#: (bench/bench_metrics.py --zoo-chunks), but the whole default demo at 2 threads on a loaded machine took
#: more CPU time with it (1,067 s vs 648 s), so the switch is not shown to pay; measure on a quiet machine.
IMAGE_COPIES = 256


def image_perturbation(
    module,
    x: torch.Tensor,
    attr: torch.Tensor,
    target: torch.Tensor,
    s,
    progress: bool = False,
    rows: dict | None = None,
    examples: list[int] | None = None,
    chunk: int | None = None,
) -> dict:
    """ABPC (region perturbation, MoRF vs LeRF) and insertion/deletion on an image batch.

    ``rows``: filled with the per-example curves (``morf``, ``lerf``, ``insertion``, ``deletion``) whose
    means are the returned curves, so that a sharded run (:mod:`.distributed`) can average them in order.
    ``examples``: the data index of each row (default: the row); the ``noise`` baseline draws each
    example's noise from (``s.seed``, its index), so a shard of the batch draws what the whole batch does.
    ``chunk``: perturbed copies per forward pass, by default :data:`IMAGE_COPIES` (fixed, so the numbers repeat
    bit for bit; recorded as ``perturbation["copies_per_pass"]``)."""
    from .. import metrics
    from ..metrics.baselines import example_seeds
    from ..metrics.baselines import noise as draw_noise

    seeds = example_seeds(s.seed, range(x.shape[0]) if examples is None else examples)

    def fill(name, part: slice):
        if not (isinstance(name, str) and name.lower() == "noise"):
            return name

        def noise(xx: torch.Tensor) -> torch.Tensor:
            return draw_noise(xx, seeds[part]).reshape(xx.shape)

        return noise

    h, w = x.shape[-2:]
    patch = max(1, min(h, w) // s.patch_grid)
    units = math.ceil(h / patch) * math.ceil(w / patch)
    regions, steps = min(s.regions, units), min(s.steps, units)
    bs = max(1, int(s.batch_size))
    copies = IMAGE_COPIES if chunk is None else max(1, int(chunk))
    kw = dict(patch_size=patch, pad=True, batch_size=copies, progress=progress)
    # One explain batch (--batch-size examples) at a time: its perturbed copies never share a forward pass
    # with another batch's. A copy's score can depend on its place in the forward pass (CPU kernels round
    # differently at tile edges, ~1e-7), so this makes every example's values independent of the examples
    # outside its batch, and the Ray engine's shards (aligned to batches) get the single-process numbers.
    got: dict[str, list[torch.Tensor]] = {}
    for i in range(0, max(1, x.shape[0]), bs):
        r = slice(i, i + bs)
        xb, ab_, tb = x[r], attr[r], target[r]
        ab = metrics.abpc(module, xb, ab_, tb, regions=regions, baseline=fill(s.baseline, r), **kw)
        idl = metrics.insertion_deletion(
            module,
            xb,
            ab_,
            tb,
            steps=steps,
            deletion_baseline=fill(s.baseline, r),
            insertion_baseline=fill(s.insertion_baseline, r),
            **kw,
        )
        if ab.morf_curve is None or ab.lerf_curve is None or ab.per_step is None:  # abpc() always sets them
            raise RuntimeError("internal: ABPC result without its curves")
        parts = {
            "morf": ab.morf_curve,
            "lerf": ab.lerf_curve,
            "insertion": idl.insertion,
            "deletion": idl.deletion,
            "abpc": ab.per_step,
            "insertion_auc": idl.insertion_auc,
            "deletion_auc": idl.deletion_auc,
            "difference": idl.difference_per_sample,
        }
        for k, v in parts.items():
            got.setdefault(k, []).append(torch.as_tensor(v))
    c = {k: torch.cat(v) for k, v in got.items()}
    morf, lerf = c["morf"], c["lerf"]
    if rows is not None:
        rows.update(morf=morf, lerf=lerf, insertion=c["insertion"], deletion=c["deletion"])
    return {
        "per_example": {
            "abpc": _list(c["abpc"]),
            "insertion": _list(c["insertion_auc"]),
            "deletion": _list(c["deletion_auc"]),
            "insertion_minus_deletion": _list(c["difference"]),
        },
        "curves": {
            "unit": "patches",
            "region_fractions": _list(torch.arange(regions + 1, dtype=torch.float64) / units),
            "morf": _list(morf.mean(0)),
            "lerf": _list(lerf.mean(0)),
            "fractions": _list(idl.fractions),
            "insertion": _list(c["insertion"].mean(0)),
            "deletion": _list(c["deletion"].mean(0)),
        },
        "perturbation": {
            "unit": f"{patch}x{patch}-pixel patches ({math.ceil(h / patch)}x{math.ceil(w / patch)} grid)",
            "abpc": f"{regions} of {units} patches, one per step, replaced by '{s.baseline}'",
            "deletion": f"{steps} steps to all patches replaced by '{s.baseline}'",
            "insertion": f"{steps} steps from '{s.insertion_baseline}' back to the input",
            "score": "softmax probability of the explained class",
            "copies_per_pass": copies,
        },
    }


#: below this change of the explained class's probability (the report's three decimals) on every copy, the
#: perturbation curves are flat: ABPC, insertion and deletion read 0.000 / equal for any method
FLAT_TOLERANCE = 1e-3


def flat_warning(*curves: torch.Tensor) -> str | None:
    """The words the report shows when no perturbed copy moves the score: every ``(B, S + 1)`` curve (MoRF,
    LeRF, insertion) stays within :data:`FLAT_TOLERANCE` of the clean input's probability (MoRF's step 0)
    for every example. The metrics are then honest but cannot tell methods apart (a randomly initialised
    transformer gives ~1e-6), so they are flagged instead of read as a tie at 0.000."""
    if curves[0].numel() == 0:
        return None
    clean = curves[0][:, :1].to(torch.float64)
    change = max(float((c.to(torch.float64) - clean).abs().nan_to_num(0.0).max()) for c in curves)
    if change >= FLAT_TOLERANCE:
        return None
    return (
        f"the model's output does not change under perturbation (the explained class's probability moves by "
        f"{change:.1e} at most on any perturbed copy, all tokens replaced included): faithfulness metrics (ABPC, "
        f"insertion, deletion) are uninformative for this model"
    )


def flat_warnings(models: list[dict]) -> list[str]:
    """One warning per model whose cells :func:`flat_warning` flagged (``perturbation['warning']``)."""
    out = []
    for m in models:
        cells = [c for c in m.get("methods", []) if c.get("status") == "ok"]
        flagged = [c for c in cells if (c.get("perturbation") or {}).get("warning")]
        if flagged:
            out.append(f"{m.get('name')}: {flagged[0]['perturbation']['warning']}")
    return out


#: token copies per forward pass of compare's text metrics: fixed (a measured size could differ between runs)
TEXT_COPIES = 128


def text_perturbation(
    module,
    tokenizer,
    x: dict,
    attr: torch.Tensor,
    target: torch.Tensor,
    s,
    progress: bool = False,
    rows: dict | None = None,
) -> dict:
    """The same metrics on token ids: tokens replaced by the mask token (special tokens never).

    One explain batch (``s.batch_size`` texts) at a time, as :func:`image_perturbation`: a text's values never
    depend on the texts outside its batch. ``rows``: filled with the per-example curves (``morf``, ``lerf``,
    ``insertion``, ``deletion``) whose means are the returned curves (the Ray engine averages them in order)."""
    from .. import metrics
    from ..metrics.perturbation import ABPCResult, InsertionDeletionResult

    ids, mask = x["input_ids"], x["attention_mask"]
    tok = tokenizer
    fill = tok.mask_token_id if tok.mask_token_id is not None else (tok.unk_token_id or tok.pad_token_id or 0)
    special = torch.zeros_like(ids, dtype=torch.bool)
    for sid in tok.all_special_ids:
        special |= ids == sid
    bs = max(1, int(s.batch_size))
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, max(1, ids.shape[0]), bs):
        r = slice(i, i + bs)
        res = metrics.token_perturbation(
            module,
            ids[r],
            attr[r],
            target[r],
            fill_id=fill,
            attention_mask=mask[r],
            exclude=special[r],
            steps=s.steps,
            progress=progress,
            batch_size=TEXT_COPIES,
        )
        for k in ("morf", "lerf", "insertion"):
            parts.setdefault(k, []).append(getattr(res, k))
    morf, lerf, insertion = (torch.cat(parts[k]) for k in ("morf", "lerf", "insertion"))
    if rows is not None:
        rows.update(morf=morf, lerf=lerf, insertion=insertion, deletion=morf)
    ab = ABPCResult.from_curves(morf, lerf)
    idl = InsertionDeletionResult.from_curves(res.fractions, insertion, morf)
    fr = _list(res.fractions)
    flat = flat_warning(morf, lerf, insertion)
    name = tok.convert_ids_to_tokens([fill])[0] if hasattr(tok, "convert_ids_to_tokens") else str(fill)
    return {
        "per_example": {
            "abpc": _list(ab.per_step),
            "insertion": _list(idl.insertion_auc),
            "deletion": _list(idl.deletion_auc),
            "insertion_minus_deletion": _list(idl.difference_per_sample),
        },
        "curves": {
            "unit": "tokens",
            "region_fractions": fr,
            "morf": _list(morf.mean(0)),
            "lerf": _list(lerf.mean(0)),
            "fractions": fr,
            "insertion": _list(insertion.mean(0)),
            "deletion": _list(morf.mean(0)),
        },
        "perturbation": {
            "unit": "tokens (special tokens and padding never replaced)",
            "abpc": f"{s.steps} steps to all tokens replaced by {name!r}",
            "deletion": f"{s.steps} steps to all tokens replaced by {name!r}",
            "insertion": f"{s.steps} steps from all tokens {name!r} back to the text",
            "score": "softmax probability of the explained class",
            "copies_per_pass": TEXT_COPIES,
            **({"warning": flat} if flat else {}),
        },
    }


def sanity_checks(module, xf, efn: ExplainFn, target: torch.Tensor, n: int, s, rows: dict | None = None) -> dict:
    """Class sensitivity and the randomisation check, per example (``None`` where not computed).

    ``rows``: filled with the per-layer x per-example similarities (``randomisation``) behind the curve.

    The randomisation similarity compares *absolute* maps (Spearman of ``|a|``): an explanation that only
    flips its sign under randomisation stays similar and fails, as it should.
    """
    from .. import metrics

    groups = wanted_groups(s)
    per: dict[str, list] = {}
    extra: dict[str, Any] = {}
    if "sensitivity" in groups:
        k = min(s.sensitivity_samples, n)
        cs = metrics.class_sensitivity(module, xf[:k], efn, batch_size=s.batch_size)
        per["class_sensitivity"] = _pad(_list(cs.sensitivity), n)
    if "randomisation" in groups:
        k = min(s.randomisation_samples, n)
        layers = metrics.randomisable_layers(module)[-s.randomisation_layers :]
        rr = metrics.model_parameter_randomisation(module, xf[:k], efn, target[:k], layers=layers, abs=True)
        per["randomisation_similarity"] = _pad(_list(rr.similarity[-1]), n)
        if rows is not None:
            rows["randomisation"] = rr.similarity
        extra["randomisation_layers"] = list(rr.layers)
        extra["randomisation_curve"] = _list(rr.mean_similarity)
    return {"per_example": per, **extra}


def compute(
    kind: str,
    module,
    x,
    attr: torch.Tensor,
    target: torch.Tensor,
    s,
    *,
    tokenizer=None,
    sanity_module=None,
    sanity_inputs=None,
    sanity_explain: ExplainFn | None = None,
    progress: bool = False,
    examples: list[int] | None = None,
) -> dict:
    """Every metric of one cell: ``per_example`` (metric key -> list over the examples), ``curves``,
    ``perturbation`` (the settings in words) and ``metric_seconds``."""
    t0 = time.perf_counter()
    n = int(target.shape[0])
    if kind == "text":
        res = text_perturbation(module, tokenizer, x, attr, target, s, progress)
    else:
        res = image_perturbation(module, x, attr, target, s, progress, examples=examples)
    if sanity_explain is not None:
        sc = sanity_checks(sanity_module, sanity_inputs, sanity_explain, target, n, s)
        res["per_example"].update(sc.pop("per_example"))
        res.update(sc)
    res["metric_seconds"] = round(time.perf_counter() - t0, 3)
    return res


def per_batch_seconds(timing: list[tuple[int, float]]) -> list[float]:
    """Per-example explanation time from ``(batch size, seconds)`` per batch: each example gets its batch's
    time divided by the batch size. One measurement per batch, not per example: the summary gives the mean
    without an interval (``MetricSpec.ci`` False)."""
    return [t / b for b, t in timing for _ in range(b)]


def summary_of(per_example: dict[str, list], s) -> dict[str, dict]:
    """Mean, bootstrap interval and count of each metric (the numbers every table shows); no interval for
    a metric whose spec says its values are not independent measurements (explanation time)."""
    from .scores import BY_KEY, summarise_metric

    return {
        k: summarise_metric(BY_KEY[k], v, n_boot=s.bootstrap, level=s.confidence, seed=s.seed)
        for k, v in per_example.items()
        if any(x is not None for x in v)
    }


#: fewer examples than this never pass or fail the randomisation check (the interval means little)
MIN_RANDOMISATION_EXAMPLES = 5


def _verdict(summary: dict, threshold: float) -> tuple[str | None, str | None]:
    """``(verdict, why inconclusive)``: the one place the randomisation rule is written."""
    r = summary.get("randomisation_similarity")
    if not r or r.get("mean") is None:
        return None, None
    if r.get("n", 0) < MIN_RANDOMISATION_EXAMPLES:
        return "inconclusive", "few"
    lo, hi = r["ci"]
    if hi is not None and hi < threshold:
        return "pass", None
    if lo is not None and lo >= threshold:
        return "fail", None
    return "inconclusive", "straddles"


def randomisation_verdict(summary: dict, threshold: float) -> str | None:
    """``pass`` when the whole interval is below ``threshold``, ``fail`` when above, else ``inconclusive``
    (few examples: say so instead of a coin flip)."""
    return _verdict(summary, threshold)[0]


def inconclusive_reason(summary: dict, threshold: float) -> str | None:
    """Why :func:`randomisation_verdict` said ``inconclusive``: ``"few"`` (fewer than
    :data:`MIN_RANDOMISATION_EXAMPLES` examples) or ``"straddles"`` (the interval contains ``threshold``);
    None for any other verdict."""
    return _verdict(summary, threshold)[1]


def np_float(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None
