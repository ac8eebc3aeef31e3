"""One reverse pass over a graph, applying a rule per node.

The pass is method-agnostic: the gradient, every LRP variant, DeepLIFT and guided backprop differ
only in the ``resolve(node) -> rule`` function they pass in (``composite.resolver(prepared)``) and
in the per-call notes of the :class:`~relprop.rules.base.PreparedGraph` the rules read. Relevance is accumulated where a
value fans out, and only nodes on a path between the requested sources and the seeds are visited,
so asking for the input relevance of one head of a multi-output model costs only that head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from .graph import Graph, Node, Value
from .rules.base import NoRuleError, PreparedGraph, Rule, RuleContext, storage_ptr


class PropagationError(RuntimeError):
    """A rule returned something unusable (wrong shape, NaN...)."""


def reachable(graph: Graph, sources: Iterable[Value]) -> set[int]:
    """Indices of values that depend on any of ``sources``."""
    reach = {v.index for v in sources}
    for node in graph.nodes:
        for v in node.inputs:
            if v.index in reach:
                reach.update(o.index for o in node.outputs if o is not None)
                break
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
    # A merged batch norm's input (canonical.merge_batch_norms): its one consumer was the norm, now part of this
    # node, so no node of the graph names it and it would stay held to the end of the pass. Only the recompute
    # of the norm's output (released just above; every reader of it came earlier in the reverse pass) reads it.
    y = node.meta.get("norm_input")
    if y is not None and y.index not in protected:
        y.data = None
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
    # Relevance tensors the pass may add into in place: made by a rule that owns them (RuleContext.own) or sums
    # made here (value index). Values the recording did not hold (their data, if any, is a recomputation made
    # during this pass) may serve their producer's rule as scratch memory (RuleContext.out_is_scratch).
    mine: set[int] = set()
    released = {v.index for v in graph.values if v.data is None and v.producer is not None} if free else set()
    scratch = _Scratch(graph, protected) if released else None

    def may_skip(v: Value) -> bool:
        """May a rule explaining several nodes at once pass over ``v`` (no relevance of its own wanted or held)?"""
        return v.index not in protected and v.index not in rel

    # (the loop body runs once per node of the graph: its Python is part of every call's cost, so the common
    # cases take no generator, closure or attribute look-up they can do without)
    for node in reversed(graph.nodes):
        outs = node.outputs
        for v in outs:
            if v is not None and v.index in rel:
                break
        else:  # no relevance arrived
            if free:
                _release(node, protected)
            continue
        needs = [v.index in reach for v in node.inputs]
        if True not in needs:
            if free:
                _release(node, protected)
            continue
        relevance: list[torch.Tensor | None] = []
        handed: list[int] = []
        for v in outs:
            if v is None:
                relevance.append(None)
                continue
            i = v.index
            if i in wanted:
                relevance.append(rel.get(i))
                continue
            r = rel.pop(i, None)
            relevance.append(r)
            if r is not None and i in mine and on_node is None:
                handed.append(id(r))  # popped: nothing but this rule holds it now (the diagnosis re-run reads it)
        rule = resolve(node)
        if rule is None:
            raise NoRuleError(node, method)
        ctx = RuleContext(node, relevance, needs, prepared.notes_of(node))
        if handed:
            ctx.handed.update(handed)
        first = outs[0] if outs else None
        if scratch is not None and first is not None and first.index in released and first.index not in protected:
            ctx.scratch = scratch.check(first, relevance)
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
        owned = _owned(ctx, result, relevance) if ctx.owned or ctx.handed else ()
        for v, need, r in zip(node.inputs, needs, result):
            if need and r is not None:
                _accumulate(rel, v, r, node, mine, id(r) in owned)
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


def _accumulate(
    rel: dict[int, torch.Tensor],
    v: Value,
    t: torch.Tensor,
    node: Node | None,
    mine: set[int] | None = None,
    owned: bool = False,
) -> None:
    """Add ``t`` to the relevance of ``v``; ``owned``: ``t`` is a rule's own new tensor (:meth:`RuleContext.own`).

    Where a value fans out, the sum is written into a tensor the pass owns (one a rule handed over, or an earlier
    sum) instead of a new one: the same additions (IEEE addition commutes: equal bits), one output-sized
    temporary fewer per fan-out (``tests/test_lrp_scratch.py``).
    """
    if t.shape != v.shape:
        where = f" from rule of {node!r}" if node is not None else ""
        raise PropagationError(f"relevance of shape {tuple(t.shape)} for value {v!r}{where}")
    i = v.index
    prev = rel.get(i)
    if prev is None:
        rel[i] = t
        if mine is not None:
            (mine.add if owned else mine.discard)(i)
        return
    if mine is None:
        rel[i] = prev + t
    elif i in mine and _addable(prev, t):
        prev.add_(t)
    elif owned and _addable(t, prev):
        rel[i] = t.add_(prev)
        mine.add(i)
    else:
        rel[i] = prev + t
        mine.add(i)


def _addable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Does ``a.add_(b)`` give ``a + b``'s values and layout: same shape, dtype and strides, disjoint memory, no autograd."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.stride() == b.stride()
        and a._base is None
        and not (a.requires_grad or b.requires_grad)
        and (pa := storage_ptr(a)) is not None
        and (pb := storage_ptr(b)) is not None
        and pa != pb
    )


def _owned(ctx: RuleContext, result: Sequence[torch.Tensor | None], arrived: list) -> set[int]:
    """``id`` of the results the rule owns (:meth:`RuleContext.own`) or passes on from what the pass handed it
    (:attr:`RuleContext.handed`), each given once, not a view, not sharing memory with other relevance that
    arrived or with another result (the same tensor twice, or a view of it that a user's rule hands to another
    input, would see later in-place sums): the pass may write into them."""
    taken = {storage_ptr(r) for r in arrived if r is not None and id(r) not in ctx.handed}
    ptrs = [storage_ptr(r) for r in result if r is not None]
    return {
        id(r)
        for r in result
        if r is not None
        and (id(r) in ctx.owned or id(r) in ctx.handed)
        and r._base is None
        and (p := storage_ptr(r)) is not None
        and ptrs.count(p) == 1
        and p not in taken
    }


class _Scratch:
    """Whether a node's first output may serve its rule as scratch memory (:meth:`RuleContext.out_is_scratch`).

    Asked only for a value the recording did not hold, that no one wants back (not a source, kept, seed or
    output value) and that the pass releases after this node (``free``): its data is a recomputation made during
    this pass, read by no later rule (every reader of a value comes before its producer in the reverse pass).
    Checked when the rule asks: the data is no view, and shares memory with none of its producer's inputs or
    other outputs, the relevance that arrived, or a protected value's data.
    """

    def __init__(self, graph: Graph, protected: set[int]) -> None:
        self.graph, self.protected = graph, protected
        self._held: list[Value] | None = None

    def check(self, v: Value, arrived: list) -> Callable[[], bool]:
        def may_write() -> bool:
            t = v.tensor
            ptr = storage_ptr(t)  # None: not strided, nothing to write into
            if t._base is not None or t.requires_grad or ptr is None:
                return False
            if self._held is None:
                self._held = [u for u in self.graph.values if u.index in self.protected]
            p = v.producer
            others = [] if p is None else [*p.inputs, *(u for u in p.outputs if u is not None and u is not v)]
            for u in [*others, *self._held]:
                d = u.data
                if d is not None and storage_ptr(d) == ptr:
                    return False
            return not any(r is not None and storage_ptr(r) == ptr for r in arrived)

        return may_write
