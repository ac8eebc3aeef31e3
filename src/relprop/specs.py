"""Model and data specs for the command line: parse a string, load a model or a dataset.

Model specs (``load_model``)::

    zoo:NAME                 a model of the embedded zoo (relprop.zoo.list_models()), or
    zoo:minilm-similarity    the all-MiniLM-L6-v2 sentence-similarity model (text)
    torchvision:NAME         a torchvision architecture; weights from --weights FILE, else torchvision's
                             own pretrained weights if they are already in the torch hub cache
    timm:NAME                a timm architecture; weights from --weights FILE, else timm's pretrained
                             weights if they are already in the local Hugging Face cache
    hf:PATH                  a local Hugging Face model folder (image or sequence classification)
    python:MODULE:FUNCTION   FUNCTION() returns an nn.Module (MODULE may be a dotted name or a .py file)
    FILE.pt / FILE.pth       a whole model saved with torch.save(model, FILE)
    FILE.safetensors         weights next to a FILE.json in the zoo's format (architecture, arch_kwargs, ...)

Data specs (``load_data``)::

    zoo:NAME                 an embedded dataset (digits, faces, chest_xray)
    DIR                      a folder of images with one sub-folder per class
    FILE.csv / FILE.jsonl    texts with labels (columns ``text`` and ``label`` by default)

Every user error raises :class:`SpecError` with a one-line message naming what was wrong.
Preprocessing (resize, channels, normalisation) comes from the model's own configuration where one
exists (zoo metadata, timm's data config, a Hugging Face image processor or tokenizer), else from
the ``--image-size``/``--mean``/``--std`` flags.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MODEL_PREFIXES = ("zoo", "torchvision", "timm", "hf", "python")
TEXT_ZOO = ("minilm-similarity",)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SpecError(ValueError):
    """A user error in a model/data spec or an input: the message is one line, shown as is."""


def _closest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _need(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpecError(f"{what} needs the '{module}' package, which is not installed (pip install {module})") from None


# ------------------------------------------------------------------------------ preprocessing
@dataclass
class Preprocess:
    """How raw ``[0, 1]`` images ``(C, H, W)`` become model inputs."""

    size: tuple[int, int] | None = None  # (H, W); None: keep the image's size
    channels: int | None = None  # None: keep
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"
    crop_pct: float | None = None  # resize to size / crop_pct, then centre-crop (timm convention)
    source: str = "defaults"

    def describe(self) -> dict:
        return {
            "size": list(self.size) if self.size else None,
            "channels": self.channels,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "source": self.source,
        }

    def display(self, raw: torch.Tensor) -> torch.Tensor:
        """Resize/crop/convert a raw ``(C, H, W)`` image in [0, 1]; not normalised (for showing)."""
        x = raw.float()
        if x.dim() == 2:
            x = x[None]
        if self.channels is not None and x.shape[0] != self.channels:
            if self.channels == 3 and x.shape[0] == 1:
                x = x.expand(3, *x.shape[1:])
            elif self.channels == 1 and x.shape[0] in (3, 4):
                x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
            elif self.channels == 3 and x.shape[0] == 4:
                x = x[:3]
            else:
                raise SpecError(f"cannot convert an image with {x.shape[0]} channels to the model's {self.channels}")
        if self.size is not None and tuple(x.shape[-2:]) != tuple(self.size):
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
            h, w = self.size
            if self.crop_pct:
                rh, rw = int(round(h / self.crop_pct)), int(round(w / self.crop_pct))
            else:
                rh, rw = h, w
            x = torch.nn.functional.interpolate(
                x[None],
                size=(rh, rw),
                mode=mode,
                align_corners=False if mode != "nearest" else None,
                antialias=mode != "nearest" and (rh < x.shape[-2] or rw < x.shape[-1]),
            )[0]
            if (rh, rw) != (h, w):
                top, left = (rh - h) // 2, (rw - w) // 2
                x = x[:, top : top + h, left : left + w]
        return x.clamp(0, 1).contiguous()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None and self.std is None:
            return x
        c = x.shape[-3]
        mean = torch.as_tensor(self.mean if self.mean is not None else (0.0,), dtype=x.dtype)
        std = torch.as_tensor(self.std if self.std is not None else (1.0,), dtype=x.dtype)
        if mean.numel() not in (1, c) or std.numel() not in (1, c):
            raise SpecError(f"--mean/--std have {mean.numel()}/{std.numel()} values but the images have {c} channels")
        shape = (-1, 1, 1)
        return (x - mean.reshape(shape)) / std.reshape(shape)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.display(raw))


def override_preprocess(pre: Preprocess | None, *, image_size=None, mean=None, std=None, channels=None) -> Preprocess:
    """Apply the command-line flags on top of a model's own preprocessing."""
    pre = Preprocess(**{k: getattr(pre, k) for k in Preprocess.__dataclass_fields__}) if pre else Preprocess()
    changed = False
    if image_size:
        pre.size, pre.crop_pct, changed = (int(image_size[0]), int(image_size[-1])), None, True
    if mean is not None:
        pre.mean, changed = tuple(float(v) for v in mean), True
    if std is not None:
        pre.std, changed = tuple(float(v) for v in std), True
    if channels:
        pre.channels, changed = int(channels), True
    if changed:
        pre.source = f"{pre.source} + flags" if pre.source != "defaults" else "flags"
    return pre


