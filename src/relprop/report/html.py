"""``index.html``: a static page (no server, no scripts) over ``results.json`` and the figures."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from importlib import resources
from string import Template

from .scores import BY_KEY, METRICS, RANK_METRIC, RANKABLE

#: (key, header, tip): the table columns, from the one metric list (relprop.report.scores.METRICS)
METRIC_COLUMNS = [(m.key, m.label, f"{m.direction}: {m.tip}" if m.direction else m.tip) for m in METRICS]
HIGHER_BETTER = {m.key: m.higher_is_better for m in METRICS if m.higher_is_better is not None}


def e(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return e(v)


def token_html(tokens: Sequence[str], scores: Sequence[float], *, merge: bool = True, cmap=None) -> str:
    """Words as coloured spans (red: for the target, blue: against); word pieces merged, the raw score of
    every piece on hover (:func:`relprop.visualize.tokens_html`)."""
    from ..visualize import tokens_html

    return tokens_html(tokens, scores, merge=merge, cmap=cmap)


def page(title: str, subtitle: str, nav: str, body: str) -> str:
    tpl = Template(resources.files("relprop.report").joinpath("template.html").read_text(encoding="utf-8"))
    return tpl.safe_substitute(title=e(title), subtitle=subtitle, nav=nav, body=body)


def render(results: dict, out) -> str:
    """Write ``OUT/index.html`` (``out``: a folder, a URL or an :class:`~relprop.report.store.Output`);
    returns where it went."""
    from .store import Output

    models = results["models"]
    methods = results["methods"]
    s = results["settings"]
    data = results["data"]
    parts: list[str] = []
    nav = ['<a href="#ranking">Ranking</a>'] + [f'<a href="#{e(m["anchor"])}">{e(m["name"])}</a>' for m in models]
    nav += ['<a href="#settings">Settings</a>', '<a href="results.json">results.json</a>']

    # ranking -------------------------------------------------------------------------------------
    rows = _ranking_rows(results)
    status = results.get("status", "complete")
    banner = ""
    if status == "incomplete":
        banner = f'<p class="bad" id="incomplete">This run is incomplete: {len(results.get("problems", []))} cell(s) failed.</p>'
        banner += '<ul class="bad">' + "".join(f"<li>{e(p)}</li>" for p in results.get("problems", [])) + "</ul>"
    elif status != "complete":
        banner = (
            f'<p class="bad">This run was {e(status)}: {results.get("cells_done", 0)} of '
            f"{results.get('cells_total', 0)} cells finished. Re-run the same command to complete it "
            f"(finished cells are reused).</p>"
        )
    if results.get("warnings"):
        banner += (
            '<div class="bad" id="warnings"><b>Warnings</b><ul>'
            + "".join(f"<li>{e(w)}</li>" for w in results["warnings"])
            + "</ul></div>"
        )
    if results.get("notes"):  # informational (e.g. the default settings' own limits), not warnings
        banner += (
            '<div class="settings" id="notes"><b>Notes</b><ul>'
            + "".join(f"<li>{e(n)}</li>" for n in results["notes"])
            + "</ul></div>"
        )
    parts.append(f"""<section id="ranking"><h2>Ranking of models by the faithfulness of their explanations</h2>{banner}
{_ranking_intro(results)}
{_ranking_table(results, rows)}
{_per_method_table(results)}
{_img(results["figures"].get("ranking"), "ABPC per model and method; faithfulness against accuracy")}
</section>""")

    # per model -----------------------------------------------------------------------------------
    for m in models:
        head = (
            f'<section id="{e(m["anchor"])}"><h2>{e(m["name"])}<span class="pill">{e(m["spec"])}</span></h2>'
            f'<p class="muted">accuracy {fmt(m.get("accuracy"))} on {e(accuracy_count(m))} · '
            f"{fmt(m.get('num_params'))} parameters · LRP composite <code>{e(m.get('composite') or '–')}</code> · "
            f"preprocessing from {e((m.get('preprocess') or {}).get('source', '–'))}</p>"
        )
        if m.get("error"):
            parts.append(head + f'<p class="bad">Failed: {e(m["error"])}</p></section>')
            continue
        rows = _metric_rows(m, s)
        header = _metric_header(s)
        body = [head, "<h3>Heatmaps</h3>"]
        if m.get("grid_figure"):
            body.append(_img(m["grid_figure"], f"heatmaps of {m['name']}: inputs x methods"))
            body.append(
                '<p class="muted">Each heatmap is drawn over its input (grey): red is evidence for the explained '
                "class (the prediction), blue against; every row (method) shares one colour scale, shown by its "
                "colour bar. Column titles: true label / prediction.</p>"
            )
        elif m.get("grid_text"):
            body.append(m["grid_text"])
        else:
            body.append('<p class="muted">No heatmaps (no method finished).</p>')
        body.append(
            "<h3>Metrics</h3>"
            + scrolling(f'<table class="metrics"><tr><th class="l">Method</th>{header}</tr>{"".join(rows)}</table>')
        )
        body.append(
            f'<p class="muted">Mean over the examples with its {int(s.get("confidence", 0.95) * 100)}% bootstrap '
            "interval in brackets (the explanation time has none: it is measured per batch). Hover a column "
            f"name for its definition. {e(bold_legend(s))}</p>"
        )
        body.append(_perturbation_settings(m, s, m.get("kind") or data["kind"]))
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
        for k, v in shown_settings(s, data["kind"]).items()
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
    o = Output(out)
    o.write_text(
        "index.html", page("relprop: how models explain their predictions", subtitle, "".join(nav), "\n".join(parts))
    )
    return o.where("index.html")


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


# ------------------------------------------------------------------------------------------ tables
def ci_text(summary: dict | None, digits: int = 3) -> str:
    """``mean [lo, hi]`` (the interval only when there are two or more examples)."""
    if not summary or summary.get("mean") is None:
        return "–"
    txt = f"{summary['mean']:.{digits}f}"
    lo, hi = summary.get("ci") or (None, None)
    if lo is not None and hi is not None and summary.get("n", 0) > 1 and hi > lo:
        txt += f' <span class="ci">[{lo:.{digits}f}, {hi:.{digits}f}]</span>'
    return txt


def shown_metrics(s: dict) -> list:
    """The metric columns of this run: every metric whose group ran (a check switched off by the settings
    has no column; the report says it was not run, :func:`relprop.report.cell_metrics.not_run`)."""
    off = _not_run(s)
    return [m for m in METRICS if m.group not in off]


def _sub(m) -> str:
    """A header's second line: the direction, or the unit and note of a number that is not a quality."""
    text = m.direction or ", ".join(x for x in (m.unit, m.note) if x)
    return f'<br><span class="dir">{e(text)}</span>' if text else ""


