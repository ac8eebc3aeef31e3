"""Every model x method over a dataset: accuracy, faithfulness, class sensitivity, randomisation.

:func:`run_compare` computes one cell (model x method) at a time, saves it at once under
``OUT/cache/`` keyed by content hashes of everything that determines it: every input byte, the
model's weights and code (the source files of its classes, a ``python:`` spec's file, the checkpoint
bytes), relprop's own source, the samples, the method and its options and the metric settings. A
saved cell is reused on the next run; a corrupt or foreign cache file is recomputed with a
warning, never trusted. Files are written atomically (temporary file, then rename; one put on an
object store) through :class:`relprop.report.store.Output`, so ``OUT`` may be a folder or any fsspec
URL. A Ctrl-C keeps every finished cell; the report is written from what is there.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..specs import METHOD_DEFAULTS, Data, LoadedModel, MethodSpec, SpecError, check_forward, image_batch
from ..specs.adapters import MODEL_INPUTS
from ..specs.errors import shorten
from ..specs.hashing import relprop_source_hash
from ..specs.labels import LabelMap, map_labels
from .interrupt import Interrupt
from .store import Output

CACHE_FORMAT = 2
#: examples per forward pass of the accuracy pass (lazy data: what is decoded and held at a time)
ACCURACY_BATCH = 256
#: methods whose default options depend on the input (see relprop.specs.methods.input_defaults)
INPUT_DEPENDENT = ("occlusion", "gradcam", "grad_cam", "guided_gradcam", "guided_grad_cam")


@dataclass
class Settings:
    samples: int = 64
    grid: int = 8
    target: str = "pred"  # "pred" | "label"
    patch_grid: int = 8  # image split into patch_grid x patch_grid patches
    regions: int = 32
    steps: int = 16
    sensitivity_samples: int = 16
    randomisation_samples: int = 6  # >= MIN_RANDOMISATION_EXAMPLES (5), or the check is always inconclusive
    randomisation_layers: int = 3
    batch_size: int = 32
    composite: str = "auto"
    seed: int = 0
    randomisation: bool = True
    sensitivity: bool = True
    labels: str = "names"  # "names" | "sorted" | "ignore": see relprop.specs.labels
    baseline: str = "black"  # what ABPC and deletion replace units by (relprop.metrics.baselines)
    insertion_baseline: str = "blur"  # what insertion starts from
    bootstrap: int = 1000  # bootstrap resamples for every confidence interval (seeded by ``seed``)
    confidence: float = 0.95
    randomisation_threshold: float = 0.5  # |a| Spearman similarity below which the check passes
    save_attributions: str | None = None  # "npy" | "pt" | "safetensors": OUT/attributions/
    rank_by: str = "abpc"  # the metric of the rankings (relprop.report.scores.RANKABLE)
    device: str = "cpu"  # --device: cpu | cuda | cuda:N | auto (relprop.report.device)
    dtype: str = "float32"  # --dtype: float32 | bfloat16 | float16: the models run in it (LRP divides in float32)
    limit: int | None = None  # --limit: only the first N examples of the data (relprop.specs.Data.select)
    subset: int | None = None  # --subset: N examples drawn at random with ``seed`` (after ``limit``)


# ------------------------------------------------------------------------------------ helpers
def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return (s[:48] or "x") + "-" + hashlib.sha1(text.encode()).hexdigest()[:6]


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cell_header(m: MethodSpec, opts: dict[str, Any], n: int, key: str) -> dict[str, Any]:
    """The identifying fields every computed cell starts with (both engines write the same ones)."""
    return {
        "method": m.label,
        "name": m.name,
        "options": {k: str(v) for k, v in opts.items()},
        "n_samples": n,
        "key": key,
    }


def method_identity(m: MethodSpec, opts: dict | None = None) -> str:
    """What a method computes: its function (aliases such as ``ig`` resolved) and its options (``opts``, or
    compare's defaults plus the spec's own options). Equal identities are one computation."""
    import relprop

    fn = relprop.METHODS.get(m.name)
    name = next((k for k, v in relprop.METHODS.items() if v is fn), m.name) if fn is not None else m.name
    if opts is None:
        opts = dict(METHOD_DEFAULTS.get(m.name, {})) | dict(m.options)
    return json.dumps([name, opts], sort_keys=True, default=str)


def dedupe_methods(methods: list[MethodSpec]) -> tuple[list[MethodSpec], list[str]]:
    """``methods`` without repeats (the same spec twice, or two specs of one computation such as ``ig`` and
    ``integrated_gradients:n_steps=16``), and a warning naming both for each one left out. The first keeps
    its place; computing a repeat would only cost time and count the method twice in the ranks."""
    kept: list[MethodSpec] = []
    seen: dict[str, MethodSpec] = {}
    notes: list[str] = []
    for m in methods:
        ident = method_identity(m)
        if ident in seen:
            a = seen[ident].label
            why = "given twice" if a == m.label else "the same computation (same method and options)"
            notes.append(f"methods '{a}' and '{m.label}' are {why}: computed once, as '{a}'")
            continue
        seen[ident] = m
        kept.append(m)
    return kept, notes


def check_seed(seed: int, flag: str = "seed") -> None:
    """NumPy's generators take seeds in 0..2**32-1 only, and their own message names no option: say it first."""
    if not 0 <= seed < 2**32:
        raise SpecError(f"{flag} must be between 0 and 2**32 - 1, got {seed}")