# ------------------------------------------------------------------------------------ models
@dataclass
class LoadedModel:
    """A model ready to explain: an ``nn.Module`` in eval mode with what is known about its inputs."""

    spec: str
    name: str
    module: nn.Module
    kind: str = "image"  # "image" | "text" | "similarity"
    preprocess: Preprocess | None = None
    tokenizer: Any = None
    class_names: list[str] | None = None
    info: dict = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names else None

    def fingerprint(self) -> str:
        """A hash of the parameters and buffers (keys the result cache)."""
        if self._fingerprint is None:
            h = hashlib.sha1(self.spec.encode())
            for k, v in self.module.state_dict().items():
                h.update(k.encode())
                t = v.detach().cpu().contiguous()
                h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


class TextClassifier(nn.Module):
    """``input_ids`` (and optional ``attention_mask``) -> logits of a Hugging Face sequence classifier."""

    def __init__(self, model: nn.Module, pad_id: int):
        super().__init__()
        self.model = model
        self.pad_id = int(pad_id)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_id).long()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class ImageClassifier(nn.Module):
    """``pixel_values`` -> logits of a Hugging Face image classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _read_state_dict(path: Path) -> dict:
    if not path.exists():
        raise SpecError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except SpecError:
        raise
    except Exception as e:
        raise SpecError(f"cannot read weights file {path}: {_first_line(e)}") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_state(model: nn.Module, state: dict, path: Path, what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = str(e)
        missing = msg.count("Missing key")
        raise SpecError(
            f"weights file {path} does not fit {what}: "
            f"{'missing/unexpected keys' if missing or 'Unexpected key' in msg else 'shape mismatch'}"
            f" ({_first_line(msg.split(':', 1)[-1]).strip()[:160]})"
        ) from None


def _first_line(e: Any) -> str:
    s = str(e).strip() or type(e).__name__
    return s.splitlines()[0] if s else s


def _classifier_classes(state: dict, classifier: str | Sequence[str] | None) -> int | None:
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    for name in names:
        w = state.get(f"{name}.weight")
        if w is not None and w.dim() >= 1:
            return int(w.shape[0])
    return None


def _has_attention(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.MultiheadAttention)
        or "attention" in type(m).__name__.lower()
        or type(m).__name__ in ("Attention",)
        for m in model.modules()
    )


def default_composite(model: LoadedModel) -> str:
    """The LRP composite used when none is given: AttnLRP for transformers, else epsilon-plus-flat."""
    if model.kind in ("text", "similarity") or _has_attention(model.module):
        return "attnlrp"
    return "epsilon_plus_flat"


def _zoo(name: str, spec: str) -> LoadedModel:
    from . import zoo

    if name in TEXT_ZOO:
        from .zoo.text import SentenceSimilarity, load_minilm  # noqa: F401

        try:
            module, tok = load_minilm()
        except (ImportError, FileNotFoundError) as e:
            raise SpecError(_first_line(e)) from None
        return LoadedModel(
            spec=spec,
            name=name,
            module=module,
            kind="similarity",
            tokenizer=tok,
            info={
                "source": "relprop.zoo.text (all-MiniLM-L6-v2)",
                "num_params": sum(p.numel() for p in module.parameters()),
            },
        )
    names = zoo.list_models()
    if name not in names:
        raise SpecError(
            f"unknown zoo model '{name}' (available: {', '.join(names + list(TEXT_ZOO))}).{_closest(name, names + list(TEXT_ZOO))}"
        )
    module = zoo.load_model(name)
    info = zoo.model_info(name)
    norm = info.get("normalization", {})
    c, h, w = info["input_shape"]
    pre = Preprocess(size=(h, w), channels=c, mean=(norm["mean"],), std=(norm["std"],), source="zoo metadata")
    return LoadedModel(
        spec=spec,
        name=name,
        module=module,
        preprocess=pre,
        class_names=list(info["class_names"]),
        info={
            "source": "relprop.zoo",
            "architecture": info.get("architecture"),
            "family": info.get("family"),
            "dataset": info.get("dataset"),
            "reported_accuracy": info.get("accuracy"),
            "num_params": info.get("num_params"),
        },
    )


def _torchvision(name: str, spec: str, weights: str | None, num_classes: int | None) -> LoadedModel:
    tvm = _need("torchvision", "a torchvision: model").models
    available = tvm.list_models()
    if name not in available:
        raise SpecError(f"unknown torchvision model '{name}'.{_closest(name, available)}")
    pre = Preprocess(
        size=(224, 224),
        channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_pct=224 / 256,
        source="torchvision defaults (ImageNet)",
    )
    class_names = None
    if weights:
        path = Path(weights)
        state = _read_state_dict(path)
        n = num_classes or _classifier_classes(
            state, ["fc", "classifier.6", "classifier.1", "classifier.3", "classifier", "head", "heads.head"]
        )
        kwargs = {"num_classes": n} if n else {}
        if name.startswith("inception") or name.startswith("googlenet"):
            kwargs["aux_logits"] = any(k.startswith("AuxLogits") or k.startswith("aux1") for k in state)
            kwargs["init_weights"] = False
        model = tvm.get_model(name, weights=None, **kwargs)
        _load_state(model, state, path, f"torchvision:{name}")
        source = f"torchvision:{name} + {path}"
    else:
        wenum, cached = _torchvision_cached(name)
        model = tvm.get_model(name, weights=wenum)
        class_names = list(wenum.meta.get("categories") or []) or None
        try:
            t = wenum.transforms()
            crop = int(t.crop_size[0])
            resize = int(t.resize_size[0])
            pre = Preprocess(
                size=(crop, crop),
                channels=3,
                mean=tuple(t.mean),
                std=tuple(t.std),
                crop_pct=crop / resize,
                source="torchvision weights transforms",
            )
        except Exception:
            pass
        source = f"torchvision:{name} pretrained ({cached.name})"
    model = _freeze(model)
    out = _out_features(model)
    if class_names is None and out:
        class_names = [str(i) for i in range(out)]
    return LoadedModel(
        spec=spec,
        name=name,
        module=model,
        preprocess=pre,
        class_names=class_names,
        info={"source": source, "num_params": sum(p.numel() for p in model.parameters())},
    )


def _torchvision_cached(name: str):
    """torchvision's default pretrained weights for ``name`` and their file, if already downloaded."""
    tvm = _need("torchvision", "a torchvision: model").models
    if name not in tvm.list_models():
        raise SpecError(f"unknown torchvision model '{name}'.{_closest(name, tvm.list_models())}")
    try:
        wenum = tvm.get_model_weights(name).DEFAULT
    except Exception:
        raise SpecError(f"torchvision:{name} has no pretrained weights; pass --weights FILE") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(wenum.url)
    if not cached.exists():
        raise SpecError(
            f"torchvision:{name}: no --weights FILE given and torchvision's pretrained weights are "
            f"not on this machine ({cached}); pass --weights FILE"
        )
    return wenum, cached