def _metric_header(s: dict) -> str:
    cells = []
    for m in shown_metrics(s):
        tip = f"{m.direction}: {m.tip}" if m.direction else m.tip
        cells.append(f'<th title="{e(tip)}">{e(m.label)}{_sub(m)}</th>')
    cells.append(
        '<th title="metric computation time of the cell (apart from the explanations)">Metric time'
        '<br><span class="dir">s per cell</span></th>'
    )
    if "randomisation" not in _not_run(s):
        cells.append(
            '<th title="pass: the whole interval of the |a| similarity is below the threshold; fail: above; '
            'inconclusive: the interval straddles it (use more --randomisation-samples)">Randomisation'
            '<br><span class="dir">check</span></th>'
        )
    return "".join(cells)


def _not_run(s: dict) -> dict[str, str]:
    from .cell_metrics import not_run

    return not_run(s)


def _metric_rows(m: dict, s: dict) -> list[str]:
    """One row per method; bold: the cell's ``best`` flags (every method tied for best by the paired
    bootstrap of the ranks, computed where the per-example values are: ``run_compare``)."""
    metrics = shown_metrics(s)
    rand = "randomisation" not in _not_run(s)
    rows = []
    ncol = len(metrics) + 1 + rand
    for c in m["methods"]:
        if c.get("status") != "ok":
            rows.append(
                f'<tr><td class="l name">{e(c["method"])}</td><td class="l bad" colspan="{ncol}">'
                f"{e(c.get('status'))}: {e(c.get('error', ''))}</td></tr>"
            )
            continue
        tds = []
        best = set(c.get("best") or ())
        for spec in metrics:
            summ = (c.get("summary") or {}).get(spec.key)
            if summ is None and c.get(spec.key) is not None:  # older results.json: a mean only
                summ = {"mean": c[spec.key], "ci": [None, None], "n": 1}
            txt = ci_text(summ, spec.digits)
            if spec.key in best:
                txt = f"<b>{txt}</b>"
            tds.append(f"<td>{txt}</td>")
        tds.append(f"<td>{fmt(c.get('metric_seconds'), 1)}</td>")
        if rand:
            verdict = c.get("randomisation_check")
            cls = {"pass": "ok", "fail": "bad"}.get(verdict or "", "muted")
            tds.append(f'<td class="{cls}">{e(verdict or "–")}</td>')
        reused = ' <span class="pill">reused</span>' if c.get("reused") else ""
        rows.append(f'<tr><td class="l name">{e(c["method"])}{reused}</td>{"".join(tds)}</tr>')
    return rows


