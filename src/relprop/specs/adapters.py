"""A user's own objects as the types the loaders make: an ``nn.Module`` as a :class:`LoadedModel`, tensors
or a map-style ``Dataset`` as a :class:`Data`.

The Python API (:func:`relprop.report.run_compare`) takes models and data as spec strings *or* as plain
PyTorch objects; this module converts the plain objects once, at that boundary, so everything after it
has one path. Tensors are taken as the models' inputs exactly as given (no resizing, no normalisation):
a report on tensors computes what ``model(inputs)`` computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .data import Data
from .errors import SpecError
from .hashing import _class_file
from .loaded import LoadedModel
from .preprocess import Preprocess, _values, override_preprocess

#: ``Data.info`` key: the data are what the models take, as the user gave them: inputs
#: (``Data.model_ready``) passed to every model unchanged, labels that are the models' class indices.
MODEL_INPUTS = "model_inputs"


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode with no parameter requiring grad, restored as found on exit: explaining a
    user's model must not switch its dropout off or its training on for good."""
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode
        for p, g in grads:
            p.requires_grad_(g)


def from_module(
    module: nn.Module,
    name: str | None = None,
    *,
    class_names: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
    spec: str | None = None,
) -> LoadedModel:
    """A :class:`LoadedModel` of a module in memory (the CLI's ``python:`` models go the same way).

    ``name``: shown in the report (default: the class name); ``spec``: its identity in the report and the
    cache (default ``module:NAME``); ``class_names``: in output order (default: ``module.class_names``, else
    ``"0".."K-1"``); ``preprocess``: how raw images from a folder or ``zoo:`` data become its inputs
    (default: the channels of its first conv layer, no resizing or normalisation; tensors given as data are
    never preprocessed). The module is not changed: it runs in eval mode without gradients on its
    parameters only while a report uses it (:func:`frozen`).
    """
    from .loaders import _generic

    if not isinstance(module, nn.Module):
        raise SpecError(f"expected a torch.nn.Module, got a {type(module).__name__}")
    name = str(name or type(module).__name__)
    with frozen(module):  # _generic freezes the models the loaders made; this one is the user's
        lm = _generic(module, spec or f"module:{name}", name, f"nn.Module {type(module).__qualname__} (Python)")
    if class_names is not None:
        lm.class_names = [str(c) for c in class_names]
    if preprocess is not None:
        if not isinstance(preprocess, Preprocess):
            raise SpecError(f"preprocess must be a relprop.specs.Preprocess, got a {type(preprocess).__name__}")
        lm.preprocess = preprocess
    unhashed = sorted(
        {
            type(m).__qualname__
            for m in module.modules()
            if not type(m).__module__.startswith("torch.") and not _class_file(type(m))
        }
    )
    if unhashed:  # e.g. defined in a notebook: its forward() can change without the cache key seeing it
        lm.info["no_cache"] = f"the source of {', '.join(unhashed[:3])} is in no file (a notebook or REPL?)"
    return lm


def from_tensors(
    inputs: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    class_names: Sequence[str] | None = None,
    *,
    name: str = "tensors",
) -> Data:
    """:class:`Data` of images already in the form the models take: ``inputs`` ``(N, C, H, W)`` (normalised
    or not; passed to every model as they are) and ``labels`` ``(N,)``: the models' class indices, as
    Captum and Quantus take them (``class_names[i]`` only names class ``i`` in the report; default
    ``"0".."K-1"``). For the report's pictures each image is shown scaled to [0, 1] when its values are
    outside that range."""
    if not isinstance(inputs, torch.Tensor):
        raise SpecError(f"inputs must be a tensor (N, C, H, W), got a {type(inputs).__name__}")
    if inputs.dim() != 4 or not inputs.is_floating_point():
        raise SpecError(
            f"inputs must be a floating-point image batch (N, C, H, W), got {inputs.dtype} of shape "
            f"{tuple(inputs.shape)}"
        )
    if not bool(torch.isfinite(inputs).all()):
        raise SpecError("inputs hold NaN or infinite values")
    try:
        lab = torch.as_tensor(labels).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise SpecError(f"labels must be class indices (N,): {e}") from None
    if lab.dim() != 1 or lab.shape[0] != inputs.shape[0] or lab.is_floating_point() or lab.dtype == torch.bool:
        raise SpecError(
            f"labels must be {inputs.shape[0]} integer class indices (one per input), got {lab.dtype} of shape "
            f"{tuple(lab.shape)}"
        )
    if inputs.shape[0] == 0:
        raise SpecError("inputs are empty")
    lab = lab.long()
    if int(lab.min()) < 0:
        raise SpecError(f"labels must be class indices >= 0, got {int(lab.min())}")
    k = int(lab.max()) + 1
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(k)]
    if len(names) < k:
        raise SpecError(f"labels go up to {k - 1} but class_names has {len(names)} names")
    x = inputs.detach().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    inside = bool((lo >= 0).all() and (hi <= 1).all())
    display = x if inside else (x - lo) / (hi - lo).clamp_min(1e-12)
    return Data(
        spec=f"tensors:{name}",
        name=name,
        kind="image",
        labels=lab,
        class_names=names,
        images=display,
        model_ready=x,
        info={
            "source": f"tensors given in Python ({tuple(x.shape)}, {x.dtype})",
            MODEL_INPUTS: True,
            "classes_present": sorted(set(lab.tolist())),
        },
    )