def _out_features(model: nn.Module) -> int | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, nn.Conv2d):
            last = last if last else None
    return last


def _timm(name: str, spec: str, weights: str | None, num_classes: int | None) -> LoadedModel:
    timm = _need("timm", "a timm: model")
    if not timm.list_models(name) and not timm.is_model(name):
        raise SpecError(f"unknown timm model '{name}'.{_closest(name, timm.list_models())}")
    if weights:
        path = Path(weights)
        state = _read_state_dict(path)
        probe = timm.create_model(name, pretrained=False)
        n = num_classes or _classifier_classes(state, probe.default_cfg.get("classifier")) or probe.num_classes
        model = timm.create_model(name, pretrained=False, num_classes=n)
        _load_state(model, state, path, f"timm:{name}")
        source = f"timm:{name} + {path}"
    else:
        saved = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            kwargs = {"num_classes": num_classes} if num_classes else {}
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception:
            raise SpecError(
                f"timm:{name}: no --weights FILE given and timm's pretrained weights are not in the "
                f"local Hugging Face cache; pass --weights FILE"
            ) from None
        finally:
            if saved is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = saved
        source = f"timm:{name} pretrained (local cache)"
    model = _freeze(model)
    cfg = timm.data.resolve_data_config({}, model=model)
    c, h, w = cfg["input_size"]
    pre = Preprocess(
        size=(h, w),
        channels=c,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bilinear"),
        crop_pct=cfg.get("crop_pct"),
        source="timm data config",
    )
    return LoadedModel(
        spec=spec,
        name=name,
        module=model,
        preprocess=pre,
        class_names=[str(i) for i in range(model.num_classes)],
        info={"source": source, "num_params": sum(p.numel() for p in model.parameters())},
    )


