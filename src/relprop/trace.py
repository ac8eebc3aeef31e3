"""Record a model's forward pass as a graph of ATen operations.

Why a ``TorchDispatchMode`` tape: it sees every operation that actually runs, below every Python
abstraction (functional calls, reused modules, custom attention code, in-place ops), and works on
models that ``torch.fx``/``torch.export`` cannot capture. What it takes to make the tape exact:

* Autograd stays on while recording, because under ``no_grad`` PyTorch picks inference-only kernels
  that have no derivative (fused multi-head attention, ...). Float inputs are made to require grad;
  for token models (integer inputs only) the outputs of embedding lookups indexed by the token ids
  are made to require grad inside the dispatch mode. The model's parameters are never touched.
* A tensor's identity is its Python object *and* the content of its storage: an in-place write to
  a storage makes every alias of it a new value. Each storage gets a version counter bumped when
  an op's schema says it writes (``alias_info.is_write``); stale aliases are re-derived from the
  storage's latest content with ``as_strided`` so gradients flow through the write. An in-place op
  is recorded as its functional counterpart, found by schema (``transpose_`` -> ``transpose.int``).
* Nothing is copied before a write: recorded op outputs whose storage is overwritten drop their
  data and :class:`~relprop.graph.Value` recomputes it from the producer's inputs on demand; only
  leaves (inputs, parameters, constants) get a snapshot. Metadata-only in-place ops (``t_``,
  ``squeeze_``) re-point the old value at a detached alias with the old geometry.
* Autograd's own semantics are kept: ops that run with grad disabled (``no_grad`` or
  ``inference_mode`` blocks inside ``forward``) read their activation inputs through a recorded
  ``detach``, so their outputs are constants; a custom ``torch.autograd.Function`` becomes one region
  node whose VJP calls the Function's own ``backward`` (its recorded forward ops ran under no-grad).
* Random ops (dropout's ``bernoulli_``) produce constants holding what was drawn, so the graph
  explains the forward that actually ran; parameters and buffers are never written (batch-norm running
  statistics in train mode, any op writing a model leaf runs on a private copy).
* No process-wide state: module paths come from forward hooks that act only for the recording thread,
  so other threads may run, train or explain the same model at the same time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

from .graph import Graph, Node, RegionOp, Value, replace_with_regions

aten = torch.ops.aten

#: Ops whose float output depends on an integer index operand (token ids -> embeddings).
_INDEXING_PACKETS = {"embedding", "embedding_bag", "index_select", "index", "gather", "take", "_embedding_bag"}

#: Random ops whose output does not depend differentiably on any input: the drawn values are constants.
_RANDOM_CONSTANT = {
    "bernoulli",
    "bernoulli_",
    "uniform_",
    "normal_",
    "random_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "rand",
    "rand_like",
    "randn",
    "randn_like",
    "randint",
    "randint_like",
    "randperm",
    "multinomial",
}
#: Random ops with a derivative w.r.t. a float operand (reparametrised sampling): constants only when
#: no activation feeds them, else the recording stops with a clear error.
_RANDOM_DIFFERENTIABLE = {
    "normal",
    "poisson",
    "binomial",
    "_standard_gamma",
    "_sample_dirichlet",
    "rrelu_with_noise",
    "rrelu_with_noise_",
    "_fused_dropout",
}
#: Batch norms whose schema does not declare that training mode writes the running statistics.
_UNDECLARED_BN = {"native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm"}


class TraceError(RuntimeError):
    """Raised when a forward pass cannot be recorded faithfully."""


class _OpInfo(NamedTuple):
    written: tuple[int | str, ...]  # positions (or kwarg names) of the arguments the op writes
    functional: Any  # functional counterpart (an OpOverload) or None
    outmap: tuple[tuple[str, int], ...] | None  # functional return j -> ("w", written k) / ("r", op return i)
    metadata_only: bool  # the write changes only shape/strides (t_, squeeze_, transpose_ ...)
    special: str | None  # "random", "random_diff", "batch_norm", "dropout"


def _signature(schema, drop_written_kwargs: bool = False) -> tuple:
    return tuple(
        (a.name, str(a.type), a.kwarg_only)
        for a in schema.arguments
        if not (drop_written_kwargs and a.kwarg_only and a.alias_info is not None and a.alias_info.is_write)
    )


def _writes(schema) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _functional_of(func: torch._ops.OpOverload) -> Any:
    """The functional twin of a writing op, matched by argument schema (not by overload name).

    ``add_.Tensor`` -> ``add.Tensor``; ``transpose_.default`` -> ``transpose.int``; ``max.dim_max`` (out=)
    -> ``max.dim``; ``_batch_norm_with_update`` -> ``_batch_norm_with_update_functional``.
    """
    schema = func._schema
    name = func.overloadpacket.__name__
    candidates: list[tuple[Any, bool]] = []
    if name.endswith("_"):
        candidates.append((getattr(aten, name[:-1], None), False))
    else:
        candidates.append((getattr(aten, name, None), True))  # out= overloads of the same packet
        candidates.append((getattr(aten, name + "_functional", None), False))
    same = _signature(schema)
    without_out = _signature(schema, drop_written_kwargs=True)
    for packet, is_out in candidates:
        if packet is None or not hasattr(packet, "overloads"):
            continue
        for ov in packet.overloads():
            f = getattr(packet, ov)
            if f is func or _writes(f._schema):
                continue
            if _signature(f._schema) == (without_out if is_out else same):
                return f
    return None


def _output_map(func, functional, written_args: list) -> tuple[tuple[str, int], ...] | None:
    rets, frets = func._schema.returns, functional._schema.returns
    sets = [set(a.alias_info.before_set) for a in written_args]

    def ret_kind(i: int) -> tuple[str, int]:
        info = rets[i].alias_info
        if info is not None and info.is_write:
            for k, s in enumerate(sets):
                if s & set(info.before_set):
                    return ("w", k)
        return ("r", i)

    if len(frets) == len(rets):
        out = [ret_kind(i) for i in range(len(rets))]
        if len(written_args) == 1 and not any(k == "w" for k, _ in out) and len(out) == 1:
            out = [("w", 0)]
    elif len(frets) == len(rets) + len(written_args):
        out = [ret_kind(i) for i in range(len(rets))] + [("w", k) for k in range(len(written_args))]
    else:
        return None
    if sorted(i for k, i in out if k == "w") != list(range(len(written_args))):
        return None
    return tuple(out)


@functools.cache
def _op_info(func: torch._ops.OpOverload) -> _OpInfo:
    schema = func._schema
    packet = func.overloadpacket.__name__
    special = None
    if packet in _RANDOM_CONSTANT:
        special = "random"
    elif packet in _RANDOM_DIFFERENTIABLE:
        special = "random_diff"
    elif packet == "native_dropout":
        special = "dropout"
    elif packet in _UNDECLARED_BN:
        special = "batch_norm"
    elif any(str(a.type) == "Generator?" for a in schema.arguments):
        special = "random_diff"
    written_args = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if not written_args:
        return _OpInfo((), None, None, False, special)
    written = tuple(a.name if a.kwarg_only else i for i, a in enumerate(schema.arguments) if a in written_args)
    lists = any(not str(a.type).startswith("Tensor") or "[]" in str(a.type) for a in written_args)
    functional = None if lists else _functional_of(func)
    outmap = _output_map(func, functional, written_args) if functional is not None else None
    if outmap is None:
        functional = None
    metadata_only = False
    if functional is not None and packet.endswith("_"):
        frets = functional._schema.returns
        metadata_only = len(frets) == 1 and frets[0].alias_info is not None and not frets[0].alias_info.is_write
    return _OpInfo(written, functional, outmap, metadata_only, special)


def written_args(op: torch._ops.OpOverload) -> tuple[int, ...]:
    """Positions of the arguments ``op`` writes in place (empty for a functional op).

    Public for code that re-runs recorded nodes on other tensors (DeepLIFT's replay), which must
    copy a written operand first so each recorded value keeps the data it had when produced.
    """
    return tuple(i for i in _op_info(op).written if isinstance(i, int))


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _covers_storage(t: torch.Tensor) -> bool:
    """True when ``t`` is a dense, offset-0 view over its entire storage."""
    try:
        nbytes = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return False
    if t.storage_offset() != 0 or t.numel() * t.element_size() != nbytes:
        return False
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _geometry(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.storage_offset(), t.dtype)


def _flat_view(t: torch.Tensor, storage: Any = None) -> torch.Tensor:
    storage = t.untyped_storage() if storage is None else storage
    n = storage.nbytes() // t.element_size()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, 0, (n,), (1,))


def _swap_tensors(obj: Any, table: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return table.get(id(obj), obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap_tensors(x, table) for x in obj)
    if isinstance(obj, dict):
        return {k: _swap_tensors(v, table) for k, v in obj.items()}
    return obj


def _swap_values(obj: Any, table: dict[int, Value]) -> Any:
    if isinstance(obj, Value):
        return table.get(obj.index, obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap_values(x, table) for x in obj)
    return obj


_AUTOGRAD_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.ADInplaceOrView
)


def _requiring_grad(t: torch.Tensor) -> torch.Tensor:
    """A non-leaf copy of ``t`` that requires grad, made from inside ``__torch_dispatch__``.

    Autograd is excluded below the dispatch mode; it is re-enabled for one ``clone`` so the copy has a
    ``grad_fn`` (a leaf requiring grad could not be written in place by the model afterwards).
    """
    leaf = t.detach().requires_grad_(True)
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude - _AUTOGRAD_KEYS):
        return leaf.clone()


class _Storage:
    """Per-storage bookkeeping: version, the value holding the whole storage, aliases to re-point."""

    __slots__ = ("version", "owner", "values")

    def __init__(self) -> None:
        self.version = 0
        self.owner: Value | None = None  # a value covering the whole storage at ``version``
        self.values: list[Value] = []


def _function_vjp(fn: Any, outputs: list[Value | None], positions: list[list[int]], name: str):
    """VJP of a region recorded from a custom autograd Function: calls the Function's own ``backward``.

    ``fn`` is the Function's autograd node (``ctx``); ``fn.apply(*grads)`` runs its ``backward`` alone,
    returning one entry per forward argument; ``positions[k]`` are the forward arguments that are
    region input ``k``. Only ``fn`` is kept (with what the Function saved for its backward).
    """

    def vjp(node: Node, grads, tensors, wrt):
        for v, t in zip(node.inputs, tensors):
            rec = v.tensor
            if t is not rec and not (t.shape == rec.shape and torch.equal(t, rec)):
                raise TraceError(
                    f"custom autograd Function '{name}': its backward can only be evaluated at the recorded "
                    f"inputs, and a rule asked for it at other ones; register a rule for '{name}' that does not "
                    f"re-run it (relprop.register_rule('{name}', rule))"
                )
        result: list = [None] * len(tensors)
        if all(g is None for g in grads):
            for i in wrt:
                result[i] = torch.zeros_like(tensors[i])
            return result
        full = []
        for out_v, g in zip(outputs, grads):
            if g is None:
                if out_v is None:
                    raise TraceError(f"custom autograd Function '{name}': an output was not recorded")
                g = out_v.zeros()
            full.append(g)
        with torch.inference_mode(False), torch.no_grad():  # as autograd's engine runs a backward
            got = fn.apply(*full)
        got = got if isinstance(got, tuple) else (got,)
        for i in wrt:
            acc = None
            for pos in positions[i]:
                g = got[pos] if pos < len(got) else None
                if g is None:
                    continue
                shape = tensors[i].shape
                g = (g.sum_to_size(shape) if g.shape != shape else g).to(tensors[i].dtype)
                acc = g if acc is None else acc + g
            result[i] = torch.zeros_like(tensors[i]) if acc is None else acc
        return result

    return vjp


def _identity_vjp(node: Node, grads, tensors, wrt):
    """VJP of a write autograd does not differentiate: the gradient passes to the overwritten value."""
    result: list = [None] * len(tensors)
    for i in wrt:
        result[i] = grads[0] if grads[0] is not None else torch.zeros_like(tensors[i])
    return result


class _Recorder(TorchDispatchMode):
    def __init__(
        self,
        names: dict[int, str],
        module_names: dict[int, str],
        model_leaves: list,
        release: Callable[[Node], bool] | None = None,
    ) -> None:
        super().__init__()
        # Values whose tensor the tape does not hold (see :meth:`release_outputs`): value index -> weak reference.
        self.release = release
        self.released: dict[int, weakref.ref] = {}
        self.nodes: list[Node] = []
        self.values: list[Value] = []
        self.by_id: dict[int, Value] = {}
        self.version_of: dict[int, int] = {}  # value index -> storage version when produced
        self.geometry_of: dict[int, tuple] = {}
        self.storages: dict[int, _Storage] = {}
        self.keep: list[torch.Tensor] = []
        self.leaf_names = names  # id(tensor) -> "param:name" / "buffer:name"
        self.module_names = module_names
        self.scope: list[str] = []
        self.module_types: dict[str, type] = {}
        # Storages of the model's parameters and buffers -> the tensors viewing them: never written.
        self.model_storages: dict[int, list[torch.Tensor]] = {}
        for t in model_leaves:
            key = _storage_key(t)
            if key is not None:
                self.model_storages.setdefault(key, []).append(t)
        # id(model tensor) -> private copy written instead. Autograd still bumps the model tensor's version
        # counter (its in-place bookkeeping runs before this mode sees the op): the content is untouched,
        # and a relprop.plan tells such bumps from edits by the content (plan._own_bumps).
        self.shadow: dict[int, torch.Tensor] = {}
        # Autograd semantics: outputs of ops run with grad disabled, until known not to be the output of
        # a custom autograd Function (value index -> the tensor object the model holds).
        self.pending: dict[int, torch.Tensor] = {}
        self.nograd_outputs: list[tuple[Value, torch.Tensor]] = []
        self.nograd_nodes: set[int] = set()
        # Tensors that requiring-grad ops consumed under no-grad: autograd edge -> recorded value.
        self.edge_values: dict[tuple, tuple[Value, Any]] = {}
        self.functions: dict[int, RegionOp] = {}  # id(autograd node) -> region
        self.reran: set[int] = set()  # id(autograd node) of reentrant checkpoints recorded through
        self.top_keys = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())
        # Values written in place, until autograd is seen to have rebased their history (grad mode), or to
        # have kept it (no-grad writes, ops without derivative): new value index -> what a region needs.
        self.rewritten: dict[int, tuple[torch.Tensor, Any, Value | None, list[Node], str]] = {}
        self.straight: dict[int, tuple[Any, Value | None, list[Node], str]] = {}
        self.regions: list[RegionOp] = []

    # ---------------------------------------------------------------- values
    def new_value(
        self,
        t: torch.Tensor,
        kind: str,
        producer: Node | None = None,
        out_index: int = 0,
        name: str | None = None,
        is_activation: bool = False,
    ) -> Value:
        v = Value(len(self.values), t, kind, producer, out_index, name, is_activation)
        self.values.append(v)
        self.by_id[id(t)] = v
        self.keep.append(t)
        key = _storage_key(t)
        st = self.storages.get(key) if key is not None else None
        if key is not None and st is None:
            st = self.storages[key] = _Storage()
        if st is not None:
            st.values.append(v)
            self.version_of[v.index] = st.version
            if (st.owner is None or self.version_of.get(st.owner.index) != st.version) and _covers_storage(t):
                st.owner = v
        self.geometry_of[v.index] = _geometry(t)
        return v

    def leaf(self, t: torch.Tensor) -> Value:
        tag = self.leaf_names.get(id(t))
        if tag is None:
            return self.new_value(t, "constant")
        kind, name = tag.split(":", 1)
        return self.new_value(t, kind, name=name)

    def lookup(self, t: torch.Tensor) -> Value:
        v = self.by_id.get(id(t))
        if v is not None and self.released and v.index in self.released and self.released[v.index]() is not t:
            v = None  # a released tensor died and another one got its id
        if v is not None:
            if self.pending and v.index in self.pending:
                self.classify(v, t)
                v = self.by_id.get(id(t), v)  # a checkpoint recorded through: the re-run's value
            if self.rewritten and v.index in self.rewritten:
                self.check_rewritten(v, t)
        key = _storage_key(t)
        st = self.storages.get(key) if key is not None else None
        if v is not None:
            fresh = st is None or self.version_of.get(v.index) == st.version
            if fresh and self.geometry_of[v.index] == _geometry(t):
                return v
        if st is None:
            return self.leaf(t)
        if v is None and not st.values:
            return self.leaf(t)
        # Stale alias (its storage was written since) or changed geometry: re-derive from the storage.
        root = self.root(st)
        node_args = (root, list(t.shape), list(t.stride()), t.storage_offset())
        return self.add_node1(aten.as_strided.default, node_args, {}, [root], [t.detach()])

    def root(self, st: _Storage) -> Value:
        """A flat value spanning the whole storage at its current version."""
        owner = st.owner
        if owner is not None and self.version_of.get(owner.index) == st.version:
            t = owner.tensor
            if t.dim() == 1 and t.stride() == (1,) and t.storage_offset() == 0:
                return owner
            flat = _flat_view(t)
            return self.add_node1(aten.as_strided.default, (owner, [flat.numel()], [1], 0), {}, [owner], [flat])
        # No value covers the storage: start from a constant snapshot and scatter in the freshest alias.
        fresh = [v for v in st.values if self.version_of.get(v.index) == st.version]
        if not fresh:
            raise TraceError("internal: storage without any recorded value")
        some = max(fresh, key=lambda v: v.tensor.numel())
        base = some.tensor
        flat = _flat_view(base)
        const = self.new_value(flat.clone(), "constant")
        args = (const, some, list(base.shape), list(base.stride()), base.storage_offset())
        return self.add_node1(aten.as_strided_scatter.default, args, {}, [const, some], [flat])

    # ---------------------------------------------------------------- nodes
    def add_node1(self, op, args, kwargs, inputs: list[Value], outs: list[Any], grad: bool = True) -> Value:
        """:meth:`add_node` for an op whose first output is a tensor: that output's Value."""
        v = self.add_node(op, args, kwargs, inputs, outs, grad)[0]
        if v is None:
            raise TraceError(f"internal: {op} recorded without a tensor output")
        return v

    def add_node(self, op, args, kwargs, inputs: list[Value], outs: list[Any], grad: bool = True) -> list[Value | None]:
        scope = self.scope[-1] if self.scope else ""
        node = Node(len(self.nodes), op, args, kwargs, inputs, [], scope, self.module_types.get(scope))
        # Float values depend on the inputs through float activations (or a lookup indexed by token ids);
        # integer values derived from token ids (views, position ids) stay tied to them, but a float cast
        # of an integer input (an attention mask) is not an activation. Under no-grad, floats are constants.
        act = grad and any(v.is_activation and v.is_float for v in inputs)
        int_act = any(v.is_activation for v in inputs)
        if grad and not act and node.packet in _INDEXING_PACKETS:
            act = int_act
        for i, o in enumerate(outs):
            if isinstance(o, torch.Tensor):
                floating = o.is_floating_point() or o.is_complex()
                node.outputs.append(self.new_value(o, "op", node, i, is_activation=act or (int_act and not floating)))
            else:
                node.outputs.append(None)
        for v in inputs:
            v.consumers.append(node)
        self.nodes.append(node)
        if not grad:
            self.nograd_nodes.add(node.index)
        return node.outputs

    def map_args(self, obj, inputs: list[Value]):
        if isinstance(obj, torch.Tensor):
            v = self.lookup(obj)
            inputs.append(v)
            return v
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.map_args(x, inputs) for x in obj)
        return obj

    def invalidate(self, t: torch.Tensor) -> None:
        """``t``'s storage is about to be written: recorded aliases lose their data.

        Op outputs are recomputed from their inputs if a rule reads them later (cheap, and only
        when needed); leaves (inputs, parameters, constants) cannot be, so they get a copy.
        """
        key = _storage_key(t)
        st = self.storages.get(key) if key is not None else None
        if st is None:
            return
        snap = None
        for v in st.values:
            if v.producer is not None:
                v.drop()
                continue
            if snap is None:
                snap = t.untyped_storage().clone()
            old = v.data
            if old is None:
                continue
            v.data = torch.empty(0, dtype=old.dtype, device=old.device).set_(
                snap, old.storage_offset(), old.shape, old.stride()
            )
        st.values = []

    # ---------------------------------------------------------------- no-grad and autograd Functions
    def cut(self, args, kwargs, inputs: list[Value], real: list[torch.Tensor]):
        """Grad is disabled: activation inputs are read through a recorded ``detach`` (autograd's view).

        Also notes which recorded value each requiring-grad tensor is, so a custom autograd Function
        running these ops can find its inputs among the recorded values afterwards.
        """
        for v, t in zip(inputs, real):
            if t.requires_grad:
                fn = t.grad_fn
                key = ("node", id(fn), t.output_nr) if fn is not None else ("leaf", id(t))
                self.edge_values.setdefault(key, (v, fn if fn is not None else t))
        table: dict[int, Value] = {}
        for v in inputs:
            if v.is_activation and v.is_float and v.index not in table:
                t = v.tensor
                table[v.index] = self.add_node1(aten.detach.default, (v,), {}, [v], [t.detach()], grad=False)
        if not table:
            return args, kwargs, inputs
        args = _swap_values(args, table)
        kwargs = {k: _swap_values(x, table) for k, x in kwargs.items()}
        return args, kwargs, [table.get(v.index, v) for v in inputs]

    def note_nograd(self, values: list[Value | None], objs: list[Any]) -> None:
        for v, o in zip(values, objs):
            if v is not None and v.is_float:
                self.pending[v.index] = o
                self.nograd_outputs.append((v, o))

    def classify(self, v: Value, t: torch.Tensor) -> None:
        """A value produced under no-grad is used: is it the output of a custom autograd Function?"""
        fn = t.grad_fn
        if fn is None:
            if torch.is_grad_enabled():
                del self.pending[v.index]  # a Function's output has its grad_fn before any grad-mode use
            return
        if isinstance(fn, torch.autograd.function.BackwardCFunction):
            self.function_region(fn)
            return
        entry = self.straight.pop(v.index, None)
        if entry is not None and entry[0] is fn and entry[1] is not None:
            # In-place write under no_grad on a tensor autograd tracks (e.g. the clamp_min_ inside
            # aten::cosine_similarity): the new content keeps the old derivative.
            del self.pending[v.index]
            self.straight_region(v, entry[1], entry[2], entry[3])
            return
        raise TraceError(
            f"a tensor that requires grad was written in place under torch.no_grad() (module "
            f"'{self.scope[-1] if self.scope else ''}', value {v!r}) through a view or in part; autograd keeps the "
            f"old derivative for the new content, which relprop cannot record there. Write it out of place."
        )

    def straight_region(self, new: Value, old: Value, nodes: list[Node], op: str) -> None:
        """Autograd keeps ``old``'s derivative for ``new`` (an in-place write it does not differentiate):
        a region whose VJP is the identity, treated by LRP as a nonlinearity of ``old``."""
        new.is_activation = old.is_activation
        self.regions.append(
            RegionOp("straight_through", op, op, nodes, [old], [new], family="nonlinear", vjp=_identity_vjp)
        )

    def function_region(self, fn: Any) -> None:
        """Make the region node of a custom autograd Function from its autograd node ``fn``."""
        if id(fn) in self.functions or id(fn) in self.reran:
            return
        cls = getattr(fn, "_forward_cls", None)
        if cls is not None and cls is getattr(torch.utils.checkpoint, "CheckpointFunction", None):
            self.record_through_checkpoint(fn)
            return
        name = cls.__name__ if cls is not None else type(fn).__name__.removesuffix("Backward")
        outs: dict[int, Value] = {}
        for idx, o in list(self.pending.items()):
            if o.grad_fn is fn:
                outs[o.output_nr] = self.values[idx]
                del self.pending[idx]
        if not outs:
            raise TraceError(f"custom autograd Function '{name}': its outputs were not recorded")
        out_list = [outs.get(i) for i in range(max(outs) + 1)]
        # Forward arguments that require grad (``needs_input_grad``) are, in order, the non-empty edges
        # of ``next_functions`` (one edge per tensor argument).
        where = f"custom autograd Function '{name}' (module '{self.scope[-1] if self.scope else ''}')"
        required = [i for i, n in enumerate(fn.needs_input_grad) if n]
        edges = [(f, nr) for f, nr in fn.next_functions if f is not None]
        if len(required) != len(edges):
            raise TraceError(f"{where}: cannot match its {len(edges)} autograd inputs to its arguments")
        inputs: list[Value] = []
        positions: list[list[int]] = []
        for pos, (f, nr) in zip(required, edges):
            v = self.find_edge(f, nr)
            if v is None:
                raise TraceError(
                    f"{where}: cannot tell which recorded tensor its argument {pos} is ({type(f).__name__}); "
                    "relprop does not guess"
                )
            k = next((j for j, u in enumerate(inputs) if u is v), None)
            if k is None:
                inputs.append(v)
                positions.append([pos])
            else:
                positions[k].append(pos)
        # Inner nodes: the no-grad nodes between the inputs and the outputs.
        stop = {v.index for v in inputs}
        inner: dict[int, Node] = {}
        todo = [v for v in out_list if v is not None]
        while todo:
            v = todo.pop()
            p = v.producer
            if v.index in stop or p is None or p.index not in self.nograd_nodes or p.index in inner:
                continue
            inner[p.index] = p
            todo.extend(p.inputs)
        act = any(v.is_activation for v in inputs)
        for v in out_list:
            if v is not None:
                v.is_activation = act
        nodes = [inner[i] for i in sorted(inner)]
        if not nodes:
            raise TraceError(f"custom autograd Function '{name}': its outputs were not computed by recorded ops")
        op = RegionOp(
            "autograd_function",
            name,
            name,
            nodes,
            inputs,
            out_list,
            family="autograd_function",
            # Region output i is the Function's output i (``output_nr``).
            vjp=_function_vjp(fn, out_list, positions, name),
        )
        self.functions[id(fn)] = op

    def record_through_checkpoint(self, fn: Any) -> None:
        """Reentrant ``torch.utils.checkpoint`` is the identity wrapper around its function, but runs it under
        no-grad (recorded as constants, maybe with inference-only kernels): re-run the function with grad
        enabled, as the checkpoint's own backward does (same RNG state and autocast), and make the outputs
        the model holds stand for the re-run's. The no-grad ops stay in the tape, unused."""
        self.reran.add(id(fn))
        outs = {idx: o for idx, o in self.pending.items() if o.grad_fn is fn}
        for idx in outs:
            del self.pending[idx]
        where = f"torch.utils.checkpoint (module '{self.scope_of(list(outs))}')"
        args = list(fn.inputs)
        for i, t in zip(fn.tensor_indices, fn.saved_tensors):
            args[i] = t
        preserve = bool(getattr(fn, "preserve_rng_state", False))
        had_device = preserve and getattr(fn, "had_device_in_fwd", False)
        device_type = getattr(fn, "device_type", "cuda")
        devices = fn.fwd_devices if had_device else []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch._C._ForceDispatchKeyGuard(*self.top_keys))  # as at the model call
            stack.enter_context(torch.random.fork_rng(devices=devices, enabled=preserve, device_type=device_type))
            if preserve:
                torch.set_rng_state(fn.fwd_cpu_state)
                if had_device:
                    torch.utils.checkpoint.set_device_states(
                        fn.fwd_devices, fn.fwd_device_states, device_type=device_type
                    )
            if torch.amp.is_autocast_available(device_type):
                stack.enter_context(torch.amp.autocast(device_type=device_type, **fn.device_autocast_kwargs))
            stack.enter_context(torch.amp.autocast("cpu", **fn.cpu_autocast_kwargs))
            stack.enter_context(torch.enable_grad())
            self.scope.append(self.scope_of(list(outs)))
            stack.callback(self.scope.pop)
            stack.enter_context(self)
            new = fn.run_function(*args)
        tensors = [t for t in (new if isinstance(new, tuple) else (new,)) if isinstance(t, torch.Tensor)]
        for idx, orig in outs.items():
            t = tensors[orig.output_nr] if orig.output_nr < len(tensors) else None
            if (
                t is None
                or _geometry(t) != _geometry(orig)
                or t.untyped_storage().nbytes() != orig.untyped_storage().nbytes()
                or not torch.allclose(t, orig, rtol=1e-4, atol=1e-5, equal_nan=True)
            ):
                raise TraceError(
                    f"{where}: re-running the checkpointed function with grad enabled gave another output than "
                    "its forward (random ops without preserve_rng_state=True, or a different layout); relprop "
                    "records it re-run. Call model.eval(), pass preserve_rng_state=True, or use_reentrant=False."
                )
            v = self.lookup(t)
            self.by_id[id(orig)] = v
            key, key_new = _storage_key(orig), _storage_key(t)
            st = self.storages.get(key_new) if key_new is not None else None
            if key is not None and st is not None:
                self.storages[key] = st  # the model's tensor is the re-run's value
            self.keep.append(orig)

    def scope_of(self, values: list[int]) -> str:
        """The module path shared by the no-grad ops that computed ``values`` (value indices)."""
        parts: list[str] | None = None
        todo = [self.values[i] for i in values]
        seen: set[int] = set()
        while todo:
            p = todo.pop().producer
            if p is None or p.index not in self.nograd_nodes or p.index in seen:
                continue
            seen.add(p.index)
            mine = p.module.split(".") if p.module else []
            if parts is None:
                parts = mine
            else:
                n = next((i for i, (a, b) in enumerate(zip(parts, mine)) if a != b), min(len(parts), len(mine)))
                parts = parts[:n]
            todo.extend(p.inputs)
        return ".".join(parts or [])

    def find_edge(self, f: Any, nr: int) -> Value | None:
        if type(f).__name__ == "AccumulateGrad":
            var = f.variable
            hit = self.edge_values.get(("leaf", id(var)))
            if hit is not None:
                return hit[0]
            v = self.by_id.get(id(var))
            return v
        hit = self.edge_values.get(("node", id(f), nr))
        if hit is not None:
            return hit[0]
        for t in self.keep:  # not touched by the Function's forward ops: any recorded tensor with that edge
            if t.grad_fn is f and t.output_nr == nr and id(t) in self.by_id:
                return self.by_id[id(t)]
        for ref in self.released.values():  # released values whose tensor is still alive
            r = ref()
            if r is not None and r.grad_fn is f and r.output_nr == nr and id(r) in self.by_id:
                return self.by_id[id(r)]
        return None

    def finish(self) -> list[RegionOp]:
        """After the forward: Functions whose outputs were never used inside it; the regions in order."""
        for idx in list(self.rewritten):
            self.check_rewritten(self.values[idx], self.rewritten[idx][0])
        for v, t in self.nograd_outputs:
            fn = t.grad_fn
            if (
                isinstance(fn, torch.autograd.function.BackwardCFunction)
                and id(fn) not in self.functions
                and id(fn) not in self.reran
            ):
                if any(u.index not in self.nograd_nodes for u in v.consumers):
                    raise TraceError(
                        f"custom autograd Function '{type(fn).__name__.removesuffix('Backward')}': its output was "
                        "used with grad enabled inside its own forward; relprop cannot record this"
                    )
                self.pending.setdefault(v.index, t)
                self.function_region(fn)
        regions = [*self.functions.values(), *self.regions]
        return sorted(regions, key=lambda op: op.nodes[-1].index if op.nodes else -1)

    # ---------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        info = _op_info(func)
        if self.shadow:
            args = _swap_tensors(args, self.shadow)
            kwargs = _swap_tensors(kwargs, self.shadow)
        grad = torch.is_grad_enabled()
        if info.special is not None:
            return self.dispatch_special(func, info, args, kwargs, grad)
        if info.written:
            return self.dispatch_write(func, info, args, kwargs, grad)
        inputs: list[Value] = []
        margs = self.map_args(args, inputs)
        mkwargs = {k: self.map_args(v, inputs) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        if not grad:
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            margs, mkwargs, inputs = self.cut(margs, mkwargs, inputs, _flatten((args, kwargs), []))
            self.note_nograd(self.add_node(func, margs, mkwargs, inputs, outs, grad=False), outs)
            return out
        if (
            isinstance(out, torch.Tensor)
            and not out.requires_grad
            and func.overloadpacket.__name__ in _INDEXING_PACKETS
            and out.is_floating_point()
            and any(v.is_activation for v in inputs)
        ):
            # A token model whose weights do not require grad: the embedding output does, so every
            # later op takes its autograd kernels (never the inference-only paths).
            out = _requiring_grad(out)
        self.add_node(func, margs, mkwargs, inputs, list(out) if isinstance(out, (tuple, list)) else [out])
        self.maybe_release()
        return out

    def written_tensors(self, info: _OpInfo, args, kwargs) -> list[Any]:
        """The written arguments, in schema order (``None`` where an optional one is absent)."""
        out: list[Any] = []
        for i in info.written:
            a = (args[i] if i < len(args) else None) if isinstance(i, int) else kwargs.get(i)
            if isinstance(a, (list, tuple)):
                out.extend(a)
            else:
                out.append(a)
        return out

    def refuse_untracked_alias_write(self, func: Any, written: list[torch.Tensor]) -> None:
        """An in-place write through an alias autograd does not track (``y.data.clamp_()``,
        ``y.detach().round_()``) into an activation that requires grad: autograd keeps ``y``'s old
        derivative for the new content. The tape cannot tell that alias apart, so refuse, never guess."""
        for w in written:
            if w.requires_grad or not (w.is_floating_point() or w.is_complex()):
                continue
            key = _storage_key(w)
            st = self.storages.get(key) if key is not None else None
            if st is None:
                continue
            if any(v.is_activation and v.is_float and _requires_grad(self.live(v)) for v in st.values):
                raise TraceError(
                    f"in-place operation {func} writes through an alias autograd does not track (`.data` or "
                    f"`.detach()`) into a tensor that requires grad (module '{self.scope[-1] if self.scope else ''}'): "
                    "autograd keeps that tensor's old derivative for the new content, which relprop cannot record. "
                    "Write it out of place (e.g. `y = y.clamp(...)`, or a straight-through `y + (f(y) - y).detach()`)."
                )

    def private_copies(self, written: list[Any]) -> bool:
        """Writes into the model's parameters/buffers go to per-call copies (another thread may be using them)."""
        done = False
        for w in written:
            if not isinstance(w, torch.Tensor):
                continue
            key = _storage_key(w)
            owners = self.model_storages.get(key) if key is not None else None
            if key is None or not owners or id(w) in self.shadow:
                continue
            storage = w.untyped_storage().clone()
            for t in [*owners, w]:
                copy = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                    storage, t.storage_offset(), t.shape, t.stride()
                )
                self.shadow[id(t)] = copy
                self.keep.append(t)
            done = True
        return done

    def dispatch_special(self, func, info: _OpInfo, args, kwargs, grad: bool):
        if info.special == "batch_norm":
            training = args[5] if len(args) > 5 else kwargs.get("training", False)
            if training and (_arg(args, kwargs, 3, "running_mean") is not None):
                # Train mode: the output uses batch statistics; the running ones must not be updated.
                args = (*args[:3], None, None, *args[5:])
                kwargs = {k: v for k, v in kwargs.items() if k not in ("running_mean", "running_var")}
            return self.dispatch_plain(func, args, kwargs, grad)
        if info.special == "dropout":
            train = _arg(args, kwargs, 2, "train")
            if train is False:
                return self.dispatch_plain(func, args, kwargs, grad)
            inputs: list[Value] = []
            x = self.map_args(args[0], inputs)
            out, mask = func(*args, **kwargs)
            p = float(_arg(args, kwargs, 1, "p"))
            scale = mask.to(out.dtype) * (1.0 / (1.0 - p) if p < 1 else 0.0)
            const = self.new_value(scale, "constant")
            ins = [*inputs, const]
            if not grad:
                xa, _, ins = self.cut((x, const), {}, ins, [args[0], scale])
                vals = self.add_node(aten.mul.Tensor, xa, {}, ins, [out], grad=False)
                self.note_nograd(vals, [out])
            else:
                self.add_node(aten.mul.Tensor, (x, const), {}, ins, [out])
            self.new_value(mask, "constant")
            return out, mask
        # Random ops: what was drawn is a constant (recomputing it would draw again). Ops that are random
        # only in training (rrelu) are plain ops when told they are not training.
        if kwargs.get("training", _training_arg(func, args)) is False:
            if info.written:
                return self.dispatch_write(func, info, args, kwargs, grad)
            return self.dispatch_plain(func, args, kwargs, grad)
        inputs = []
        self.map_args(args, inputs)
        for v in kwargs.values():
            self.map_args(v, inputs)
        if info.special == "random_diff" and grad and any(v.is_activation and v.is_float for v in inputs):
            raise TraceError(
                f"random operation {func} (module '{self.scope[-1] if self.scope else ''}') has a derivative "
                "w.r.t. a tensor derived from the model inputs; relprop records random ops as constants. "
                "Call model.eval() if this is a training-time op."
            )
        written = self.written_tensors(info, args, kwargs)
        if written and self.private_copies(written):
            return self.__torch_dispatch__(func, (), args, kwargs)
        written = [w for w in written if isinstance(w, torch.Tensor)]
        roots = self.partial_roots(written)
        for w in written:
            self.invalidate(w)
        out = func(*args, **kwargs)
        if not written:
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor):
                    self.new_value(o, "constant")
            return out
        news = [self.new_value(w.detach(), "constant") for w in written]
        self.settle(written, news, roots)
        return out

    def dispatch_plain(self, func, args, kwargs, grad: bool):
        inputs: list[Value] = []
        margs = self.map_args(args, inputs)
        mkwargs = {k: self.map_args(v, inputs) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if not grad:
            margs, mkwargs, inputs = self.cut(margs, mkwargs, inputs, _flatten((args, kwargs), []))
            self.note_nograd(self.add_node(func, margs, mkwargs, inputs, outs, grad=False), outs)
        else:
            self.add_node(func, margs, mkwargs, inputs, outs)
            self.maybe_release()
        return out

    def maybe_release(self) -> None:
        """Apply the release policy (if any) to the node just recorded."""
        if self.release is not None and self.release(self.nodes[-1]):
            self.release_outputs(self.nodes[-1])

    def live(self, v: Value) -> torch.Tensor | None:
        """``v``'s tensor: its data, or a released value's tensor while the model still holds it."""
        if v.data is not None:
            return v.data
        ref = self.released.get(v.index)
        return ref() if ref is not None else None

    def release_outputs(self, node: Node) -> None:
        """Do not hold ``node``'s outputs: their data is recomputed from the node's inputs if a rule reads them
        (:attr:`Value.tensor`), and the memory is the model's to free, as without a recording.

        Only an output whose storage the tape holds through no other value: one of its own, or one whose
        other values were all released too (a view of a released tensor, as ``matmul``'s ``_unsafe_view`` of
        its ``bmm``); an alias of a held value would keep the memory anyway. The tape's alias bookkeeping
        (storage -> values) stays exact: released values stay in their storage's list. Once the storage's
        tensors die, the allocator may give its address (``id``, storage key) to a new tensor: the storage's
        entry is dropped when the last of its values dies (a weak reference's callback, before the memory
        is freed), and :meth:`lookup` checks a released value's weak reference before matching an ``id``.
        """
        own = {_storage_key(v.data) for v in node.inputs if v.data is not None}
        for v in node.outputs:
            t = v.data if v is not None else None
            if t is None or v is None:
                continue
            key = _storage_key(t)
            st = self.storages.get(key) if key is not None else None
            if key is None or key in own or st is None or v.index in self.pending:
                continue
            if not all(u is v or (u.data is None and u.index in self.released) for u in st.values):
                continue
            for i in range(len(self.keep) - 1, max(-1, len(self.keep) - 1 - len(node.outputs)), -1):
                if self.keep[i] is t:
                    del self.keep[i]
                    break
            else:
                continue  # not held by the tape's list: leave it as it is
            v.drop()
            self.released[v.index] = weakref.ref(t, functools.partial(self._forget, key, st))
            del t

    def _forget(self, key: int, st: _Storage, _ref: Any) -> None:
        """A released tensor died: forget its storage when no value of it is alive (its key may be reused)."""
        if self.storages.get(key) is not st:
            return
        for v in st.values:
            ref = self.released.get(v.index)
            if ref is None or ref() is not None:
                return
        del self.storages[key]

    def partial_roots(self, written: list[torch.Tensor]) -> list[Value | None]:
        roots: list[Value | None] = []
        for w in written:
            key = _storage_key(w)
            st = self.storages.get(key) if key is not None else None
            roots.append(self.root(st) if st is not None and not _covers_storage(w) else None)
        return roots

    def settle(self, written: list[torch.Tensor], news: Sequence[Value | None], roots: list[Value | None]) -> None:
        """After a write: bump storage versions, scatter partial writes into their storage, re-point ids."""
        for w, new, old_root in zip(written, news, roots):
            if new is None:
                raise TraceError(f"internal: a written tensor of shape {tuple(w.shape)} got no recorded value")
            key = _storage_key(w)
            st = self.storages.get(key) if key is not None else None
            if st is not None:
                st.version += 1
                self.version_of[new.index] = st.version
                if new not in st.values:
                    st.values.append(new)
                if _covers_storage(w):
                    st.owner = new
            if old_root is not None and st is not None:
                live = _flat_view(w)
                geo = (list(w.shape), list(w.stride()), w.storage_offset())
                root = self.add_node1(
                    aten.as_strided_scatter.default, (old_root, new, *geo), {}, [old_root, new], [live]
                )
                self.version_of[root.index] = st.version
                st.owner = root
            self.by_id[id(w)] = new
            self.keep.append(w)

    def dispatch_write(self, func, info: _OpInfo, args, kwargs, grad: bool):
        written = self.written_tensors(info, args, kwargs)
        if self.private_copies(written):
            return self.__torch_dispatch__(func, (), args, kwargs)
        written = [w for w in written if isinstance(w, torch.Tensor)]
        if grad:
            self.refuse_untracked_alias_write(func, written)
        functional = info.functional
        # out= tensors are written, not read: they are not inputs of the functional twin.
        out_names = {k for k in info.written if isinstance(k, str)}
        read_kwargs = {k: v for k, v in kwargs.items() if k not in out_names}
        inputs: list[Value] = []
        margs = self.map_args(args, inputs)
        mkwargs = {k: self.map_args(v, inputs) for k, v in read_kwargs.items()}
        if functional is None:
            if any(v.is_activation for v in inputs):
                raise TraceError(
                    f"cannot record in-place/out= operation {func} on a tensor derived from the model inputs "
                    f"(module '{self.scope[-1] if self.scope else ''}'): no functional counterpart is known"
                )
            roots = self.partial_roots(written)
            for w in written:
                self.invalidate(w)
            out = func(*args, **kwargs)
            self.settle(written, [self.new_value(w.detach(), "constant") for w in written], roots)
            return out
        # The value a single in-place write replaces, when it covers a whole tensor autograd tracks.
        w0 = written[0] if len(written) == 1 else None
        old_value = (
            margs[info.written[0]]
            if w0 is not None
            and isinstance(info.written[0], int)
            and w0.requires_grad
            and not w0._is_view()
            and _covers_storage(w0)
            else None
        )
        mark = len(self.nodes)
        if not grad:
            margs, mkwargs, inputs = self.cut(margs, mkwargs, inputs, _flatten((args, read_kwargs), []))
        if info.metadata_only:
            w = written[0]
            # Old values must keep the geometry they had: re-point any that hold the caller's object.
            key = _storage_key(w)
            st = self.storages.get(key) if key is not None else None
            for v in st.values if st is not None else ():
                if v.data is not None and v.data is w:
                    v.data = v.data.detach()
            out = func(*args, **kwargs)
            new = self.add_node(functional, margs, mkwargs, inputs, [w.detach()], grad=grad)
            if not grad:
                self.note_nograd(new, [w])
            if new[0] is None:
                raise TraceError(f"internal: {func} recorded without a tensor output")
            self.by_id[id(w)] = new[0]
            self.keep.append(w)
            return out
        roots = self.partial_roots(written)
        for w in written:
            self.invalidate(w)
        # Autograd gives the written tensor a new grad_fn after this returns, unless the op has no
        # derivative: checked when the tensor is next used (see ``check_rewritten``).
        history = [w.grad_fn if grad and w.requires_grad and not w._is_view() else None for w in written]
        before = w0.grad_fn if w0 is not None else None
        out = func(*args, **kwargs)
        rets = list(out) if isinstance(out, (tuple, list)) else [out]
        outmap = info.outmap
        if outmap is None:  # _op_info sets functional only together with its output map
            raise TraceError(f"internal: {func} has a functional counterpart but no output map")
        fouts = [written[i].detach() if kind == "w" else rets[i] for kind, i in outmap]
        values = self.add_node(functional, margs, mkwargs, inputs, fouts, grad=grad)
        news: list[Value | None] = [None] * len(written)
        for (kind, i), fv in zip(outmap, values):
            if kind == "w":
                news[i] = fv
        if not grad:
            self.note_nograd(values, [written[i] if kind == "w" else rets[i] for kind, i in outmap])
        self.settle(written, news, roots)
        name = func.overloadpacket.__name__
        for w, fn, nv in zip(written, history, news):
            if fn is not None and nv is not None and nv.producer is not None:
                self.rewritten[nv.index] = (w, fn, old_value if len(written) == 1 else None, [nv.producer], name)
        if not grad and old_value is not None and news[0] is not None:
            self.straight[news[0].index] = (before, old_value, self.nodes[mark:], name)
        return out

    def check_rewritten(self, v: Value, t: torch.Tensor) -> None:
        w, fn, old, nodes, op = self.rewritten.pop(v.index)
        if t is w and w.grad_fn is fn:
            if old is None:
                raise TraceError(
                    f"in-place operation {op} (value {v!r}) has no derivative and wrote part of a tensor that "
                    "requires grad: autograd keeps the tensor's old derivative for the new content, which relprop "
                    "cannot record there. Use the out-of-place op (or detach the tensor first)."
                )
            self.straight_region(v, old, nodes, op)  # an in-place op without derivative: autograd's identity


def _requires_grad(t: torch.Tensor | None) -> bool:
    return t is not None and t.requires_grad


def _training_arg(func, args: tuple) -> Any:
    for i, a in enumerate(func._schema.arguments):
        if a.name in ("training", "train"):
            return args[i] if i < len(args) else a.default_value
    return None


def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    return args[i] if i < len(args) else kwargs.get(name)


@contextmanager
def _module_scope(recorder: _Recorder):
    """Track the module path of every op via forward hooks that never touch the model.

    The hooks are process-wide (that is what PyTorch offers without modifying the model) but act only
    for the thread that records: other threads running the same or other models are not seen.
    """
    names = recorder.module_names
    stack = recorder.scope
    me = threading.get_ident()

    def pre(module, _args):
        if threading.get_ident() != me:
            return
        name = names.get(id(module))
        if name is not None:
            stack.append(name)
            recorder.module_types.setdefault(name, type(module))

    def post(module, _args, _out):
        if threading.get_ident() == me and names.get(id(module)) is not None and stack:
            stack.pop()

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post, always_call=True)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def _flatten(obj, out: list):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _flatten(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _flatten(v, out)
    elif hasattr(obj, "to_tuple"):  # transformers ModelOutput
        _flatten(obj.to_tuple(), out)
    return out


def _detached(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):  # includes transformers' ModelOutput, updated in place to keep its type
        for k in list(obj.keys()):
            obj[k] = _detached(obj[k])
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_detached(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(v) for v in obj)
    return obj


def _inference_leaves(err: RuntimeError, leaves: list, names: dict) -> Exception:
    """PyTorch's "Inference tensors cannot be saved for backward", said in the model's terms where parameters or
    buffers made under ``torch.inference_mode()`` caused it (the forward is recorded with autograd on, and an
    inference tensor can never take part in autograd; cloning them is the user's call, not ours)."""
    if "Inference tensors cannot be saved for backward" not in str(err):
        return err
    made = list(dict.fromkeys(names.get(id(t), "?").partition(":")[2] for t in leaves if t.is_inference()))
    if not made:
        return err
    more = f" and {len(made) - 1} more" if len(made) > 1 else ""
    return ValueError(
        f"model: its parameters/buffers were made under torch.inference_mode() ('{made[0]}'{more}), and PyTorch lets "
        "no inference tensor take part in the autograd pass relprop records; create or load the model outside "
        "torch.inference_mode() (torch.no_grad() is fine)"
    )


def _prepare_inputs(obj, recorder: _Recorder, values: list[Value]):
    """Replace tensors by grad-enabled copies registered as input values; keep the structure."""
    if isinstance(obj, torch.Tensor):
        if obj.is_inference():  # a caller under torch.inference_mode(): make a normal tensor
            obj = obj.clone()
        if obj.is_floating_point() or obj.is_complex():
            leaf = obj.detach().requires_grad_(True)
            t = leaf.clone()  # a non-leaf, so in-place ops on inputs inside forward stay legal
        else:
            t = obj
        v = recorder.new_value(t, "input", name=f"input{len(values)}", is_activation=True)
        values.append(v)
        return t, v
    if isinstance(obj, dict):
        pairs = {k: _prepare_inputs(v, recorder, values) for k, v in obj.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    if isinstance(obj, (list, tuple)):
        seq = [_prepare_inputs(v, recorder, values) for v in obj]
        return type(obj)(p[0] for p in seq), type(obj)(p[1] for p in seq)
    return obj, obj


@contextmanager
def preserved(model: torch.nn.Module):
    """Restore modules' training flags, also on error (``requires_grad`` flags are never changed)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, tr in modes:
            m.training = tr


def _unwrap_compiled(model: Any) -> Any:
    """``torch.compile(model)`` returns a wrapper; relprop records (and explains) the original module."""
    orig = getattr(model, "_orig_mod", None)
    if orig is not None and type(model).__name__ == "OptimizedModule":
        return orig
    orig = getattr(model, "_torchdynamo_orig_callable", None)  # torch.compile(function)
    return orig if orig is not None and callable(orig) else model


def trace(model: torch.nn.Module | Any, *args: Any, **kwargs: Any) -> Graph:
    """Run ``model(*args, **kwargs)`` once and record every ATen operation it executes.

    ``model`` may be an ``nn.Module`` or any callable (then no module paths or parameter names are
    known, and tensors it closes over are constants). A ``torch.compile``'d model is recorded through
    its original module (``model._orig_mod``): compiled kernels cannot be recorded op by op, and they
    compute the same function.

    The model is never modified: parameters, ``requires_grad`` flags, buffers (batch-norm running
    statistics in train mode included), training modes and hooks are as before, also when the forward
    pass raises, and other threads may use the same model meanwhile. A model in training mode is
    recorded as it runs (dropout masks drawn once become constants; batch statistics are used) with a
    warning. Recording is not re-entrant within one thread (a forward that itself calls ``trace``).

    A custom ``torch.autograd.Function`` becomes one region node (``node.region.kind ==
    "autograd_function"``, packet = the Function's class name) whose VJP is the Function's own
    ``backward``; the graph keeps that Function's autograd node (and what it saved, with the autograd
    history before it) alive while the graph lives.

    A dict as the only argument holds keyword arguments, as in :func:`relprop.explain`:
    ``trace(model, {"input_ids": ids})`` runs ``model(input_ids=ids)``. To pass a dict as one argument,
    name that argument: ``trace(model, batch=d)``.
    """
    if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
        _check_keywords(model, args[0])
        return record(model, (), dict(args[0]))
    return record(model, args, kwargs)


def _check_keywords(model: Any, inputs: Mapping) -> None:
    """A clear error when ``model`` does not take the dict's keys as keyword arguments."""
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call say it
        return
    try:
        sig.bind(**inputs)
    except TypeError as err:
        first = next(iter(sig.parameters), "inputs")
        raise TypeError(
            f"relprop.trace(model, inputs): a dict is the model's keyword arguments (model(**inputs)), as in "
            f"relprop.explain, and {type(model).__name__} does not take them ({err}); to pass the dict as one "
            f"argument, name it: relprop.trace(model, {first}=inputs)"
        ) from None


def record(
    model: torch.nn.Module | Any,
    args: tuple,
    kwargs: dict,
    post: Any = None,
    warn: bool = True,
    release: Callable[[Node], bool] | None = None,
) -> Graph:
    """:func:`trace` with explicit arguments; ``post(output)`` runs inside the recording too.

    ``warn=False``: no training-mode warning (for a method that recorded many forwards and warned once).
    ``release(node) -> bool``: a policy (the rule set's) naming recorded nodes whose outputs the tape need
    not hold; their data is dropped right away and recomputed from the node's inputs if a rule reads it
    (same op, same inputs: same bits), so a large intermediate a rule rarely reads (attention scores) is
    freed during the forward as without a recording. A relprop.plan's replay frees them too.
    """
    with torch.inference_mode(False):
        return _record(_unwrap_compiled(model), args, kwargs, post, warn, release)


#: What a recording in training mode explains (:func:`warn_training`'s default).
RECORDED_IN_TRAINING = (
    "the explanation is of this one forward: the dropout masks it draws are recorded as constants, and batch "
    "norm normalises with the statistics of these inputs (its running statistics are left unchanged)"
)


#: Set while a method that runs other methods has warned once for its whole call (:func:`training_warned`);
#: a context variable, so per thread and per task (no process-wide state).
_TRAINING_WARNED: contextvars.ContextVar[bool] = contextvars.ContextVar("relprop_training_warned", default=False)


@contextmanager
def training_warned():
    """Within: :func:`warn_training` stays silent (it still returns whether the model is in training mode);
    for a method that warned once for its whole call and then runs other methods (the noise tunnel)."""
    token = _TRAINING_WARNED.set(True)
    try:
        yield
    finally:
        _TRAINING_WARNED.reset(token)


def warn_training(model: Any, what: str = RECORDED_IN_TRAINING, who: str = "relprop", stacklevel: int = 3) -> bool:
    """The one training-mode warning (the trace's and every method's): warn when a module of ``model`` is in
    training mode, saying ``what`` that means for ``who``'s result and how to avoid it; return whether a module is
    in training mode (it warned, or stayed silent within :func:`training_warned`).

    Dropout and batch norm are named first; any module counts, since a forward may branch on
    ``self.training`` itself (functional dropout in Hugging Face attention, stochastic depth).
    """
    if not isinstance(model, torch.nn.Module):
        return False
    names = [(n or type(m).__name__, m) for n, m in model.named_modules() if m.training]
    if not names:
        return False
    if _TRAINING_WARNED.get():
        return True
    kinds = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)
    noted = [repr(n) for n, m in names if isinstance(m, kinds)] or [repr(n) for n, _ in names]
    shown = ", ".join(noted[:3]) + (" ..." if len(noted) > 3 else "")
    warnings.warn(
        f"{who}: the model is in training mode ({len(names)} module{'s' if len(names) > 1 else ''}, e.g. {shown}): "
        f"{what}. Call model.eval() to explain the model's predictions.",
        UserWarning,
        stacklevel=stacklevel,
    )
    return True


def _record(model, args: tuple, kwargs: dict, post: Any, warn: bool = True, release: Any = None) -> Graph:
    module = model if isinstance(model, torch.nn.Module) else None
    names: dict[int, str] = {}
    module_names: dict[int, str] = {}
    leaves: list[torch.Tensor] = []
    if module is not None:
        for n, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), f"param:{n}")
            leaves.append(p)
        for n, b in module.named_buffers(remove_duplicate=False):
            names.setdefault(id(b), f"buffer:{n}")
            leaves.append(b)
        for n, m in module.named_modules(remove_duplicate=False):
            module_names.setdefault(id(m), n)
    if warn:
        warn_training(model, stacklevel=5)
    rec = _Recorder(names, module_names, leaves, release)
    input_values: list[Value] = []
    args2, arg_spec = _prepare_inputs(tuple(args), rec, input_values)
    kwargs2, kw_spec = _prepare_inputs(dict(kwargs), rec, input_values)
    with torch.inference_mode(False), torch.enable_grad(), _module_scope(rec):
        with rec:
            try:
                output = model(*args2, **kwargs2)
            except RuntimeError as err:
                reworded = _inference_leaves(err, leaves, names)
                if reworded is err:
                    raise
                raise reworded from err
            if post is not None:
                output = post(output)
        flat = _flatten(output, [])
        output_values = [rec.lookup(t) for t in flat]
        for v, t in zip(output_values, flat):  # a released output is alive (returned): the tape holds it now
            if v.data is None and v.index in rec.released and rec.released[v.index]() is t:
                v.data = t
        regions = rec.finish()
    # The output's autograd history would keep every tensor autograd saved alive (the whole
    # forward): the graph holds detached data only.
    output = _detached(output)
    for v in rec.values:  # drop autograd history: the graph holds data only
        if v.data is not None and v.data.requires_grad:
            v.data = v.data.detach()
    rec.keep.clear()
    rec.released.clear()  # (the weak references' callbacks hold the recorder: not after this call)
    rec.pending.clear()
    rec.nograd_outputs.clear()
    rec.edge_values.clear()
    rec.shadow.clear()
    rec.rewritten.clear()
    rec.straight.clear()
    params = {v.name: v for v in rec.values if v.kind == "param" and v.name is not None}
    graph = Graph(
        rec.nodes, rec.values, input_values, (arg_spec, kw_spec), output, output_values, params, dict(rec.module_types)
    )
    if module is not None:
        graph.module_types.update({n: type(m) for n, m in module.named_modules()})
    return replace_with_regions(graph, regions)
