"""What a rule is, what it sees, and the registry that classifies ATen ops into families.

A rule is a function ``rule(ctx) -> list[Tensor | None]``: given the relevance (or gradient) that
arrived at a node's outputs, it returns one tensor per node input (``None`` where nothing flows).
Every backward method (gradient, LRP variants, DeepLIFT, guided backprop...) is a rule set, i.e. a
mapping from nodes to such functions, propagated by :mod:`relprop.propagate` over one graph.

Ops are grouped into *families* (``conv``, ``dense``, ``sum``, ``product``, ``nonlinear``,
``softmax``, ``norm``, ``routing``, ``attention``, ``stop``, ``constant``) so that a rule set can
say "epsilon on every dense op" once instead of listing ATen overloads. Each rules module
registers its ops next to its rules with :func:`register_family`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..graph import Graph, Node
from .vjps import VJPS, RecordedInputs, autograd_vjp

Rule = Callable[["RuleContext"], Sequence["torch.Tensor | None"]]

#: Half-precision dtypes: LRP on such a model carries its relevance in float32 (``linear.stabilize``
#: divides in float32, :func:`vjp` then runs in float32 on the recorded values).
HALF = (torch.bfloat16, torch.float16)

#: packet name (``relu``, ``convolution``...) -> family name or ``classifier(node, constant_operands) -> family``.
_FAMILIES: dict[str, str | Callable[[Node, tuple[int, ...]], str | None]] = {}


def register_family(family: str | Callable[[Node, tuple[int, ...]], str | None], *packets: str) -> None:
    """Declare that the ATen op packets ``packets`` (in-place twins included) belong to ``family``.

    ``family`` may be a classifier ``fn(node, constant_operands) -> family`` for ops whose family
    depends on the call (a matmul is ``dense`` against a weight, ``product`` between two activations);
    ``constant_operands`` are the input positions the rule set holds constant (see :class:`NodeNotes`).
    """
    for p in packets:
        _FAMILIES[p] = family


def family_of(node: Node, constant_operands: tuple[int, ...] = ()) -> str | None:
    """The family of ``node`` (``None`` if no rules module knows the op).

    Computed, never cached on the node: the answer depends on the rule set's constant operands, and a
    recorded graph is shared between rule sets. :meth:`Composite.prepare` computes it once per node
    and per call (:attr:`NodeNotes.family`).
    """
    region = node.region
    if region is not None and region.family is not None:
        return region.family
    fam = _FAMILIES.get(node.packet)
    if fam is None and node.packet.endswith("_"):
        fam = _FAMILIES.get(node.packet[:-1])
    if callable(fam):
        fam = fam(node, constant_operands)
    return fam


class NoRuleError(LookupError):
    """No rule is registered for an op the propagation has to pass through."""

    def __init__(self, node: Node, method: str):
        super().__init__(
            f"no {method} rule for operation {node.op_name} in {node.location}. "
            f"Register one with relprop.register_rule('{node.packet}', rule, family=...) or pass "
            f"rules={{'{node.packet}': rule}} to explain(); to accept an approximation, pass "
            f"fallback='gradient' (routes relevance through the op's gradient and warns)."
        )
        self.node = node


@dataclass(frozen=True)
class NodeNotes:
    """What a rule set's graph preparation found out about one node, for one call.

    Kept apart from the (shared, reusable) recorded graph, so the same recording can be explained
    with several rule sets, in any order and from several threads.
    """

    #: The op family the rules see (``conv``, ``dense``, ``product``...), ``None`` if unknown.
    family: str | None
    #: Input positions held constant by the rule set (normalisers; CP-LRP's attention weights and gates).
    constant_operands: tuple[int, ...] = ()
    #: DeepLIFT: (reference inputs, reference outputs) of the node on the baseline.
    reference: tuple[list, list] | None = None


@dataclass(frozen=True)
class PreparedGraph:
    """A graph as prepared by one rule set for one call: the graph plus per-node notes.

    ``graph`` may be a new graph (batch norms merged, regions replaced) sharing values with the
    recording; the recording itself is never modified. ``first_node`` is the index of the node that
    gets the rule set's first-layer rule (``None``: no such rule or node).
    """

    graph: Graph
    notes: Mapping[int, NodeNotes]
    first_node: int | None = None

    def notes_of(self, node: Node) -> NodeNotes:
        """The notes of ``node`` (by index); a node the preparation did not see gets its plain family."""
        n = self.notes.get(node.index)
        return n if n is not None else NodeNotes(family_of(node))

    @staticmethod
    def plain(graph: Graph, constant: Mapping[int, tuple[int, ...]] | None = None, **kw: Any) -> PreparedGraph:
        """Notes with each node's family and ``constant`` operands (node index -> positions)."""
        constant = constant or {}
        notes = {}
        for node in graph.nodes:
            const = tuple(constant.get(node.index, ()))
            notes[node.index] = NodeNotes(family_of(node, const), const)
        return PreparedGraph(graph, notes, **kw)