def _hf(path_str: str, spec: str) -> LoadedModel:
    path = Path(path_str).expanduser()
    if not path.exists():
        raise SpecError(f"Hugging Face model folder not found: {path}")
    if not (path / "config.json").exists():
        raise SpecError(f"{path} is not a Hugging Face model folder (no config.json)")
    transformers = _need("transformers", "an hf: model")
    cfg = json.loads((path / "config.json").read_text())
    arch = " ".join(cfg.get("architectures") or [])
    from transformers.utils import logging as hf_logging

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        kw = {"local_files_only": True, "attn_implementation": "eager"}
        if "ImageClassification" in arch:
            hf = transformers.AutoModelForImageClassification.from_pretrained(str(path), **kw)
            module, kind, tok = ImageClassifier(hf), "image", None
        elif (
            "SequenceClassification" in arch
            or (path / "tokenizer_config.json").exists()
            or (path / "vocab.txt").exists()
        ):
            hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(path), **kw)
            tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            module, kind = TextClassifier(hf, pad), "text"
        else:
            raise SpecError(
                f"{path}: config.json names architectures [{arch}]; expected an image or sequence "
                f"classification model (…ForImageClassification / …ForSequenceClassification)"
            )
    except SpecError:
        raise
    except Exception as e:
        raise SpecError(f"cannot load the Hugging Face model in {path}: {_first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _freeze(module)
    id2label = getattr(hf.config, "id2label", None) or {}
    n = int(getattr(hf.config, "num_labels", len(id2label)) or len(id2label))
    class_names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(n)]
    pre = None
    if kind == "image":
        pre = _hf_image_preprocess(path, hf.config)
    return LoadedModel(
        spec=spec,
        name=path.name,
        module=module,
        kind=kind,
        preprocess=pre,
        tokenizer=tok,
        class_names=class_names,
        info={"source": f"hf:{path}", "architecture": arch, "num_params": sum(p.numel() for p in module.parameters())},
    )


