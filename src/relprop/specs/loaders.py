"""One loader per model kind: each turns the rest of a spec into a :class:`LoadedModel`.

Pickled files load with ``weights_only=True``; a whole pickled module only with ``--trust-pickle``.

Every path a user names (a spec's file or folder, ``--weights``, ``--classes``, a checkpoint's ``.json``)
is opened through :func:`model_path`. In :func:`recording` it notes the paths, so a caller learns which
files a model needs (``LoadedModel.info["model_files"]``); in :func:`placed` it answers with copies of
them, so another machine (a Ray worker) runs this same loader code on the driver's bytes
(:func:`read_model_files`, :func:`relprop.report.distributed`).

The Python a spec imports from the user's own folders (a ``python:MODULE:FUNCTION`` factory's module, the
module of a trusted pickle's classes) is noted too (``LoadedModel.info["model_modules"]``,
:func:`module_sources`) and shipped the same way: :func:`placed` puts its copy first on ``sys.path`` for the
block only and forgets the modules imported from it afterwards.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SpecError, TrustPickleWarning, closest, first_line, install_hint, need, size_text
from .hashing import file_sha256
from .loaded import TEXT_ZOO, ImageClassifier, LoadedModel, LoadOptions, TextClassifier, _freeze
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

# ------------------------------------------------------------------------------------ model files
#: while a loader runs in :func:`recording`: the paths it opened, as given -> absolute
_RECORD: ContextVar[dict[str, str] | None] = ContextVar("relprop_model_files", default=None)
#: inside :func:`placed`: a path as given -> where its copy lies in this process
_PLACED: ContextVar[dict[str, str] | None] = ContextVar("relprop_placed_files", default=None)
#: files of a model folder that no loader here reads (other frameworks' weights of a Hugging Face snapshot:
#: TensorFlow, Flax, ONNX, Rust, TFLite, Core ML, GGUF), so they are not shipped
OTHER_FRAMEWORKS = (".h5", ".msgpack", ".onnx", ".onnx_data", ".ot", ".tflite", ".mlmodel", ".gguf")
#: :func:`read_model_files`' default bound on the bytes of one model's files (RayOptions.model_bytes)
MODEL_BYTES = 4 << 30


def model_path(given: str | Path) -> Path:
    """The path to open for the file or folder the user named ``given``: ``given`` itself (``~`` expanded),
    or, inside :func:`placed`, its shipped copy. Inside :func:`recording` an existing path is noted."""
    key = str(given)
    placed_ = _PLACED.get()
    if placed_ is not None and key in placed_:
        return Path(placed_[key])
    path = Path(key).expanduser()
    rec = _RECORD.get()
    if rec is not None and path.exists():  # absolute but links kept: a copy bears the name as given
        rec.setdefault(key, os.path.abspath(path))
    return path


@contextmanager
def recording() -> Iterator[dict[str, str]]:
    """Collect the paths that :func:`model_path` opens in the block (a fresh dict, nested blocks apart)."""
    got: dict[str, str] = {}
    token = _RECORD.set(got)
    try:
        yield got
    finally:
        _RECORD.reset(token)


def read_model_files(paths: dict[str, str], limit: int = MODEL_BYTES, modules: dict | None = None) -> dict:
    """The bytes of a model's files (``info["model_files"]``: path as given -> absolute; a folder with
    every file under it but hidden ones and :data:`OTHER_FRAMEWORKS`' weights), for :func:`placed` on another
    machine; and of its modules (``info["model_modules"]``, :func:`module_sources`: a module's file or its
    package folder, without ``__pycache__``). Over ``limit`` bytes in all: a :class:`SpecError` naming the file
    that crosses it; a module that cannot be shipped (compiled, a namespace package over several folders):
    a :class:`SpecError` naming it and the fix."""
    total, seen = 0, set()

    def read(root: Path, keep) -> dict[str, bytes]:
        nonlocal total
        files = [root]
        if root.is_dir():
            files = sorted(f for f in root.rglob("*") if f.is_file() and keep(f.relative_to(root)))
        data: dict[str, bytes] = {}
        for f in files:
            rel = "" if f == root else f.relative_to(root).as_posix()
            if str(f) not in seen:
                seen.add(str(f))
                total += f.stat().st_size
                if total > limit:
                    now, most = size_text(total), size_text(limit)
                    if now == most:  # "2.0 KiB, over the limit of 2.0 KiB": in bytes
                        now, most = f"{total} bytes", f"{limit} bytes"
                    raise SpecError(
                        f"model file {f} takes the model's files to {now}, over the limit of "
                        f"{most} for shipping them to the workers; raise it (--model-files-limit, "
                        f"RayOptions.model_bytes) or put the files on storage every node reaches at the same path and pass "
                        f"--model-files shared (RayOptions(ship_models=False))"
                    )
            data[rel] = f.read_bytes()
        return data

    entries = []
    for key, where in paths.items():
        root = Path(where)
        if not root.exists():
            raise SpecError(f"model file {where} is gone since the model was loaded (it is read again to ship it)")
        entries.append({"key": key, "path": where, "dir": root.is_dir(), "files": read(root, _read_by_torch)})
    shipped = []
    for name, where in (modules or {}).items():
        root = _shippable(name, where)
        shipped.append({"module": name, "path": str(root), "dir": root.is_dir(), "files": read(root, _python_source)})
    return {"entries": entries, "modules": shipped, "bytes": total}


def _python_source(rel: Path) -> bool:
    """Whether a file of a shipped package folder goes along (not hidden, not a byte-code cache)."""
    return not any(p.startswith(".") or p == "__pycache__" for p in rel.parts)


#: suffixes of compiled extension modules, which another machine cannot be assumed to run
_COMPILED = (".so", ".pyd", ".dylib", ".dll")


def _shippable(name: str, where: list[str]) -> Path:
    """The file or package folder of top-level module ``name`` (:func:`module_sources`), or a SpecError that
    names it and the fix when it cannot be shipped as Python source."""
    fix = (
        f"install it on every node (so that 'import {name}' works there) and pass --model-files shared "
        f"(RayOptions(ship_models=False)), with the model files on storage every node reaches"
    )
    if len(where) != 1:
        raise SpecError(
            f"module '{name}' is a namespace package spread over {len(where)} folders ({', '.join(where)}); it "
            f"cannot be shipped to the Ray workers: {fix}"
        )
    root = Path(where[0])
    if not root.exists():
        raise SpecError(f"module '{name}' ({root}) is gone since the model was loaded (it is read again to ship it)")
    compiled = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.suffix in _COMPILED)
    if compiled and (root.is_dir() or root.suffix != ".py"):
        raise SpecError(
            f"module '{name}' holds compiled code ({compiled[0]}), which is not shipped to the Ray workers: {fix}"
        )
    return root


def module_sources(names: Iterable[str]) -> dict[str, list[str]]:
    """The top-level modules of the imported modules ``names`` that a Ray worker may lack, and of the modules
    they import in turn (their ``import`` statements and globals: ``import helpers``, ``from helpers import
    Block``; only those imported on the driver count): ``{name:
    [its .py file, or its package folder(s)]}``. Left out: what an installed environment provides (the
    standard library, site-packages, relprop, torch), which every node needs anyway, as it needs relprop, and
    whose imports are not followed; modules not imported from a file (a ``python:FILE.py``, which is a model
    file, or ``__main__``)."""
    installed = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    installed |= {str(Path(__file__).resolve().parents[1]), str(Path(torch.__file__).resolve().parents[1])}
    out: dict[str, list[str]] = {}
    todo, seen = list(names), set()
    while todo:
        top = todo.pop(0).partition(".")[0]
        mod = sys.modules.get(top)
        if top in seen or top in ("__main__", "relprop", "torch") or top in sys.stdlib_module_names or mod is None:
            continue
        seen.add(top)
        file, package = getattr(mod, "__file__", None), list(getattr(mod, "__path__", None) or [])
        if package:  # a regular package's folder, or the folders of a namespace package
            where = [os.path.dirname(os.path.abspath(file))] if file else [os.path.abspath(p) for p in package]
        elif file:
            where = [os.path.abspath(file)]
        else:
            continue
        if not any(_installed(Path(w).resolve(), installed) for w in where):
            out[top] = where
            for name in [n for n in list(sys.modules) if n == top or n.startswith(top + ".")]:
                todo += _imported_by(sys.modules.get(name))
    return out


def _imported_by(mod: Any) -> list[str]:
    """The modules ``mod`` imports: its source's absolute ``import``/``from ... import`` statements, and the
    modules its globals come from (imported modules, the modules that define imported classes and functions)."""
    import ast

    found = []
    file = getattr(mod, "__file__", None)
    if isinstance(file, str) and file.endswith(".py"):
        try:
            tree = ast.parse(Path(file).read_bytes())
        except (OSError, SyntaxError, ValueError):
            tree = None
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, ast.Import):
                found += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append(node.module)
    for v in list(getattr(mod, "__dict__", {}).values()):
        try:
            name = v.__name__ if isinstance(v, type(sys)) else getattr(v, "__module__", None)
        except Exception:  # a lazy proxy that fails on access names nothing
            continue
        if isinstance(name, str):
            found.append(name)
    return found


def _installed(where: Path, installed: set[str]) -> bool:
    """Whether ``where`` lies in an installed environment (see :func:`module_sources`)."""
    return bool({"site-packages", "dist-packages"} & set(where.parts)) or any(
        where.is_relative_to(p) for p in installed
    )


def _read_by_torch(rel: Path) -> bool:
    """Whether a file of a model folder may be read by a loader here (not hidden, not another framework's)."""
    return not any(p.startswith(".") for p in rel.parts) and rel.suffix not in OTHER_FRAMEWORKS


@contextmanager
def placed(bundle: dict | None) -> Iterator[None]:
    """Write a :func:`read_model_files` bundle to a private temporary folder and make :func:`model_path`
    answer with the copies in the block; the folder is removed after. Files of one folder on the driver
    land in one folder here (a checkpoint's ``.json`` next to it) under their own names (a model's name is
    its file's). Shipped modules: their folders go first on ``sys.path`` for the block, and the modules
    imported from them are dropped from ``sys.modules`` after (the loaded model keeps its classes); a module
    this process imported before the block stays the one it uses. Nothing happens for ``None`` or an empty
    bundle."""
    if not bundle or not (bundle.get("entries") or bundle.get("modules")):
        yield
        return
    import hashlib

    def place_of(src: Path) -> Path:
        return root / hashlib.sha256(str(src.parent).encode()).hexdigest()[:12] / src.name

    root = Path(tempfile.mkdtemp(prefix="relprop-model-"))
    saved = list(sys.path)
    try:
        where: dict[str, str] = {}
        for e in bundle["entries"]:
            where[e["key"]] = str(_write(place_of(Path(e["path"])), e))
        folders: list[str] = []
        for e in bundle.get("modules") or ():
            src = Path(e["path"])
            folder = str(_write(root / "python" / place_of(src).relative_to(root), e).parent)
            folders += [folder] if folder not in folders else []
        sys.path[:0] = folders
        if folders:
            importlib.invalidate_caches()
        token = _PLACED.set(where)
        try:
            yield
        finally:
            _PLACED.reset(token)
    finally:
        sys.path[:] = saved
        _forget(root)
        shutil.rmtree(root, ignore_errors=True)


def _write(place: Path, entry: dict) -> Path:
    """Write one shipped file or folder (:func:`read_model_files`' entry) at ``place``."""
    for rel, data in entry["files"].items():
        f = place / rel if rel else place
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    if entry["dir"]:
        place.mkdir(parents=True, exist_ok=True)
    return place


def _forget(root: Path) -> None:
    """Drop the modules imported from under ``root`` and the import system's finders for its folders."""
    prefix = str(root) + os.sep
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", None) or []), None)
        if isinstance(f, str) and f.startswith(prefix):
            del sys.modules[name]
    for key in [k for k in sys.path_importer_cache if str(k).startswith(prefix)]:
        del sys.path_importer_cache[key]


def _pickle_refused(path: Path) -> SpecError:
    return SpecError(
        f"{path} holds a whole pickled model: loading it runs code stored in the file (arbitrary code "
        f"execution). If you made it or fully trust its source, pass --trust-pickle; better, save the weights "
        f"(model.state_dict()) as .safetensors and give the architecture (see relprop --help)"
    )


def trust_pickle_note(path: Path) -> str:
    """What loading ``path`` with ``--trust-pickle`` means, in one line."""
    return (
        f"--trust-pickle: unpickling {path} runs the code stored in the file as you, with your files and "
        f"permissions (arbitrary code execution); use it only for files you made or fully trust"
    )


@contextmanager
def _importable_from(*folders: str | Path) -> Iterator[None]:
    """Put ``folders`` (not already there) first on ``sys.path`` for an import, then restore ``sys.path``
    exactly: the ``relprop`` console script does not search the current folder, but a user's own model
    code (``python:MODULE``, the class of a trusted pickle) lives there. The process is left as found."""
    saved = list(sys.path)
    try:
        for f in reversed([str(f) for f in folders]):
            if f not in sys.path:
                sys.path.insert(0, f)
        yield
    finally:
        sys.path[:] = saved


def _is_weights_only_refusal(e: BaseException) -> bool:
    """torch.load(weights_only=True) refused a pickle that holds more than tensors."""
    msg = str(e)
    return "weights_only" in msg or "Unsupported global" in msg or "WeightsUnpickler" in msg


def _read_state_dict(path: Path) -> dict:
    if not path.exists():
        raise SpecError(f"weights file not found: {path}")
    state: Any  # a flat state dict, or a checkpoint dict holding one
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except SpecError:
        raise
    except ImportError:
        raise SpecError(f"reading .safetensors files needs 'safetensors' ({install_hint('safetensors')})") from None
    except Exception as e:
        if _is_weights_only_refusal(e):
            raise SpecError(
                f"weights file {path} is not a plain state dict (it pickles objects, and unpickling runs code "
                f"from the file); save model.state_dict(), preferably as .safetensors"
            ) from None
        raise SpecError(f"cannot read weights file {path}: {first_line(e)}") from None
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
            f" ({first_line(msg.split(':', 1)[-1]).strip()[:160]})"
        ) from None


