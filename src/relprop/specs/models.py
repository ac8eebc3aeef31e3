"""Model specs: one registry of model kinds, each a prefix, an example, a loader and a cheap check.

Model specs (``load_model``)::

    zoo:NAME                 a model of the embedded zoo (relprop.zoo.list_models()), or
    zoo:minilm-similarity    the all-MiniLM-L6-v2 sentence-similarity model (text)
    torchvision:NAME         a torchvision architecture; weights from --weights FILE, else torchvision's
                             own pretrained weights if they are already in the torch hub cache
    timm:NAME                a timm architecture; weights from --weights FILE, else timm's pretrained
                             weights if they are already in the local Hugging Face cache
    hf:PATH                  a local Hugging Face model folder (image or sequence classification)
    python:MODULE:FUNCTION   FUNCTION() returns an nn.Module (MODULE may be a dotted name or a .py file);
                             --weights FILE loads a state dict into it (strictly: every key must fit)
    FILE.safetensors         weights next to a FILE.json in the zoo's format (architecture, arch_kwargs, ...)
    FILE.pt / .pth / .bin    a state dict is refused (give the architecture); a whole pickled model
                             loads only with --trust-pickle, because unpickling runs code from the file

Adding a kind is one :class:`ModelKind` in :data:`KINDS`: the dispatcher, the cheap pre-checks,
the error messages and the CLI's help all read the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SpecError, closest
from .layers import default_cam_layer, list_layers
from .loaded import (
    PICKLE_SUFFIXES,
    TEXT_ZOO,
    TRUST_PICKLE_HELP,
    ImageClassifier,
    LoadedModel,
    LoadOptions,
    TextClassifier,
    default_composite,
)
from .loaders import (
    _checkpoint,
    _hf,
    _python,
    _timm,
    _torchvision,
    _torchvision_cached,
    _zoo,
    imagenet_aliases,
    model_path,
    recording,
)

__all__ = [
    "KINDS",
    "MODEL_PREFIXES",
    "TEXT_ZOO",
    "TRUST_PICKLE_HELP",
    "ImageClassifier",
    "LoadOptions",
    "LoadedModel",
    "ModelKind",
    "TextClassifier",
    "check_model_spec",
    "default_cam_layer",
    "default_composite",
    "imagenet_aliases",
    "list_layers",
    "load_model",
    "spec_forms",
    "takes_weights",
    "unique_names",
    "weights_prefixes",
]


# ------------------------------------------------------------------------------------ registry
def _check_zoo(rest: str, opts: LoadOptions) -> None:
    from .. import zoo

    names = zoo.list_models() + list(TEXT_ZOO)
    if rest not in names:
        raise SpecError(f"unknown zoo model '{rest}' (available: {', '.join(names)}).{closest(rest, names)}")


def _check_hf(rest: str, opts: LoadOptions) -> None:
    if not Path(rest).expanduser().exists():
        raise SpecError(f"Hugging Face model folder not found: {rest}")


def _check_torchvision(rest: str, opts: LoadOptions) -> None:
    if not opts.weights:
        _torchvision_cached(rest)


@dataclass(frozen=True)
class ModelKind:
    """One kind of model spec: ``PREFIX:REST``."""

    prefix: str
    example: str
    help: str
    load: Callable[[str, str, LoadOptions], LoadedModel]  # (rest, spec, options)
    check: Callable[[str, LoadOptions], None] = lambda rest, opts: None  # cheap, before any loading
    takes_weights: bool = False


KINDS: dict[str, ModelKind] = {
    k.prefix: k
    for k in (
        ModelKind(
            "zoo", "zoo:NAME", "a model of the embedded zoo (relprop list)", lambda r, s, o: _zoo(r, s), _check_zoo
        ),
        ModelKind(
            "torchvision",
            "torchvision:NAME [--weights FILE]",
            "a torchvision architecture with --weights or its cached pretrained weights",
            _torchvision,
            _check_torchvision,
            takes_weights=True,
        ),
        ModelKind(
            "timm",
            "timm:NAME [--weights FILE]",
            "a timm architecture with --weights or its cached pretrained weights",
            _timm,
            takes_weights=True,
        ),
        ModelKind("hf", "hf:FOLDER", "a local Hugging Face image/sequence classifier", _hf, _check_hf),
        ModelKind(
            "python",
            "python:MODULE:FUNCTION [--weights FILE]",
            "FUNCTION() returns the nn.Module; --weights loads a state dict into it (strict)",
            _python,
            takes_weights=True,
        ),
    )
}
MODEL_PREFIXES = tuple(KINDS)
# (form, what it is): the model files the loader takes, for the help text, errors and ``relprop list``
FILE_FORMS: tuple[tuple[str, str], ...] = (
    ("FILE.safetensors", "+ FILE.json, zoo format"),
    (
        "FILE.pt / .pth / .bin",
        "a whole model, torch.save(model), needs --trust-pickle; a state dict: --weights FILE with its architecture",
    ),
)


def spec_forms() -> str:
    """Every accepted form, for help texts and error messages."""
    files = (f"{form} ({what})" for form, what in FILE_FORMS)
    return " | ".join([*(k.example for k in KINDS.values()), *files])


def _resolve(spec: str) -> tuple[str, str]:
    """``(kind, rest)``: kind is a prefix of :data:`KINDS`, ``"file"`` or ``"hf"`` for a model folder."""
    prefix, _, rest = spec.partition(":")
    if prefix in KINDS and rest:
        return prefix, rest
    path = model_path(spec)
    if path.suffix in (*PICKLE_SUFFIXES, ".safetensors"):
        return "file", spec
    if path.is_dir() and (path / "config.json").exists():
        return "hf", spec
    from .. import zoo

    if spec in zoo.list_models() or spec in TEXT_ZOO:
        return "zoo", spec
    if prefix and rest and prefix not in KINDS and len(prefix) > 1:  # "C:\..." is a path, not a prefix
        raise SpecError(
            f"unknown model spec '{spec}': unknown prefix '{prefix}:'.{closest(prefix, MODEL_PREFIXES)} "
            f"Use {spec_forms()}"
        )
    close = closest(spec, zoo.list_models() + list(TEXT_ZOO))
    hint = close.replace("'", "'zoo:", 1) if close else ""
    raise SpecError(f"unknown model spec '{spec}'.{hint} Use {spec_forms()}")


def load_model(
    spec: str,
    *,
    weights: str | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
    classes_file: str | None = None,
) -> LoadedModel:
    """Load a model from a spec string (see the module docstring). ``info["model_files"]`` of the result:
    the files and folders the user named that loading read (path as given -> absolute), which
    ``--engine ray`` ships to its workers (:func:`relprop.specs.loaders.read_model_files`)."""
    spec = spec.strip()
    if not spec:
        raise SpecError("empty model spec")
    opts = LoadOptions(weights, num_classes, trust_pickle, classes_file)
    with recording() as files:
        lm = _load(spec, opts)
    lm.info["model_files"] = files
    return lm


def _load(spec: str, opts: LoadOptions) -> LoadedModel:
    kind, rest = _resolve(spec)
    if kind == "file":
        lm = _checkpoint(model_path(rest), spec, opts)
    else:
        lm = KINDS[kind].load(rest, spec if kind != "zoo" or spec.startswith("zoo:") else f"zoo:{spec}", opts)
    classes_file = opts.classes_file
    if classes_file:
        from .labels import read_class_file

        names, aliases = read_class_file(model_path(classes_file))
        if lm.class_names and len(names) != len(lm.class_names):
            raise SpecError(
                f"--classes {classes_file} lists {len(names)} classes but model '{lm.name}' has {len(lm.class_names)}"
            )
        lm.class_names, lm.class_aliases = names, aliases
        lm.info["classes_from"] = "--classes"
        lm.info.pop("class_names_note", None)
        lm.source_files.append(str(Path(classes_file).resolve()))
    return lm


def check_model_spec(spec: str, weights: str | None = None, **options: Any) -> None:
    """Cheap checks of a model spec before any work (unknown prefix or zoo name, missing files)."""
    spec = spec.strip()
    if weights and not Path(weights).expanduser().exists():
        raise SpecError(f"weights file not found: {weights}")
    opts = LoadOptions(weights, **options)
    kind, rest = _resolve(spec)
    if kind == "file":
        if not Path(rest).expanduser().exists():
            raise SpecError(f"model file not found: {rest}")
        return
    KINDS[kind].check(rest, opts)


def takes_weights(spec: str) -> bool:
    kind = spec.partition(":")[0]
    return kind in KINDS and KINDS[kind].takes_weights


def weights_prefixes() -> str:
    """``torchvision:/timm:/python:``: the kinds that read ``--weights``, as messages name them."""
    return "/".join(f"{k.prefix}:" for k in KINDS.values() if k.takes_weights)


def unique_names(models: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Display names by spec from ``(spec, name)`` pairs: a model's own name, or its spec where two
    models share a name (``timm:resnet18`` and ``torchvision:resnet18``): the spec is the identity."""
    counts: dict[str, int] = {}
    for _, name in models:
        counts[name] = counts.get(name, 0) + 1
    return {spec: (name if counts[name] == 1 else spec) for spec, name in models}
