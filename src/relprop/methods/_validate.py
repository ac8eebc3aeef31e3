"""One validation path for what every method receives: inputs, targets, model outputs, scores.

Every method (``explain`` itself, the graph methods through ``run_backward``, the methods that run
the model directly: integrated gradients' autograd engine, occlusion, Captum's convergence delta)
goes through these functions, so a given mistake gets the same message whichever method meets it,
and it is caught *before* the model runs where that is possible (nothing to restore afterwards).

What is checked, and why:

* **inputs**: a tensor, a tuple/list or a dict of tensors (numpy arrays are named, with the fix); no
  tensor on the ``meta`` device (it has no values to explain); every tensor has a batch dimension and
  the batch is not empty (an empty batch has nothing to explain and used to divide by zero); float
  inputs are finite (a NaN input gives a NaN map, which looks like a result). ``uint8`` tensors are
  raw image bytes, never token ids: they are rejected with the conversion to use. Other integer
  tensors are token ids or masks and are fine (token ids are attributed through their embedding).
* **target** (before the forward pass): an ``int`` class index, a per-sample sequence or integer
  tensor of indices, a callable ``output -> (batch,) scores``, or ``None``. ``bool`` values and
  tensors are rejected (``True`` silently meaning class 1 is a bug, not a feature), so are strings
  (with the label lookup to use), floats, and sequences of the wrong length.
* **output** (after the forward pass): floating point (an ``argmax`` output has no gradient and no
  relevance: explain the logits), and with as many rows as the inputs have samples.

**Outputs with one score per sample.** A model whose output has shape ``(batch,)`` (a regression
head, a similarity, a log-likelihood) has a single score per sample: the target is then ``None``
(or ``0``, the only index there is), and the explained score is the output itself. ``None`` is also
accepted when the last output dimension has size 1 (``(batch, 1)`` heads). Every other output
needs a target.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, SupportsIndex, TypeGuard, cast

import torch

from .._errors import did_you_mean
from ..trace import warn_training as warn

Target = int | Sequence[int] | torch.Tensor | Callable[[Any], torch.Tensor] | None
Inputs = torch.Tensor | tuple | list | Mapping[str, torch.Tensor]

_TARGET_KINDS = "an int class index, a per-sample sequence/tensor of indices, or a callable output -> (batch,) scores"


def is_callable_target(target: Any) -> TypeGuard[Callable[[Any], torch.Tensor]]:
    """A callable target (a function of the model output), as opposed to indices."""
    return callable(target) and not isinstance(target, torch.Tensor)


# ------------------------------------------------------------------------------------------ inputs
def _named_leaves(obj: Any, name: str = "inputs") -> list[tuple[str, Any]]:
    """(path, leaf) for every tensor and array-like leaf (``inputs[0]``, ``inputs['x']``)."""
    if isinstance(obj, torch.Tensor) or _is_numpy(obj):
        return [(name, obj)]
    if isinstance(obj, Mapping):
        return [p for k, v in obj.items() for p in _named_leaves(v, f"{name}[{k!r}]")]
    if isinstance(obj, (tuple, list)):
        return [p for i, v in enumerate(obj) for p in _named_leaves(v, f"{name}[{i}]")]
    return []


def _is_numpy(obj: Any) -> bool:
    return type(obj).__module__ == "numpy" and hasattr(obj, "shape") and hasattr(obj, "dtype")


def check_inputs(inputs: Inputs, *, same_batch: bool = False) -> int:
    """Validate ``inputs`` (see the module docstring); return the batch size.

    ``same_batch=True`` also requires every tensor to have that batch size: methods that repeat or
    perturb the inputs along the batch (integrated gradients, noise tunnel, occlusion) need it.
    """
    if _is_numpy(inputs):
        raise ValueError("inputs: got a numpy array; convert it with torch.from_numpy(array) (and .float() for images)")
    if not isinstance(inputs, (torch.Tensor, Mapping, tuple, list)):
        raise ValueError(
            f"inputs: expected a tensor, a tuple of tensors or a dict of tensors, got {type(inputs).__name__}"
        )
    leaves = _named_leaves(inputs)
    for name, t in leaves:
        if _is_numpy(t):
            raise ValueError(f"{name}: got a numpy array; convert it with torch.from_numpy(array)")
    if not leaves:
        raise ValueError("inputs: no tensor found")
    batch: int | None = None
    first = ""
    for name, t in leaves:
        if t.is_meta:
            raise ValueError(
                f"{name}: a tensor on the 'meta' device has shapes but no values, so there is nothing to explain; "
                "pass real data (and a model with loaded weights)"
            )
        if t.dim() == 0:
            raise ValueError(f"{name}: each tensor needs a batch dimension (got a 0-d tensor; use t.unsqueeze(0))")
        if t.dtype == torch.uint8:
            raise ValueError(
                f"{name}: dtype torch.uint8 (raw image bytes?): convert images with .float() and the model's "
                "normalisation; token ids are int64/int32"
            )
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not torch.isfinite(t).all():
            nan = int(torch.isnan(t).sum())
            inf = int(torch.isinf(t).sum())
            raise ValueError(
                f"{name}: contain NaN or infinite values ({nan} NaN, {inf} infinite of {t.numel()}); "
                "an explanation of a non-finite input is non-finite"
            )
        if batch is None:
            batch, first = t.shape[0], name
        elif same_batch and t.shape[0] != batch:
            raise ValueError(
                f"{name}: batch size {t.shape[0]} differs from {first}'s {batch}; every input tensor needs the same "
                "first (batch) dimension"
            )
    assert batch is not None
    if batch == 0:
        raise ValueError(f"inputs: empty batch ({first} has shape {tuple(leaves[0][1].shape)}): nothing to explain")
    return batch


def check_model(model: Any) -> None:
    """A model whose parameters are on the ``meta`` device cannot compute anything to explain."""
    if isinstance(model, torch.nn.Module):
        for name, p in model.named_parameters():
            if p.is_meta:
                raise ValueError(
                    f"model: parameter '{name}' is on the 'meta' device (no values); load the weights first "
                    "(e.g. model.to_empty(device='cpu') and load_state_dict)"
                )
            break  # one look is enough: meta models are meta throughout


def model_float_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The one floating dtype of ``model``'s parameters (of its buffers when it has no floating parameter),
    else None (mixed, or none). Read from the tensors themselves: a ``dtype`` attribute (Hugging Face's
    ``PreTrainedModel.dtype`` is the first parameter's) can disagree with what the forward computes in."""
    for tensors in (model.parameters(), model.buffers()):
        dtypes = {t.dtype for t in tensors if t.is_floating_point()}
        if dtypes:
            return dtypes.pop() if len(dtypes) == 1 else None
    return None