def scrolling(table: str) -> str:
    """A table in a container that scrolls sideways when the table is wider than the page, with a hint above
    it that the page's script shows only then (the last columns are never cut off)."""
    return (
        '<p class="muted scroll-hint" hidden>Scroll sideways for more columns →</p>'
        f'<div class="table-wrap" tabindex="0">{table}</div>'
    )


def best_methods(r: dict) -> str:
    """A ranking row's best method, or every method tied for best: "input_x_gradient = lrp (tied)"."""
    names = r.get("best_methods") or ([r["best_method"]] if r.get("best_method") else [])
    if len(names) > 1:
        return " = ".join(names) + " (tied)"
    return names[0] if names else "–"


def incomplete_text(r: dict) -> str:
    """The words for a model the run stopped in (Ctrl-C), "incomplete: 1 of 2 methods finished; not ranked,
    its means are over those only"; else "". Such a model has no rank, tie or best mark (``report._assemble``)."""
    part = r.get("interrupted")
    if not part:
        failed = r.get("failed_methods")
        if failed:
            return f"{', '.join(failed)} failed; not ranked overall, its means are over the other methods"
        return ""
    if not part["cells_done"]:
        return "incomplete: no method finished"
    return (
        f"incomplete: {part['cells_done']} of {part['cells_total']} methods finished; not ranked, "
        "its means are over those only"
    )


def accuracy_count(m: dict) -> str:
    """The examples an accuracy is over: "12 examples", or "6 of 12 examples (6 have no model class)" when
    some labels match no class of the model (``--labels ignore``) and so are left out of it."""
    n, total = m.get("n_eval"), m.get("n_total", m.get("n_eval"))
    if n is None:
        return "– examples"
    if total is None or total == n:
        return f"{n} examples"
    return f"{n} of {total} examples ({total - n} have no model class)"


def bold_legend(s: dict) -> str:
    """What bold means in a table (the same test as the ranks)."""
    level = int(s.get("confidence", 0.95) * 100)
    return (
        "Bold: best of the column and every row tied with it: no other row is significantly better (the "
        f"{level}% paired-bootstrap interval of the per-example difference contains 0, the test of the ranks). "
        "Ties are pairwise, so not transitive: a value can tie the best while another value between them does not."
    )


#: settings that only image data uses (text perturbs tokens, ``--steps`` of them; no patches or baselines)
IMAGE_ONLY_SETTINGS = ("patch_grid", "regions", "baseline", "insertion_baseline")
#: the options that set the perturbation metrics, per data kind
PERTURBATION_FLAGS = {
    "image": ("--baseline", "--insertion-baseline", "--patch-grid", "--regions", "--steps"),
    "text": ("--steps",),
}