def _classifier_classes(state: dict, classifier: str | Sequence[str] | None) -> int | None:
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    for name in names:
        w = state.get(f"{name}.weight")
        if w is not None and w.dim() >= 1:
            return int(w.shape[0])
    return None


def _zoo(name: str, spec: str) -> LoadedModel:
    from .. import zoo

    if name in TEXT_ZOO:
        from ..zoo.text import SentenceSimilarity, load_minilm  # noqa: F401

        try:
            module, tok = load_minilm()
        except (ImportError, FileNotFoundError) as e:
            msg, mod = first_line(e), getattr(e, "name", None)
            if isinstance(e, ImportError) and mod and "pip install" not in msg:
                msg = f"{msg} ({install_hint(mod)})"
            raise SpecError(f"zoo:{name}: {msg}") from None
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
            f"unknown zoo model '{name}' (available: {', '.join(names + list(TEXT_ZOO))}).{closest(name, names + list(TEXT_ZOO))}"
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


def _torchvision(name: str, spec: str, opts: LoadOptions) -> LoadedModel:
    weights, num_classes = opts.weights, opts.num_classes
    tvm = need("torchvision", "a torchvision: model").models
    available = tvm.list_models()
    if name not in available:
        raise SpecError(f"unknown torchvision model '{name}'.{closest(name, available)}")
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
        path = model_path(weights)
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
        files = [str(path)]
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
        files = [str(cached)]
    model = _freeze(model)
    out = _out_features(model)
    if class_names is None and out:
        class_names = [str(i) for i in range(out)]
    aliases, note = None, None
    if class_names is not None and len(class_names) == 1000 and (aliases := imagenet_aliases()):
        if weights:
            note = _assumed_imagenet(name)
        else:
            aliases = [[c, *a] for a, c in zip(aliases, class_names)]  # torchvision's name, WordNet id, ...
    if note and aliases:
        class_names = [a[1] for a in aliases]
    return _image_classifier(spec, name, model, pre, class_names, aliases, files, source, note)