def check_input_dtype(model: Any, inputs: Inputs) -> None:
    """A floating input in another dtype than the model's floating parameters (``x.double()`` into a float32
    model) fails deep in the forward with torch's "expected scalar type Double but found Float": say so first.

    Only where the answer is certain: an ``nn.Module`` whose floating parameters (else buffers) share one
    dtype (:func:`model_float_dtype`), Hugging Face models included. Models with mixed or no floating
    tensors, integer inputs (token ids, masks), and wrappers that declare ``casts_inputs = True`` (the
    report's ``device.Placed``, which casts float inputs to the model's dtype at its entry) are left to run.
    """
    if not isinstance(model, torch.nn.Module) or getattr(model, "casts_inputs", False) is True:
        return
    want = model_float_dtype(model)
    if want is None:
        return
    for name, t in _named_leaves(inputs):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != want:
            short = str(want).removeprefix("torch.")
            cli = f" (on the CLI: --dtype {short})" if short in ("float32", "bfloat16", "float16") else ""
            raise ValueError(
                f"{name}: dtype {t.dtype} but the model's parameters are {want}; convert the inputs with "
                f"x.to({want}){cli}"
            )


# ------------------------------------------------------------------------------------------ target
def _labels(model: Any) -> dict[str, int] | None:
    config = getattr(model, "config", None)
    label2id = getattr(config, "label2id", None)
    if isinstance(label2id, Mapping) and label2id:
        return {str(k): int(v) for k, v in label2id.items()}
    return None


