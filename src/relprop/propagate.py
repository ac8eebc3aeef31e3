"""One reverse pass over a graph, applying a rule per node.

The pass is method-agnostic: the gradient, every LRP variant, DeepLIFT and guided backprop differ
only in the ``resolve(node) -> rule`` function they pass in (``composite.resolver(prepared)``) and
in the per-call notes of the :class:`~relprop.rules.base.PreparedGraph` the rules read. Relevance is accumulated where a
value fans out, and only nodes on a path between the requested sources and the seeds are visited,
so asking for the input relevance of one head of a multi-output model costs only that head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .graph import Graph, Node, Value
from .rules.base import NoRuleError, PreparedGraph, Rule, RuleContext


class PropagationError(RuntimeError):
    """A rule returned something unusable (wrong shape, NaN...)."""


def reachable(graph: Graph, sources: Iterable[Value]) -> set[int]:
    """Indices of values that depend on any of ``sources``."""
    reach = {v.index for v in sources}
    for node in graph.nodes:
        if any(v.index in reach for v in node.inputs):
            reach.update(v.index for v in node.outputs if v is not None)
    return reach


def propagate(
    graph: Graph | PreparedGraph,
    resolve: Callable[[Node], Rule | None],
    seeds: dict[Value, torch.Tensor],
    sources: Iterable[Value],
    keep: Iterable[Value] = (),
    method: str = "relevance",
    check_finite: bool = True,
    free: bool = False,
) -> dict[int, torch.Tensor]:
    """Propagate ``seeds`` (value -> tensor) backwards until ``sources``.

    ``graph`` is a :class:`PreparedGraph` (``composite.prepare(recording)``, whose notes the rules
    read: families, constant operands) or a plain graph (each node's plain family, no constants).
    Returns relevance by value index for ``sources`` and ``keep`` (missing where nothing arrived).
    With ``free=True`` the forward data of each node's outputs is released once the node is done
    (all its consumers come later in the graph, so nothing reads it again): memory then shrinks
    as the pass moves back, as autograd's does. The graph cannot be propagated again afterwards.
    """
    prepared = graph if isinstance(graph, PreparedGraph) else PreparedGraph.plain(graph)
    with torch.inference_mode(False):
        return _propagate(prepared, resolve, seeds, list(sources), list(keep), method, check_finite, free)


def _release(node: Node, protected: set[int]) -> None:
    for v in node.outputs:
        if v is not None and v.index not in protected:
            v.data = None
    # Constants a graph pass derived (merged batch-norm weights) are recomputable: drop them too, so
    # they do not pile up over the pass.
    for v in node.inputs:
        if v.kind == "constant" and v.producer is not None and v.index not in protected:
            v.data = None


def _propagate(prepared: PreparedGraph, resolve, seeds, sources, keep, method, check_finite, free, on_node=None):
    graph = prepared.graph
    reach = reachable(graph, sources)
    wanted = {v.index for v in sources} | {v.index for v in keep}
    rel: dict[int, torch.Tensor] = {}
    for v, t in seeds.items():
        _accumulate(rel, v, t, None)
    protected = wanted | {v.index for v in seeds} | {v.index for v in graph.output_values}

    def may_skip(v: Value) -> bool:
        """May a rule explaining several nodes at once pass over ``v`` (no relevance of its own wanted or held)?"""
        return v.index not in protected and v.index not in rel

    for node in reversed(graph.nodes):
        outs = node.outputs
        if not any(v is not None and v.index in rel for v in outs):
            if free:
                _release(node, protected)
            continue
        needs = [v.index in reach for v in node.inputs]
        if not any(needs):
            if free:
                _release(node, protected)
            continue
        relevance = [
            None if v is None else (rel.get(v.index) if v.index in wanted else rel.pop(v.index, None)) for v in outs
        ]
        rule = resolve(node)
        if rule is None:
            raise NoRuleError(node, method)
        ctx = RuleContext(node, relevance, needs, prepared.notes_of(node))
        through = getattr(rule, "through", None) if on_node is None else None
        hit = through(ctx, prepared, resolve, may_skip) if through is not None else None
        if hit is not None:
            # The rule explained a chain of nodes in one step (rules.attention.ScoreChain): relevance lands on
            # the inputs of the chain's first node; the nodes in between get none and are passed over.
            first, result = hit
            for v, r in zip(first.inputs, result):
                if r is not None and v.index in reach:
                    _accumulate(rel, v, r, first)
            if free:
                _release(node, protected)
            continue
        result = rule(ctx)
        if on_node is not None:  # diagnosis of a non-finite result (relprop._nonfinite)
            on_node(node, relevance, result, rule)
        for v, need, r in zip(node.inputs, needs, result):
            if need and r is not None:
                _accumulate(rel, v, r, node)
        if free:
            _release(node, protected)
    if check_finite:
        for i in wanted:
            t = rel.get(i)
            if t is not None and not torch.isfinite(t).all():
                from ._nonfinite import non_finite_message

                def rerun(hook):
                    return _propagate(prepared, resolve, seeds, sources, keep, method, False, False, on_node=hook)

                raise PropagationError(non_finite_message(prepared.graph, i, method, rerun))
    return {i: rel[i] for i in wanted if i in rel}


def _accumulate(rel: dict[int, torch.Tensor], v: Value, t: torch.Tensor, node: Node | None) -> None:
    if t.shape != v.shape:
        where = f" from rule of {node!r}" if node is not None else ""
        raise PropagationError(f"relevance of shape {tuple(t.shape)} for value {v!r}{where}")
    prev = rel.get(v.index)
    rel[v.index] = t if prev is None else prev + t