def _image_classifier(
    spec: str,
    name: str,
    model: nn.Module,
    pre: Any,
    class_names: list[str] | None,
    aliases: Any,
    files: list[str],
    source: str,
    note: str | None,
) -> LoadedModel:
    """The loaded torchvision/timm classifier; ``note`` says when ImageNet's class names were assumed."""
    lm = LoadedModel(
        spec=spec,
        name=name,
        module=model,
        preprocess=pre,
        class_names=class_names,
        class_aliases=aliases,
        source_files=files,
        info={"source": source, "num_params": sum(p.numel() for p in model.parameters())},
    )
    if note:
        lm.info["class_names_note"] = note
    return lm


def _assumed_imagenet(name: str) -> str:
    return (
        f"{name}: 1000 outputs and no class names in the weights file: ImageNet-1k's classes are assumed "
        f"for matching labels; pass --classes FILE if the model was trained on other classes"
    )


def _torchvision_cached(name: str):
    """torchvision's default pretrained weights for ``name`` and their file, if already downloaded."""
    tvm = need("torchvision", "a torchvision: model").models
    if name not in tvm.list_models():
        raise SpecError(f"unknown torchvision model '{name}'.{closest(name, tvm.list_models())}")
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


def imagenet_aliases() -> list[list[str]] | None:
    """WordNet id and all names of each ImageNet-1k class, from timm's offline tables (None without timm)."""
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [[wnid, *info.index_to_description(i).split(", ")] for i, wnid in enumerate(info.label_names())]
    except Exception:
        return None


