"""Model-comparison reports: every model x method over a dataset, into one folder.

``run_compare(models, data, methods, out)`` writes ``out/index.html`` (opens in a browser with no
server), ``out/results.json`` (every number), ``out/figures/*.png`` and ``out/cache/`` (one file per
finished model x method cell, reused by the next run with the same settings); ``out`` is a folder
or any fsspec URL (:class:`~relprop.report.store.Output`). ``relprop compare`` on the command line
is this function. Needs matplotlib (``pip install '.[report]'`` from the clone).

Models and data may be your own PyTorch objects::

    from relprop.report import Settings, run_compare

    res = run_compare({"small": net_a, "wide": net_b}, (images, labels), ["lrp", "saliency"], "report",
                      Settings(samples=32))
    res["ranking"][0]["name"]

models: spec strings (as on the command line), ``nn.Module`` s (a mapping name -> module, or a list) or
:class:`~relprop.specs.LoadedModel` s; data: a spec string, ``(inputs, labels)`` or ``(inputs, labels,
class_names)`` tensors (the models' inputs as they are), a map-style ``Dataset`` of ``(input, label)`` or a
:class:`~relprop.specs.Data`; methods: ``"NAME[:KEY=VALUE...]"`` strings or :class:`MethodSpec` s. The
conversion happens once, in :mod:`relprop.specs.adapters`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..specs import LoadedModel, SpecError, load_model
from ..specs.adapters import MODEL_INPUTS, from_dataset, from_module, from_tensors
from .compare import (
    Job,
    MethodSpec,
    Settings,
    check_seed,
    dedupe_methods,
    failed_cell,
    method_identity,
    one_line,
    slug,
)
from .interrupt import Interrupt
from .store import Output

__all__ = ["MethodSpec", "Settings", "from_dataset", "from_module", "from_tensors", "run_compare"]


def _bars_wanted(progress: bool) -> bool:
    """Progress bars (the cells', the metrics') only when asked for and stderr is a terminal, or the
    environment variable ``RELPROP_PROGRESS`` is set: redirected logs get one line per cell instead."""
    return bool(progress) and (sys.stderr.isatty() or bool(os.environ.get("RELPROP_PROGRESS")))


class _Bar:
    """A tqdm bar when ``enabled`` and tqdm is installed; else nothing, and :meth:`write` logs the line."""

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
    """One terminal line per cell, from the metric list: mean [CI] of each metric."""
    from .scores import METRICS

    out = []
    for m in METRICS:
        v = (res.get("summary") or {}).get(m.key)
        if v and v.get("mean") is not None and m.group != "time":
            lo, hi = v["ci"]
            ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None and v["n"] > 1 else ""
            out.append(f"{m.label} {v['mean']:.3f}{ci}")
    if res.get("randomisation_check"):
        out.append(f"randomisation check: {res['randomisation_check']}")
    if (res.get("perturbation") or {}).get("warning"):
        out.append("perturbation metrics uninformative (see the warnings)")
    return ", ".join(out)


def run_compare(
    models: Any,
    data: Any,
    methods: Sequence[str | MethodSpec],
    out: str | Path | Output,
    settings: Settings | None = None,
    *,
    weights: dict[str, str] | None = None,
    num_classes: int | None = None,
    preprocess_overrides: dict | None = None,
    force: bool = False,
    progress: bool = True,
    command: str = "",
    log: Callable[[str], None] = print,
    header: str | None = None,
    load: Callable[[str], LoadedModel] | None = None,
    use_cache: bool = True,
    warnings: Sequence[str] = (),
    engine: str = "local",
    ray_options: Any = None,
) -> dict:
    """Run the comparison; return the results dict (also written to ``out/results.json``). ``out``: a
    folder, or any fsspec URL (``file://``, ``memory://``, ``s3://``, ...: :class:`~relprop.report.store.Output`).

    ``models``: spec strings, ``nn.Module`` s (mapping name -> module, or a list) or loaded models; ``data``:
    a spec string, ``(inputs, labels[, class_names])`` tensors, a map-style ``Dataset`` or a ``Data``;
    ``methods``: method spec strings or :class:`MethodSpec` s (see the module docstring). A model that fails
    to load is reported like a failed cell (the run goes on; ``status`` "incomplete"). Two methods that are
    the same computation are computed once, with a warning naming both.

    ``engine``: "local" (one process, the default) or "ray" (model x method x data shards on a Ray actor
    pool, :mod:`relprop.report.distributed`; ``ray_options`` a :class:`~relprop.report.distributed.RayOptions`
    or a dict of its fields), with the same numbers.

    ``progress``: a tqdm bar over the cells while stderr is a terminal (or the environment variable
    ``RELPROP_PROGRESS`` is set); otherwise, and with False, no bar: one ``log`` line per cell (the CLI
    passes ``not --quiet``, so both behave the same). ``log``: where the per-cell lines, notes and, at the
    end, each warning once go (default ``print``).

    ``load``: spec -> LoadedModel (the CLI's loader, with its options and display names); ``use_cache``:
    False neither reads nor writes ``out/cache``; ``warnings``: shown in the report (``results["warnings"]``).
    """
    from ..specs import check_method, check_overrides, override_preprocess
    from ..specs.adapters import check_overrides_fit, frozen, to_data, to_models
    from . import cell_metrics, figures, html, store
    from .device import cast_text, check_placement, place_loaded, resolve_device, resolve_dtype

    settings = settings if settings is not None else Settings()
    check_placement(settings.device, settings.dtype)  # a bad device/dtype: one clear error before any work
    check_seed(settings.seed)
    check_overrides(**(preprocess_overrides or {}))  # a zero std, a NaN mean: one clear error before any work
    out = Output(out, flag="out")  # a bad URL, or a file where the folder goes: one clear error before any work
    out.check_folder()
    items = to_models(models)  # the one boundary: user objects -> specs and LoadedModels
    data = to_data(data)
    parsed = [m if isinstance(m, MethodSpec) else MethodSpec.parse(str(m)) for m in methods]
    for m in parsed:
        check_method(m)
    methods, same = dedupe_methods(parsed)
    if not methods:
        raise SpecError("no methods given")
    given = {m.spec: m for m in items if isinstance(m, LoadedModel)}

    def load_spec(spec: str) -> LoadedModel:
        return load(spec) if load else load_model(spec, weights=(weights or {}).get(spec), num_classes=num_classes)

    # tensors are used as given; mean/std counts vs each model's channels (spec strings loaded to see them)
    check_overrides_fit(preprocess_overrides, data, items, load=load_spec)

    def load_any(spec: str) -> LoadedModel:
        if spec in given:  # the user's own: a placed copy (settings.device/dtype), the original untouched
            return place_loaded(given[spec], settings.device, settings.dtype, copy=True)
        return place_loaded(load_spec(spec), settings.device, settings.dtype, copy=False)

    progress = _bars_wanted(progress)
    job = Job(out, data, list(methods), settings, force=force, log=log, progress=progress, use_cache=use_cache)
    data = job.data  # settings.limit/subset applied (Data.select)
    job.warnings.extend(w for w in warnings if w not in job.warnings)
    for w in same:
        job.warn(w)
    off = cell_metrics.not_run(settings)
    run = store.run_id(command, asdict(settings))  # the run id of every per-example row, either engine
    t_start = time.time()
    total = len(items) * len(methods)
    bar = _Bar(total, progress)
    results_models: list[dict] = []
    done = 0
    status = "complete"
    grid_idx = job.indices[: settings.grid]
    current: dict[str, Any] = {}
    pool = None
    restore = contextlib.ExitStack()  # the user's own modules go back to their train/grad state at the end
    if engine not in ("local", "ray"):
        raise SpecError(f"engine must be 'local' or 'ray', got {engine!r}")
    try:
        job.interrupt = restore.enter_context(Interrupt())  # Ctrl-C always stops the run (see .interrupt)
        if engine == "ray":
            from .distributed import RayEngine, RayOptions, _Loader

            opts = ray_options if isinstance(ray_options, RayOptions) else RayOptions(**(ray_options or {}))
            loader = _Loader(load_any, weights, num_classes, preprocess_overrides, frozenset(given))
            pool = RayEngine(data, methods, settings, out, options=opts, loader=loader, run=run, log=log)
        for item, spec in zip(items, _specs(items)):
            job.check_interrupt()
            entry = _model_entry(spec)
            results_models.append(entry)
            if header:
                log(header)
                header = None
                for why in off.values():
                    log(f"  note: {why}")
            bar.describe(f"loading {spec}")
            try:  # a model that fails to load or does not fit the data is reported, like a failed cell
                model: LoadedModel = load_any(spec)
                if not isinstance(item, str):
                    restore.enter_context(frozen(model.module))
                if model.kind == "similarity":
                    raise SpecError(
                        f"{spec} is a sentence-similarity model without classes; use it with "
                        f"relprop explain --model {spec} --input TEXT --reference TEXT"
                    )
                if model.kind != data.kind:
                    raise SpecError(
                        f"model {spec} takes {model.kind} inputs but the data {data.spec} holds {data.kind}s"
                    )
                if model.kind == "image" and preprocess_overrides:
                    model.preprocess = override_preprocess(model.preprocess, **preprocess_overrides)
            except KeyboardInterrupt:
                raise
            except Exception as ex:
                entry["error"] = f"could not load the model: {one_line(ex)}"
                bar.write(f"  {spec}: failed ({entry['error']})", log)
                done += len(methods)
                bar.update(len(methods))
                continue
            if model.info.get("no_cache") and job.use_cache:
                job.warn(f"{model.name}: results are not cached ({model.info['no_cache']})")
            if (
                model.kind == "image"
                and not data.info.get(MODEL_INPUTS)  # tensors are the inputs as given: nothing is preprocessed
                and model.preprocess
                and model.preprocess.source in ("defaults", "inferred (first conv layer)")
            ):
                bar.write(
                    f"  note: {model.name} has no preprocessing configuration: images go in as pixels in [0, 1]"
                    f"{'' if model.preprocess.size else ' at their own size'}; set --image-size/--mean/--std "
                    f"if it expects otherwise",
                    log,
                )
            if model.info.get("dtype_cast"):  # e.g. a float64 model under the default --dtype float32
                entry["dtype_cast"] = model.info["dtype_cast"]
                bar.write(f"  note: {cast_text(model.name, model.info['dtype_cast'])}", log)
            entry.update(
                name=model.name,
                kind=model.kind,
                num_params=model.info.get("num_params"),
                source=model.info.get("source"),
                preprocess={"source": "none (the tensors given are its inputs)"}
                if data.info.get(MODEL_INPUTS)
                else model.preprocess.describe()
                if model.preprocess
                else {"source": "its tokenizer" if model.tokenizer is not None else "–"},
            )
            from ..specs import default_composite

            entry["composite"] = settings.composite if settings.composite != "auto" else default_composite(model)
            bar.describe(f"{model.name}: accuracy")
            acc = job.accuracy(model)
            # n_eval: the examples the accuracy is over (those with a model class); n_total: all of them
            entry.update(accuracy=acc["accuracy"], n_eval=acc["n_labelled"], n_total=acc["n"])
            prep = None
            cells: dict[str, dict] = {}
            current = {"entry": entry, "model": model, "cells": cells}
            # methods that resolve to one computation on this model (e.g. lrp and lrp:composite=<its default>)
            first: dict[str, MethodSpec] = {}
            twin: dict[str, str] = {}
            for m in methods:
                try:
                    ident = method_identity(m, job.options(model, m))
                except Exception:  # noqa: BLE001 - options that cannot be resolved fail in their cell below
                    continue
                if ident in first:
                    twin[m.label] = first[ident].label
                    job.warn(
                        f"on {model.name}, methods '{first[ident].label}' and '{m.label}' are the same computation "
                        f"(same method and options); computed once"
                    )
                else:
                    first[ident] = m
            remote: dict[str, dict] = {}
            if pool is not None:
                bar.describe(f"{model.name}: on Ray")
                todo = [m for m in methods if m.label not in twin and job.cached_cell(model, m) is None]
                remote = pool.cells(model, job, todo)
            for m in methods:
                job.check_interrupt()
                cell: dict | None
                bar.describe(f"{model.name} × {m.label}")
                if m.label in twin:
                    src = cells[twin[m.label]]
                    cells[m.label] = dict(src, method=m.label, name=m.name, duplicate_of=twin[m.label])
                    bar.write(f"  {model.name} × {m.label}: the same as {twin[m.label]} (not computed again)", log)
                    done += 1
                    bar.update(1)
                    continue
                try:
                    cell = None if m.label in remote else job.cached_cell(model, m)
                except Exception as ex:  # noqa: BLE001 - e.g. no default Grad-CAM layer: a failed cell
                    cell = failed_cell(m, ex)
                if cell is not None and cell.get("status") == "failed":
                    bar.write(f"  {model.name} × {m.label}: failed ({cell['error']})", log)
                elif m.label in remote:
                    cell = remote[m.label]
                    if cell.get("status") == "failed":
                        bar.write(f"  {model.name} × {m.label}: failed ({cell['error']})", log)
                    else:
                        cell["status"] = "ok"
                        bar.write(f"  {model.name} × {m.label}: {_summary(cell)} ({cell['seconds']:.1f} s, Ray)", log)
                elif cell is None:
                    if prep is None:
                        prep = job.prepare(model, job.indices)
                    try:
                        cell = job.compute_cell(model, m, prep)
                    except KeyboardInterrupt:
                        raise
                    except Exception as ex:  # a method that fails on a model is reported, not fatal
                        cell = failed_cell(m, ex)
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
        if job.interrupt is not None:
            job.interrupt.seen()  # the report of the finished cells is written in full
        status = "interrupted"
        bar.write("interrupted: writing the report from the finished cells", log)
        if current:
            try:  # what finished of the model in progress: Ray's cells whose every shard is done, cached cells
                cells = _finished_cells(current["cells"], pool, job, current["model"], methods)
                done += len(cells) - len(current["cells"])
                for label, c in cells.items():  # Ray's finished cells and cached ones were not said yet
                    if label not in current["cells"]:
                        how = "reused cached result, " if c.get("reused") else ""
                        bar.write(f"  {current['model'].name} × {label}: {_summary(c)} ({how}finished)", log)
                if cells:
                    _finish_model(
                        current["entry"], current["model"], cells, job, None, grid_idx, data, out, figures, html
                    )
            except (Exception, KeyboardInterrupt):
                pass
        reached = {e["spec"] for e in results_models}  # the models not reached are listed too, with no cells
        results_models += [_model_entry(spec) for spec in _specs(items) if spec not in reached]
        for e in results_models:  # every model whose cells did not all finish is marked (terminal, report)
            got = len(e.get("methods", []))
            if got < len(methods) and not e.get("error"):
                e["interrupted"] = {"cells_done": got, "cells_total": len(methods)}
    finally:
        bar.close()
        restore.close()
        if pool is not None:
            engine_info = pool.info()
            pool.close()
    failed = [f"{m.get('spec')}: {m['error']}" for m in results_models if m.get("error")] + [
        f"{m.get('name')} × {c.get('method')}: {c.get('error')}"
        for m in results_models
        for c in m.get("methods", [])
        if c.get("status") == "failed"
    ]
    if failed and status == "complete":
        status = "incomplete"
    results = _assemble(results_models, list(methods), data, settings, command, status, done, total, t_start, out)
    results["problems"] = failed
    results["engine"] = engine_info if pool is not None else {"name": "local"}
    results["warnings"] = list(job.warnings)
    results["not_run"] = off
    # what --device/--dtype resolved to (auto -> cpu or cuda), next to what was asked for
    results["settings"]["device_used"] = str(resolve_device(settings.device))
    results["settings"]["dtype_used"] = str(resolve_dtype(settings.dtype)).replace("torch.", "")
    if cast := {m["name"]: m["dtype_cast"]["from"] for m in results_models if m.get("dtype_cast")}:
        results["settings"]["dtype_cast"] = cast  # the models whose own dtype(s) differ from the one they ran in
    results["data"]["n_metrics"] = min(settings.samples, len(data))
    if results_models:
        try:
            results["figures"]["ranking"] = out.write(
                "figures/ranking.png",
                lambda tmp: figures.ranking_figure(
                    [m for m in results["models"] if m.get("methods")],
                    [m.label for m in methods],
                    Path(tmp),
                    metric=settings.rank_by,
                ),
            )
        except Exception:
            pass
    for w in cell_metrics.flat_warnings(results_models):
        job.warn(w)
        results["warnings"] = list(job.warnings)
    results["notes"] = []
    note = _inconclusive(results_models, settings)
    if note is not None:
        text, is_default = note
        if is_default:  # the default setting's own limit: said as a note, not a warning
            results["notes"].append(text)
        else:
            job.warn(text)
            results["warnings"] = list(job.warnings)
    _write_examples(results, out, job, run)
    for w in results["warnings"]:  # each once, at the end (the caller's own ``warnings`` it has shown itself)
        if w not in warnings:
            log(f"relprop: WARNING: {w}")
    for n in results["notes"]:
        log(f"relprop: note: {n}")
    out.write_text("results.json", json.dumps(results, indent=2, default=_json_default))
    html.render(results, out)
    return results


def _inconclusive(models: list[dict], settings: Settings) -> tuple[str, bool] | None:
    """The words for the cells whose randomisation check is inconclusive, each with its reason (too few
    examples, or an interval that straddles the threshold), and whether only the default
    ``randomisation_samples`` is to blame (then a note: the default demo does not warn about its defaults).
    The pass/fail rule itself is :func:`relprop.report.cell_metrics.randomisation_verdict`, unchanged."""
    from dataclasses import fields

    from .cell_metrics import MIN_RANDOMISATION_EXAMPLES, inconclusive_reason

    thr = settings.randomisation_threshold
    why: dict[str, list[str]] = {"few": [], "straddles": []}
    for m in models:
        for c in m.get("methods", []):
            if c.get("status") == "ok" and c.get("randomisation_check") == "inconclusive":
                reason = inconclusive_reason(c.get("summary") or {}, thr) or "straddles"
                why[reason].append(f"{m.get('name')} × {c.get('method')}")

    def cells(names: list[str]) -> str:
        return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

    parts = []
    if why["straddles"]:
        parts.append(
            f"for {len(why['straddles'])} cell(s) ({cells(why['straddles'])}) the interval of the similarity "
            f"straddles the threshold {thr}: neither clearly below (pass) nor above (fail)"
        )
    if why["few"]:
        parts.append(
            f"for {len(why['few'])} cell(s) ({cells(why['few'])}) it ran on fewer than "
            f"{MIN_RANDOMISATION_EXAMPLES} examples"
        )
    if not parts:
        return None
    k = settings.randomisation_samples
    more = f"more --randomisation-samples (now {k})"
    if settings.samples < k:  # the check runs on the metric examples' first ones: --samples caps it
        more = f"more --samples (now {settings.samples}, which caps the check's {k} --randomisation-samples)"
    text = f"the randomisation check is inconclusive: {'; '.join(parts)}; {more} narrow the interval"
    default = next(f.default for f in fields(Settings) if f.name == "randomisation_samples")
    return text, (k == default and not why["few"])


def _write_examples(results: dict, out: Output, job: Job, run: str) -> None:
    """Per-example values to ``OUT/examples.parquet`` (the record every mean is computed from); without
    pyarrow they stay in results.json and the report says why. ``run``: the rows' run id."""
    from . import store

    results["run"] = run
    rows = [r for m in results["models"] for c in m.get("methods", []) if c.get("status") == "ok"
            for r in store.example_rows(run, m, c)]  # fmt: skip
    try:
        store.write_examples("examples.parquet", rows, out=out)
    except ImportError as e:
        job.warn(f"{e}; per-example values are kept in results.json instead")
        results["warnings"] = list(job.warnings)
        return
    results["examples_file"] = "examples.parquet"
    for m in results["models"]:
        for c in m.get("methods", []):
            c.pop("examples", None)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _specs(items) -> list[str]:
    return [item if isinstance(item, str) else item.spec for item in items]


def _model_entry(spec: str) -> dict[str, Any]:
    """A model's entry in ``results["models"]`` before anything of it is known."""
    name = spec.split(":", 1)[-1].rstrip("/").split("/")[-1]
    return {"spec": spec, "name": name, "methods": [], "anchor": "m-" + slug(spec)}


def _finished_cells(cells: dict, pool, job: Job, model, methods) -> dict:
    """The finished cells of an interrupted model, in the methods' order: those it has, the Ray engine's whose
    every shard is done (``pool.finished``), and cached ones (the rest of a resumed run)."""
    got = dict(cells)
    if pool is not None:
        got.update({k: dict(c, status="ok") for k, c in pool.finished.items() if c.get("status") != "failed"})
    for m in methods:
        if m.label not in got and job.use_cache:
            try:
                cached = job.cached_cell(model, m)
            except Exception:  # noqa: BLE001 - options that cannot be resolved: not a finished cell
                cached = None
            if cached is not None:
                got[m.label] = dict(cached, status=cached.get("status") or "ok")
    return {m.label: got[m.label] for m in methods if m.label in got}


def _finish_model(entry, model, cells, job: Job, prep, grid_idx, data, out: Output, figures, html):
    """Figures and the JSON view of one model's cells."""
    ok = {k: c for k, c in cells.items() if c.get("status") == "ok"}
    for label, c in cells.items():
        entry["methods"].append({k: v for k, v in c.items() if k not in ("grid_attributions",)})
    if not ok:
        return
    if prep is None:
        prep = job.prepare(model, grid_idx)
    g = min(len(grid_idx), *(len(c["grid_attributions"]) for c in ok.values()))
    names = data.class_names
    names = prep.label_names or [names[int(v)] for v in prep.labels]
    titles = [f"true {names[j]} / pred {_cls(model, int(prep.pred[j]))}" for j in range(g)]
    if data.kind == "image":
        heat = {k: c["grid_attributions"][:g] for k, c in ok.items()}
        title = f"{model.name}: heatmaps of the predicted class (rows: methods)"
        entry["grid_figure"] = out.write(
            f"figures/{slug(model.spec)}_grid.png",
            lambda tmp: figures.heatmap_grid(prep.display[:g], heat, titles, Path(tmp), title=title),
        )
    else:
        toks = prep.tokens[:g]
        entry["grid_text"] = html.text_grid(
            toks, titles, {k: [a.tolist() for a in c["grid_attributions"][:g]] for k, c in ok.items()}
        )
        entry["grid_tokens"] = toks
    title = f"{model.name}: perturbation curves (mean over {min(job.s.samples, len(job.indices))} examples)"
    entry["curves_figure"] = out.write(
        f"figures/{slug(model.spec)}_curves.png", lambda tmp: figures.curves_figure(ok, Path(tmp), title=title)
    )


def _cls(model: LoadedModel, i: int) -> str:
    names = model.class_names
    return names[i] if names and i < len(names) else str(i)


def _assemble(models, methods, data, settings, command, status, done, total, t_start, out) -> dict:
    import relprop

    from .scores import (
        BY_KEY,
        METRICS,
        RANK_METRIC,
        paired_difference,
        rank_models,
        summarise_metric,
        tied_for_best,
    )

    spec = BY_KEY[getattr(settings, "rank_by", None) or RANK_METRIC]
    boot = dict(n_boot=settings.bootstrap, level=settings.confidence, seed=settings.seed)

    def values(m: dict, method: str, key: str) -> dict[int, float]:
        c = next((c for c in m.get("methods", []) if c.get("method") == method and c.get("status") == "ok"), None)
        ex = (c or {}).get("examples") or {}
        return {i: v for i, v in zip(ex.get("example", []), ex.get(key, [])) if v is not None}

    def ranked(m: dict) -> bool:
        """Whether ``m`` takes part in ranks, ties and best marks: not a model a Ctrl-C stopped in. Its means are
        over the methods that finished, so next to complete models' they compare unequal things (a model with
        only its best method done would rank first); it is listed with its numbers, unranked, and the complete
        models rank as in a run without it."""
        return not m.get("interrupted")

    def finished(m: dict) -> set[str]:
        return {c["method"] for c in m.get("methods", []) if c.get("status") == "ok"}

    # Methods some ranked model finished: a model missing one of them (its cell failed) keeps its per-method ranks
    # but takes no overall rank or best mark, as a model a Ctrl-C stopped in: its means are over fewer methods.
    counted = set().union(*(finished(m) for m in models if ranked(m))) if models else set()

    def whole(m: dict) -> bool:
        return ranked(m) and counted <= finished(m)

    # rankings per method on the rank metric, then the overall rank as the mean rank over methods
    per_method = {}
    for meth in methods:
        per = {m["anchor"]: values(m, meth.label, spec.key) if ranked(m) else {} for m in models}
        rows = rank_models(per, spec, **boot)
        per_method[meth.label] = rows
    ranking = []
    for m in models:
        ranks = {k: next(r for r in rows if r["model"] == m["anchor"]) for k, rows in per_method.items()}
        got = [r["rank"] for r in ranks.values() if r["rank"] is not None]
        oks = [c for c in m.get("methods", []) if c.get("status") == "ok"]
        # per-example mean over methods: the model-level numbers and their intervals
        overall: dict[str, dict] = {}
        for metric in METRICS:
            by_example: dict[int, list[float]] = {}
            for c in oks:
                for i, v in values(m, c["method"], metric.key).items():
                    by_example.setdefault(i, []).append(v)
            overall[metric.key] = summarise_metric(metric, [sum(v) / len(v) for v in by_example.values()], **boot)
        m["overall"] = overall
        m["faithfulness"] = overall[spec.key]["mean"]
        for key in ("class_sensitivity", "randomisation_similarity"):
            m[key] = overall[key]["mean"]
        scored = [c for c in oks if c.get(spec.key) is not None]
        pick = max if spec.higher_is_better else min
        best = pick(scored, key=lambda c: c[spec.key]) if scored else None
        ranking.append(
            {
                "model": m["spec"],
                "name": m.get("name"),
                "anchor": m.get("anchor"),
                "metric": spec.key,
                "metric_label": spec.label,
                "mean_rank": sum(got) / len(got) if got and whole(m) else None,
                "ranks": {k: r["rank"] for k, r in ranks.items()},
                "ties": {k: r["ties_with"] for k, r in ranks.items()},
                "faithfulness": m["faithfulness"],
                "overall": overall,
                "accuracy": m.get("accuracy"),
                "n_eval": m.get("n_eval"),
                "n_total": m.get("n_total"),
                "best_method": best["method"] if best and ranked(m) else None,
                "interrupted": m.get("interrupted"),  # {"cells_done", "cells_total"} when the run stopped in it
                # the methods whose cells failed, where others finished them: unranked overall (see whole())
                "failed_methods": sorted(counted - finished(m)) if ranked(m) and finished(m) else [],
                # every perturbation metric of the model's finished cells is flagged uninformative
                "uninformative": bool(oks) and all((c.get("perturbation") or {}).get("warning") for c in oks),
                "class_sensitivity": m.get("class_sensitivity"),
                "randomisation_similarity": m.get("randomisation_similarity"),
            }
        )

    def method_mean(m: dict, key: str) -> dict[int, float]:
        """Per example, the mean over the model's finished methods (examples all of them have)."""
        per_ex: dict[int, list[float]] = {}
        for c in m.get("methods", []):
            if c.get("status") == "ok":
                for i, v in values(m, c["method"], key).items():
                    per_ex.setdefault(i, []).append(v)
        n_ok = sum(1 for c in m.get("methods", []) if c.get("status") == "ok")
        return {i: sum(v) / len(v) for i, v in per_ex.items() if len(v) == n_ok}

    # bold in the tables: every row tied for best by the ranks' paired-bootstrap test (scores.tied_for_best)
    for m in models:
        oks = [c for c in m.get("methods", []) if c.get("status") == "ok"]
        for c in oks:
            c["best"] = []
        for metric in METRICS if ranked(m) else ():  # the best of an incomplete model's methods: unknown
            for label in tied_for_best({c["method"]: values(m, c["method"], metric.key) for c in oks}, metric, **boot):
                next(c for c in oks if c["method"] == label)["best"].append(metric.key)
    # the best method of a model: every method tied for best on the rank metric (all names on a tie)
    for r in ranking:
        m = next(m for m in models if m["anchor"] == r["anchor"])
        tied = [c for c in m.get("methods", []) if spec.key in (c.get("best") or ()) and c.get(spec.key) is not None]
        tied.sort(key=lambda c: -c[spec.key] if spec.higher_is_better else c[spec.key])  # best mean first
        r["best_methods"] = [c["method"] for c in tied] or ([r["best_method"]] if r["best_method"] else [])
    for r in ranking:
        r["best"] = []
    for metric in METRICS:
        best = tied_for_best({m["anchor"]: method_mean(m, metric.key) for m in models if whole(m)}, metric, **boot)
        for r in ranking:
            if r["anchor"] in best:
                r["best"].append(metric.key)

    # overall: sorted by mean rank; a model's rank is 1 + the models with a better mean rank whose
    # method-averaged per-example metric is significantly better (paired bootstrap), so ties stay ties
    averaged = {m["anchor"]: method_mean(m, spec.key) for m in models}
    for r in ranking:  # an incomplete model has no per-method rank, so no mean rank: unranked, tied with none
        if r["mean_rank"] is None:
            r["rank"], r["tied_with"] = None, []
            continue
        better, ties = 0, []
        for o in ranking:
            if o is r or o["mean_rank"] is None:
                continue
            d = paired_difference(averaged[o["anchor"]], averaged[r["anchor"]], **boot)
            if d["tie"]:
                ties.append(o["anchor"])
            elif o["mean_rank"] < r["mean_rank"] and spec.better(d["mean"], 0.0):
                better += 1
        r["rank"], r["tied_with"] = 1 + better, ties
    ranking.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0, r["mean_rank"] or 0, -(r["faithfulness"] or 0)))
    for m in models:
        m["rank"] = next(r["rank"] for r in ranking if r["anchor"] == m.get("anchor"))
    rankings = {
        k: [dict(r, name=next(m.get("name") for m in models if m["anchor"] == r["model"])) for r in rows]
        for k, rows in per_method.items()
    }
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
            "split": data.info.get("split"),  # a saved Hugging Face DatasetDict's split (--split), else None
            "selection": data.info.get("selection"),  # --limit/--subset (Data.select), else None
            "selected_from": data.info.get("selected_from", len(data)),
            "selected_indices": data.info.get("selected_indices"),  # --subset: the data's index of each example
        },
        "methods": [m.label for m in methods],
        "models": models,
        "ranking": ranking,
        "rankings_per_method": rankings,
        "metrics": [asdict(m) | {"direction": m.direction} for m in METRICS],
        "figures": {},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
    }