def from_dataset(dataset: Any, class_names: Sequence[str] | None = None, *, name: str | None = None) -> Data:
    """:class:`Data` of a map-style ``torch.utils.data.Dataset`` whose items are ``(input, label)`` with
    inputs the models take (see :func:`from_tensors`; read once, into memory). ``class_names`` defaults to
    the dataset's ``classes`` (the torchvision convention)."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise SpecError(f"expected a map-style Dataset (len(ds) and ds[i]), got a {type(dataset).__name__}")
    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise SpecError(f"dataset[{i}] is a {type(item).__name__}; expected (input, label)")
        x, y = item[0], item[1]
        if not isinstance(x, torch.Tensor):
            raise SpecError(
                f"dataset[{i}][0] is a {type(x).__name__}, not a tensor; give the dataset a transform that "
                f"makes tensors (e.g. torchvision.transforms.ToTensor())"
            )
        xs.append(x)
        ys.append(int(y))
    if not xs:
        raise SpecError("the dataset is empty")
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise SpecError(f"the dataset's inputs have different shapes {sorted(shapes)[:3]}; resize them in a transform")
    names = class_names if class_names is not None else getattr(dataset, "classes", None)
    return from_tensors(torch.stack(xs), torch.tensor(ys), names, name=name or type(dataset).__name__)


def to_data(data: Any, class_names: Sequence[str] | None = None) -> Data:
    """Any data the report takes as :class:`Data`: a spec string (:func:`load_data`), a :class:`Data`,
    ``(inputs, labels)`` or ``(inputs, labels, class_names)`` tensors, or a map-style ``Dataset``."""
    from .data import load_data

    if isinstance(data, Data):
        return data
    if isinstance(data, str):
        return load_data(data)
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and isinstance(data[0], torch.Tensor):
        names = data[2] if len(data) == 3 else class_names
        return from_tensors(data[0], data[1], names)
    if isinstance(data, torch.Tensor):
        raise SpecError("data as tensors needs the labels too: give (inputs, labels)")
    return from_dataset(data, class_names)


def to_models(models: Any) -> list[str | LoadedModel]:
    """Any models the report takes, in order: spec strings stay specs (loaded one at a time by the report),
    modules become :class:`LoadedModel` s (:func:`from_module`). ``models``: a spec, a module, a loaded
    model, a list of them, or a mapping name -> module (or loaded model)."""
    if isinstance(models, (str, nn.Module, LoadedModel)):
        models = [models]
    items: list[tuple[str | None, Any]]
    if isinstance(models, Mapping):
        items = [(str(k), v) for k, v in models.items()]
    else:
        items = [(None, v) for v in models]
    out: list[str | LoadedModel] = []
    for name, m in items:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, LoadedModel):
            out.append(m)
        elif isinstance(m, nn.Module):
            base = name or type(m).__name__
            taken = {x if isinstance(x, str) else x.spec for x in out}
            n = base
            k = 2
            while f"module:{n}" in taken:  # two modules of one class in a list: module:Net, module:Net#2
                n, k = f"{base}#{k}", k + 1
            out.append(from_module(m, n))
        else:
            raise SpecError(
                f"a model must be a spec string, a torch.nn.Module or a LoadedModel, got a {type(m).__name__}"
            )
    specs = [x if isinstance(x, str) else x.spec for x in out]
    dup = sorted({s for s in specs if specs.count(s) > 1})
    if dup:
        raise SpecError(f"a model is given twice: {', '.join(dup)}")
    if not out:
        raise SpecError("no models given")
    return out


def check_overrides_fit(
    overrides: Mapping[str, Any] | None,
    data: Data,
    models: Sequence[str | LoadedModel],
    load: Callable[[str], LoadedModel] | None = None,
) -> None:
    """Preprocessing overrides that cannot apply are refused before any work, with one line.

    Tensors and datasets are the models' inputs as given (:func:`from_tensors`): nothing resizes or
    normalises them, so ``run_compare(preprocess_overrides=...)`` on them used to change nothing, silently.
    The mean/std counts are checked against the channels each model takes (:func:`override_preprocess`, on
    a copy: the model's own preprocessing is untouched) here, not when the model's turn comes: models in
    memory as they are; a spec string's model, known only once loaded, through ``load`` (then dropped) when
    a per-channel mean/std is given (one value fits any model), as the CLI's check of every model does. A
    model that does not load is left to its turn, which reports it as before.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not given:
        return
    if data.info.get(MODEL_INPUTS):
        raise SpecError(
            f"preprocess_overrides ({', '.join(sorted(given))}) cannot apply to {data.spec}: tensors and datasets are "
            "the models' inputs as given (nothing is resized or normalised); transform them before passing them, "
            "or drop preprocess_overrides"
        )
    per_channel = any(len(_values(given.get(k)) or ()) > 1 for k in ("mean", "std"))
    for m in models:
        if isinstance(m, str):
            if load is None or not per_channel:
                continue
            try:
                m = load(m)
            except Exception:  # noqa: BLE001 - a model that does not load fails at its turn, reported there
                continue
        if m.kind == "image":
            override_preprocess(m.preprocess, **given)  # a copy: the model's own preprocessing is untouched
