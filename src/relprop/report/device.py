"""Where and in what precision the report and the command line run a model: ``--device`` and ``--dtype``.

The library needs none of this: :func:`relprop.explain` runs wherever the model and its inputs are (every
method creates its tensors on the inputs' device; LRP on a bfloat16/float16 model computes its divisions and
carries its relevance in float32, see :mod:`relprop.rules.base`). The report builds its inputs on the CPU, in
float32, in many places (batches, perturbations, baselines); :class:`Placed` moves them to the model's device
and precision at the model's entry, so every caller gets it right without converting anything itself, and a
caller that already works on the device pays nothing (``Tensor.to`` returns the tensor itself).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..specs import LoadedModel, SpecError

#: ``--dtype`` names -> dtypes.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: ``--device`` choices (``cuda:N`` is accepted too).
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; ``cuda`` without CUDA is a clear error."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device: expected one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name}: CUDA is not available to this torch ({torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu or --device auto"
            )
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"device: {name!r} is not a device name (cuda or cuda:N)") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    return torch.device("cpu")


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {name}")
        return name
    key = str(name).strip().lower().replace("torch.", "")
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(
        key, key
    )
    if key not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[key]


class Placed(torch.nn.Module):
    """``inner`` on ``device`` in ``dtype``: float inputs are moved and cast at the entry, integer inputs (token
    ids, masks) only moved. The output stays where the model made it (on the device, in ``dtype``).

    Explanations of a ``Placed`` model are of the inner model on its inputs: relprop records the entry copy
    as an op and takes relevance back through it (exactly, in float32 for LRP), so attributions come back on
    the caller's device in the caller's dtype.

    The wrapper is transparent to names: :meth:`named_modules` (and so ``named_parameters``/``named_buffers``,
    which walk it) lists the inner model's modules under the names they have in the inner model, and
    :meth:`get_submodule` resolves them, so a recorded graph's module scopes and parameter names, ``layers=``
    and ``params=`` names, and error messages read as if the user's model had been called directly.
    ``state_dict`` keeps ``Module``'s own keys (``inner.``-prefixed): it round-trips with ``load_state_dict``.
    As ``modules()`` walks :meth:`named_modules`, the wrapper is not among them either: code that saves and
    restores each module's ``training`` flag, or reads each module's hooks (the plan's signature), sees the
    inner model's. Nothing of the wrapper depends on either (its forward reads no mode; the report registers
    no hook on it): put hooks on ``inner``.
    """

    #: float inputs are cast to the model's dtype here, so any float dtype is accepted
    #: (:func:`relprop.methods._validate.check_input_dtype` reads this)
    casts_inputs = True

    def __init__(self, inner: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.device = device
        self.dtype = dtype
        self.training = inner.training  # a wrapper of an eval model is in eval mode too

    def _to(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if v.is_floating_point():
                return v.to(device=self.device, dtype=self.dtype)
            return v.to(self.device)
        if isinstance(v, dict):
            return {k: self._to(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(self._to(x) for x in v)
        return v

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*self._to(args), **self._to(kwargs))

    def named_modules(self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True):
        """The inner model's modules, named as in the inner model (the wrapper itself is not listed)."""
        return self.inner.named_modules(memo, prefix, remove_duplicate)

    def get_submodule(self, target: str) -> torch.nn.Module:
        """A module by its name in the inner model ("" is the inner model), as :meth:`named_modules` names it."""
        return self.inner.get_submodule(target)

    def extra_repr(self) -> str:
        return f"device={self.device}, dtype={self.dtype}"


def place(
    module: torch.nn.Module,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    *,
    copy: bool = False,
) -> torch.nn.Module:
    """``module`` on ``device`` in ``dtype``, wrapped in :class:`Placed` (the module itself when nothing changes).

    ``copy=True`` moves a deep copy, leaving ``module`` (a user's own) untouched; else it is moved in place.
    Only floating-point parameters and buffers change dtype (``Module.to`` semantics).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype)
    if isinstance(module, Placed) and module.device == dev and module.dtype == dt:
        return module  # placed already (the CLI's loader and run_compare both place)
    params = [*module.parameters(), *module.buffers()]
    here = {p.device for p in params}
    floats = {p.dtype for p in params if p.is_floating_point()}
    if here <= {dev} and floats <= {dt} and dev.type == "cpu" and dt == torch.float32:
        return module  # the default: nothing to move, nothing to cast at the entry
    if copy:
        import copy as _copy

        module = _copy.deepcopy(module)
    module.to(device=dev, dtype=dt)
    return Placed(module, dev, dt)


def check_placement(device: str | torch.device, dtype: str | torch.dtype) -> None:
    """Raise a one-line :class:`~relprop.specs.SpecError` for a device or dtype this machine cannot run."""
    try:
        if not isinstance(device, torch.device):
            resolve_device(device)
        resolve_dtype(dtype)
    except ValueError as e:
        raise SpecError(str(e)) from None


def place_loaded(
    model: LoadedModel, device: str | torch.device, dtype: str | torch.dtype, *, copy: bool
) -> LoadedModel:
    """A :class:`~relprop.specs.LoadedModel` whose module is :func:`place` d (a new LoadedModel when the module
    changes, so a user's own LoadedModel and module stay untouched with ``copy=True``)."""
    own = float_dtypes(model.module)
    module = place(model.module, device, dtype, copy=copy)
    if module is model.module:
        return model
    info = model.info
    cast = own - {resolve_dtype(dtype)}
    if cast:  # said in the report and on the terminal: a float64 model's numbers are float32 ones now
        info = {**info, "dtype_cast": cast_note(own, resolve_dtype(dtype))}
    return dataclasses.replace(model, module=module, info=info, _fingerprint=None)


def float_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    """The floating-point dtypes of ``module``'s parameters and buffers."""
    return {p.dtype for p in (*module.parameters(), *module.buffers()) if p.is_floating_point()}


def cast_note(own: set[torch.dtype], to: torch.dtype) -> dict[str, Any]:
    """``{"from": [...], "to": ...}``: the dtypes a model held and the one it runs in (``LoadedModel.info``)."""
    return {"from": sorted(_name(d) for d in own), "to": _name(to)}


def cast_text(name: str, cast: dict[str, Any]) -> str:
    """The one line that says a model was cast (terminal note, report)."""
    return (
        f"{name} holds {'/'.join(cast['from'])} parameters; it runs in {cast['to']} (--dtype), so its numbers "
        f"are {cast['to']} ones"
    )


def _name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")
