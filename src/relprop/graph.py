"""The recorded operation graph: values (tensors) produced and consumed by ATen operation nodes.

A :class:`Graph` is what :func:`relprop.trace` returns. It is deliberately plain data: nodes in
execution order (which is a topological order), each with the ATen overload that ran, the
arguments it got (tensors replaced by :class:`Value` handles), the values it produced and the
module path it ran under. Everything downstream (rules, propagation, coverage) reads this structure
and nothing else, so a graph can be inspected, filtered and re-used for many rule sets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

import torch

Kind = str  # 'input' | 'param' | 'buffer' | 'constant' | 'op'


@dataclass(eq=False)
class Value:
    """One tensor value in the graph. A tensor mutated in place becomes a new Value.

    ``data`` may be dropped (an in-place write overwrote the storage, or the reverse pass is done
    with it); :attr:`tensor` then recomputes it from the producer's inputs, so the tape never has
    to copy a storage before an in-place write (what DynamicLRP calls a "promise").
    """

    index: int
    data: torch.Tensor | None
    kind: Kind
    producer: Node | None = None
    output_index: int = 0
    name: str | None = None
    #: True when the value depends on a model input (an "activation"), False for parameters,
    #: buffers, constants and anything computed from them only.
    is_activation: bool = False
    consumers: list[Node] = field(default_factory=list)
    dtype: torch.dtype | None = None
    shape: torch.Size | None = None
    device: torch.device | None = None
    #: Strides noted by :meth:`drop` (see :attr:`strides`); ``None`` while the data is held.
    kept_strides: tuple[int, ...] | None = field(default=None, repr=False)
    #: True when every element was finite with ``|x|`` at least the smallest normal number, False when not, None
    #: when not looked at: noted on CPU where the data is made, for values whose data is then released (eager
    #: attention's scores, :func:`relprop.rules.attention.note_normal`), so that a rule need not recompute them to
    #: know. It describes this Value's contents (a tensor written in place becomes a new Value); each recording and
    #: each replay notes its own Values, never copied from another.
    normal: bool | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.data is not None:
            self.dtype, self.shape, self.device = self.data.dtype, self.data.shape, self.data.device

    @property
    def strides(self) -> tuple[int, ...] | None:
        """The recorded tensor's strides, also once its data is dropped (a plan checks a replay's against them).

        Read from the data while it is held; noted only when the recorder drops it (:meth:`drop`), so the
        recording's hot path does not take every value's strides for the plan's sake.
        """
        if self.kept_strides is None and self.data is not None and self.data.layout == torch.strided:
            return tuple(self.data.stride())
        return self.kept_strides

    @strides.setter
    def strides(self, s: tuple[int, ...] | None) -> None:
        self.kept_strides = s

    def drop(self) -> None:
        """Drop the data (the recorder does not hold it), noting its strides first; :attr:`tensor` recomputes it."""
        self.kept_strides = self.strides
        self.data = None

    def zeros(self) -> torch.Tensor:
        """Zeros shaped like this value (without touching its data)."""
        if self.shape is None:
            raise RuntimeError(f"internal: value %{self.index} has no recorded shape")
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    @property
    def tensor(self) -> torch.Tensor:
        if self.data is None:
            recompute(self)
            if self.data is None:
                raise RuntimeError(f"internal: recomputing {self!r} did not restore its data")
        return self.data

    @tensor.setter
    def tensor(self, t: torch.Tensor | None) -> None:
        self.data = t

    @property
    def is_float(self) -> bool:
        return self.dtype is not None and (self.dtype.is_floating_point or self.dtype.is_complex)

    def __repr__(self) -> str:
        src = self.name or (self.producer.op_name if self.producer is not None else self.kind)
        shape = tuple(self.shape) if self.shape is not None else "?"
        return f"%{self.index}<{src} {shape}>"


def recompute(v: Value) -> None:
    """Re-run ``v``'s producer on its (recursively recomputed) inputs to restore dropped data."""
    p = v.producer
    if p is None:
        raise RuntimeError(f"internal: the data of leaf value {v!r} was released")
    inputs = [u.tensor for u in p.inputs]
    with torch.no_grad(), torch.inference_mode(False):
        out = p.run(inputs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    for o, w in zip(outs, p.outputs):
        if w is not None and w.data is None and isinstance(o, torch.Tensor):
            w.data = o


_T = TypeVar("_T")


class _once(Generic[_T]):  # noqa: N801 (a decorator, named like functools.cached_property)
    """:func:`functools.cached_property` without its lock: Python 3.11 takes an ``RLock`` on every first read,
    once per node per name, which the recorder and the rule pass pay for every op. Two threads reading one
    node at once would both compute the same name; nothing else can differ."""

    def __init__(self, fn: Callable[[Any], _T]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _once[_T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...
    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@dataclass(eq=False)
class Node:
    """One ATen operation call."""

    index: int
    #: The ATen overload that ran, or a :class:`RegionOp` for a region node.
    op: torch._ops.OpOverload | RegionOp
    args: tuple
    kwargs: dict
    inputs: list[Value]
    outputs: list[Value | None]
    module: str
    module_type: type | None
    #: Free-form annotations added by graph passes (e.g. merged batch norm parameters).
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> str:
        """``module 'encoder.layer.0' (BertLayer)``: where the op ran, for error messages."""
        mtype = f" ({self.module_type.__name__})" if self.module_type is not None else ""
        return f"module '{self.module or '<top level>'}'{mtype}"

    # Cached: a node's op never changes, and the rule pass, graph passes and the plan ask for these
    # names thousands of times per call (``str(OpOverload)`` builds a new string each time).
    @_once
    def op_name(self) -> str:
        """``aten.convolution.default`` style name."""
        return str(self.op)

    @_once
    def packet(self) -> str:
        """Overload packet name without namespace (``convolution``); a region's own packet name."""
        if isinstance(self.op, RegionOp):
            return self.op.packet
        return self.op.overloadpacket.__name__

    @property
    def region(self) -> RegionOp | None:
        """The :class:`RegionOp` this node stands for, or ``None`` for a plain ATen op."""
        return self.op if isinstance(self.op, RegionOp) else None

    def rebuild(self, tensors: Sequence[torch.Tensor | None]) -> tuple[tuple, dict]:
        """Arguments with the i-th input Value (in recording order) replaced by ``tensors[i]``."""
        it = iter(tensors)
        args = tuple(_substitute(a, it) for a in self.args)
        return args, {k: _substitute(v, it) for k, v in self.kwargs.items()}

    def run(self, tensors: Sequence[torch.Tensor | None]) -> Any:
        """Re-execute the operation on ``tensors`` (one per input Value)."""
        args, kwargs = self.rebuild(tensors)
        return self.op(*args, **kwargs)

    @property
    def first_output(self) -> Value:
        """The first output Value (what single-output ops produce); raises if it was not recorded."""
        v = self.outputs[0] if self.outputs else None
        if v is None:
            raise RuntimeError(f"internal: node {self!r} has no recorded first output")
        return v

    def arg(self, i: int, default: Any = None) -> Any:
        """Positional argument ``i`` of the schema (kwargs honoured), as recorded."""
        if i < len(self.args):
            return self.args[i]
        if isinstance(self.op, RegionOp):
            return default
        name = self.op._schema.arguments[i].name if i < len(self.op._schema.arguments) else None
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        return default

    def activation_inputs(self) -> list[int]:
        """Indices (into ``inputs``) of floating-point inputs that depend on a model input."""
        return [i for i, v in enumerate(self.inputs) if v.is_activation and v.is_float]

    def __repr__(self) -> str:
        where = f" @ {self.module}" if self.module else ""
        return f"#{self.index} {self.op_name}({', '.join(map(repr, self.inputs))}){where}"


class RegionOp:
    """Several recorded nodes that the rules treat as one operation (a "region node").

    One concept serves every case where the unit a rule must see is bigger than one ATen op:

    * ``kind="elementwise"``: a univariate function written as several element-wise ops
      (GPT-2's ``0.5*x*(1+tanh(...))``, ``x*sigmoid(x)``); LRP gives it the nonlinearity rule.
    * ``kind="autograd_function"``: a custom ``torch.autograd.Function``; ``vjp`` calls its own
      ``backward``, so the gradient is autograd's, not the derivative of the recorded forward ops.
    * ``kind="fused"``: a fused kernel (e.g. a recurrent layer) that a rule re-derives.

    A region node (``Node(op=RegionOp(...))``) has the region's inputs and outputs as its values and
    positional args ``tuple(inputs)``; calling the op re-runs the inner nodes, so the generic VJP of
    :func:`relprop.rules.base.vjp` differentiates the composed function exactly. Inner nodes keep their
    values and producers, so data dropped from a region output is recomputed through them.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        packet: str,
        nodes: list[Node],
        inputs: list[Value],
        outputs: list[Value | None],
        family: str | None = None,
        vjp: Callable[..., list] | None = None,
    ) -> None:
        self.kind = kind
        self.name = name
        self.packet = packet
        self.nodes = list(nodes)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        #: The op family the rules see (``None``: look ``packet`` up in the family registry).
        self.family = family
        #: Optional ``vjp(node, grads, tensors, wrt) -> list`` replacing the re-run-and-differentiate VJP.
        self.vjp = vjp

    def __call__(self, *tensors: Any) -> Any:
        env: dict[int, Any] = {v.index: t for v, t in zip(self.inputs, tensors)}
        for node in self.nodes:
            ins = [env[v.index] if v.index in env else v.tensor for v in node.inputs]
            out = node.run(ins)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            for v, o in zip(node.outputs, outs):
                if v is not None:
                    env[v.index] = o
        res = [env[v.index] if v is not None else None for v in self.outputs]
        return res[0] if len(res) == 1 else tuple(res)

    def describe(self) -> str:
        """``kind name: op, op, ...`` listing the inner ATen ops in order."""
        return f"{self.kind} {self.name}: " + ", ".join(n.packet for n in self.nodes)

    def __str__(self) -> str:
        return f"region.{self.kind}.{self.name}"

    __repr__ = __str__


def region_node(op: RegionOp, index: int | None = None) -> Node:
    """A node standing for ``op``: module path and type of its last inner node, index of its last one."""
    last = op.nodes[-1]
    return Node(
        last.index if index is None else index,
        op,
        tuple(op.inputs),
        {},
        list(op.inputs),
        list(op.outputs),
        last.module,
        last.module_type,
    )


def replace_with_regions(graph: Graph, regions: list[RegionOp]) -> Graph:
    """A new graph where each region's inner nodes are replaced by one region node (at its last node).

    The input graph is not modified (its nodes, values and producers are shared, not edited).
    """
    if not regions:
        return graph
    drop: set[int] = set()
    at: dict[int, Node] = {}
    for op in regions:
        drop.update(id(n) for n in op.nodes)
        at[id(op.nodes[-1])] = region_node(op)
    nodes = []
    for n in graph.nodes:
        if id(n) in at:
            nodes.append(at[id(n)])
        elif id(n) not in drop:
            nodes.append(n)
    return graph.with_nodes(nodes)


def _substitute(a: Any, it: Iterator) -> Any:
    # A module-level function, not a recursive closure: a self-referencing closure would form a
    # reference cycle holding the tensors until the garbage collector happens to run.
    if isinstance(a, Value):
        return next(it)
    if isinstance(a, (list, tuple)):
        return type(a)(_substitute(x, it) for x in a)
    return a


@dataclass(eq=False)
class Graph:
    """Nodes in execution order, with the model's inputs, parameters and outputs as Values."""

    nodes: list[Node]
    values: list[Value]
    inputs: list[Value]
    #: Input structure: same nesting as the call's positional args / kwargs, Values at tensor leaves.
    input_spec: Any
    output: Any
    output_values: list[Value]
    params: dict[str, Value]
    module_types: dict[str, type]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def op_counts(self) -> Counter:
        return Counter(n.op_name for n in self.nodes)

    def module_outputs(self, module: str) -> list[Value]:
        """Values produced inside ``module`` and consumed outside it (its outputs)."""
        prefix = module + "."
        inside = lambda n: n.module == module or n.module.startswith(prefix)  # noqa: E731
        outs = []
        for n in self.nodes:
            if not inside(n):
                continue
            for v in n.outputs:
                if v is None:
                    continue
                if any(not inside(c) for c in v.consumers) or any(v is o for o in self.output_values):
                    outs.append(v)
        return outs

    def with_nodes(self, nodes: list[Node], values: list[Value] | None = None) -> Graph:
        """A graph over ``nodes`` (and ``values``) with this graph's inputs, outputs and parameters.

        Graph passes return such a copy instead of editing the recorded graph, which may be shared.
        """
        return Graph(
            nodes,
            self.values if values is None else values,
            self.inputs,
            self.input_spec,
            self.output,
            self.output_values,
            self.params,
            self.module_types,
        )

    def find(self, predicate: Callable[[Node], bool]) -> list[Node]:
        return [n for n in self.nodes if predicate(n)]

    def summary(self, limit: int = 40) -> str:
        lines = [f"Graph: {len(self.nodes)} ops, {len(self.inputs)} inputs, {len(self.params)} params"]
        for name, count in self.op_counts().most_common(limit):
            lines.append(f"  {count:6d}  {name}")
        regions = Counter(n.region.describe() for n in self.nodes if n.region is not None)
        if regions:
            lines.append("regions (several recorded ops that rules treat as one):")
            lines.extend(f"  {count:6d}  {desc}" for desc, count in regions.most_common(limit))
        return "\n".join(lines)