def shown_settings(s: dict, kind: str) -> dict:
    """The settings that apply to ``kind`` data, for display; ``device``/``dtype`` as requested → used
    (``auto → cpu``) where the run resolved them (``device_used``/``dtype_used``), and the models whose
    own dtype was not ``dtype`` (``dtype_cast``)."""
    out = {k: v for k, v in s.items() if not (kind != "image" and k in IMAGE_ONLY_SETTINGS)}
    for k in ("device", "dtype"):
        used = out.pop(f"{k}_used", None)
        if used is not None and k in out and str(out[k]) != str(used):
            out[k] = f"{out[k]} → {used}"
    if cast := out.pop("dtype_cast", None):  # models cast to --dtype (a float64 model under float32)
        froms = ", ".join(f"{name} from {'/'.join(own)}" for name, own in cast.items())
        out["dtype"] = f"{out.get('dtype')} (models cast to it: {froms})"
    return out


def _perturbation_settings(m: dict, s: dict, kind: str = "image") -> str:
    """The perturbation settings in words, next to the numbers they produced."""
    c = next((c for c in m["methods"] if c.get("status") == "ok" and c.get("perturbation")), None)
    if c is None:
        return ""
    p = c["perturbation"]
    items = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in p.items())
    thr = s.get("randomisation_threshold", 0.5)
    off = _not_run(s)
    if "randomisation" in off:
        rand = f'<li class="not-run"><b>randomisation check</b>: not run ({e(off["randomisation"].split(": ", 1)[-1])})</li>'
    else:
        rand = (
            f"<li><b>randomisation check</b>: Spearman similarity of |attributions| before and after randomising "
            f"the top {e(s.get('randomisation_layers'))} layers on {e(s.get('randomisation_samples'))} examples; "
            f"passes when its interval lies below {thr}</li>"
        )
    return (
        f'<div class="settings" id="perturbation-{e(m["anchor"])}"><b>Perturbation settings</b> '
        f"(set with {', '.join(f'<code>{f}</code>' for f in PERTURBATION_FLAGS[kind])}):<ul>{items}{rand}"
        f"<li><b>intervals</b>: {e(s.get('bootstrap'))} bootstrap resamples (seed {e(s.get('seed'))})</li></ul></div>"
    )


def _rank_spec(results: dict):
    """The metric the rankings of this run used (``--rank-by``)."""
    key = (results.get("settings") or {}).get("rank_by") or RANK_METRIC
    return BY_KEY.get(key, BY_KEY[RANK_METRIC])


def _ranking_columns(s: dict) -> list[str]:
    """The metric columns of the ranking table: the rankable ones, then the checks that ran."""
    off = _not_run(s)
    return list(RANKABLE) + [k for k in ("class_sensitivity", "randomisation_similarity") if BY_KEY[k].group not in off]


def _ranking_rows(results: dict) -> list[str]:
    rows = []
    names = {r["anchor"]: r["name"] for r in results["ranking"]}
    s = results["settings"]
    cols = _ranking_columns(s)

    def cell(r: dict, k: str) -> str:
        txt = ci_text((r.get("overall") or {}).get(k))
        return f"<td><b>{txt}</b></td>" if k in (r.get("best") or ()) else f"<td>{txt}</td>"

    for r in results["ranking"]:
        ties = ", ".join(names.get(t, t) for t in r.get("tied_with", []))
        tie = (
            f' <span class="tie" title="paired bootstrap interval of the difference contains 0">tie with {e(ties)}</span>'
            if ties
            else ""
        )
        cut = f'<br><span class="muted">{e(incomplete_text(r))}</span>' if incomplete_text(r) else ""
        rows.append(
            f"<tr><td>{r['rank'] if r.get('rank') is not None else '–'}{tie}</td>"
            f'<td class="l name"><a href="#{e(r["anchor"])}">{e(r["name"])}</a><br><span class="muted">{e(r["model"])}</span>{cut}</td>'
            f"<td>{fmt(r.get('mean_rank'), 2)}</td>"
            + "".join(cell(r, k) for k in cols if k in RANKABLE)
            + f'<td class="l">{e(best_methods(r))}</td><td>{fmt(r.get("accuracy"))}</td>'
            + "".join(cell(r, k) for k in cols if k not in RANKABLE)
            + "</tr>"
        )
    return rows