@dataclass
class RuleContext:
    """Everything a rule may read about one node during the reverse pass."""

    node: Node
    #: Relevance (or gradient) arriving at each output; ``None`` where nothing arrived.
    relevance: list[torch.Tensor | None]
    #: For each input: does the caller want something to flow into it?
    needs: list[bool]
    #: The rule set's notes on this node for this call (family, constant operands...).
    notes: NodeNotes | None = None
    #: Scratch space for one rule call (e.g. modified weights shared by a rule's forward and VJP).
    memo: dict[Any, Any] = field(default_factory=dict)
    #: Set by the reverse pass (:mod:`relprop.propagate`): tells whether the first output's data may serve the
    #: rule as scratch memory (see :meth:`out_is_scratch`); ``None``: it may not.
    scratch: Callable[[], bool] | None = None
    #: ``id`` of the results this rule made for this call and holds nowhere else (:meth:`own`).
    owned: set[int] = field(default_factory=set)
    #: ``id`` of the arriving relevance tensors the pass hands over: nothing else holds them (see :meth:`spare_relevance`).
    handed: set[int] = field(default_factory=set)

    def own(self, t: torch.Tensor) -> torch.Tensor:
        """Declare ``t`` a result made by this rule call that nothing else holds (not the relevance that arrived,
        not a recorded value, not another result): the reverse pass may add later relevance into it in place."""
        self.owned.add(id(t))
        return t

    def spare_relevance(self) -> torch.Tensor | None:
        """The relevance that arrived at the first output where the pass holds it nowhere else (not wanted back,
        summed or made by a rule that owned it), else None: once the rule has read it, it may write a result into
        it (and return it, or :meth:`own` it) instead of making a new tensor."""
        r = self.relevance[0] if self.relevance else None
        return r if r is not None and id(r) in self.handed else None

    def out_is_scratch(self) -> bool:
        """May the rule overwrite the first output's data (``ctx.out``) with its own temporaries?

        True only where the pass reads that data no more after this rule (it releases it), the recording did not
        hold it (the data is a recomputation made during this pass) and nothing else shares its memory: then
        writing a quotient into it spares a new output-sized tensor (on CPU, page faults on top of the pass).
        """
        return self.scratch is not None and self.scratch()

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [v.tensor for v in self.node.inputs]

    @property
    def outputs(self) -> list[torch.Tensor | None]:
        return [None if v is None else v.tensor for v in self.node.outputs]

    @property
    def out(self) -> torch.Tensor:
        return self.node.first_output.tensor

    def output(self, i: int) -> torch.Tensor:
        """Output ``i``'s data (e.g. a norm's saved ``rstd``); an error if the op's output ``i`` was not recorded."""
        v = self.node.outputs[i]
        if v is None:
            raise RuntimeError(f"internal: output {i} of {self.node!r} was not recorded")
        return v.tensor

    @property
    def rel(self) -> torch.Tensor:
        """Relevance at the first output (zeros if none arrived there)."""
        r = self.relevance[0]
        return r if r is not None else torch.zeros_like(self.out)

    @property
    def family(self) -> str | None:
        """The node's family for this rule set."""
        return self.notes.family if self.notes is not None else family_of(self.node)

    @property
    def constant_operands(self) -> tuple[int, ...]:
        """Input positions this rule set holds constant at this node."""
        return self.notes.constant_operands if self.notes is not None else ()

    def activation_inputs(self) -> list[int]:
        """Activation inputs of the node that the rule set does not hold constant."""
        const = self.constant_operands
        return [i for i in self.node.activation_inputs() if i not in const]

    def vjp(
        self,
        grads: Sequence[torch.Tensor | None],
        tensors: Sequence[torch.Tensor] | None = None,
        wrt: Sequence[int] | None = None,
    ) -> list[torch.Tensor | None]:
        """Vector-Jacobian product of the op (optionally re-run on other ``tensors``) w.r.t. inputs ``wrt``."""
        return vjp(self.node, grads, tensors, wrt if wrt is not None else [i for i, n in enumerate(self.needs) if n])