def check_target(target: Target, batch: int | None = None, model: Any = None) -> None:
    """Reject targets that cannot be right, before the model runs (see the module docstring)."""
    if target is None or is_callable_target(target):
        return
    if isinstance(target, str):
        labels = _labels(model)
        if labels is not None and target in labels:
            hint = f" (this model's config.label2id[{target!r}] is {labels[target]})"
        elif labels is not None:
            hint = f"; the model's labels are in model.config.label2id.{did_you_mean(target, labels)}"
        else:
            hint = " (for a Hugging Face model: model.config.label2id[name])"
        raise ValueError(f"target: got the string {target!r}; pass the class index (an int){hint}")
    if isinstance(target, bool) or (type(target).__module__ == "numpy" and type(target).__name__ in ("bool", "bool_")):
        raise ValueError(
            f"target: got the bool {target!r}; pass a class index as an int (True/False is not taken to mean 1/0)"
        )
    if isinstance(target, float):
        raise ValueError(f"target: expected integer class indices, got the float {target!r}")
    if isinstance(target, int):
        return
    if not isinstance(target, torch.Tensor):  # a 0-d bool tensor has an __index__ too: checked below
        try:  # numpy / other integer scalars (anything else raises TypeError here)
            operator.index(cast(SupportsIndex, target))
            return
        except TypeError:
            pass
    if isinstance(target, (list, tuple)):
        for t in target:
            if isinstance(t, (bool, str, float)) or isinstance(t, torch.Tensor) and t.dim() > 0:
                raise ValueError(
                    f"target: a sequence of targets must hold int class indices, got {type(t).__name__} {t!r}"
                )
    try:
        t = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"target: expected {_TARGET_KINDS}; got {type(target).__name__}") from None
    if t.dtype == torch.bool:
        raise ValueError(
            "target: got a bool tensor; pass class indices (an integer tensor). A mask is not a target: "
            "for 0/1 labels use target.long()"
        )
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"target: expected integer class indices, got dtype {t.dtype}")
    if batch is not None and t.numel() not in (1, batch):
        raise ValueError(f"target: expected {batch} indices (one per sample), got {t.numel()}")


# ------------------------------------------------------------------------------------------ output
def select_output(output: Any) -> torch.Tensor:
    """The tensor to explain: the output itself, ``.logits``, or the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the output to explain in a {type(output).__name__}; pass a callable target")


def check_output(out: torch.Tensor, batch: int | None = None) -> None:
    """The explained output must be a floating-point score tensor with one row per sample."""
    if not (out.is_floating_point() or out.is_complex()):
        raise ValueError(
            f"the model output has dtype {out.dtype} (class indices, e.g. from argmax?): there is no gradient or "
            "relevance to explain; return the scores (logits) the prediction is computed from, or pass a callable "
            "target that computes a float score"
        )
    if out.dim() == 0:
        raise ValueError("the model output is a single number (0-d); it needs a batch dimension (one row per sample)")
    if batch is not None and out.shape[0] != batch:
        raise ValueError(
            f"the model output has {out.shape[0]} rows (shape {tuple(out.shape)}) for a batch of {batch} inputs; "
            "relprop reads one row per sample: pass a callable target returning one score per sample"
        )


def target_indices(target: Target, out: torch.Tensor) -> torch.Tensor:
    """Per-sample class indices on the last dim of ``out``, validated (long tensor of shape ``(batch,)``).

    For a ``(batch,)`` output (one score per sample) the only index is 0, and ``None`` means it; ``None``
    also selects the only class of a ``(..., 1)`` output.
    """
    check_target(target)
    check_output(out)
    batch = out.shape[0]
    single = out.dim() == 1
    classes = 1 if single else out.shape[-1]
    if target is None:
        if classes != 1:
            raise ValueError(f"target: required ({_TARGET_KINDS}); the output has {classes} classes")
        return torch.zeros(batch, dtype=torch.long, device=out.device)
    if is_callable_target(target):
        raise TypeError("internal: target_indices() got a callable target; use score()")
    if isinstance(target, int) or not isinstance(target, (torch.Tensor, list, tuple)) and _is_index(target):
        t = torch.full((batch,), operator.index(cast(SupportsIndex, target)), dtype=torch.long, device=out.device)
    else:
        t = torch.as_tensor(target).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"target: expected {batch} indices (one per sample), got {t.numel()}")
    if ((t < -classes) | (t >= classes)).any():
        if single:
            raise ValueError(
                f"target: the output has one score per sample (shape {tuple(out.shape)}); target must be None or 0, "
                f"got {t.unique().tolist()}"
            )
        raise ValueError(f"target: index out of range for an output with {classes} classes: {t.tolist()}")
    return (t % classes).to(out.device)


def _is_index(x: Any) -> bool:
    try:
        operator.index(x)
        return True
    except TypeError:
        return False


def onehot(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """1 at ``idx`` on the last dim of ``out`` (every position of the middle dims), 0 elsewhere.

    For a ``(batch,)`` output (one score per sample, ``idx`` all 0) this is all ones.
    """
    if out.dim() == 1:
        return torch.ones_like(out)
    view = [out.shape[0]] + [1] * (out.dim() - 1)
    hot = torch.zeros_like(out)
    hot.scatter_(-1, idx.view(view).expand(*out.shape[:-1], 1).to(out.device), 1.0)
    return hot


def seed(out: torch.Tensor, idx: torch.Tensor, times_output: bool) -> torch.Tensor:
    """Backward seed: the one-hot of ``idx`` (times the output value for LRP)."""
    hot = onehot(out, idx)
    return hot * out if times_output else hot


def indexed_score(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The explained score per sample: ``out[b, ..., idx[b]]`` summed over the middle dims."""
    if out.dim() == 1:
        return out
    view = [out.shape[0]] + [1] * (out.dim() - 1)
    return out.gather(-1, idx.view(view).expand(*out.shape[:-1], 1).to(out.device)).flatten(1).sum(1)


