"""``index.html``: a static page (no server, no scripts) over ``results.json`` and the figures."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np

from .figures import CMAP, normalise

METRIC_COLUMNS = [
    ("abpc_norm", "ABPC", "higher is better: mean gap between the LeRF and MoRF probability curves"),
    ("insertion_auc", "Insertion AUC", "higher is better"),
    ("deletion_auc", "Deletion AUC", "lower is better"),
    ("insertion_minus_deletion", "Ins − Del", "higher is better"),
    (
        "class_sensitivity",
        "Class sensitivity",
        "1 − Spearman(map for the top class, map for the bottom class), in [0, 2]; higher is better",
    ),
    (
        "randomisation_similarity",
        "Randomisation sim.",
        "Spearman similarity after randomising the top layers; lower is better (passes below 0.5)",
    ),
    ("seconds", "Time (s)", "wall time of the cell (explanations + metrics)"),
]

HIGHER_BETTER = {
    "abpc_norm": True,
    "insertion_auc": True,
    "deletion_auc": False,
    "insertion_minus_deletion": True,
    "class_sensitivity": True,
    "randomisation_similarity": False,
}


def e(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return e(v)


def token_html(tokens: Sequence[str], scores: Sequence[float]) -> str:
    """Tokens as coloured spans (red: for the target, blue: against)."""
    from matplotlib import colormaps

    cmap = colormaps[CMAP]
    s = normalise(np.asarray(list(scores), dtype=np.float64)) if len(scores) else []
    out = []
    for t, v in zip(tokens, s):
        r, g, b, _ = cmap((float(v) + 1) / 2)
        fg = "#fff" if abs(float(v)) > 0.6 else "#000"
        out.append(
            f'<span class="tok" style="background: rgb({int(r * 255)},{int(g * 255)},{int(b * 255)}); color: {fg}" '
            f'title="{float(v):+.3f}">{e(t)}</span>'
        )
    return " ".join(out)


def page(title: str, subtitle: str, nav: str, body: str) -> str:
    tpl = Template(resources.files("relprop.report").joinpath("template.html").read_text(encoding="utf-8"))
    return tpl.safe_substitute(title=e(title), subtitle=subtitle, nav=nav, body=body)


def render(results: dict, out: Path) -> Path:
    models = results["models"]
    methods = results["methods"]
    s = results["settings"]
    data = results["data"]
    parts: list[str] = []
    nav = ['<a href="#ranking">Ranking</a>'] + [f'<a href="#{e(m["anchor"])}">{e(m["name"])}</a>' for m in models]
    nav += ['<a href="#settings">Settings</a>', '<a href="results.json">results.json</a>']

    # ranking -------------------------------------------------------------------------------------
    rows = []
    for m in results["ranking"]:
        rows.append(
            f'<tr><td>{m["rank"] if m["rank"] is not None else "–"}</td><td class="l"><a href="#{e(m["anchor"])}">'
            f'{e(m["name"])}</a></td><td>{fmt(m["faithfulness"])}</td><td class="l">{e(m.get("best_method") or "–")}'
            f"</td><td>{fmt(m['accuracy'])}</td><td>{fmt(m.get('class_sensitivity'))}</td>"
            f"<td>{fmt(m.get('randomisation_similarity'))}</td></tr>"
        )
    status = results.get("status", "complete")
    banner = ""
    if status != "complete":
        banner = (
            f'<p class="bad">This run was {e(status)}: {results.get("cells_done", 0)} of '
            f"{results.get('cells_total', 0)} cells finished. Re-run the same command to complete it "
            f"(finished cells are reused).</p>"
        )
    parts.append(f"""<section id="ranking"><h2>Ranking of models by the faithfulness of their explanations</h2>{banner}
