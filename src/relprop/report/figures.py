"""Figures of the report (matplotlib without pyplot: the caller's backend is never switched; imported only here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

CMAP = "bwr"  # red: evidence for the target class, blue: against (the LRP papers' colour map)


def _subplots(*grid: int, figsize: tuple[float, float], layout: Any = None, **kw: Any):
    """A new figure and its axes, made without pyplot: no backend switch and no global figure registry, so
    a notebook's backend stays as the user set it and threads draw figures of their own."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)  # this figure's own canvas (the caller's backend and pyplot are untouched)
    return fig, fig.subplots(*grid, **kw)


def normalise(h: np.ndarray) -> np.ndarray:
    """Scale a heatmap to [-1, 1] by its 99.5th percentile of |values| (robust to a few extreme pixels)."""
    h = np.asarray(h, dtype=np.float64)
    s = np.percentile(np.abs(h), 99.5) if h.size else 0.0
    if not np.isfinite(s) or s <= 0:
        s = np.abs(h).max() if h.size and np.abs(h).max() > 0 else 1.0
    return np.clip(h / s, -1, 1)


def _show_image(ax, img: torch.Tensor):
    a = img.detach().float().cpu().numpy()
    if a.shape[0] == 1:
        ax.imshow(a[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.transpose(a[:3], (1, 2, 0)).clip(0, 1))
    ax.set_xticks([])
    ax.set_yticks([])


def _show_heat(ax, h, img: torch.Tensor | None = None):
    if img is not None:
        g = img.detach().float().cpu().numpy().mean(0)
        ax.imshow(g, cmap="gray", vmin=0, vmax=1, alpha=1.0)
        ax.imshow(normalise(h), cmap=CMAP, vmin=-1, vmax=1, alpha=0.85)
    else:
        ax.imshow(normalise(h), cmap=CMAP, vmin=-1, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def heatmap_grid(
    display: torch.Tensor,
    heatmaps: dict[str, torch.Tensor],
    col_titles: Sequence[str],
    path: Path,
    title: str = "",
    *,
    overlay: bool = True,
    cmap: str | None = None,
    sign: str = "all",
) -> Path:
    """Rows: the inputs, then one row per method; columns: the samples. Each method's row shares one
    colour scale (shown by its colour bar), so the examples of a row compare; maps are drawn over the
    input unless ``overlay=False``."""
    from .. import visualize as V

    g = display.shape[0]
    rows = 1 + len(heatmaps)
    cell = 1.35 if g > 6 else 1.7
    fig, axes = _subplots(rows, g, figsize=(2.0 + cell * g, 0.6 + cell * rows), squeeze=False)
    for j in range(g):
        _show_image(axes[0, j], display[j])
        axes[0, j].set_title(_wrap(_text(col_titles[j]), 18), fontsize=7)
    axes[0, 0].set_ylabel("input", fontsize=9, rotation=0, ha="right", va="center")
    cm = V._cmap(cmap, sign)
    for i, (label, h) in enumerate(heatmaps.items(), start=1):
        maps = [h[j].detach().float().cpu().numpy() for j in range(min(g, len(h))) if h[j] is not None]
        sc = V.Scale.of(maps, sign) if maps else None
        for j in range(g):
            ax = axes[i, j]
            if j < len(h) and h[j] is not None:
                m = h[j].detach().float().cpu().numpy()
                if overlay:
                    rgb, _ = V.overlay(m, display[j], sign=sign, cmap=cm, scale=sc)
                    ax.imshow(rgb)
                else:
                    ax.imshow(V.heatmap_rgba(m, sign=sign, cmap=cm, scale=sc)[0])
                ax.set_xticks([])
                ax.set_yticks([])
                for sp in ax.spines.values():
                    sp.set_visible(False)
            else:
                ax.axis("off")
        if sc is not None:
            V._colorbar(fig, list(axes[i, :]), cm, sc, sign)
        axes[i, 0].set_ylabel(_wrap(_text(label)), fontsize=9, rotation=0, ha="right", va="center")
    if rows > 1:  # each colour bar took its width from its own row: the input row (none) the same, so columns align
        for j in range(g):
            box, ref = axes[0, j].get_position(), axes[1, j].get_position()
            axes[0, j].set_position([ref.x0, box.y0, ref.width, box.height])
    return _save(fig, path, _text(title), dpi=110, tight=False)


def _text(s: str) -> str:
    """Plain text for matplotlib: ``$`` would start mathtext (class names like ``$5 bill``)."""
    return str(s).replace("$", r"\$")


def _save(fig, path: Path, title: str, dpi: int, tight: bool = True) -> Path:
    """Title, tight layout, write: the end of every figure here."""
    if title:
        fig.suptitle(title, fontsize=11)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches=None if tight else "tight")
    return path


def _wrap(label: str, width: int = 14) -> str:
    parts, line = [], ""
    for chunk in label.replace(":", ": ").split(" "):
        if len(line) + len(chunk) > width and line:
            parts.append(line)
            line = chunk
        else:
            line = f"{line} {chunk}".strip() if line else chunk
    parts.append(line)
    return "\n".join(parts)


def curves_figure(cells: dict[str, dict], path: Path, title: str = "") -> Path:
    """Region perturbation (MoRF/LeRF), deletion, insertion and randomisation curves, one colour per method
    (no randomisation panel when no cell has that curve: the check was switched off)."""
    rand = any(res.get("randomisation_curve") for res in cells.values())
    fig, axes = _subplots(1, 4 if rand else 3, figsize=(16 if rand else 12, 3.6))
    import matplotlib

    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    unit = "patches"
    for i, (label, res) in enumerate(cells.items()):
        c = colors[i % len(colors)]
        cv = res.get("curves") or {}
        unit = cv.get("unit", unit)
        if cv:
            axes[0].plot(cv["region_fractions"], cv["morf"], color=c, label=f"{label} MoRF")
            axes[0].plot(cv["region_fractions"], cv["lerf"], color=c, ls="--", label=f"{label} LeRF")
            axes[1].plot(cv["fractions"], cv["deletion"], color=c, label=label)
            axes[2].plot(cv["fractions"], cv["insertion"], color=c, label=label)
        rc = res.get("randomisation_curve")
        if rc and rand:
            axes[3].plot(range(1, len(rc) + 1), rc, color=c, marker="o", label=label)
    axes[0].set(
        title="Region perturbation: MoRF —, LeRF - -",
        xlabel=f"fraction of {unit} replaced",
        ylabel="target probability",
    )
    axes[1].set(title="Deletion (lower is better)", xlabel=f"fraction of {unit} removed", ylabel="target probability")
    axes[2].set(
        title="Insertion (higher is better)", xlabel=f"fraction of {unit} inserted", ylabel="target probability"
    )
    if rand:
        axes[3].set(
            title="Randomisation (lower is better)", xlabel="top layers randomised", ylabel="Spearman similarity"
        )
        axes[3].axhline(0, color="gray", lw=0.5)
        axes[3].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[:3]:  # probabilities: the full range, so a flat curve looks flat
        ax.set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=7, loc="best")
    return _save(fig, path, _text(title), dpi=100)


def ranking_figure(models: list[dict], methods: list[str], path: Path, metric: str = "abpc") -> Path:
    """Left: the ranking metric per model x method; right: each model's mean of it against its accuracy."""
    from .scores import BY_KEY

    spec = BY_KEY[metric]
    label = f"{spec.label} ({spec.direction})"
    fig, (a1, a2) = _subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1.6, 1]})
    n = max(len(methods), 1)
    width = 0.8 / n
    names = [_text(m["name"]) for m in models]
    x = np.arange(len(models))
    for j, meth in enumerate(methods):
        vals, errs = [], []
        for m in models:
            cell = next((c for c in m["methods"] if c["method"] == meth), None)
            summ = (cell.get("summary") or {}).get(metric) if cell and cell.get("status") == "ok" else None
            vals.append(np.nan if not summ or summ.get("mean") is None else summ["mean"])
            lo, hi = (summ or {}).get("ci") or (None, None)
            errs.append([0, 0] if lo is None or hi is None else [vals[-1] - lo, hi - vals[-1]])
        a1.bar(x + (j - (n - 1) / 2) * width, vals, width, label=_text(meth), yerr=np.asarray(errs).T, capsize=2)
    a1.set_xticks(x, names, rotation=15 if len(names) > 4 else 0, fontsize=9)
    a1.axhline(0, color="gray", lw=0.6)
    a1.set(ylabel=spec.label, title=f"{label} per model and method, 95% bootstrap interval")
    a1.legend(fontsize=8, ncols=min(n, 4))
    a1.grid(axis="y", alpha=0.3)
    for m in models:
        if m.get("faithfulness") is not None and m.get("accuracy") is not None:
            lo, hi = ((m.get("overall") or {}).get(metric) or {}).get("ci") or (None, None)
            err = None if lo is None or hi is None else [[m["faithfulness"] - lo], [hi - m["faithfulness"]]]
            a2.errorbar(m["accuracy"], m["faithfulness"], yerr=err, fmt="o", capsize=3)
            a2.annotate(
                _text(m["name"]),
                (m["accuracy"], m["faithfulness"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=9,
            )
    a2.set(xlabel="accuracy", ylabel=f"{spec.label}, mean over methods", title=f"{label} vs accuracy (95% interval)")
    a2.grid(alpha=0.3)
    return _save(fig, path, "", dpi=100)


def explain_figure(
    display: torch.Tensor,
    heatmaps: dict[str, np.ndarray],
    path: Path,
    title: str = "",
    *,
    overlay: bool = False,
    cmap: str | None = None,
    sign: str = "all",
    scale: str = "per-image",
) -> Path:
    """One input and its heatmaps side by side (``relprop explain``), each with its colour bar; each map
    scaled to its own range by default (methods differ in units), ``scale="shared"``: one scale."""
    from .. import visualize as V

    k = 1 + len(heatmaps)
    # constrained layout: each colour bar and its label get their own room (they overlapped the next
    # panel), and the panel titles stay clear of the figure title
    fig, axes = _subplots(1, k, figsize=(3.7 * k, 3.4), squeeze=False, layout="constrained")
    _show_image(axes[0, 0], display)
    axes[0, 0].set_title("input", fontsize=10)
    V.image(
        list(heatmaps.values()),
        [display] * len(heatmaps) if overlay else None,
        method="overlay" if overlay else "heatmap",
        sign=sign,
        cmap=cmap,
        scale=scale,
        titles=[_text(t) for t in heatmaps],
        axes=axes[0, 1:],
    )
    if title:
        title = f"{title} ({'one colour scale' if scale == 'shared' else 'each map scaled to its own range'})"
    return _save(fig, path, _text(title), dpi=120, tight=False)
