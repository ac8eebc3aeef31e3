"""Pictures of attributions: images (heatmap alone or over the input) and tokens (HTML, terminal).

``relprop.visualize`` is what Captum's ``visualize_image_attr`` and Zennit's ``imgify`` do, for
relprop's attributions (or anyone's tensors):

* **sign modes**: ``"all"`` (signed, a diverging colour map centred on zero: red for, blue against),
  ``"positive"``, ``"negative"`` (the evidence against, as magnitudes) and ``"absolute"``;
* **scale**: ``"shared"`` (one colour scale for every map drawn together, so magnitudes compare),
  ``"per-image"`` (each map by its own range), or a number (a fixed scale); the scale is the
  ``percentile`` of |values| (99.5 by default: a few extreme pixels do not wash out the rest);
* **overlay**: the heatmap over a grey version of the input, opaque where the attribution is
  strong and transparent where it is near zero; ``"heatmap"`` draws the map alone;
* **colour bar** and **any matplotlib colour map** (``cmap="coolwarm"``, a ``Colormap`` object).

Tokens: :func:`merge_wordpieces` joins ``##`` pieces (and SentencePiece ``▁`` words) into words,
summing their scores; :func:`tokens_html` colours words (raw scores on hover); :func:`tokens_figure`
draws them (one or several texts, e.g. both sentences of a pair) as a matplotlib figure;
:func:`print_tokens` prints a coloured table in the terminal with scores at a readable scale.

Matplotlib is imported only when an image is drawn (the ``report`` extra).
"""

from __future__ import annotations

import html as _html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "SIGNS",
    "Scale",
    "heatmap_rgba",
    "image",
    "merge_wordpieces",
    "print_tokens",
    "readable_scale",
    "reduce_channels",
    "TokenRow",
    "tokens_figure",
    "tokens_html",
]

SIGNS = ("all", "positive", "negative", "absolute")
DEFAULT_CMAPS = {"all": "bwr", "positive": "Reds", "negative": "Blues", "absolute": "Reds"}


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_sign(sign: str) -> str:
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
    return sign


def reduce_channels(attr: Any, channel_axis: int | None = 0, reduce: str = "sum") -> np.ndarray:
    """A ``(C, H, W)`` map to ``(H, W)``: ``"sum"`` (keeps the sign; relevance adds up over channels),
    ``"abs_sum"`` or ``"norm"``. A 2-d map is returned as it is."""
    a = _np(attr)
    if a.ndim == 2 or channel_axis is None:
        return a
    if a.ndim != 3:
        raise ValueError(f"an image attribution is (H, W) or (C, H, W), got shape {a.shape}")
    if reduce == "sum":
        return a.sum(channel_axis)
    if reduce == "abs_sum":
        return np.abs(a).sum(channel_axis)
    if reduce == "norm":
        return np.sqrt((a**2).sum(channel_axis))
    raise ValueError(f"reduce must be 'sum', 'abs_sum' or 'norm', got {reduce!r}")


def _signed(a: np.ndarray, sign: str) -> np.ndarray:
    if sign == "positive":
        return np.clip(a, 0, None)
    if sign == "negative":
        return np.clip(-a, 0, None)
    if sign == "absolute":
        return np.abs(a)
    return a


def _robust_max(values: Sequence[np.ndarray], percentile: float) -> float:
    flat = np.concatenate([np.abs(v).reshape(-1) for v in values]) if values else np.zeros(0)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 1.0
    s = float(np.percentile(flat, percentile))
    if not s > 0:
        s = float(flat.max())
    return s if s > 0 else 1.0


@dataclass(frozen=True)
class Scale:
    """The value range a colour map spans: ``[vmin, vmax]`` (``vmin = -vmax`` for ``sign="all"``)."""

    vmin: float
    vmax: float

    @classmethod
    def of(cls, maps: Sequence[np.ndarray], sign: str = "all", percentile: float = 99.5) -> Scale:
        s = _robust_max([_signed(_np(m), sign) for m in maps], percentile)
        return cls(-s, s) if sign == "all" else cls(0.0, s)


def _cmap(cmap, sign: str):
    from matplotlib import colormaps

    if cmap is None:
        cmap = DEFAULT_CMAPS[sign]
    return colormaps[cmap] if isinstance(cmap, str) else cmap