def _hf_image_preprocess(path: Path, config) -> Preprocess:
    c = int(getattr(config, "num_channels", 3) or 3)
    size = getattr(config, "image_size", None)
    pre = Preprocess(
        size=(size, size) if isinstance(size, int) else None,
        channels=c,
        mean=(0.5,) * c,
        std=(0.5,) * c,
        source="model config (image_size), mean/std 0.5",
    )
    pp = path / "preprocessor_config.json"
    if pp.exists():
        p = json.loads(pp.read_text())
        s = p.get("crop_size") if p.get("do_center_crop") else p.get("size")
        if isinstance(s, dict):
            if "height" in s:
                s = (int(s["height"]), int(s["width"]))
            elif "shortest_edge" in s:
                s = (int(s["shortest_edge"]),) * 2
            else:
                s = None
        elif isinstance(s, int):
            s = (s, s)
        mean = tuple(p["image_mean"]) if p.get("do_normalize", True) and p.get("image_mean") else None
        std = tuple(p["image_std"]) if p.get("do_normalize", True) and p.get("image_std") else None
        pre = Preprocess(
            size=s or pre.size,
            channels=c,
            mean=mean,
            std=std,
            interpolation="bicubic" if p.get("resample") == 3 else "bilinear",
            source="Hugging Face image processor",
        )
    return pre


def _python(target: str, spec: str) -> LoadedModel:
    if ":" not in target:
        raise SpecError(f"model spec '{spec}': expected python:MODULE:FUNCTION (e.g. python:mymodels:build)")
    mod_name, fn_name = target.rsplit(":", 1)
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            file = Path(mod_name)
            if not file.exists():
                raise SpecError(f"python file not found: {file}")
            s = importlib.util.spec_from_file_location(file.stem, str(file))
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(mod_name)
    except SpecError:
        raise
    except ModuleNotFoundError as e:
        raise SpecError(f"model spec '{spec}': cannot import module '{mod_name}' ({_first_line(e)})") from None
    except Exception as e:
        raise SpecError(
            f"model spec '{spec}': importing '{mod_name}' failed: {type(e).__name__}: {_first_line(e)}"
        ) from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        raise SpecError(
            f"model spec '{spec}': module '{mod_name}' has no function '{fn_name}'.{_closest(fn_name, names)}"
        )
    try:
        model = fn()
    except Exception as e:
        raise SpecError(f"model spec '{spec}': {fn_name}() failed: {type(e).__name__}: {_first_line(e)}") from None
    if isinstance(model, tuple) and model and isinstance(model[0], nn.Module):
        model = model[0]
    if not isinstance(model, nn.Module):
        raise SpecError(f"model spec '{spec}': {fn_name}() returned a {type(model).__name__}, not a torch.nn.Module")
    return _generic(model, spec, fn_name, f"python:{target}")


def _generic(model: nn.Module, spec: str, name: str, source: str) -> LoadedModel:
    _freeze(model)
    channels = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            channels = m.in_channels
            break
    pre = Preprocess(channels=channels, source="inferred (first conv layer)" if channels else "defaults")
    for attr in ("input_size", "input_shape"):
        shape = getattr(model, attr, None)
        if isinstance(shape, (tuple, list)) and len(shape) == 3:
            pre.channels, pre.size = int(shape[0]), (int(shape[1]), int(shape[2]))
            pre.source = f"model.{attr}"
    for attr, key in (("mean", "mean"), ("std", "std")):
        v = getattr(model, attr, None)
        if isinstance(v, (tuple, list)):
            setattr(pre, key, tuple(float(x) for x in v))
    out = _out_features(model)
    names = getattr(model, "class_names", None)
    return LoadedModel(
        spec=spec,
        name=name,
        module=model,
        preprocess=pre,
        class_names=list(names) if names else ([str(i) for i in range(out)] if out else None),
        info={"source": source, "num_params": sum(p.numel() for p in model.parameters())},
    )


