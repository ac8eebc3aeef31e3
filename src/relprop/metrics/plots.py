"""Matplotlib plot helpers for the metric results (matplotlib is imported
lazily, inside each helper). Every helper takes an optional ``ax`` and
returns the ``Axes`` it drew on."""

from __future__ import annotations

import numpy as np


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5, 3.5))
    return ax


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def plot_perturbation_curve(result, ax=None, kind: str = "prob", **kwargs):
    """Mean target-score curve (``kind`` ``"prob"``, ``"logit"`` or ``"accuracy"``)
    of a :class:`~relprop.metrics.PerturbationCurve` vs fraction perturbed."""
    ax = _axes(ax)
    x = _np(result.fractions)
    if kind == "accuracy":
        y = _np(result.accuracy)
        ax.plot(x, y, label=kwargs.pop("label", f"{result.order.upper()} accuracy"), **kwargs)
    else:
        curves = _np(result.prob if kind == "prob" else result.logit)
        mean, std = curves.mean(0), curves.std(0)
        line = ax.plot(x, mean, label=kwargs.pop("label", f"{result.order.upper()} ({result.baseline})"), **kwargs)[0]
        ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
    ax.set_xlabel("fraction perturbed")
    ax.set_ylabel({"prob": "target probability", "logit": "target logit", "accuracy": "accuracy"}.get(kind, kind))
    ax.legend()
    return ax


def plot_perturbation_result(result, ax=None, **kwargs):
    """Mean score curve of a region-perturbation / pixel-flipping result."""
    ax = _axes(ax)
    y = _np(result.score_curve)
    steps = np.arange(y.shape[1])
    label = kwargs.pop("label", f"{result.order.upper()} (AUC {result.mean_auc:.3g})")
    ax.plot(steps, y.mean(0), label=label, **kwargs)
    ax.set_xlabel("patches replaced" if result.kind == "region_perturbation" else "perturbation steps")
    ax.set_ylabel("target probability" if result.softmax else "target logit")
    ax.legend()
    return ax


def plot_abpc(result, ax=None, **kwargs):
    """MoRF and LeRF mean score curves with the area between them shaded."""
    ax = _axes(ax)
    m = _np(result.morf_curve if result.morf_curve is not None else result.morf.score_curve).mean(0)
    l = _np(result.lerf_curve if result.lerf_curve is not None else result.lerf.score_curve).mean(0)
    steps = np.arange(len(m))
    ax.plot(steps, m, label="MoRF", color="tab:red")
    ax.plot(steps, l, label="LeRF", color="tab:blue")
    ax.fill_between(steps, m, l, alpha=0.2, color="tab:gray", label=f"ABPC {result.value:.3g}")
    ax.set_xlabel("units replaced (patches or tokens)")
    ax.set_ylabel("target probability" if result.morf is None or result.morf.softmax else "target logit")
    ax.legend()
    return ax


def plot_insertion_deletion(result, ax=None, **kwargs):
    ax = _axes(ax)
    x = _np(result.fractions)
    ax.plot(x, _np(result.insertion).mean(0), label=f"insertion (AUC {result.mean_insertion_auc:.3g})")
    ax.plot(x, _np(result.deletion).mean(0), label=f"deletion (AUC {result.mean_deletion_auc:.3g})")
    ax.set_xlabel("fraction of pixels")
    ax.set_ylabel("target probability")
    ax.legend()
    return ax


def plot_randomisation(result, ax=None, **kwargs):
    """Mean (and per-sample spread of) similarity per randomised layer."""
    ax = _axes(ax)
    s = _np(result.similarity)
    idx = np.arange(len(result.layers))
    ax.plot(idx, np.nanmean(s, 1), marker="o", **kwargs)
    ax.fill_between(idx, np.nanmin(s, 1), np.nanmax(s, 1), alpha=0.2)
    ax.set_xticks(idx)
    ax.set_xticklabels(result.layers, rotation=45, ha="right")
    ax.set_ylabel(f"{result.similarity_name} similarity")
    ax.set_xlabel("randomised layer (cascading, top-down)" if result.cascading else "randomised layer")
    ax.set_ylim(-1.05, 1.05)
    return ax


def plot_class_sensitivity(result, ax=None, bins: int = 20, **kwargs):
    """Histogram of the top-vs-bottom-class map similarity."""
    ax = _axes(ax)
    s = _np(result.similarity)
    ax.hist(s[np.isfinite(s)], bins=bins, range=(-1, 1), **kwargs)
    ax.axvline(result.mean_similarity, color="k", ls="--", label=f"mean {result.mean_similarity:.3g}")
    ax.set_xlabel(f"{result.similarity_name}(top-class map, bottom-class map)")
    ax.set_ylabel("samples")
    ax.legend()
    return ax


def plot_conservation(result, ax=None, **kwargs):
    """Scatter of attribution sum vs (reference-corrected) output, with y = x."""
    ax = _axes(ax)
    x = _np(result.output)
    y = _np(result.attribution_sum)
    ax.scatter(x, y, s=kwargs.pop("s", 12), **kwargs)
    lo = float(min(x.min(), y.min()))
    hi = float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="perfect conservation")
    ax.set_xlabel("output" if result.reference_output is None else "output - reference output")
    ax.set_ylabel("sum of attributions")
    ax.legend()
    return ax


def plot_complexity(result, ax=None, bins: int = 20, **kwargs):
    ax = _axes(ax)
    ax.hist(_np(result.scores), bins=bins, **kwargs)
    ax.axvline(result.mean, color="k", ls="--", label=f"mean {result.mean:.3g}")
    ax.set_xlabel(result.name)
    ax.set_ylabel("samples")
    ax.legend()
    return ax