def _timm(name: str, spec: str, opts: LoadOptions) -> LoadedModel:
    weights, num_classes = opts.weights, opts.num_classes
    files: list[str] = []
    timm = need("timm", "a timm: model")
    if not timm.list_models(name) and not timm.is_model(name):
        raise SpecError(f"unknown timm model '{name}'.{closest(name, timm.list_models())}")
    if weights:
        path = model_path(weights)
        state = _read_state_dict(path)
        probe = timm.create_model(name, pretrained=False)
        n = num_classes or _classifier_classes(state, probe.default_cfg.get("classifier")) or probe.num_classes
        model = timm.create_model(name, pretrained=False, num_classes=n)
        _load_state(model, state, path, f"timm:{name}")
        source = f"timm:{name} + {path}"
        files = [str(path)]
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
    n_classes = model.num_classes
    if not isinstance(n_classes, int):
        raise SpecError(f"timm:{name}: model.num_classes is {n_classes!r}, not an int")
    class_names, aliases, note = [str(i) for i in range(n_classes)], None, None
    if n_classes == 1000 and (aliases := imagenet_aliases()):
        class_names = [a[1] for a in aliases]  # the first English name; the WordNet id is an alias
        note = _assumed_imagenet(name) if weights else None
    return _image_classifier(spec, name, model, pre, class_names, aliases, files, source, note)