def _checkpoint(path: Path, spec: str) -> LoadedModel:
    if not path.exists():
        raise SpecError(f"model file not found: {path}")
    if path.suffix == ".safetensors":
        meta = path.with_suffix(".json")
        if not meta.exists():
            raise SpecError(
                f"{path} holds only weights; give the architecture with --model torchvision:NAME or "
                f"timm:NAME and --weights {path}, or put a {meta.name} (zoo format) next to it"
            )
        from .zoo.models import ARCHITECTURES, build

        info = json.loads(meta.read_text())
        if info.get("architecture") not in ARCHITECTURES:
            raise SpecError(
                f"{meta}: unknown architecture {info.get('architecture')!r} (known: {', '.join(sorted(ARCHITECTURES))})"
            )
        model = build(info["architecture"], **info.get("arch_kwargs", {}))
        _load_state(model, _read_state_dict(path), path, info["architecture"])
        lm = _generic(model, spec, path.stem, str(path))
        if "input_shape" in info:
            c, h, w = info["input_shape"]
            lm.preprocess.size, lm.preprocess.channels = (h, w), c
        norm = info.get("normalization") or {}
        if "mean" in norm:
            lm.preprocess.mean, lm.preprocess.std = (norm["mean"],), (norm["std"],)
        lm.preprocess.source = f"{meta.name}"
        if info.get("class_names"):
            lm.class_names = list(info["class_names"])
        return lm
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)  # a local file the user named
    except Exception as e:
        raise SpecError(f"cannot read model file {path}: {_first_line(e)}") from None
    if isinstance(obj, dict):
        raise SpecError(
            f"{path} holds a state dict, not a model; give the architecture with "
            f"--model torchvision:NAME or timm:NAME and --weights {path}"
        )
    if not isinstance(obj, nn.Module):
        raise SpecError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
    return _generic(obj, spec, path.stem, str(path))


def load_model(spec: str, *, weights: str | None = None, num_classes: int | None = None) -> LoadedModel:
    """Load a model from a spec string (see the module docstring)."""
    spec = spec.strip()
    if not spec:
        raise SpecError("empty model spec")
    prefix, _, rest = spec.partition(":")
    if prefix in MODEL_PREFIXES and rest:
        if prefix == "zoo":
            return _zoo(rest, spec)
        if prefix == "torchvision":
            return _torchvision(rest, spec, weights, num_classes)
        if prefix == "timm":
            return _timm(rest, spec, weights, num_classes)
        if prefix == "hf":
            return _hf(rest, spec)
        return _python(rest, spec)
    path = Path(spec).expanduser()
    if path.suffix in (".pt", ".pth", ".safetensors", ".bin"):
        return _checkpoint(path, spec)
    if path.is_dir() and (path / "config.json").exists():
        return _hf(str(path), spec)
    from . import zoo

    if spec in zoo.list_models() or spec in TEXT_ZOO:
        return _zoo(spec, f"zoo:{spec}")
    if prefix and rest and prefix not in MODEL_PREFIXES:
        raise SpecError(
            f"unknown model spec '{spec}': unknown prefix '{prefix}:'.{_closest(prefix, MODEL_PREFIXES)} "
            f"Use zoo:NAME, torchvision:NAME, timm:NAME, hf:PATH, python:MODULE:FUNCTION or a .pt/.safetensors file"
        )
    close = difflib.get_close_matches(spec, zoo.list_models() + list(TEXT_ZOO), n=1, cutoff=0.5)
    hint = f" Did you mean 'zoo:{close[0]}'?" if close else ""
    raise SpecError(
        f"unknown model spec '{spec}'.{hint} Use zoo:NAME, torchvision:NAME, timm:NAME, hf:PATH, "
        f"python:MODULE:FUNCTION or a .pt/.safetensors file"
    )


