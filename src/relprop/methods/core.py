"""Shared machinery of graph-based methods: inputs, targets, seeds, sources, attributions.

Every backward method is "trace, prepare the graph for a rule set, seed the target, propagate,
read relevance at the inputs". This module is that pipeline; methods differ in the composite and
in the seed (one-hot for gradients, one-hot times the logit for LRP).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import did_you_mean
from ..graph import Graph, Value
from ..propagate import propagate
from ..rules.attention import release_scores
from ..rules.base import HALF, PreparedGraph
from ..rules.composites import Composite
from ..trace import record
from ._validate import (  # noqa: F401  (re-exported: the names methods and older callers import from here)
    Inputs,
    Target,
    check_callable_score,
    check_inputs,
    score,
    select_output,
    target_indices,
    validate_call,
)
from ._validate import seed as _seed


@dataclass
class Explanation:
    """Result of :func:`relprop.explain`.

    Attributes:
        attributions: same structure as the ``inputs`` argument (tensor, tuple or dict); for integer
            token inputs one score per token (relevance at the embedding output summed over hidden).
        output: the model output that was explained (the logits tensor), detached.
        target: per-sample target indices (``None`` for a callable target).
        score: the explained score per sample (target logit, or the callable's value).
        layers: relevance at the outputs of the modules requested with ``layers=``.
        method, composite: what produced it.
    """

    attributions: Any
    output: torch.Tensor
    target: torch.Tensor | None
    score: torch.Tensor
    method: str
    composite: str | None = None
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Forward activations at the outputs of the modules requested with ``layers=``.
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    #: With ``keep_graph=True``: the graph the rules ran on, every value held (``Value.data`` is its tensor,
    #: also for values the model overwrote in place, which the recording drops and recomputes).
    graph: Graph | None = field(default=None, repr=False)
    #: With ``keep_graph=True``: the graph as the rule set prepared it, with its per-node notes
    #: (family, constant operands, DeepLIFT reference values) for this call.
    prepared: PreparedGraph | None = field(default=None, repr=False)
    #: What reached the parameters requested with ``params=`` (name -> tensor).
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Relevance at the extra values requested by a method (value index -> tensor).
    at_values: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    #: DeepLIFT: ``sum of attributions - (f(x) - f(x0))`` per example (Captum's convergence delta, same sign), in
    #: float32 at least; ~0 where the rules are exact (ReLU nets), and a warning where it is not
    #: (:mod:`relprop.methods._convergence`). ``None`` for methods without summation to delta. Always of the
    #: attributions ``(x - x0) * multiplier``, also where ``multiply_by_inputs=False`` returns the multipliers.
    convergence_delta: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Attributions as a flat list (one per input tensor)."""
        return _leaves(self.attributions)


def _leaves(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _leaves(v)]
    return []


# ---------------------------------------------------------------------------------------- inputs
def split_inputs(inputs: Inputs) -> tuple[tuple, dict]:
    """Positional and keyword arguments for the model call."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise TypeError(f"inputs: expected a tensor, a tuple of tensors or a dict of tensors, got {type(inputs).__name__}")


def like_inputs(inputs: Inputs, values: Sequence[torch.Tensor | None]) -> Any:
    """Rebuild the structure of ``inputs`` with ``values`` at its tensor leaves."""
    return _rebuild(inputs, iter(values))


def _rebuild(obj: Any, it) -> Any:
    # Module level rather than a recursive closure, which would be a reference cycle.
    if isinstance(obj, torch.Tensor):
        return next(it)
    if isinstance(obj, Mapping):
        return {k: _rebuild(v, it) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rebuild(v, it) for v in obj)
    return obj


# --------------------------------------------------------------------------------------- outputs
def seed_for(out: torch.Tensor, idx: torch.Tensor, times_output: bool) -> torch.Tensor:
    """One-hot of ``idx`` on the last dim (times the output value for LRP); all ones for a ``(batch,)`` output."""
    return _seed(out, idx, times_output)


# --------------------------------------------------------------------------------------- sources
_ROUTE = {
    "view",
    "_unsafe_view",
    "reshape",
    "expand",
    "clone",
    "_to_copy",
    "alias",
    "contiguous",
    "unsqueeze",
    "squeeze",
    "flatten",
    "select",
    "slice",
}


def embedding_outputs(graph: Graph, v: Value) -> list[Value]:
    """Outputs of embedding lookups whose indices are ``v`` (or a view/copy of it)."""
    found = []
    for node in graph.nodes:
        if node.packet != "embedding" or len(node.inputs) < 2:
            continue
        idx = node.inputs[1]
        for _ in range(6):
            if idx is v or idx.producer is None or idx.producer.packet not in _ROUTE:
                break
            idx = idx.producer.inputs[0]
        if idx is v and node.outputs[0] is not None:
            found.append(node.outputs[0])
    return found


def sources_of(graph: Graph) -> list[tuple[Value, list[Value]]]:
    """For each input value: the values whose relevance is its attribution."""
    pairs = []
    for v in graph.inputs:
        if v.is_float:
            pairs.append((v, [v]))
        else:
            pairs.append((v, embedding_outputs(graph, v)))
    return pairs


def module_value(graph: Graph, name: str) -> Value:
    outs = graph.module_outputs(name)
    if not outs:
        known = [n for n in graph.module_types if n]
        raise ValueError(f"layers: no module named '{name}' ran in the forward pass.{did_you_mean(name, known, n=3)}")
    return max(outs, key=lambda v: v.index)


def prepared_layer(recorded: Graph, prepared: Graph, name: str, made: set[int]) -> Value:
    """The output of module ``name`` as the model computed it, if the rule set's graph still computes it.

    Names are looked up in the recording, not in the rule set's rewritten graph: there a batch norm merged into
    the convolution before it leaves one node under the convolution's name that computes the norm's output, and
    asking for the convolution would silently give the norm's output and relevance. A value the rewrite folded
    away has no relevance of its own under this rule set: an error says so and how to get it. ``made``: the
    indices of the values ``prepared``'s nodes compute.
    """
    v = module_value(recorded, name)
    if prepared is recorded or v.producer is None:
        return v
    if v.index not in made:
        consumers = sorted({c.module for c in v.consumers if c.module and c.module != name})
        into = f" into {', '.join(repr(c) for c in consumers)}" if consumers else ""
        raise ValueError(
            f"layers: the output of '{name}' is folded{into} by this rule set's canonical rewrite (a batch norm "
            f"merged into the layer before it), so it has no relevance of its own here; ask for "
            f"{consumers[0] if consumers else 'the next layer'!r} (the merged layer's output) or pass canonize=False"
        )
    return v


def run_backward(
    model,
    inputs: Inputs,
    *,
    target: Target,
    composite: Composite,
    method: str,
    times_output: bool,
    layers: Sequence[str] | None = None,
    keep_graph: bool = False,
    extra_values: Callable[[Graph], Sequence[Value]] | None = None,
    params: bool | Sequence[str] = False,
    recorder: Callable[..., Graph] = record,
    hold_values: bool | None = None,
) -> Explanation:
    """Trace ``model`` on ``inputs``, seed the target, propagate ``composite``, collect attributions.

    ``params=True`` (or a list of parameter names) also returns what reaches the parameters in
    ``Explanation.params``: the gradient for gradient methods; for LRP the relevance that rules assign
    to weights (batch-norm-merged weights are new constants, so their parameters get none).

    ``extra_values(graph)`` names more values whose relevance the caller wants (e.g. a convolution's
    output for NormGrad); they come back in ``Explanation.at_values`` and the graph is kept.

    ``recorder(model, args, kwargs, post=post, release=policy) -> Graph`` makes the recording (default
    :func:`relprop.trace.record`; a :class:`relprop.plan.Plan` passes its replay).

    ``hold_values`` (default: ``keep_graph``): a kept graph's values all hold their data (:func:`hold_every_value`);
    DeepLIFT keeps the graph for its notes only and passes False unless the caller asked for the graph.
    """
    batch = validate_call(model, inputs, target)
    args, kwargs = split_inputs(inputs)
    post = None
    if callable(target) and not isinstance(target, torch.Tensor):
        fn = target

        def post(output):
            return check_callable_score(fn(output), batch)

    # The rule set's notes (families, constant operands, merged batch norms) live in the prepared
    # graph of this call; the recording itself is not modified.
    # Eager attention's scaled and masked scores are not held by the recording (recomputed, same bits,
    # where a rule reads them): two score-sized tensors per layer that a gradient does not keep either.
    # A kept graph keeps everything, for the caller to read.
    release = None if keep_graph else release_scores
    recorded = recorder(model, args, kwargs, post=post, release=release)
    prepared = composite.prepare(recorded)
    graph = prepared.graph
    if post is not None:
        out_t = graph.output
        out_v = graph.output_values[0]
        idx = None
        seed = out_v.tensor.clone() if times_output else torch.ones_like(out_v.tensor)
        explained = out_v.tensor
        shown = out_v.tensor
    else:
        out_t = select_output(graph.output)
        out_v = next(
            (
                v
                for v in graph.output_values
                if v.tensor.data_ptr() == out_t.data_ptr() and v.tensor.shape == out_t.shape
            ),
            None,
        )
        if out_v is None:
            raise RuntimeError("internal: explained output not found in the graph")
        explained, idx = score(out_v.tensor, target, batch)
        seed = seed_for(out_v.tensor, idx, times_output)
        shown = out_v.tensor
    if (times_output or composite.float32_relevance) and seed.dtype in HALF:
        # LRP (and DeepLIFT, whose composite asks for it) on a bfloat16/float16 model: relevance is carried in
        # float32 from the seed on (rules.base.vjp), so the rules' divisions never overflow or round to half.
        seed = seed.float()
    pairs = sources_of(graph)
    if not any(src for _, src in pairs):
        raise ValueError(
            "inputs: nothing to attribute to: no float input and no integer input feeding an embedding lookup "
            "(integer images? convert them with .float() and the model's normalisation)"
        )
    all_sources = [s for _, src in pairs for s in src]
    param_values = _param_values(graph, params)
    all_sources += list(param_values.values())
    made = {o.index for n in graph.nodes for o in n.outputs if o is not None} if layers else set()
    layer_values = {name: prepared_layer(recorded, graph, name, made) for name in (layers or [])}
    extra = list(extra_values(graph)) if extra_values is not None else []
    rel = propagate(
        prepared,
        composite.resolver(prepared),
        {out_v: seed},
        all_sources,
        keep=list(layer_values.values()) + extra,
        method=method,
        free=not keep_graph and extra_values is None,
    )
    attributions = []
    for v, src in pairs:
        if v.is_float:
            attributions.append(rel.get(v.index, v.zeros()))
        else:
            # Token ids: relevance at their embedding output, summed over the hidden dim.
            # Other integer inputs (attention masks, positions) get zeros.
            total = v.zeros().to(src[0].dtype if src else torch.float32)
            for s in src:
                r = rel.get(s.index)
                if r is not None:
                    total = total + r.sum(-1).reshape(v.tensor.shape)
            attributions.append(total)
    params_out = {n: rel.get(v.index, v.zeros()) for n, v in param_values.items()}
    keep = keep_graph or extra_values is not None
    if keep_graph and (keep_graph if hold_values is None else hold_values):
        hold_every_value(graph)
    if not keep:
        # Values and nodes reference each other (a cycle the GC collects late): drop the tape's data
        # now so memory is back to where it was as soon as explain returns.
        activations = {n: v.tensor for n, v in layer_values.items()}
        for v in graph.values:
            v.data = None
    structure = inputs if not isinstance(inputs, list) else tuple(inputs)
    layers_out = {n: rel.get(v.index, v.zeros()) for n, v in layer_values.items()}
    return Explanation(
        attributions=like_inputs(structure, attributions),
        output=shown.detach(),
        target=idx,
        score=explained.detach(),
        method=method,
        composite=getattr(composite, "name", None),
        layers=layers_out,
        activations=activations if not keep else {n: v.tensor for n, v in layer_values.items()},
        graph=graph if keep else None,
        prepared=prepared if keep_graph else None,
        at_values={v.index: rel.get(v.index, torch.zeros_like(v.tensor)) for v in extra},
        params=params_out,
    )


def hold_every_value(graph: Graph) -> None:
    """Give every value of a kept graph its data (``keep_graph=True``: ``Value.data`` is the tensor, never None).

    The recording drops the data of a value the model then overwrites in place (``torch.relu(h).mul_(3)``
    drops ``relu``'s output; ``Value.tensor`` recomputes it from the producer's inputs). A kept graph is for
    reading, so those values are recomputed here, in graph order (each producer's inputs are then held).
    """
    for node in graph.nodes:
        for v in node.outputs:
            if v is not None and v.data is None:
                v.tensor  # noqa: B018 (recomputes and stores the data)
    for v in graph.values:
        if v.data is None and v.producer is not None:
            v.tensor  # noqa: B018  (a value whose producer the rule set rewrote away)


def _param_values(graph: Graph, params: bool | Sequence[str]) -> dict[str, Value]:
    if params is False or params is None:
        return {}
    if params is True:
        return {n: v for n, v in graph.params.items() if v.is_float}
    missing = [n for n in params if n not in graph.params]
    if missing:
        hint = did_you_mean(missing[0], graph.params, n=3)
        raise ValueError(f"params: no parameter named '{missing[0]}' was used in the forward pass.{hint}")
    return {n: graph.params[n] for n in params}
