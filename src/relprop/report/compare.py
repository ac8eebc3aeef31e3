"""Every model x method over a dataset: accuracy, faithfulness, class sensitivity, randomisation.

:func:`run_compare` computes one cell (model x method) at a time, saves it at once under
``OUT/cache/`` keyed by everything that determines it (model weights, data, samples, method and
its options, metric settings, relprop version), and reuses a saved cell on the next run. A
Ctrl-C keeps every finished cell; the report is written from what is there.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..specs import Data, LoadedModel, SpecError, check_forward, default_composite, image_batch

CACHE_FORMAT = 1

#: Options a method gets in ``compare`` unless the method spec sets them (kept cheap on CPUs).
METHOD_DEFAULTS: dict[str, dict] = {
    "integrated_gradients": {"n_steps": 16},
    "ig": {"n_steps": 16},
    "smoothgrad": {"nt_samples": 8, "stdevs": 0.15},
    "smoothgrad_sq": {"nt_samples": 8, "stdevs": 0.15},
    "vargrad": {"nt_samples": 8, "stdevs": 0.15},
}


@dataclass
class MethodSpec:
    """``name[:key=value[:key=value...]]``, e.g. ``lrp:composite=epsilon`` or ``integrated_gradients:n_steps=32``."""

    label: str
    name: str
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        parts = [p for p in text.strip().split(":")]
        name, opts = parts[0].strip(), {}
        for p in parts[1:]:
            if "=" not in p:
                raise SpecError(f"method spec '{text}': option '{p}' is not KEY=VALUE (e.g. lrp:composite=epsilon)")
            k, v = p.split("=", 1)
            try:
                opts[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                opts[k.strip()] = v.strip()
        return cls(label=text.strip(), name=name, options=opts)

    def options_for(self, model: LoadedModel, composite: str | None) -> dict:
        opts = dict(METHOD_DEFAULTS.get(self.name, {}))
        if self.name == "lrp" and "composite" not in self.options:
            opts["composite"] = composite if composite and composite != "auto" else default_composite(model)
        opts.update(self.options)
        return opts


@dataclass
class Settings:
    samples: int = 64
    grid: int = 8
    target: str = "pred"  # "pred" | "label"
    patch_grid: int = 8  # image split into patch_grid x patch_grid patches
    regions: int = 32
    steps: int = 16
    sensitivity_samples: int = 16
    randomisation_samples: int = 4
    randomisation_layers: int = 3
    batch_size: int = 32
    composite: str = "auto"
    seed: int = 0
    randomisation: bool = True
    sensitivity: bool = True


# ------------------------------------------------------------------------------------ helpers
def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return (s[:48] or "x") + "-" + hashlib.sha1(text.encode()).hexdigest()[:6]


def _key(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


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


def _trapz(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


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
    labels: torch.Tensor
    target: torch.Tensor
    pred: torch.Tensor
    tokens: list[list[str]] | None = None


class Job:
    def __init__(
        self,
        out: Path,
        data: Data,
        methods: list[MethodSpec],
        settings: Settings,
        *,
        force: bool = False,
        log: Callable[[str], None] = print,
        progress: bool = True,
    ):
        self.out = Path(out)
        self.cache = self.out / "cache"
        self.data = data
        self.methods = methods
        self.s = settings
        self.force = force
        self.log = log
        self.progress = progress
        order = sample_order(data.labels, settings.seed)
        self.indices = order[: max(settings.samples, settings.grid)]
        self.explain_calls = 0

    # -------------------------------------------------------------------------------- inputs
    def label_map(self, model: LoadedModel) -> torch.Tensor | None:
        """Data class index -> model class index, by name, when every data class is a model class name."""
        names = model.class_names or []
        if (
            names
            and all(c in names for c in self.data.class_names)
            and list(names[: len(self.data.class_names)]) != list(self.data.class_names)
        ):
            return torch.tensor([names.index(c) for c in self.data.class_names], dtype=torch.long)
        return None

    def prepare(self, model: LoadedModel, idx: list[int]) -> Prepared:
        labels = self.data.labels[idx]
        lm = self.label_map(model)
        if lm is not None:
            labels = lm[labels]
        tokens = None
        if self.data.kind == "text":
            from ..specs import text_batch

            inputs = text_batch(model, [self.data.texts[i] for i in idx])
            tok = model.tokenizer
            tokens = [
                tok.convert_ids_to_tokens(row[m.bool()].tolist())
                for row, m in zip(inputs["input_ids"], inputs["attention_mask"])
            ]
            display = None
        else:
            if (
                self.data.model_ready is not None
                and model.info.get("source") == "relprop.zoo"
                and model.info.get("dataset") == self.data.name
            ):
                inputs = self.data.model_ready[idx]
                display = self.data.images[idx]
            else:
                inputs, display = image_batch(model, [self.data.images[i] for i in idx])
        logits = self.forward(model, inputs)
        pred = logits.argmax(-1)
        n = logits.shape[-1]
        if int(labels.max()) >= n:
            raise SpecError(f"the data has {len(self.data.class_names)} classes but model '{model.name}' outputs {n}")
        target = pred if self.s.target == "pred" else labels
        return Prepared(inputs, display, labels, target, pred, tokens)

    def forward(self, model: LoadedModel, inputs, batch: int = 64) -> torch.Tensor:
        from ..methods.core import select_output

        first = _slice(inputs, 0, min(batch, _len(inputs)))
        outs = [check_forward(model, first)]
        with torch.no_grad():
            for i in range(batch, _len(inputs), batch):
                x = _slice(inputs, i, i + batch)
                outs.append(select_output(model.module(**x) if isinstance(x, dict) else model.module(x)))
        return torch.cat(outs).float()

    # -------------------------------------------------------------------------------- accuracy
    def accuracy(self, model: LoadedModel) -> dict:
        key = _key(
            [
                "accuracy",
                CACHE_FORMAT,
                model.spec,
                model.fingerprint(),
                self.data.fingerprint(),
                model.preprocess.describe() if model.preprocess else None,
            ]
        )
        path = self.cache / f"{slug(model.spec)}__accuracy__{key}.json"
        if path.exists() and not self.force:
            res = json.loads(path.read_text())
            res["reused"] = True
            return res
        t0 = time.time()
        correct, n = 0, len(self.data)
        chunk = 256
        for i in range(0, n, chunk):
            idx = list(range(i, min(n, i + chunk)))
            p = self.prepare(model, idx)
            correct += int((p.pred == p.labels).sum())
        res = {"accuracy": correct / max(n, 1), "n": n, "seconds": round(time.time() - t0, 2)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res))
        res["reused"] = False
        return res

    # -------------------------------------------------------------------------------- one cell
    def cell_key(self, model: LoadedModel, m: MethodSpec, opts: dict) -> str:
        import relprop

        return _key(
            [
                "cell",
                CACHE_FORMAT,
                relprop.__version__,
                model.spec,
                model.fingerprint(),
                model.preprocess.describe() if model.preprocess else None,
                self.data.fingerprint(),
                self.indices,
                m.name,
                opts,
                asdict(self.s) | {"composite": None},
            ]
        )

    def cell_path(self, model: LoadedModel, m: MethodSpec, key: str) -> Path:
        return self.cache / f"{slug(model.spec)}__{slug(m.label)}__{key}.pt"

    def cached_cell(self, model: LoadedModel, m: MethodSpec) -> dict | None:
        opts = m.options_for(model, self.s.composite)
        path = self.cell_path(model, m, self.cell_key(model, m, opts))
        if path.exists() and not self.force:
            try:
                res = torch.load(str(path), map_location="cpu", weights_only=True)
                res["reused"] = True
                return res
            except Exception:
                return None
        return None

    def explain_fn(self, model: LoadedModel, m: MethodSpec, opts: dict):
        import relprop

        bs = self.s.batch_size

        def fn(module, x, t):
            parts = []
            for i in range(0, _len(x), bs):
                xb = _slice(x, i, i + bs)
                tb = t[i : i + bs] if isinstance(t, torch.Tensor) else t
                self.explain_calls += 1
                e = relprop.explain(module, xb, target=tb, method=m.name, **opts)
                a = e.attributions
                if isinstance(a, dict):
                    a = a["input_ids"]
                elif isinstance(a, (tuple, list)):
                    a = a[0]
                parts.append(a.detach().float().cpu())
            return torch.cat(parts)

        return fn

    def compute_cell(self, model: LoadedModel, m: MethodSpec, prep: Prepared) -> dict:
        from .. import metrics

        opts = m.options_for(model, self.s.composite)
        key = self.cell_key(model, m, opts)
        t0 = time.time()
        fn = self.explain_fn(model, m, opts)
        n = min(self.s.samples, _len(prep.inputs))
        x = _slice(prep.inputs, 0, n)
        target = prep.target[:n]
        attr = fn(model.module, x, target)
        t_explain = time.time() - t0
        res: dict[str, Any] = {
            "method": m.label,
            "name": m.name,
            "options": {k: str(v) for k, v in opts.items()},
            "n_samples": n,
            "key": key,
        }
        g = min(self.s.grid, n)
        if self.data.kind == "text":
            res["grid_attributions"] = [attr[i][prep.inputs["attention_mask"][i].bool()].clone() for i in range(g)]
            res.update(self._text_faithfulness(model, x, attr, target))
            module = _FloatIds(model.module, getattr(model.module, "pad_id", 0))
            xf = x["input_ids"].float()

            def efn(mod, xx, tt):
                ids = xx.round().long()
                return fn(mod.inner, {"input_ids": ids, "attention_mask": (ids != mod.pad_id).long()}, tt)
        else:
            res["grid_attributions"] = attr[:g].sum(1).clone() if attr.dim() == 4 else attr[:g].clone()
            res.update(self._image_faithfulness(model, x, attr, target))
            module, xf, efn = model.module, x, fn
        if self.s.sensitivity and self.s.sensitivity_samples > 0:
            k = min(self.s.sensitivity_samples, n)
            cs = metrics.class_sensitivity(module, xf[:k], efn, batch_size=self.s.batch_size)
            res["class_similarity"] = _num(cs.mean_similarity)
            res["class_sensitivity"] = _num(cs.mean_sensitivity)
        if self.s.randomisation and self.s.randomisation_samples > 0 and self.s.randomisation_layers > 0:
            k = min(self.s.randomisation_samples, n)
            layers = metrics.randomisable_layers(module)[-self.s.randomisation_layers :]
            rr = metrics.model_parameter_randomisation(module, xf[:k], efn, target[:k], layers=layers)
            res["randomisation_layers"] = list(rr.layers)
            res["randomisation_curve"] = _to_list(rr.mean_similarity)
            res["randomisation_similarity"] = _num(rr.final_similarity)
        res["seconds"] = round(time.time() - t0, 2)
        res["explain_seconds_per_sample"] = round(t_explain / max(n, 1), 4)
        path = self.cell_path(model, m, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(res, str(tmp))
        tmp.replace(path)
        res["reused"] = False
        return res

    def _image_faithfulness(self, model, x, attr, target) -> dict:
        from .. import metrics

        h, w = x.shape[-2:]
        patch = max(1, min(h, w) // self.s.patch_grid)
        kw = dict(patch_size=patch, pad=True, batch_size=256)
        ab = metrics.abpc(model.module, x, attr, target, regions=self.s.regions, **kw)
        morf = ab.morf.score_curve.mean(0).numpy()
        lerf = ab.lerf.score_curve.mean(0).numpy()
        units = math.ceil(h / patch) * math.ceil(w / patch)
        fr = np.arange(len(morf)) / units
        idl = metrics.insertion_deletion(model.module, x, attr, target, steps=min(self.s.steps, units), **kw)
        return {
            "abpc": _num(ab.value),
            "abpc_norm": _trapz(lerf - morf, np.arange(len(morf)) / max(len(morf) - 1, 1)),
            "insertion_auc": _num(idl.mean_insertion_auc),
            "deletion_auc": _num(idl.mean_deletion_auc),
            "insertion_minus_deletion": _num(idl.difference),
            "curves": {
                "region_fractions": fr.tolist(),
                "morf": morf.tolist(),
                "lerf": lerf.tolist(),
                "fractions": _to_list(idl.fractions),
                "insertion": _to_list(idl.insertion.mean(0)),
                "deletion": _to_list(idl.deletion.mean(0)),
            },
            "patch_size": patch,
            "regions": min(self.s.regions, units),
            "steps": min(self.s.steps, units),
        }

    def _text_faithfulness(self, model, x, attr, target) -> dict:
        """Token perturbation: replace tokens (most/least relevant first) by the mask or pad token."""
        tok = model.tokenizer
        ids, mask = x["input_ids"], x["attention_mask"]
        fill = tok.mask_token_id if tok.mask_token_id is not None else (tok.unk_token_id or tok.pad_token_id or 0)
        special = torch.zeros_like(ids, dtype=torch.bool)
        for sid in tok.all_special_ids:
            special |= ids == sid
        content = mask.bool() & ~special
        steps = self.s.steps
        fr = np.linspace(0, 1, steps + 1)

        def curves(order: str, insertion: bool) -> np.ndarray:
            copies = []
            for b in range(ids.shape[0]):
                pos = torch.nonzero(content[b]).reshape(-1)
                sc = attr[b, pos]
                ranked = pos[torch.argsort(sc, descending=(order == "morf"), stable=True)]
                for f in fr:
                    k = int(round(f * len(ranked)))
                    row = ids[b].clone()
                    if insertion:
                        row[ranked[k:]] = fill
                    else:
                        row[ranked[:k]] = fill
                    copies.append(row)
            allx = torch.stack(copies)
            am = mask.repeat_interleave(len(fr), 0)
            probs = []
            with torch.no_grad():
                for i in range(0, allx.shape[0], 128):
                    out = model.module(allx[i : i + 128], am[i : i + 128])
                    probs.append(torch.softmax(out.float(), -1))
            p = torch.cat(probs).reshape(ids.shape[0], len(fr), -1)
            return p.gather(2, target.reshape(-1, 1, 1).expand(-1, len(fr), 1))[..., 0].mean(0).numpy()

        morf, lerf, ins = curves("morf", False), curves("lerf", False), curves("morf", True)
        return {
            "abpc": _trapz(lerf - morf, np.arange(len(fr)).astype(float)),
            "abpc_norm": _trapz(lerf - morf, fr),
            "insertion_auc": _trapz(ins, fr),
            "deletion_auc": _trapz(morf, fr),
            "insertion_minus_deletion": _trapz(ins, fr) - _trapz(morf, fr),
            "curves": {
                "region_fractions": fr.tolist(),
                "morf": morf.tolist(),
                "lerf": lerf.tolist(),
                "fractions": fr.tolist(),
                "insertion": ins.tolist(),
                "deletion": morf.tolist(),
            },
            "steps": steps,
        }


def _len(x) -> int:
    return int(x["input_ids"].shape[0]) if isinstance(x, dict) else int(x.shape[0])


def _slice(x, a: int, b: int):
    return {k: v[a:b] for k, v in x.items()} if isinstance(x, dict) else x[a:b]


__all__ = ["Job", "MethodSpec", "Settings", "sample_order", "slug"]