def check_model_spec(spec: str, weights: str | None = None) -> None:
    """Cheap checks of a model spec before any work (unknown prefix or zoo name, missing files)."""
    spec = spec.strip()
    prefix, _, rest = spec.partition(":")
    if weights and not Path(weights).expanduser().exists():
        raise SpecError(f"weights file not found: {weights}")
    if prefix == "zoo" and rest:
        from . import zoo

        names = zoo.list_models() + list(TEXT_ZOO)
        if rest not in names:
            raise SpecError(f"unknown zoo model '{rest}' (available: {', '.join(names)}).{_closest(rest, names)}")
    elif prefix == "hf" and rest:
        if not Path(rest).expanduser().exists():
            raise SpecError(f"Hugging Face model folder not found: {rest}")
    elif prefix == "torchvision" and rest and not weights:
        _torchvision_cached(rest)
    elif prefix in ("torchvision", "timm", "python") and rest:
        return
    else:
        path = Path(spec).expanduser()
        if path.suffix in (".pt", ".pth", ".safetensors", ".bin"):
            if not path.exists():
                raise SpecError(f"model file not found: {path}")
            return
        if path.is_dir() and (path / "config.json").exists():
            return
        from . import zoo

        if spec in zoo.list_models() or spec in TEXT_ZOO:
            return
        load_model(spec)  # raises the explanatory SpecError


# -------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """A labelled dataset: raw images in [0, 1] (``(C, H, W)`` each) or texts."""

    spec: str
    name: str
    kind: str  # "image" | "text"
    labels: torch.Tensor
    class_names: list[str]
    images: list[torch.Tensor] | torch.Tensor | None = None
    texts: list[str] | None = None
    info: dict = field(default_factory=dict)
    model_ready: torch.Tensor | None = None  # zoo datasets: already-normalised inputs for zoo models

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def fingerprint(self) -> str:
        h = hashlib.sha1(self.spec.encode())
        h.update(self.labels.numpy().tobytes())
        if self.texts is not None:
            h.update("\x00".join(self.texts).encode())
        else:
            for im in self.images:
                h.update(str(tuple(im.shape)).encode())
                h.update(im.float().sum().numpy().tobytes())
        return h.hexdigest()[:16]