def _float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def vjp(
    node: Node, grads: Sequence[torch.Tensor | None], tensors: Sequence[torch.Tensor] | None, wrt: Sequence[int]
) -> list[torch.Tensor | None]:
    """The op's vector-Jacobian product w.r.t. inputs ``wrt``, on the recorded or on other ``tensors``.

    Order: a region node's own ``vjp``; the op's entry in :data:`relprop.rules.vjps.VJPS` (a direct
    kernel, or a correction); else re-run the op under autograd on detached inputs and differentiate.
    """
    # LRP on a bfloat16/float16 model: float32 relevance arrives at a half-precision output. The VJP runs
    # in float32 on exact float32 copies of the recorded values (one op's operands at a time), so the
    # relevance is never rounded to half precision; the gradient method (half-precision cotangents)
    # keeps the op's dtype and equals autograd.
    widen = any(
        g is not None and g.dtype == torch.float32 and v is not None and v.dtype in HALF
        for g, v in zip(grads, node.outputs)
    )
    if widen:
        grads = [g.float() if g is not None else None for g in grads]
    if tensors is None:  # the recorded inputs, read only where a kernel needs them
        tensors = Float32Inputs(node) if widen else RecordedInputs(node)
        wrt = [i for i in wrt if node.inputs[i].is_float]
    else:
        tensors = [to_float32(t) for t in tensors] if widen else list(tensors)
        wrt = [i for i in wrt if _float(tensors[i])]
    if not wrt:
        return [None] * len(tensors)
    region = node.region
    if region is not None and region.vjp is not None:
        return region.vjp(node, grads, list(tensors), wrt)
    kernel = VJPS.get(node.packet)
    if kernel is not None:
        res = kernel(node, grads, tensors, wrt)
        if res is not None:
            return res
    return autograd_vjp(node, grads, tensors, wrt)


def to_float32(t: Any) -> Any:
    """``t`` as float32 if it is a half-precision tensor (an exact copy), else ``t`` itself."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in HALF else t


class Float32Inputs(RecordedInputs):
    """A node's recorded inputs with half-precision ones read as float32 copies (see :func:`vjp`)."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [to_float32(t) for t in super().__getitem__(i)]
        return to_float32(super().__getitem__(i))


def cheap_read(t: torch.Tensor) -> bool:
    """May a rule read a value computed from ``t`` back into Python (``bool(t.amin() >= tiny)``) to choose a faster
    path with the same bits? On a CPU that costs no more than the reduction; on a GPU each read is a host sync, and
    an explain call makes at most a few (``tests/test_gpu.py`` counts them on a CPU with this answering False, as
    it does on a GPU). Rules look it up as ``base.cheap_read`` (one switch for every such choice)."""
    return t.device.type == "cpu"


def storage_ptr(t: torch.Tensor) -> int | None:
    """The address of ``t``'s memory, to tell whether two tensors share it before one is written in place;
    None where there is none to write into (not strided, or a storage Python cannot read, as some in-place
    ops' results have): such a tensor is never written into."""
    if t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None
