"""Helpers shared by the perturbation/baseline methods: input leaves, baselines, target expansion,
embedding-space access for integer token inputs, and a batched backward pass that returns full
per-input gradients (for token inputs: the gradient at the embedding output, not yet summed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..rules.composites import Composite
from ..trace import record
from .core import Explanation, Inputs, Target, _leaves, embedding_outputs, like_inputs, run_backward

aten = torch.ops.aten


def leaves(inputs: Inputs) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if not isinstance(inputs, (Mapping, tuple, list)):
        raise ValueError(
            f"inputs: expected a tensor, a tuple of tensors or a dict of tensors, got {type(inputs).__name__}"
        )
    out = _leaves(inputs)
    if not out:
        raise ValueError("inputs: no tensor found")
    return out


def rebuild(inputs: Inputs, values: Sequence[Any]) -> Any:
    structure = inputs if not isinstance(inputs, list) else tuple(inputs)
    return like_inputs(structure, list(values))


def is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def format_baselines(inputs: Inputs, baselines: Any, name: str = "baselines") -> list[torch.Tensor]:
    """One baseline tensor per input leaf, expanded to the leaf's shape.

    ``None``: zeros (token id 0 for integer inputs); a number: filled; a tensor broadcastable to each leaf
    (single input) ; a tuple/list with one entry per input tensor; a dict with the input dict's keys.
    """
    xs = leaves(inputs)
    per = baseline_specs(inputs, baselines, name)
    out = []
    for x, b in zip(xs, per):
        if b is None:
            out.append(torch.zeros_like(x))
        elif isinstance(b, (int, float)):
            out.append(torch.full_like(x, b))
        elif isinstance(b, torch.Tensor):
            try:
                out.append(b.to(device=x.device, dtype=x.dtype).expand_as(x).clone())
            except RuntimeError:
                raise ValueError(
                    f"{name}: a baseline of shape {tuple(b.shape)} does not broadcast to the input "
                    f"shape {tuple(x.shape)}"
                ) from None
        else:
            raise ValueError(f"{name}: expected numbers or tensors, got {type(b).__name__}")
    for t in out:
        if is_float(t) and not torch.isfinite(t).all():
            raise ValueError(f"{name}: contain NaN or infinite values (the attributions would be non-finite)")
    return out


def baseline_specs(inputs: Inputs, baselines: Any, name: str = "baselines") -> list[Any]:
    """What was given for each input leaf: ``None`` (nothing: the default), a number or a tensor."""
    xs = leaves(inputs)
    per: list[Any]
    if baselines is None:
        per = [None] * len(xs)
    elif isinstance(baselines, (int, float)) and not isinstance(baselines, bool):
        per = [baselines] * len(xs)
    elif isinstance(baselines, torch.Tensor):
        if len(xs) != 1:
            raise ValueError(f"{name}: got one tensor for {len(xs)} inputs; pass a tuple with one baseline per input")
        per = [baselines]
    elif isinstance(baselines, Mapping):
        if not isinstance(inputs, Mapping) or set(baselines) - set(inputs):
            raise ValueError(f"{name}: a dict of baselines needs dict inputs with the same keys")
        per = [baselines.get(k) for k, v in inputs.items() for _ in _leaves(v)]
    elif isinstance(baselines, (tuple, list)):
        if len(baselines) != len(xs):
            raise ValueError(f"{name}: expected {len(xs)} baselines (one per input tensor), got {len(baselines)}")
        per = list(baselines)
    else:
        raise ValueError(
            f"{name}: expected None, a number, a tensor, a tuple of those or a dict, got {type(baselines).__name__}"
        )
    return per


def expand_target(target: Target, batch: int, n: int, interleave: bool = False) -> Target:
    """Target for a batch made of ``n`` copies of the ``batch`` samples (step-major, or interleaved)."""
    if target is None or callable(target) and not isinstance(target, torch.Tensor) or isinstance(target, int):
        return target
    t = torch.as_tensor(target)
    if t.numel() <= 1:
        return target
    t = t.reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"target: expected {batch} indices (one per sample), got {t.numel()}")
    return t.repeat_interleave(n) if interleave else t.repeat(n)


def cat_leaves(chunks: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.cat(parts, 0) for parts in zip(*chunks)]


# ------------------------------------------------------------------------- embedding-space access
class EmbeddingEdit(TorchDispatchMode):
    """Replace the output of ``aten.embedding`` calls whose indices are one of ``ids`` by ``edit(i, emb)``.

    Used for methods that move token inputs continuously (integrated gradients, noise): the change
    happens in embedding space, which is where token scores are read.
    """

    def __init__(self, ids: Sequence[torch.Tensor], edit: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.ids = list(ids)
        self.edit = edit
        self.seen: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket is aten.embedding and len(args) >= 2:
            idx = args[1]
            for i, ids in enumerate(self.ids):
                if idx.shape == ids.shape and idx.dtype == ids.dtype and torch.equal(idx, ids):
                    return self.edit(i, out, args[0])
        return out


@contextmanager
def embedding_edit(ids, edit):
    if not ids:
        yield None
        return
    with EmbeddingEdit(ids, edit) as mode:
        yield mode


# --------------------------------------------------------------------------- full backward pass
@dataclass
class Backward:
    """Result of :func:`backward`: the explanation and, per input leaf, the full gradient.

    For a float input: the relevance at the input. For an integer (token) input: ``(embedding value,
    relevance at it)`` pairs, one per embedding lookup of those ids (empty for masks).
    """

    expl: Explanation
    grads: list[Any]

    def token_scores(
        self, i: int, delta: Callable[[torch.Tensor], torch.Tensor] | None = None, shape: torch.Size | None = None
    ) -> torch.Tensor:
        """Sum over hidden of ``delta(embedding) * grad`` (or of the gradient when ``delta`` is None)."""
        total = None
        for emb, g in self.grads[i]:
            s = (g if delta is None else delta(emb) * g).sum(-1)
            total = s if total is None else total + s
        if total is None:
            if shape is None:
                raise ValueError(f"internal: no embedding gradients recorded for input {i} and no shape given")
            return torch.zeros(shape, device=self.expl.output.device)
        return total.reshape(shape) if shape is not None else total


def backward(
    model,
    inputs: Inputs,
    *,
    target: Target,
    composite: Composite,
    method: str,
    times_output: bool = False,
    layers: Sequence[str] | None = None,
    extra_values: Callable | None = None,
    keep_graph: bool = False,
    recorder: Callable[..., Any] = record,
    hold_values: bool | None = None,
) -> Backward:
    """:func:`run_backward` that also returns the gradient at the embedding outputs of token inputs."""
    xs = leaves(inputs)
    int_pos = [i for i, x in enumerate(xs) if not is_float(x)]
    emb_vals: dict[int, list] = {}

    def extra(graph):
        vals = []
        float_inputs = [v for v in graph.inputs]
        for i in int_pos:
            if i < len(float_inputs):
                found = embedding_outputs(graph, float_inputs[i])
                emb_vals[i] = found
                vals.extend(found)
        if extra_values is not None:
            vals.extend(extra_values(graph))
        return vals

    need_extra = bool(int_pos) or extra_values is not None
    expl = run_backward(
        model,
        inputs,
        target=target,
        composite=composite,
        method=method,
        times_output=times_output,
        layers=layers,
        keep_graph=keep_graph,
        extra_values=extra if need_extra else None,
        recorder=recorder,
        hold_values=hold_values,
    )
    grads: list[Any] = []
    atts = expl.tensors()
    for i, x in enumerate(xs):
        if is_float(x):
            grads.append(atts[i])
        else:
            grads.append([(v.tensor, expl.at_values[v.index]) for v in emb_vals.get(i, [])])
    return Backward(expl, grads)