def read_image(path: Path) -> torch.Tensor:
    """An image file as a float tensor ``(C, H, W)`` in [0, 1] (C = 1 for grayscale, else 3)."""
    if not path.exists():
        raise SpecError(f"input file not found: {path}")
    try:
        from PIL import Image
    except ImportError:
        raise SpecError("reading images needs Pillow (pip install 'relprop[report]')") from None
    import numpy as np

    try:
        with Image.open(path) as im:
            im.load()
            mode = "L" if im.mode in ("L", "I", "I;16", "1", "F") else "RGB"
            a = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except Exception as e:
        raise SpecError(f"cannot read image {path}: {_first_line(e)}") from None
    t = torch.from_numpy(a.copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _image_folder(path: Path, spec: str) -> Data:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for i, c in enumerate(classes):
        for f in sorted((path / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f, i))
    if not files:
        loose = [f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        why = (
            f"its {len(loose)} image(s) are not in class sub-folders"
            if loose
            else "no images found"
            if classes
            else "it is empty"
        )
        raise SpecError(f"data folder {path} has no images in class sub-folders ({why}); expected DIR/CLASS/IMAGE.png")
    images = [read_image(f) for f, _ in files]
    labels = torch.tensor([lab for _, lab in files], dtype=torch.long)
    return Data(
        spec=spec,
        name=path.name,
        kind="image",
        labels=labels,
        class_names=classes,
        images=images,
        info={"source": str(path), "files": [str(f.relative_to(path)) for f, _ in files]},
    )


def _text_file(path: Path, spec: str, text_column: str, label_column: str) -> Data:
    rows: list[dict] = []
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        else:
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise SpecError(f"{path}: line {n} is not valid JSON") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a UTF-8 text file") from None
    if not rows:
        raise SpecError(f"data file {path} has no rows")
    cols = list(rows[0].keys())
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in rows[0]:
            raise SpecError(
                f"data file {path} has no column '{col}' (columns: {', '.join(map(str, cols))}); choose one with {flag}"
            )
    texts = [str(r[text_column]) for r in rows]
    raw = [r[label_column] for r in rows]
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in raw):
        ints = [int(v) for v in raw]
        class_names = [str(i) for i in range(max(ints) + 1)]
        labels = torch.tensor(ints, dtype=torch.long)
        named = False
    else:
        class_names = sorted({str(v) for v in raw})
        labels = torch.tensor([class_names.index(str(v)) for v in raw], dtype=torch.long)
        named = True
    return Data(
        spec=spec,
        name=path.stem,
        kind="text",
        labels=labels,
        class_names=class_names,
        texts=texts,
        info={"source": str(path), "named_labels": named},
    )


def load_data(spec: str, *, split: str = "test", text_column: str = "text", label_column: str = "label") -> Data:
    """Load a dataset from a spec string (see the module docstring)."""
    spec = spec.strip()
    prefix, _, rest = spec.partition(":")
    if prefix == "zoo" and rest:
        from . import zoo

        names = zoo.list_datasets()
        if rest not in names:
            raise SpecError(f"unknown zoo dataset '{rest}' (available: {', '.join(names)}).{_closest(rest, names)}")
        try:
            ds = zoo.load_dataset(rest, split=split)
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise SpecError(_first_line(e)) from None
        return Data(
            spec=spec,
            name=rest,
            kind="image",
            labels=ds.labels,
            class_names=list(ds.class_names),
            images=ds.raw_images,
            info={"source": f"relprop.zoo ({ds.info.get('source')})", "split": ds.split},
            model_ready=ds.images,
        )
    path = Path(spec).expanduser()
    if not path.exists():
        if spec in __import__("relprop.zoo", fromlist=["list_datasets"]).list_datasets():
            return load_data(f"zoo:{spec}", split=split)
        raise SpecError(
            f"data not found: {spec} (expected zoo:NAME, a folder of class sub-folders, or a .csv/.jsonl file)"
        )
    if path.is_dir():
        return _image_folder(path, spec)
    if path.suffix.lower() in (".csv", ".jsonl", ".json", ".ndjson"):
        return _text_file(path, spec, text_column, label_column)
    raise SpecError(f"data spec {spec}: expected zoo:NAME, a folder of class sub-folders, or a .csv/.jsonl file")


# ------------------------------------------------------------------------------ model inputs
def image_batch(model: LoadedModel, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, display)`` for raw images: model inputs and the resized [0, 1] images to show."""
    pre = model.preprocess or Preprocess()
    shown = [pre.display(im) for im in images]
    shapes = {tuple(s.shape) for s in shown}
    if len(shapes) > 1:
        raise SpecError(
            f"the images have different sizes {sorted(shapes)[:3]} and model '{model.name}' has no input "
            f"size in its configuration; pass --image-size H W"
        )
    disp = torch.stack(shown)
    return pre.normalize(disp), disp


def text_batch(model: LoadedModel, texts: Sequence[str], max_length: int = 128) -> dict:
    tok = model.tokenizer
    enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def check_forward(model: LoadedModel, inputs: Any) -> torch.Tensor:
    """Run the model once; a failure becomes a one-line :class:`SpecError` naming the input shape."""
    try:
        with torch.no_grad():
            out = model.module(**inputs) if isinstance(inputs, dict) else model.module(inputs)
    except Exception as e:
        shape = {k: tuple(v.shape) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(inputs.shape)
        raise SpecError(
            f"model '{model.name}' cannot take an input of shape {shape}: {type(e).__name__}: {_first_line(e)[:200]}"
        ) from None
    from .methods.core import select_output

    out = select_output(out)
    if model.kind != "similarity" and out.dim() != 2:
        raise SpecError(
            f"model '{model.name}' returned an output of shape {tuple(out.shape)}; expected class scores "
            f"(batch, classes)"
        )
    if model.class_names is None or (out.dim() == 2 and len(model.class_names) != out.shape[-1]):
        model.class_names = [str(i) for i in range(out.shape[-1])] if out.dim() == 2 else None
    return out
