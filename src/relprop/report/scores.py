"""The metrics of a comparison as data: one :class:`MetricSpec` list drives what a cell computes, the
table columns, the terminal summary and the ranking; seeded bootstrap intervals and paired-bootstrap
ties make the numbers honest about their spread.

Per-example values are the primary record (``OUT/examples.parquet``, one row per model x method x
example, see :data:`EXAMPLE_COLUMNS`); every mean in ``results.json`` and the report is computed from
them, with its confidence interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MetricSpec:
    """One metric of ``relprop compare``.

    ``group`` names the computation that produces it (``"perturbation"``, ``"sensitivity"``,
    ``"randomisation"``, ``"time"``): a cell runs a group only when one of its metrics is wanted.
    ``higher_is_better`` is ``None`` for numbers that are not a quality (time). ``ci``: False where the
    per-example values are not independent measurements (the explanation time is one timing per batch,
    shared by its examples), so an interval would show precision that was never measured; ``note`` says why.
    """

    key: str
    label: str
    higher_is_better: bool | None
    tip: str
    group: str
    digits: int = 3
    ci: bool = True
    note: str = ""
    unit: str = ""

    @property
    def direction(self) -> str:
        if self.higher_is_better is None:
            return ""
        return "higher is better" if self.higher_is_better else "lower is better"

    def better(self, a: float, b: float) -> bool:
        """Is ``a`` better than ``b``?"""
        return a > b if self.higher_is_better else a < b


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "abpc",
        "ABPC",
        True,
        "area between the perturbation curves per step: target probability with the least relevant units "
        "replaced first minus with the most relevant replaced first, averaged over the steps",
        "perturbation",
    ),
    MetricSpec(
        "insertion",
        "Insertion AUC",
        True,
        "area under the target probability while the most relevant units are restored into the "
        "insertion baseline (fraction of units on the x axis)",
        "perturbation",
    ),
    MetricSpec(
        "deletion",
        "Deletion AUC",
        False,
        "area under the target probability while the most relevant units are replaced by the baseline",
        "perturbation",
    ),
    MetricSpec("insertion_minus_deletion", "Ins − Del", True, "insertion AUC minus deletion AUC", "perturbation"),
    MetricSpec(
        "class_sensitivity",
        "Class sensitivity",
        True,
        "1 − Spearman(map for the top class, map for the bottom class), in [0, 2]",
        "sensitivity",
    ),
    MetricSpec(
        "randomisation_similarity",
        "Randomisation sim. |a|",
        False,
        "Spearman similarity of the absolute maps before and after randomising the top layers; a map that "
        "only flips sign stays similar (fails)",
        "randomisation",
    ),
    MetricSpec(
        "explain_seconds",
        "Explain time",
        None,
        "time of the explanation alone per example: each batch's time divided by its size (per-batch "
        "timing, so no interval); metric time is apart",
        "time",
        digits=4,
        ci=False,
        note="per-batch timing",
        unit="s per example",
    ),
)

BY_KEY = {m.key: m for m in METRICS}

#: The metric the rankings use by default (named in the report next to every rank; ``--rank-by``).
RANK_METRIC = "abpc"
#: Metrics a ranking may use: the faithfulness metrics.
RANKABLE = tuple(m.key for m in METRICS if m.group == "perturbation")

#: Columns of ``examples.parquet``: one row per model x method x example. Appending rows with the same
#: columns (e.g. one file per worker of a distributed run, read together as a ``pyarrow.dataset``)
#: is the supported way to grow it; ``run`` tells runs apart.
EXAMPLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "string"),  # id of the run (hash of command + settings)
    ("model", "string"),  # the model spec (the identity; display names may repeat)
    ("model_name", "string"),
    ("method", "string"),  # the method spec label, e.g. "lrp:composite=epsilon"
    ("example", "int64"),  # index of the example in the data set
    ("label", "int64"),  # true label as the model's class index
    ("prediction", "int64"),
    ("target", "int64"),  # the class explained
    ("abpc", "float64"),
    ("insertion", "float64"),
    ("deletion", "float64"),
    ("insertion_minus_deletion", "float64"),
    ("class_sensitivity", "float64"),  # null for examples outside --sensitivity-samples
    ("randomisation_similarity", "float64"),  # null outside --randomisation-samples
    ("explain_seconds", "float64"),
)


# ------------------------------------------------------------------------------------ bootstrap
def _clean(values: Sequence | np.ndarray) -> np.ndarray:
    a = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return a[np.isfinite(a)]


def bootstrap_ci(
    values: Sequence | np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean (seeded: the same data give the same interval)."""
    a = _clean(values)
    if a.size == 0:
        return None, None
    if a.size == 1 or n_boot <= 0:
        return float(a[0]) if a.size == 1 else None, float(a[0]) if a.size == 1 else None
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def summarise(values: Sequence, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """``{"mean", "ci": [lo, hi], "n"}`` of the finite values."""
    a = _clean(values)
    lo, hi = bootstrap_ci(a, n_boot=n_boot, level=level, seed=seed)
    return {"mean": float(a.mean()) if a.size else None, "ci": [lo, hi], "n": int(a.size)}


def summarise_metric(spec: MetricSpec, values: Sequence, *, n_boot: int = 1000, level: float = 0.95, seed=0) -> dict:
    """:func:`summarise` as ``spec`` allows: no interval (``ci: [None, None]``) and its ``note`` where the
    per-example values are not independent measurements (``spec.ci`` False)."""
    out = summarise(values, n_boot=n_boot if spec.ci else 0, level=level, seed=seed)
    if not spec.ci:
        out["ci"] = [None, None]
        out["note"] = spec.note
    return out


def paired_difference(
    a: dict[int, float], b: dict[int, float], *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> dict:
    """Mean of ``a - b`` over the examples both have (keyed by example index), with its bootstrap
    interval. ``tie`` when the interval contains 0 (or there is nothing to compare)."""
    common = sorted(k for k in a.keys() & b.keys() if _finite(a[k]) and _finite(b[k]))
    d = np.asarray([a[k] - b[k] for k in common], dtype=np.float64)
    if d.size == 0:
        return {"mean": None, "ci": [None, None], "n": 0, "tie": True}
    lo, hi = bootstrap_ci(d, n_boot=n_boot, level=level, seed=seed)
    tie = d.size < 2 or lo is None or hi is None or (lo <= 0.0 <= hi)
    return {"mean": float(d.mean()), "ci": [lo, hi], "n": int(d.size), "tie": bool(tie)}


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


# ------------------------------------------------------------------------------------ ranking
def rank_models(
    per_example: dict[str, dict[int, float]], spec: MetricSpec, *, n_boot: int = 1000, level: float = 0.95, seed=0
) -> list[dict]:
    """Rank models on one metric: ``rank = 1 + number of models significantly better`` (paired bootstrap
    of the per-example difference excludes 0). Models whose difference interval contains 0 share ranks
    (``ties_with``). ``per_example``: model -> {example index: value}."""
    means = {m: (float(np.mean(list(v.values()))) if v else None) for m, v in per_example.items()}
    rows: list[dict[str, Any]] = []
    for m in per_example:
        if means[m] is None:
            rows.append({"model": m, "rank": None, "mean": None, "ties_with": [], "metric": spec.key})
            continue
        better, ties = 0, []
        for o in per_example:
            if o == m or means[o] is None:
                continue
            d = paired_difference(per_example[o], per_example[m], n_boot=n_boot, level=level, seed=seed)
            if d["tie"]:
                ties.append(o)
            elif spec.better(d["mean"], 0.0):
                better += 1
        rows.append({"model": m, "rank": 1 + better, "mean": means[m], "ties_with": ties, "metric": spec.key})
    sign = -1.0 if spec.higher_is_better else 1.0
    rows.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0, sign * (r["mean"] or 0.0)))
    return rows


def tied_for_best(
    per_example: dict[str, dict[int, float]], spec: MetricSpec, *, n_boot: int = 1000, level: float = 0.95, seed=0
) -> list[str]:
    """The rows a table marks best in ``spec``'s column: every one of rank 1 in :func:`rank_models`, i.e.
    no other row is significantly better (the ranks' own paired-bootstrap test), so two rows whose
    difference interval contains 0 are both marked. Nothing with fewer than two rows with values, or for a
    metric without a direction."""
    if spec.higher_is_better is None or sum(1 for v in per_example.values() if v) < 2:
        return []
    rows = rank_models(per_example, spec, n_boot=n_boot, level=level, seed=seed)
    return [r["model"] for r in rows if r["rank"] == 1]