def heatmap_rgba(
    attr: Any, *, sign: str = "all", cmap=None, scale: Scale | float | None = None, percentile: float = 99.5
) -> tuple[np.ndarray, Scale]:
    """``(H, W, 4)`` colours of a 2-d map, and the scale used (a signed map is centred on zero)."""
    sign = _check_sign(sign)
    a = _signed(_np(attr), sign)
    if scale is None:
        scale = Scale.of([a], "all" if sign == "all" else "positive", percentile)
    elif not isinstance(scale, Scale):
        s = float(scale)
        scale = Scale(-s, s) if sign == "all" else Scale(0.0, s)
    norm = (np.clip(a, scale.vmin, scale.vmax) - scale.vmin) / max(scale.vmax - scale.vmin, 1e-300)
    return _cmap(cmap, sign)(norm), scale


def _channels_last(x: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` (torch's layout; C = 1, 3 or 4) to ``(H, W, C)``; ``(H, W, C)`` stays."""
    if x.ndim == 3 and (x.shape[0] in (1, 3) or (x.shape[0] == 4 and x.shape[-1] not in (1, 3))):
        return np.moveaxis(x, 0, -1)
    return x


def _grey(img: Any) -> np.ndarray:
    x = _np(img)
    x = _channels_last(x)
    if x.ndim == 3:
        x = x[..., :3].mean(-1)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    if lo < 0 or hi > 1:  # normalised input: back to [0, 1] for display
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return x


def _rgb(img: Any) -> np.ndarray:
    x = _np(img)
    x = _channels_last(x)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    if lo < 0 or hi > 1:
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return x


def overlay(
    attr: Any, img: Any, *, sign: str = "all", cmap=None, scale=None, alpha: float = 0.8, percentile: float = 99.5
) -> tuple[np.ndarray, Scale]:
    """``(H, W, 3)``: the heatmap over a grey version of the input. Each pixel's opacity grows with
    ``|value| / scale`` (up to ``alpha``), so where the attribution is near zero the input shows."""
    rgba, sc = heatmap_rgba(attr, sign=sign, cmap=cmap, scale=scale, percentile=percentile)
    g = _grey(img)
    if g.shape != rgba.shape[:2]:
        raise ValueError(f"the input's size {g.shape} differs from the attribution's {rgba.shape[:2]}")
    a = _signed(_np(attr), sign)
    strength = np.clip(np.abs(a) / max(sc.vmax, 1e-300), 0, 1)[..., None] * alpha
    base = np.repeat((0.2 + 0.6 * g)[..., None], 3, -1)  # dimmed: pale colours stay visible on white
    return (1 - strength) * base + strength * rgba[..., :3], sc


def image(
    attributions: Any,
    inputs: Any = None,
    *,
    method: str = "overlay",
    sign: str = "all",
    cmap=None,
    scale: str | float = "shared",
    percentile: float = 99.5,
    alpha: float = 0.8,
    colorbar: bool = True,
    titles: Sequence[str] | None = None,
    reduce: str = "sum",
    axes=None,
    ncols: int | None = None,
    size: float = 2.6,
):
    """Draw one or several image attributions; returns the matplotlib ``Figure``.

    ``attributions``: ``(H, W)``, ``(C, H, W)`` or a batch ``(B, C, H, W)`` / list of maps (channels are
    reduced with ``reduce``). ``inputs``: the matching images (``(C, H, W)`` in any range; needed for
    ``method="overlay"`` and ``"input"``). ``method``: ``"overlay"``, ``"heatmap"`` or ``"input"`` (the
    image alone). ``scale``: ``"shared"``, ``"per-image"`` or a number (see the module docstring).
    ``axes``: draw into these matplotlib axes instead of a new figure.
    """
    if method not in ("overlay", "heatmap", "input"):
        raise ValueError(f"method must be 'overlay', 'heatmap' or 'input', got {method!r}")
    sign = _check_sign(sign)
    maps = _as_list(attributions)
    maps = [reduce_channels(m, reduce=reduce) for m in maps]
    imgs = _as_list(inputs) if inputs is not None else [None] * len(maps)
    if len(imgs) != len(maps):
        raise ValueError(f"{len(maps)} attribution map(s) but {len(imgs)} input(s)")
    if method in ("overlay", "input") and inputs is None:
        raise ValueError(f"method={method!r} needs the inputs; pass inputs=... or method='heatmap'")
    if isinstance(scale, str):
        if scale not in ("shared", "per-image"):
            raise ValueError(f"scale must be 'shared', 'per-image' or a number, got {scale!r}")
        shared = Scale.of(maps, sign, percentile) if scale == "shared" else None
    else:
        shared = Scale.of([np.array([float(scale)])], sign, 100)

    import matplotlib.pyplot as plt  # the user's backend, as it is (no switch: process-wide state)

    n = len(maps)
    fig: Any  # a matplotlib Figure that also carries ``_relprop_scale``
    if axes is None:
        ncols = ncols or min(n, 6)
        nrows = math.ceil(n / ncols)
        fig, ax = plt.subplots(nrows, ncols, figsize=(size * ncols + 0.4, size * nrows), squeeze=False)
        axes_list = list(ax.reshape(-1))
        for extra in axes_list[n:]:
            extra.axis("off")
    else:
        axes_list = list(np.asarray(axes).reshape(-1))
        fig = axes_list[0].figure
    cm = _cmap(cmap, sign)
    last = None
    for i, (m, img) in enumerate(zip(maps, imgs)):
        ax = axes_list[i]
        sc = shared or Scale.of([m], sign, percentile)
        if method == "input":
            ax.imshow(_rgb(img), cmap="gray", vmin=0, vmax=1)
        elif method == "overlay":
            rgb, sc = overlay(m, img, sign=sign, cmap=cm, scale=sc, alpha=alpha, percentile=percentile)
            ax.imshow(rgb)
        else:
            rgba, sc = heatmap_rgba(m, sign=sign, cmap=cm, scale=sc, percentile=percentile)
            ax.imshow(rgba)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None and i < len(titles):
            ax.set_title(str(titles[i]).replace("$", r"\$"), fontsize=9)
        last = sc
        if colorbar and method != "input" and (shared is None or i == n - 1):
            _colorbar(fig, ax, cm, sc, sign)
    fig._relprop_scale = last  # the scale of the last map (all maps' when shared): for tests and captions
    return fig


def _colorbar(fig, ax, cmap, sc: Scale, sign: str):
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(sc.vmin, sc.vmax), cmap=cmap)
    cb = fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=7)
    label = {"all": "relevance", "positive": "relevance > 0", "negative": "−relevance (< 0)", "absolute": "|relevance|"}
    cb.set_label(label[sign], fontsize=7)
    return cb


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    a = x.detach().float().cpu() if hasattr(x, "detach") else np.asarray(x)
    if a.ndim == 4:
        return [a[i] for i in range(a.shape[0])]
    return [a]


# ------------------------------------------------------------------------------------------ tokens
def merge_wordpieces(tokens: Sequence[str], scores: Sequence[float]) -> tuple[list[str], list[float], list[list[int]]]:
    """Join word pieces into words and sum their scores (relevance adds up).

    ``##ing`` (BERT WordPiece) continues the previous token; ``▁word`` (SentencePiece) and ``Ġword``
    (GPT-2 BPE) start a new word, so a piece without the marker continues one. Returns the words,
    their scores and the indices of the pieces in each word (for the raw scores on hover).
    """
    if len(tokens) != len(scores):
        raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
    starts = ("▁", "Ġ")
    marked = any(t.startswith(starts) for t in tokens)
    words: list[str] = []
    vals: list[float] = []
    groups: list[list[int]] = []
    for i, (t, v) in enumerate(zip(tokens, scores)):
        special = t.startswith("[") and t.endswith("]") or t.startswith("<") and t.endswith(">")
        cont = t.startswith("##") or (marked and not t.startswith(starts) and not special)
        if cont and words and not _is_special(words[-1]):
            words[-1] += t[2:] if t.startswith("##") else t
            vals[-1] += float(v)
            groups[-1].append(i)
        else:
            words.append(t.lstrip("".join(starts)) if marked else t)
            vals.append(float(v))
            groups.append([i])
    return words, vals, groups


def _is_special(t: str) -> bool:
    return (t.startswith("[") and t.endswith("]")) or (t.startswith("<") and t.endswith(">"))


def readable_scale(values: Sequence[float]) -> tuple[float, str]:
    """A power of ten that brings the largest |value| into [1, 10): (factor, label like ``"×1e-4"``).
    Scores of ``3e-5`` then print as ``3.00`` instead of ``0.0000``."""
    m = max((abs(float(v)) for v in values if math.isfinite(float(v))), default=0.0)
    if m == 0:
        return 1.0, ""
    k = math.floor(math.log10(m))
    if k == 0:
        return 1.0, ""
    return 10.0**k, f"×1e{k:+d}".replace("+", "")


def _css_colour(v: float, sc: Scale, sign: str, cmap) -> tuple[str, str]:
    rgba, _ = heatmap_rgba(np.array([[v]]), sign=sign, cmap=cmap, scale=sc)
    r, g, b = (int(255 * c) for c in rgba[0, 0, :3])
    lum = 0.299 * r + 0.587 * g + 0.114 * b
    return f"rgb({r},{g},{b})", "#000" if lum > 140 else "#fff"


def tokens_html(
    tokens: Sequence[str],
    scores: Sequence[float],
    *,
    merge: bool = True,
    sign: str = "all",
    cmap=None,
    scale: Scale | float | None = None,
    percentile: float = 100.0,
) -> str:
    """Coloured ``<span>`` words; hovering a word shows its score and the raw score of every piece."""
    sign = _check_sign(sign)
    raw = [float(s) for s in scores]
    words, vals, groups = (
        merge_wordpieces(tokens, raw) if merge else (list(tokens), raw, [[i] for i in range(len(raw))])
    )
    if scale is None:
        sc = Scale.of([np.asarray(vals)], sign, percentile)
    elif isinstance(scale, Scale):
        sc = scale
    else:
        sc = Scale(-float(scale), float(scale)) if sign == "all" else Scale(0.0, float(scale))
    out = []
    for w, v, g in zip(words, vals, groups):
        bg, fg = _css_colour(v, sc, sign, cmap)
        tip = f"{v:+.4g}"
        if len(g) > 1:
            tip += " = " + " + ".join(f"{tokens[i]} {raw[i]:+.4g}" for i in g)
        out.append(
            f'<span class="tok" style="background: {bg}; color: {fg}" title="{_html.escape(tip, quote=True)}" '
            f'data-score="{v:.6g}">{_html.escape(w)}</span>'
        )
    return " ".join(out)


@dataclass(frozen=True)
class TokenRow:
    """One drawn line of words: a method's scores on one text (``section``), merged into ``words``."""

    section: str
    method: str
    words: list[str]
    scores: list[float]
    scale: Scale


def tokens_figure(
    sections: Sequence[tuple[str, Sequence[str], Mapping[str, Sequence[float]]]],
    *,
    title: str | None = None,
    merge: bool = True,
    sign: str = "all",
    cmap=None,
    scale: str | float = "per-method",
    width: float = 10.0,
    fontsize: float = 10.0,
):
    """Words coloured by their scores, for one text or several (both sentences of a pair); returns the
    matplotlib ``Figure``. Its ``relprop_rows`` attribute lists the drawn :class:`TokenRow` s.

    ``sections``: ``(heading, tokens, {method: scores})`` per text; each gets its heading (none when
    empty), then one line of words per method (wrapped at ``width`` inches). Word pieces are merged into words with their
    scores added (``merge``). ``scale``: ``"per-method"`` (one colour scale per method over every
    section, so sentence A and B compare), ``"per-row"`` or a number; the scale is max |score|.
    """
    sign = _check_sign(sign)
    if not sections:
        raise ValueError("tokens_figure needs at least one (heading, tokens, scores) section")
    merged: list[tuple[str, str, list[str], list[float]]] = []
    for heading, tokens, scores in sections:
        for method, sc in scores.items():
            raw = [float(v) for v in sc]
            words, vals = (merge_wordpieces(tokens, raw)[:2]) if merge else (list(tokens), raw)
            if not merge and len(raw) != len(tokens):
                raise ValueError(f"{len(tokens)} tokens but {len(raw)} scores")
            merged.append((str(heading), str(method), list(words), list(vals)))
    if isinstance(scale, str) and scale not in ("per-method", "per-row"):
        raise ValueError(f"scale must be 'per-method', 'per-row' or a number, got {scale!r}")

    def scale_of(method: str, values: list[float]) -> Scale:
        if not isinstance(scale, str):
            return Scale(-float(scale), float(scale)) if sign == "all" else Scale(0.0, float(scale))
        same = [r[3] for r in merged if r[1] == method] if scale == "per-method" else [values]
        return Scale.of([np.asarray(v) for v in same], sign, 100.0)

    rows = [TokenRow(h, m, w, v, scale_of(m, v)) for h, m, w, v in merged]

    import matplotlib.pyplot as plt  # the user's backend, as it is (no switch: process-wide state)
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    cm = _cmap(cmap, sign)
    fig: Any = plt.figure(figsize=(width, 1.0))  # also carries ``relprop_rows``
    renderer = RendererAgg(1, 1, fig.dpi)  # measures text as Agg does, whatever the figure's backend
    font = FontProperties(size=fontsize)

    def text_width(t: str) -> float:  # inches
        w, _, _ = renderer.get_text_width_height_descent(t, font, ismath=False)
        return w / fig.dpi

    line = fontsize * 2.0 / 72  # inches per line of words
    margin, gap = 0.15, 0.06
    label_w = max(text_width(r.method) for r in rows) + 0.25
    right = width - margin
    # lay out first (x, line number), then size the figure and draw from the top
    items: list[tuple[str, float, int, dict]] = []
    n = 1 if title else 0
    last_section = None
    used = 0.0  # the rightmost word's end
    for r in rows:
        if r.section != last_section and r.section:
            items.append((r.section, margin, n, dict(weight="bold", size=fontsize + 1)))
            used = max(used, margin + 1.15 * text_width(r.section))
            n += 1
        last_section = r.section
        items.append((r.method, margin, n, dict(weight="bold", size=fontsize, color="0.3")))
        x = margin + label_w
        for word, v in zip(r.words, r.scores):
            w = text_width(word) + 0.1
            if x + w > right and x > margin + label_w:
                n, x = n + 1, margin + label_w
            rgba, _ = heatmap_rgba(np.array([[v]]), sign=sign, cmap=cm, scale=r.scale)
            c = rgba[0, 0, :3]
            fg = "black" if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 0.55 else "white"
            box = dict(boxstyle="round,pad=0.2", fc=tuple(c), ec="none")
            items.append((word, x + 0.05, n, dict(size=fontsize, color=fg, bbox=box)))
            x += w + gap
            used = max(used, x)
        n += 1
    height = line * (n + 0.6)
    width = min(width, max(used, text_width(title or "") * 1.25 + margin) + margin)  # no empty right side
    fig.set_size_inches(width, height)
    if title:
        fig.text(margin, height - 0.6 * line, title, transform=fig.dpi_scale_trans, va="center", parse_math=False,
                 size=fontsize + 2, weight="bold")  # fmt: skip
    for t, x, k, style in items:
        fig.text(x, height - (k + 0.6) * line, t, transform=fig.dpi_scale_trans, va="center", parse_math=False,
                 **style)  # fmt: skip
    fig.relprop_rows = rows
    return fig


def print_tokens(
    tokens: Sequence[str],
    scores: Mapping[str, Sequence[float]],
    *,
    merge: bool = True,
    console=None,
    title: str | None = None,
    cmap=None,
) -> Any:
    """A coloured terminal table (rich): one row per word, one column per method; each column's scores
    are printed at a readable scale (the factor is in its header) and coloured like the HTML.
    Returns the rich ``Table``."""
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        raise ImportError(
            "coloured terminal output needs rich: pip install '.[report]' from your relprop clone"
        ) from None
    merged = {}
    words: list[str] = list(tokens)
    for k, s in scores.items():
        w, v, _ = (
            merge_wordpieces(tokens, [float(x) for x in s]) if merge else (list(tokens), list(map(float, s)), None)
        )
        merged[k], words = v, w
    table = Table(show_lines=False)  # the title goes on its own line: a narrow table would wrap it
    table.add_column("word" if merge else "token")
    factors = {}
    for k, v in merged.items():
        f, label = readable_scale(v)
        factors[k] = f
        table.add_column(f"{k} {label}".strip(), justify="right")
    scales = {k: Scale.of([np.asarray(v)], "all", 100.0) for k, v in merged.items()}
    for i, word in enumerate(words):
        cells = [Text(word)]
        for k, v in merged.items():
            bg, fg = _css_colour(v[i], scales[k], "all", cmap)
            cells.append(Text(f"{v[i] / factors[k]:+.2f}", style=f"{'black' if fg == '#000' else 'white'} on {bg}"))
        table.add_row(*cells)
    console = console or Console()
    if title:
        console.print(Text(title, style="bold"))
    console.print(table)
    return table
