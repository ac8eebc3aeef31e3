"""Model-comparison reports: every model x method over a dataset, into one folder.

``run_compare(models, data, methods, out)`` writes ``out/index.html`` (opens in a browser with no
server), ``out/results.json`` (every number), ``out/figures/*.png`` and ``out/cache/`` (one file per
finished model x method cell, reused by the next run with the same settings). ``relprop compare``
on the command line is this function. Needs matplotlib (``pip install 'relprop[report]'``).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..specs import LoadedModel, SpecError, load_model
from .compare import Job, MethodSpec, Settings, slug

__all__ = ["MethodSpec", "Settings", "run_compare"]


class _Bar:
    """tqdm when available, else nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="cell", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def describe(self, text: str):
        if self.bar is not None:
            self.bar.set_description(text[:60])

    def write(self, text: str, log):
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            log(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _summary(res: dict) -> str:
    keys = [
        ("abpc_norm", "ABPC"),
        ("insertion_auc", "ins"),
        ("deletion_auc", "del"),
        ("class_sensitivity", "cls-sens"),
        ("randomisation_similarity", "rand-sim"),
    ]
    return ", ".join(f"{n} {res[k]:.3f}" for k, n in keys if res.get(k) is not None)


def run_compare(
    models: Sequence[str],
    data,
    methods: Sequence[MethodSpec],
    out: str | Path,
    settings: Settings,
    *,
    weights: dict[str, str] | None = None,
    num_classes: int | None = None,
    preprocess_overrides: dict | None = None,
    force: bool = False,
    progress: bool = True,
    command: str = "",
    log: Callable[[str], None] = print,
    header: str | None = None,
) -> dict:
    """Run the comparison; return the results dict (also written to ``out/results.json``)."""
    from ..specs import override_preprocess
    from . import figures, html

    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    job = Job(out, data, list(methods), settings, force=force, log=log, progress=progress)
    t_start = time.time()
    total = len(models) * len(methods)
    bar = _Bar(total, progress)
    results_models: list[dict] = []
    done = 0
    status = "complete"
    grid_idx = job.indices[: settings.grid]
    current: dict[str, Any] = {}
    try:
        for spec in models:
            entry: dict[str, Any] = {
                "spec": spec,
                "name": spec.split(":", 1)[-1].rstrip("/").split("/")[-1],
                "methods": [],
            }
            entry["anchor"] = "m-" + slug(spec)
            results_models.append(entry)
            bar.describe(f"loading {spec}")
            model: LoadedModel = load_model(spec, weights=(weights or {}).get(spec), num_classes=num_classes)
            if model.kind == "similarity":
                raise SpecError(
                    f"{spec} is a sentence-similarity model without classes; use it with "
                    f"relprop explain --model {spec} --input TEXT --reference TEXT"
                )
            if model.kind != data.kind:
                raise SpecError(f"model {spec} takes {model.kind} inputs but the data {data.spec} holds {data.kind}s")
            if model.kind == "image" and preprocess_overrides:
                model.preprocess = override_preprocess(model.preprocess, **preprocess_overrides)
            if header:
                log(header)
                header = None
            if (
                model.kind == "image"
                and model.preprocess
                and model.preprocess.source in ("defaults", "inferred (first conv layer)")
            ):
                bar.write(
                    f"  note: {model.name} has no preprocessing configuration: images go in as pixels in [0, 1]"
                    f"{'' if model.preprocess.size else ' at their own size'}; set --image-size/--mean/--std "
                    f"if it expects otherwise",
                    log,
                )
            entry.update(
                name=model.name,
                kind=model.kind,
                num_params=model.info.get("num_params"),
                source=model.info.get("source"),
                preprocess=model.preprocess.describe()
                if model.preprocess
                else {"source": "its tokenizer" if model.tokenizer is not None else "–"},
            )
            from ..specs import default_composite

            entry["composite"] = settings.composite if settings.composite != "auto" else default_composite(model)
            bar.describe(f"{model.name}: accuracy")
            acc = job.accuracy(model)
            entry.update(accuracy=acc["accuracy"], n_eval=acc["n"])
            prep = None
            cells: dict[str, dict] = {}
            current = {"entry": entry, "model": model, "cells": cells}
            for m in methods:
                bar.describe(f"{model.name} × {m.label}")
                cell = job.cached_cell(model, m)
                if cell is None:
                    if prep is None:
                        prep = job.prepare(model, job.indices)
                    try:
                        cell = job.compute_cell(model, m, prep)
                    except KeyboardInterrupt:
                        raise
                    except Exception as ex:  # a method that fails on a model is reported, not fatal
                        msg = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
                        cell = {
                            "method": m.label,
                            "name": m.name,
                            "status": "failed",
                            "error": f"{type(ex).__name__}: {msg}"[:300],
                            "reused": False,
                        }
                        bar.write(f"  {model.name} × {m.label}: failed ({cell['error']})", log)
                    else:
                        cell["status"] = "ok"
                        bar.write(f"  {model.name} × {m.label}: {_summary(cell)} ({cell['seconds']:.1f} s)", log)
                else:
                    cell["status"] = "ok"
                    bar.write(f"  {model.name} × {m.label}: reused cached result ({_summary(cell)})", log)
                cells[m.label] = cell
                done += 1
                bar.update(1)
            current = {}
            _finish_model(entry, model, cells, job, prep, grid_idx, data, out, figures, html)
    except KeyboardInterrupt:
        status = "interrupted"
        bar.write("interrupted: writing the report from the finished cells", log)
        if current.get("cells"):
            try:
                _finish_model(
                    current["entry"], current["model"], current["cells"], job, None, grid_idx, data, out, figures, html
                )
            except (Exception, KeyboardInterrupt):
                pass
    finally:
        bar.close()
    results = _assemble(results_models, list(methods), data, settings, command, status, done, total, t_start, out)
    if results_models:
        try:
            results["figures"]["ranking"] = str(
                figures.ranking_figure(
                    [m for m in results["models"] if m.get("methods")],
                    [m.label for m in methods],
                    out / "figures" / "ranking.png",
                ).relative_to(out)
            )
        except Exception:
            pass
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    html.render(results, out)
    return results


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _finish_model(entry, model, cells, job: Job, prep, grid_idx, data, out: Path, figures, html):
    """Figures and the JSON view of one model's cells."""
    fig_dir = out / "figures"
    ok = {k: c for k, c in cells.items() if c.get("status") == "ok"}
    for label, c in cells.items():
        entry["methods"].append({k: v for k, v in c.items() if k not in ("grid_attributions",)})
    if not ok:
        return
    if prep is None:
        prep = job.prepare(model, grid_idx)
    g = min(len(grid_idx), *(len(c["grid_attributions"]) for c in ok.values()))
    names = data.class_names
    titles = [f"true {names[int(prep.labels[j])]} / pred {_cls(model, int(prep.pred[j]))}" for j in range(g)]
    if data.kind == "image":
        heat = {k: c["grid_attributions"][:g] for k, c in ok.items()}
        p = fig_dir / f"{slug(model.spec)}_grid.png"
        figures.heatmap_grid(
            prep.display[:g], heat, titles, p, title=f"{model.name}: heatmaps of the predicted class (rows: methods)"
        )
        entry["grid_figure"] = str(p.relative_to(out))
    else:
        toks = prep.tokens[:g]
        entry["grid_text"] = html.text_grid(
            toks, titles, {k: [a.tolist() for a in c["grid_attributions"][:g]] for k, c in ok.items()}
        )
        entry["grid_tokens"] = toks
    p = fig_dir / f"{slug(model.spec)}_curves.png"
    figures.curves_figure(ok, p, title=f"{model.name}: perturbation curves (mean over {job.s.samples} examples)")
    entry["curves_figure"] = str(p.relative_to(out))


def _cls(model: LoadedModel, i: int) -> str:
    names = model.class_names
    return names[i] if names and i < len(names) else str(i)


def _assemble(models, methods, data, settings, command, status, done, total, t_start, out) -> dict:
    import relprop

    ranking = []
    for m in models:
        oks = [c for c in m.get("methods", []) if c.get("status") == "ok" and c.get("abpc_norm") is not None]
        m["faithfulness"] = sum(c["abpc_norm"] for c in oks) / len(oks) if oks else None
        best = max(oks, key=lambda c: c["abpc_norm"]) if oks else None
        for key in ("class_sensitivity", "randomisation_similarity"):
            vals = [c[key] for c in oks if c.get(key) is not None]
            m[key] = sum(vals) / len(vals) if vals else None
        ranking.append(
            {
                "model": m["spec"],
                "name": m.get("name"),
                "anchor": m.get("anchor"),
                "faithfulness": m["faithfulness"],
                "accuracy": m.get("accuracy"),
                "best_method": best["method"] if best else None,
                "class_sensitivity": m.get("class_sensitivity"),
                "randomisation_similarity": m.get("randomisation_similarity"),
            }
        )
    ranking.sort(key=lambda r: (r["faithfulness"] is None, -(r["faithfulness"] or 0.0)))
    for i, r in enumerate(ranking, 1):
        r["rank"] = i if r["faithfulness"] is not None else None
    for m in models:
        m["rank"] = next(r["rank"] for r in ranking if r["anchor"] == m.get("anchor"))
    return {
        "relprop_version": relprop.__version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "status": status,
        "cells_done": done,
        "cells_total": total,
        "seconds": round(time.time() - t_start, 1),
        "settings": asdict(settings),
        "data": {
            "spec": data.spec,
            "name": data.name,
            "kind": data.kind,
            "n": len(data),
            "class_names": data.class_names,
            "source": data.info.get("source"),
        },
        "methods": [m.label for m in methods],
        "models": models,
        "ranking": ranking,
        "figures": {},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
    }