def _ranking_intro(results: dict) -> str:
    spec = _rank_spec(results)
    s, data = results["settings"], results["data"]
    n = data.get("n_metrics", s["samples"])
    return f"""<p class="muted">Rank: the mean over methods of each model's rank by <b>{e(spec.label)}</b>
({e(spec.direction)}; {e(spec.tip)}). Within a method, a model's rank is 1 + the number of models that are
significantly better: two models tie when the {int(s.get("confidence", 0.95) * 100)}% paired-bootstrap interval
of their per-example difference contains 0. Every number is a mean over methods and examples with its bootstrap
interval in brackets. Accuracy on those of the {data["n"]} examples of <code>{e(data["spec"])}</code> that have a model
class (per model below); metrics on {n}
examples per model. {e(bold_legend(s))}{e(_unranked_note(results))}</p>{_not_run_note(s)}"""


def _unranked_note(results: dict) -> str:
    """Why a model a Ctrl-C stopped in has no rank: its means are over fewer methods than the others'."""
    rows = results.get("ranking", [])
    failed = (
        " A model with a failed method takes no overall rank or bold mark either (its per-method ranks stand)."
        if any(r.get("failed_methods") for r in rows)
        else ""
    )
    if not any(r.get("interrupted") for r in rows):
        return failed
    return failed + (
        " A model whose methods did not all finish (the run was interrupted) is listed with the means of what "
        "finished but takes no rank, tie or bold mark: the complete models are ranked among themselves, as in a "
        "run without it."
    )


def _not_run_note(s: dict) -> str:
    """The checks the settings switched off, said once at the top (their columns are left out)."""
    off = _not_run(s)
    if not off:
        return ""
    items = "".join(f"<li>{e(v[0].upper() + v[1:])}.</li>" for v in off.values())
    return f'<ul class="muted" id="not-run">{items}</ul>'


def _ranking_table(results: dict, rows: list[str]) -> str:
    spec = _rank_spec(results)

    def th(key: str, label: str | None = None) -> str:
        m = BY_KEY[key]
        mark = " (ranked by)" if key == spec.key else ""
        return f'<th title="{e(m.tip)}">{e(label or m.label)}<br><span class="dir">{e(m.direction)}{mark}</span></th>'

    return scrolling(
        f'<table id="ranking-table"><tr><th>#</th><th class="l">Model</th>'
        f'<th title="mean over methods of the rank by {e(spec.label)}">Mean rank<br><span class="dir">by {e(spec.label)}, lower is better</span></th>'
        + "".join(th(k) for k in RANKABLE)
        + f'<th class="l">Best method<br><span class="dir">by {e(spec.label)}</span></th><th>Accuracy</th>'
        + "".join(th(k) for k in _ranking_columns(results["settings"]) if k not in RANKABLE)
        + f"</tr>{''.join(rows)}</table>"
    )


def _per_method_table(results: dict) -> str:
    per = results.get("rankings_per_method") or {}
    if not per:
        return ""
    spec = _rank_spec(results)
    models = [r["anchor"] for r in results["ranking"]]
    names = {r["anchor"]: r["name"] for r in results["ranking"]}
    head = "".join(f"<th>{e(k)}</th>" for k in per)
    body = []
    for a in models:
        tds = []
        for rows in per.values():
            r = next((x for x in rows if x["model"] == a), None)
            if r is None or r.get("rank") is None:
                tds.append("<td>–</td>")
                continue
            tie = " =" if r.get("ties_with") else ""
            tds.append(f'<td title="{e(spec.label)} {fmt(r.get("mean"))}">{r["rank"]}{tie}</td>')
        body.append(f'<tr><td class="l name">{e(names[a])}</td>{"".join(tds)}</tr>')
    return (
        f'<h3>Rank per method (by {e(spec.label)}, {e(spec.direction)}; "=": tied with another model)</h3>'
        + scrolling(f'<table id="per-method-ranks"><tr><th class="l">Model</th>{head}</tr>{"".join(body)}</table>')
    )