def sample_order(labels: torch.Tensor, seed: int) -> list[int]:
    """Indices that cycle through the classes (one of each class first), in a seeded random order."""
    rng = np.random.RandomState(seed)
    lab = labels.numpy()
    per = [list(np.flatnonzero(lab == c)[rng.permutation(int((lab == c).sum()))]) for c in np.unique(lab)]
    order: list[int] = []
    while any(per):
        for q in per:
            if q:
                order.append(int(q.pop(0)))
    return order


def _to_list(t) -> list:
    return [float(v) for v in torch.as_tensor(t, dtype=torch.float64).reshape(-1).tolist()]


def _num(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class _FloatIds(torch.nn.Module):
    """Token ids as a float tensor -> logits, so that relprop.metrics (float inputs) can drive a text model."""

    def __init__(self, inner: torch.nn.Module, pad_id: int):
        super().__init__()
        self.inner = inner
        self.pad_id = int(pad_id)

    def forward(self, x):
        ids = x.round().long()
        return self.inner(ids, (ids != self.pad_id).long())


# ------------------------------------------------------------------------------------ the job
@dataclass
class Prepared:
    """Inputs of one model for the chosen samples."""

    inputs: Any  # tensor (images) or dict (text)
    display: torch.Tensor | None  # images in [0, 1] as the model sees them
    labels: torch.Tensor  # model class index of the true label; -1: no model class (--labels ignore)
    target: torch.Tensor
    pred: torch.Tensor
    tokens: list[list[str]] | None = None
    label_names: list[str] | None = None  # the data's own label of each example


class Job:
    def __init__(
        self,
        out: str | Path | Output,
        data: Data,
        methods: list[MethodSpec],
        settings: Settings,
        *,
        force: bool = False,
        log: Callable[[str], None] = print,
        progress: bool = True,
        use_cache: bool = True,
    ):
        self.out = Output(out)  # a folder or any fsspec URL: every file of the report goes through it
        self.use_cache = use_cache
        #: messages for the terminal and the report (label mismatches, ignored cache files, ...)
        self.data = data = data.select(settings.limit, settings.subset, settings.seed)  # --limit/--subset
        self.warnings: list[str] = list(getattr(data, "warnings", []) or [])  # the selection's too
        self._label_maps: dict[str, LabelMap] = {}
        self._options: dict[tuple[str, str], dict] = {}
        self.methods = methods
        self.s = settings
        self.force = force
        self.log = log
        self.progress = progress
        order = sample_order(data.labels, settings.seed)
        self.indices = order[: max(settings.samples, settings.grid)]
        self.explain_calls = 0
        #: the run's Ctrl-C (run_compare sets it): checked between batches, see :mod:`.interrupt`
        self.interrupt: Interrupt | None = None

    def check_interrupt(self) -> None:
        """Stop here (KeyboardInterrupt) for a Ctrl-C the run has not seen yet; nothing without one."""
        if self.interrupt is not None:
            self.interrupt.check()

    # -------------------------------------------------------------------------------- inputs
    def warn(self, text: str) -> None:
        """Keep a warning for the report; :func:`relprop.report.run_compare` prints each once, at its end
        (after the per-cell lines, so none scrolls away), not here as well."""
        if text not in self.warnings:
            self.warnings.append(text)

    def label_map(self, model: LoadedModel, n_outputs: int | None = None) -> LabelMap:
        """Data class -> model class by name (see :mod:`relprop.specs.labels`); raises on no match
        unless ``settings.labels`` is "ignore" or "sorted"."""
        if model.spec not in self._label_maps and self.data.info.get(MODEL_INPUTS):
            # tensors from Python: the labels are the model's class indices (class_names only name them)
            k = len(self.data.class_names)
            self._label_maps[model.spec] = LabelMap(list(range(k)), ["index"] * k)
        if model.spec not in self._label_maps:
            n = n_outputs or len(model.class_names or [])
            present = self.data.info.get("classes_present") or sorted(set(self.data.labels.tolist()))
            lm = map_labels(
                self.data.class_names,
                model.class_names,
                n,
                aliases=model.class_aliases,
                present=present,
                policy=self.s.labels,
                model_name=model.name,
            )
            for w in lm.warnings:
                self.warn(w)
            self._label_maps[model.spec] = lm
        return self._label_maps[model.spec]

    def prepare(
        self, model: LoadedModel, idx: list[int], items: list | None = None, pad_to: int | None = None
    ) -> Prepared:
        """The inputs, labels and predictions of examples ``idx``; ``items``: their images/texts, already read;
        ``pad_to``: texts are padded to this many tokens (a Ray shard pads to its whole run's length)."""
        raw = self.data.labels[idx]
        tokens = None
        inputs: torch.Tensor | dict
        display: torch.Tensor | None
        if self.data.kind == "text":
            from ..specs import text_batch

            texts = self.data.texts
            if texts is None:
                raise SpecError(f"internal: text data '{self.data.name}' without texts")
            inputs = text_batch(model, items if items is not None else [texts[i] for i in idx], pad_to=pad_to)
            tok = model.tokenizer
            tokens = [
                tok.convert_ids_to_tokens(row[m.bool()].tolist())
                for row, m in zip(inputs["input_ids"], inputs["attention_mask"])
            ]
            display = None
        else:
            ready, images = self.data.model_ready, self.data.images
            if images is None:
                raise SpecError(f"internal: image data '{self.data.name}' without images")
            if (
                isinstance(ready, torch.Tensor)
                and isinstance(images, torch.Tensor)
                and (
                    self.data.info.get(MODEL_INPUTS)  # tensors from the Python API: every model's inputs as given
                    or (model.info.get("source") == "relprop.zoo" and model.info.get("dataset") == self.data.name)
                )
            ):
                inputs = ready[idx]
                display = images[idx]
            else:
                inputs, display = image_batch(model, items if items is not None else [images[i] for i in idx])
        logits = self.forward(model, inputs)
        pred = logits.argmax(-1)
        n = logits.shape[-1]
        lm = self.label_map(model, n)
        labels = torch.tensor([-1 if lm.index[c] is None else lm.index[c] for c in raw.tolist()], dtype=torch.long)
        if int(labels.max()) >= n:
            raise SpecError(f"the data has {len(self.data.class_names)} classes but model '{model.name}' outputs {n}")
        if self.s.target == "label":
            if bool((labels < 0).any()):
                raise SpecError(
                    f"--target label: some data labels match no class of '{model.name}' (see the warning); "
                    f"use --target pred or fix the labels"
                )
            target = labels
        else:
            target = pred
        names = [self.data.class_names[c] for c in raw.tolist()]
        return Prepared(inputs, display, labels, target, pred, tokens, names)

    def forward(self, model: LoadedModel, inputs, batch: int = 64) -> torch.Tensor:
        from ..methods.core import select_output

        first = _slice(inputs, 0, min(batch, _len(inputs)))
        outs = [check_forward(model, first)]
        with torch.no_grad():
            for i in range(batch, _len(inputs), batch):
                x = _slice(inputs, i, i + batch)
                outs.append(select_output(model.module(**x) if isinstance(x, dict) else model.module(x)))
        return torch.cat(outs).float().cpu()  # the report's labels and predictions live on the CPU

    # -------------------------------------------------------------------------------- accuracy
    def accuracy(self, model: LoadedModel) -> dict:
        key = _key(
            [
                "accuracy",
                CACHE_FORMAT,
                relprop_source_hash(),
                model.spec,
                model.fingerprint(),
                self.data.fingerprint(),
                model.preprocess.describe() if model.preprocess else None,
                self.s.labels,
                self._placement(),  # predictions in bfloat16 or on a GPU can differ from float32 on the CPU
            ]
        )
        path = f"cache/{slug(model.spec)}__accuracy__{key}.json"
        res = self._read_cached(path, key, "json", ("accuracy", "n", "n_labelled"), model)
        if res is not None:
            res["reused"] = True
            return res
        t0 = time.time()
        correct, labelled, n = 0, 0, len(self.data)
        from ..specs.sources import batches

        for idx, items in batches(self.data, range(n), ACCURACY_BATCH):  # lazy data: a DataLoader reads ahead
            self.check_interrupt()
            p = self.prepare(model, idx, items)
            known = p.labels >= 0
            correct += int((p.pred == p.labels)[known].sum())
            labelled += int(known.sum())
        res = {
            "key": key,
            "accuracy": correct / labelled if labelled else None,
            "n": n,
            "n_labelled": labelled,
            "seconds": round(time.time() - t0, 2),
        }
        if self.caches(model):
            self.out.write_text(path, json.dumps(res))
        res["reused"] = False
        return res

    def caches(self, model: LoadedModel) -> bool:
        """Whether ``model``'s results are read from and written to the cache: not when the cache is off, or
        when its code cannot be hashed (classes defined in a notebook: ``info["no_cache"]``)."""
        return self.use_cache and not model.info.get("no_cache")

    def _read_cached(self, path: str, key: str, fmt: str, required: tuple[str, ...], model: LoadedModel) -> dict | None:
        """A cached result (``path``: its name in the output), or None (recompute) when absent, forced off,
        unreadable or not this key's."""
        if self.force or not self.caches(model) or not self.out.exists(path):
            return None
        name = path.rsplit("/", 1)[-1]
        try:
            raw = self.out.read_bytes(path)
            if fmt == "json":
                res = json.loads(raw.decode("utf-8"))
            else:
                res = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupt, or not ours: never trusted, never fatal
            self.warn(f"cache file {name} is unreadable ({type(e).__name__}); recomputing it")
            return None
        if not isinstance(res, dict) or res.get("key") != key or any(k not in res for k in required):
            self.warn(f"cache file {name} does not hold this result (foreign or incomplete); recomputing it")
            return None
        return res

    # -------------------------------------------------------------------------------- one cell
    def cell_key(self, model: LoadedModel, m: MethodSpec, opts: dict) -> str:
        import relprop

        return _key(
            [
                "cell",
                CACHE_FORMAT,
                relprop.__version__,
                relprop_source_hash(),
                model.spec,
                model.fingerprint(),
                model.preprocess.describe() if model.preprocess else None,
                self.data.fingerprint(),
                self.indices,
                m.name,
                opts,
                asdict(self.s) | {"composite": None} | self._placement(),
            ]
        )

    def _placement(self) -> dict[str, str]:
        """``--device``/``--dtype`` as they resolve (``auto`` -> ``cpu`` or ``cuda``): a cached result is
        keyed on where it was computed, not on the words asked for (``auto`` on a CPU machine and then on
        a GPU machine are two results)."""
        from .device import resolve_device, resolve_dtype

        return {"device": str(resolve_device(self.s.device)), "dtype": str(resolve_dtype(self.s.dtype))}

    def cell_name(self, model: LoadedModel, m: MethodSpec, key: str) -> str:
        """The cell's cache file, relative to the output."""
        return f"cache/{slug(model.spec)}__{slug(m.label)}__{key}.pt"

    def save_cell(self, model: LoadedModel, m: MethodSpec, key: str, res: dict) -> None:
        """Cache a computed cell (when ``model``'s results are cached), written whole or not at all."""
        if self.caches(model):
            self.out.write(self.cell_name(model, m, key), lambda tmp: torch.save(res, tmp))

    def options(self, model: LoadedModel, m: MethodSpec) -> dict:
        """The options of ``m`` on ``model``, with the defaults that depend on the input (occlusion's
        window, Grad-CAM's layer) resolved on the first sample; the same for the key and the run."""
        k = (model.spec, m.label)
        if k not in self._options:
            inputs = None
            if m.name in INPUT_DEPENDENT:
                inputs = self.prepare(model, self.indices[:1]).inputs
            self._options[k] = m.options_for(model, self.s.composite, inputs)
        return self._options[k]

    def cached_cell(self, model: LoadedModel, m: MethodSpec, opts: dict | None = None) -> dict | None:
        opts = self.options(model, m) if opts is None else opts
        key = self.cell_key(model, m, opts)
        res = self._read_cached(
            self.cell_name(model, m, key), key, "pt", ("grid_attributions", "method", "n_samples"), model
        )
        if res is not None:
            res["reused"] = True
        return res

    def explain_fn(self, model: LoadedModel, m: MethodSpec, opts: dict, timing: list | None = None):
        """``fn(module, x, target) -> attributions`` in batches of ``--batch-size``; ``timing``: gets one
        ``(batch size, seconds)`` per batch (the explanation time is measured per batch, not per example)."""
        import relprop

        bs = self.s.batch_size

        def fn(module, x, t):
            parts = []
            starts = range(0, _len(x), bs)
            bar = None
            if self.progress and len(starts) > 1:  # progress inside a long cell, not only between cells
                try:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=_len(x), desc=f"{model.name} × {m.label}"[:40], unit="ex", leave=False)
                except ImportError:
                    pass
            for i in starts:
                self.check_interrupt()
                xb = _slice(x, i, i + bs)
                tb = t[i : i + bs] if isinstance(t, torch.Tensor) else t
                self.explain_calls += 1
                t0 = time.perf_counter()
                e = relprop.explain(module, xb, target=tb, method=m.name, **opts)
                a = e.attributions
                if isinstance(a, dict):
                    a = a["input_ids"]
                elif isinstance(a, (tuple, list)):
                    a = a[0]
                parts.append(a.detach().float().cpu())
                if timing is not None:
                    timing.append((_len(xb), time.perf_counter() - t0))
                if bar is not None:
                    bar.update(_len(xb))
            if bar is not None:
                bar.close()
            return torch.cat(parts)

        return fn

    def compute_cell(self, model: LoadedModel, m: MethodSpec, prep: Prepared, opts: dict | None = None) -> dict:
        opts = self.options(model, m) if opts is None else opts
        key = self.cell_key(model, m, opts)
        t0 = time.time()
        fn = self.explain_fn(model, m, opts)
        n = min(self.s.samples, _len(prep.inputs))
        x = _slice(prep.inputs, 0, n)
        target = prep.target[:n]
        timing: list[tuple[int, float]] = []
        attr = self.explain_fn(model, m, opts, timing)(model.module, x, target)
        res = cell_header(m, opts, n, key)
        res.update(self._metrics(model, fn, prep, x, attr, target, n, timing))
        if self.s.save_attributions:
            from .store import save_attributions

            res["attributions_file"] = save_attributions(self.out, model.spec, m.label, attr, self.s.save_attributions)
        res["seconds"] = round(time.time() - t0, 2)
        self.save_cell(model, m, key, res)
        res["reused"] = False
        return res

    def sanity_setup(self, model: LoadedModel, fn, x) -> tuple[torch.nn.Module, Any, Callable]:
        """(module, inputs, explain fn) of the sanity checks, which perturb float inputs: for text the model
        behind :class:`_FloatIds` (float token ids), the ids as floats and an explain fn that rounds them
        back; for images the model, ``x`` and ``fn`` as they are. The Ray engine's shards call this too."""
        if self.data.kind != "text":
            return model.module, x, fn
        module = _FloatIds(model.module, getattr(model.module, "pad_id", 0))

        def efn(mod, xx, tt):
            ids = xx.round().long()
            return fn(mod.inner, {"input_ids": ids, "attention_mask": (ids != mod.pad_id).long()}, tt)

        return module, x["input_ids"].float(), efn

    def _metrics(self, model: LoadedModel, fn, prep: Prepared, x, attr, target, n: int, timing: list) -> dict:
        """Grid attributions, every metric per example (:mod:`.cell_metrics`) and their summaries.
        ``timing``: ``(batch size, seconds)`` of each explanation batch."""
        from . import cell_metrics

        g = min(self.s.grid, n)
        if self.data.kind == "text":
            grid = [attr[i][prep.inputs["attention_mask"][i].bool()].clone() for i in range(g)]
        else:
            grid = attr[:g].sum(1).clone() if attr.dim() == 4 else attr[:g].clone()
        module, xf, efn = self.sanity_setup(model, fn, x)
        sanity = {"sensitivity", "randomisation"} & cell_metrics.wanted_groups(self.s)
        res = cell_metrics.compute(
            self.data.kind,
            model.module,
            x,
            attr,
            target,
            self.s,
            tokenizer=model.tokenizer,
            sanity_module=module,
            sanity_inputs=xf,
            sanity_explain=efn if sanity else None,
            progress=self.progress,
            examples=[int(i) for i in self.indices[:n]],
        )
        per = res.pop("per_example")
        per["explain_seconds"] = cell_metrics.per_batch_seconds(timing)
        res["examples"] = {
            "example": [int(i) for i in self.indices[:n]],
            "label": [int(v) for v in prep.labels[:n]],
            "prediction": [int(v) for v in prep.pred[:n]],
            "target": [int(v) for v in target],
            **per,
        }
        res["summary"] = cell_metrics.summary_of(per, self.s)
        for k, v in res["summary"].items():  # flat means: the keys older readers of results.json know
            res[k] = v["mean"]
        res["randomisation_check"] = cell_metrics.randomisation_verdict(res["summary"], self.s.randomisation_threshold)
        res["grid_attributions"] = grid
        res["explain_seconds_per_sample"] = round(sum(t for _, t in timing) / max(n, 1), 6)
        return res


def one_line(ex: BaseException) -> str:
    """``ex`` as ``"Type: first line of its message"`` (shortened), the form every stored error takes."""
    msg = str(ex).strip().splitlines()[0] if str(ex).strip() else ""
    return shorten(f"{type(ex).__name__}: {msg}") if msg else type(ex).__name__


def failed_cell(m: MethodSpec, error: str | BaseException) -> dict:
    """The record of a cell that failed, either engine: ``error`` an exception (said by :func:`one_line`) or
    a message already worded (shortened)."""
    text = one_line(error) if isinstance(error, BaseException) else shorten(error)
    return {"method": m.label, "name": m.name, "status": "failed", "error": text, "reused": False}


def _len(x) -> int:
    return int(x["input_ids"].shape[0]) if isinstance(x, dict) else int(x.shape[0])


def _slice(x, a: int, b: int):
    return {k: v[a:b] for k, v in x.items()} if isinstance(x, dict) else x[a:b]


__all__ = [
    "METHOD_DEFAULTS",
    "Job",
    "Output",
    "MethodSpec",
    "Settings",
    "dedupe_methods",
    "failed_cell",
    "method_identity",
    "one_line",
    "sample_order",
    "slug",
]