def _hf(path_str: str, spec: str, opts: LoadOptions | None = None) -> LoadedModel:
    path = model_path(path_str)
    if not path.exists():
        raise SpecError(f"Hugging Face model folder not found: {path}")
    if not (path / "config.json").exists():
        raise SpecError(f"{path} is not a Hugging Face model folder (no config.json)")
    transformers = need("transformers", "an hf: model")
    cfg = json.loads((path / "config.json").read_text())
    arch = " ".join(cfg.get("architectures") or [])
    from transformers.utils import logging as hf_logging

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would mix into relprop's own output
    try:
        kw = {"local_files_only": True, "attn_implementation": "eager"}
        if "ImageClassification" in arch:
            hf = transformers.AutoModelForImageClassification.from_pretrained(str(path), **kw)
            module: nn.Module = ImageClassifier(hf)
            kind, tok = "image", None
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
        if _is_weights_only_refusal(e):  # transformers loads .bin with weights_only=True; its message says
            # "re-run with weights_only=False", which would run the file's code
            raise SpecError(
                f"{path}: a pickled weights file (.bin) holds objects besides tensors, and unpickling them "
                f"would run code from the file; relprop loads it only as plain tensors. Save the model with "
                f"save_pretrained() (safetensors) from a source you trust"
            ) from None
        raise SpecError(f"cannot load the Hugging Face model in {path}: {first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
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
        source_files=sorted(
            str(f) for f in path.iterdir() if f.is_file() and f.suffix in (".json", ".safetensors", ".bin")
        ),
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


def _python(target: str, spec: str, opts: LoadOptions | None = None) -> LoadedModel:
    if ":" not in target:
        raise SpecError(f"model spec '{spec}': expected python:MODULE:FUNCTION (e.g. python:mymodels:build)")
    mod_name, fn_name = target.rsplit(":", 1)
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            file = model_path(mod_name)
            if not file.exists():
                raise SpecError(f"python file not found: {file}")
            s = importlib.util.spec_from_file_location(file.stem, str(file))
            if s is None or s.loader is None:
                raise SpecError(f"cannot import python file {file}")
            mod = importlib.util.module_from_spec(s)
            with _importable_from(file.resolve().parent):  # as `python FILE.py` would: its siblings import
                s.loader.exec_module(mod)
            files = [str(file.resolve())]
        else:
            known = mod_name in sys.modules
            with _importable_from(os.getcwd()):
                mod = importlib.import_module(mod_name)
                files = [f] if (f := getattr(mod, "__file__", None)) else []
                if known and files and Path(files[0]).resolve().is_relative_to(Path.cwd().resolve()):
                    # imported earlier in this process: run the code now on disk, the code the cache key hashes
                    mod = importlib.reload(mod)
    except SpecError:
        raise
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and missing != mod_name and not mod_name.startswith(missing + "."):
            raise SpecError(
                f"model spec '{spec}': '{mod_name}' imports '{missing}', which is neither installed nor beside it "
                f"({first_line(e)})"
            ) from None
        raise SpecError(f"model spec '{spec}': cannot import module '{mod_name}' ({first_line(e)})") from None
    except Exception as e:
        raise SpecError(
            f"model spec '{spec}': importing '{mod_name}' failed: {type(e).__name__}: {first_line(e)}"
        ) from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        raise SpecError(
            f"model spec '{spec}': module '{mod_name}' has no function '{fn_name}'.{closest(fn_name, names)}"
        )
    try:
        model = fn()
    except Exception as e:
        raise SpecError(f"model spec '{spec}': {fn_name}() failed: {type(e).__name__}: {first_line(e)}") from None
    if isinstance(model, tuple) and model and isinstance(model[0], nn.Module):
        model = model[0]
    if not isinstance(model, nn.Module):
        raise SpecError(f"model spec '{spec}': {fn_name}() returned a {type(model).__name__}, not a torch.nn.Module")
    source = f"python:{target}"
    if opts is not None and opts.weights:  # the same reader and strict key/shape check as torchvision:/timm:
        wpath = model_path(opts.weights)
        _load_state(model, _read_state_dict(wpath), wpath, f"the model of {spec}")
        files.append(str(wpath.resolve()))
        source = f"{source} + {wpath}"
    lm = _generic(model, spec, f"{Path(mod_name).stem}:{fn_name}", source)
    lm.source_files = files
    classes = [type(m).__module__ for m in model.modules()]
    if not (mod_name.endswith(".py") or os.sep in mod_name):
        lm.info["model_modules"] = module_sources([mod_name, *classes])
    else:  # a FILE.py is a model file (shipped as one); the modules it imports from its folder are shipped as code
        lm.info["model_modules"] = module_sources([*_imported_by(mod), *classes])
    return lm


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


def _checkpoint(path: Path, spec: str, opts: LoadOptions) -> LoadedModel:
    if not path.exists():
        raise SpecError(f"model file not found: {path}")
    if path.suffix == ".safetensors":
        meta = model_path(path.with_suffix(".json"))
        if not meta.exists():
            raise SpecError(
                f"{path} holds only weights; give the architecture with --model torchvision:NAME or "
                f"timm:NAME and --weights {path}, or put a {meta.name} (zoo format) next to it"
            )
        from ..zoo.models import ARCHITECTURES, build

        info = json.loads(meta.read_text())
        if info.get("architecture") not in ARCHITECTURES:
            raise SpecError(
                f"{meta}: unknown architecture {info.get('architecture')!r} (known: {', '.join(sorted(ARCHITECTURES))})"
            )
        model = build(info["architecture"], **info.get("arch_kwargs", {}))
        _load_state(model, _read_state_dict(path), path, info["architecture"])
        lm = _generic(model, spec, path.stem, str(path))
        pre = lm.preprocess
        if pre is None:  # _generic always infers one
            raise SpecError(f"internal: no preprocessing inferred for {path}")
        if "input_shape" in info:
            c, h, w = info["input_shape"]
            pre.size, pre.channels = (h, w), c
        norm = info.get("normalization") or {}
        if "mean" in norm:
            pre.mean, pre.std = (norm["mean"],), (norm["std"],)
        pre.source = f"{meta.name}"
        if info.get("class_names"):
            lm.class_names = list(info["class_names"])
        lm.source_files = [str(path), str(meta)]
        return lm
    # .pt / .pth / .bin: weights_only first; a whole pickled module only with --trust-pickle
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        if not _is_weights_only_refusal(e):
            raise SpecError(f"cannot read model file {path}: {first_line(e)}") from None
        if not opts.trust_pickle:
            raise _pickle_refused(path) from None
        warnings.warn(TrustPickleWarning(trust_pickle_note(path)), stacklevel=2)
        try:  # the model's class is looked up next to the file and in the current folder, as python: specs
            with _importable_from(path.resolve().parent, os.getcwd()):
                obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except ModuleNotFoundError as e2:
            raise SpecError(
                f"cannot read model file {path}: it refers to module '{e2.name}', which defines the model's class "
                f"and is found neither next to the file nor in the current folder; add its folder to the search "
                f"path (PYTHONPATH=<folder holding {e2.name}.py> relprop ...)"
            ) from None
        except Exception as e2:
            raise SpecError(f"cannot read model file {path}: {first_line(e2)}") from None
    if isinstance(obj, dict):
        raise SpecError(
            f"{path} holds a state dict (weights only), not a model; give the architecture that builds the "
            f"model: your own code with --model python:MODULE:FUNCTION --weights {path}, or --model "
            f"torchvision:NAME or timm:NAME with --weights {path}"
        )
    if not isinstance(obj, nn.Module):
        raise SpecError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
    lm = _generic(obj, spec, path.stem, str(path))
    lm.source_files = [str(path)]
    lm.info["weights_sha256"] = file_sha256(path)
    if opts.trust_pickle:  # the modules of the classes the file's pickle named
        lm.info["model_modules"] = module_sources(type(m).__module__ for m in obj.modules())
    return lm