<p class="muted">Faithfulness: the mean over methods of ABPC (area between the perturbation curves: the target
probability when the least relevant patches are replaced first, minus when the most relevant are replaced first;
higher means the heatmaps point at what the model uses). Accuracy on all {data["n"]} examples of
<code>{e(data["spec"])}</code>. Metrics on {s["samples"]} examples per model.</p>
<table><tr><th>#</th><th class="l">Model</th><th>Faithfulness (mean ABPC)</th><th class="l">Most faithful method</th>
<th>Accuracy</th><th>Class sensitivity</th><th>Randomisation sim.</th></tr>{"".join(rows)}</table>
{_img(results["figures"].get("ranking"), "ABPC per model and method; faithfulness against accuracy")}
</section>""")

    # per model -----------------------------------------------------------------------------------
    for m in models:
        head = (
            f'<section id="{e(m["anchor"])}"><h2>{e(m["name"])}<span class="pill">{e(m["spec"])}</span></h2>'
            f'<p class="muted">accuracy {fmt(m.get("accuracy"))} on {m.get("n_eval", "–")} examples · '
            f"{fmt(m.get('num_params'))} parameters · LRP composite <code>{e(m.get('composite') or '–')}</code> · "
            f"preprocessing from {e((m.get('preprocess') or {}).get('source', '–'))}</p>"
        )
        if m.get("error"):
            parts.append(head + f'<p class="bad">Failed: {e(m["error"])}</p></section>')
            continue
        rows = []
        oks = [c for c in m["methods"] if c.get("status") == "ok"]
        best = {}
        for k, _, _ in METRIC_COLUMNS:
            vals = [c.get(k) for c in oks if c.get(k) is not None]
            if vals and k in HIGHER_BETTER:
                best[k] = max(vals) if HIGHER_BETTER[k] else min(vals)
        for c in m["methods"]:
            if c.get("status") != "ok":
                rows.append(
                    f'<tr><td class="l">{e(c["method"])}</td><td class="l bad" colspan="{len(METRIC_COLUMNS)}">'
                    f"{e(c.get('status'))}: {e(c.get('error', ''))}</td></tr>"
                )
                continue
            tds = []
            for k, _, _ in METRIC_COLUMNS:
                v = c.get(k)
                txt = fmt(v, 1 if k == "seconds" else 3)
                if k == "randomisation_similarity" and v is not None:
                    txt += ' <span class="ok">✓</span>' if v < 0.5 else ' <span class="bad">✗</span>'
                if k in best and v is not None and v == best[k] and len(oks) > 1:
                    txt = f"<b>{txt}</b>"
                tds.append(f"<td>{txt}</td>")
            reused = ' <span class="pill">reused</span>' if c.get("reused") else ""
            rows.append(f'<tr><td class="l">{e(c["method"])}{reused}</td>{"".join(tds)}</tr>')
        header = "".join(f'<th title="{e(tip)}">{e(name)}</th>' for _, name, tip in METRIC_COLUMNS)
        body = [head, "<h3>Heatmaps</h3>"]
        if m.get("grid_figure"):
            body.append(_img(m["grid_figure"], f"heatmaps of {m['name']}: inputs x methods"))
            body.append(
                '<p class="muted">Red: evidence for the explained class (the prediction), blue: against; '
                "each heatmap scaled to its own range. Column titles: true label / prediction.</p>"
            )
        elif m.get("grid_text"):
            body.append(m["grid_text"])
        else:
            body.append('<p class="muted">No heatmaps (no method finished).</p>')
        body.append(f'<h3>Metrics</h3><table><tr><th class="l">Method</th>{header}</tr>{"".join(rows)}</table>')
        body.append('<p class="muted">Hover a column name for its definition. Bold: best of the column.</p>')
        if m.get("curves_figure"):
            body.append(
                "<h3>Perturbation curves</h3>" + _img(m["curves_figure"], f"perturbation curves of {m['name']}")
            )
        body.append("</section>")
        parts.append("\n".join(body))

    # settings ------------------------------------------------------------------------------------
    srows = "".join(
        f'<tr><td class="l">{e(k)}</td><td class="l"><code>{e(json.dumps(v) if not isinstance(v, str) else v)}'
        f"</code></td></tr>"
        for k, v in s.items()
    )
    env = "".join(
        f'<tr><td class="l">{e(k)}</td><td class="l">{e(v)}</td></tr>' for k, v in results["environment"].items()
    )
    parts.append(f"""<section id="settings"><h2>Settings of this run</h2>
<p>Command: <code>{e(results["command"])}</code></p>
<p>Data: <code>{e(data["spec"])}</code> ({data["n"]} examples, {len(data["class_names"])} classes, {e(data["kind"])}).
Methods: {", ".join(f"<code>{e(x)}</code>" for x in methods)}.</p>
<table>{srows}</table><h3>Environment</h3><table>{env}</table>
<p class="muted">Every number is in <a href="results.json">results.json</a>; finished cells are cached in
<code>cache/</code> and reused when the same command runs again.</p></section>""")
    subtitle = (
        f"{len(models)} model(s) × {len(methods)} method(s) on <code>{e(data['spec'])}</code> · "
        f"{e(results['created'])} · {e(status)}"
    )
    path = out / "index.html"
    path.write_text(
        page("relprop: how models explain their predictions", subtitle, "".join(nav), "\n".join(parts)),
        encoding="utf-8",
    )
    return path


def _img(rel: str | None, alt: str) -> str:
    if not rel:
        return ""
    return f'<img class="fig" src="{e(rel)}" alt="{e(alt)}">'


def text_grid(tokens: list[list[str]], labels: list[str], cells: dict[str, list]) -> str:
    """Highlighted tokens per example and method (the text version of the heatmap grid)."""
    out = []
    for i, toks in enumerate(tokens):
        out.append(f"<details open><summary>Example {i + 1}: {e(labels[i])}</summary>")
        for meth, attrs in cells.items():
            if i < len(attrs):
                out.append(
                    f'<div class="text-row"><b>{e(meth)}</b>: {token_html(toks, list(map(float, attrs[i])))}</div>'
                )
        out.append("</details>")
    return "\n".join(out)