def check_callable_score(s: Any, batch: int | None = None) -> torch.Tensor:
    """What a callable target returned must be a floating-point tensor of shape ``(batch,)``."""
    ok = isinstance(s, torch.Tensor) and s.dim() == 1 and (batch is None or s.shape[0] == batch)
    if not ok:
        got = f"shape {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
        rows = "" if batch is None else f" (the model ran on {batch} rows)"
        raise ValueError(f"target: a callable target must return a tensor of shape (batch,){rows}; got {got}")
    if not (s.is_floating_point() or s.is_complex()):
        raise ValueError(f"target: a callable target must return float scores, got dtype {s.dtype}")
    return s


def score(output: Any, target: Target, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(score per sample, class indices or None)`` for the raw model ``output`` and ``target``.

    The single definition of "the explained score" used by every method: a callable target's value,
    or ``output[b, ..., target[b]]`` summed over the middle dims (``output`` itself for a ``(batch,)``
    output). ``batch`` (the number of input samples), when given, is checked against the output.
    """
    if is_callable_target(target):
        return check_callable_score(target(output), batch), None
    out = select_output(output)
    check_output(out, batch)
    idx = target_indices(target, out)
    return indexed_score(out, idx), idx


# -------------------------------------------------------------------------------------- one call
def validate_call(model: Any, inputs: Inputs, target: Target, *, same_batch: bool = False) -> int:
    """Everything that can be checked before the model runs; returns the batch size."""
    batch = check_inputs(inputs, same_batch=same_batch)
    check_target(target, batch, model)
    check_model(model)
    check_input_dtype(model, inputs)
    return batch


def _modules_where(model: Any, pred: Callable[[torch.nn.Module], bool]) -> list[str]:
    if not isinstance(model, torch.nn.Module):
        return []
    return [repr(n) if n else type(m).__name__ for n, m in model.named_modules() if m.training and pred(m)]


def active_dropout(model: Any) -> list[str]:
    """Names of dropout modules of ``model`` in training mode (they draw a random mask per forward)."""
    return _modules_where(model, lambda m: isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)


def updating_norms(model: Any) -> list[str]:
    """Names of batch norms of ``model`` in training mode (batch statistics; running statistics updated)."""
    return _modules_where(
        model, lambda m: isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    )


def warn_training(model: Any, method: str, masks: str) -> bool:
    """:func:`relprop.trace.warn_training` for a method that runs several forward passes (and records
    them without warning again); ``masks`` says which dropout masks the method uses."""
    what = (
        f"{masks}, and batch norm normalises with the statistics of each forward's batch (its running statistics "
        "are left unchanged where relprop records the forward), so the attributions are random and depend on how "
        "the batch is made up"
    )
    return warn(model, what, method, stacklevel=4)
