"""Record a model's forward pass as a graph of ATen operations.

Why a ``TorchDispatchMode`` tape: it sees every operation that actually runs, below every Python
abstraction (functional calls, reused modules, custom attention code, in-place ops), and works on
models that ``torch.fx``/``torch.export`` cannot capture. What it takes to make the tape exact:

* Autograd stays on while recording (float inputs require grad), because under ``no_grad`` PyTorch
  picks inference-only kernels that have no derivative (fused multi-head attention, ...).
* A tensor's identity is its Python object *and* the content of its storage: an in-place write to
  a storage makes every alias of it a new value. Each storage gets a version counter bumped when
  an op's schema says it writes (``alias_info.is_write``); stale aliases are re-derived from the
  storage's latest content with ``as_strided`` so gradients flow through the write.
* Before a write, the storage is snapshotted and recorded values that alias it are re-pointed at
  the snapshot, so every value keeps the data it had when it was produced.
* Module paths come from process-wide forward hooks installed only for the duration of the call:
  the model itself is never modified.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .graph import Graph, Node, Value

aten = torch.ops.aten

#: Ops whose float output depends on an integer index operand (token ids -> embeddings).
_INDEXING_PACKETS = {"embedding", "embedding_bag", "index_select", "index", "gather", "take", "_embedding_bag"}


class TraceError(RuntimeError):
    """Raised when a forward pass cannot be recorded faithfully."""


@functools.cache
def _op_info(func: torch._ops.OpOverload) -> tuple[tuple[int, ...], tuple[str, ...], Any, bool]:
    """(written positional indices, written kwarg names, functional counterpart, metadata-only write)."""
    schema = func._schema
    pos, kw = [], []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            (kw if a.kwarg_only else pos).append(a.name if a.kwarg_only else i)
    if not pos and not kw:
        return (), (), None, False
    functional = None
    name = func.overloadpacket.__name__
    if name.endswith("_") and not kw:
        packet = getattr(aten, name[:-1], None)
        if packet is not None:
            try:
                functional = (
                    packet.overload(func._overloadname)
                    if hasattr(packet, "overload")
                    else getattr(packet, func._overloadname)
                )
            except AttributeError:
                functional = getattr(packet, func._overloadname, None)
    metadata_only = False
    if functional is not None:
        rets = functional._schema.returns
        metadata_only = bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write
    return tuple(pos), tuple(kw), functional, metadata_only


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


class _Storage:
    """Per-storage bookkeeping: version, the value holding the whole storage, aliases to re-point."""

    __slots__ = ("version", "owner", "values")

    def __init__(self) -> None:
        self.version = 0
        self.owner: Value | None = None  # a value covering the whole storage at ``version``
        self.values: list[Value] = []


class _Recorder(TorchDispatchMode):
    def __init__(self, names: dict[int, str], module_names: dict[int, str]) -> None:
        super().__init__()
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
        return self.add_node(aten.as_strided.default, node_args, {}, [root], [t.detach()])[0]

    def root(self, st: _Storage) -> Value:
        """A flat value spanning the whole storage at its current version."""
        owner = st.owner
        if owner is not None and self.version_of.get(owner.index) == st.version:
            t = owner.tensor
            if t.dim() == 1 and t.stride() == (1,) and t.storage_offset() == 0:
                return owner
            n = t.untyped_storage().nbytes() // t.element_size()
            flat = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, (n,), (1,))
            return self.add_node(aten.as_strided.default, (owner, [n], [1], 0), {}, [owner], [flat])[0]
        # No value covers the storage: start from a constant snapshot and scatter in the freshest alias.
        fresh = [v for v in st.values if self.version_of.get(v.index) == st.version]
        some = max(fresh, key=lambda v: v.tensor.numel()) if fresh else None
        base = some.tensor if some is not None else None
        if base is None:
            raise TraceError("internal: storage without any recorded value")
        n = base.untyped_storage().nbytes() // base.element_size()
        flat = torch.empty(0, dtype=base.dtype, device=base.device).set_(base.untyped_storage(), 0, (n,), (1,))
        const = self.new_value(flat.clone(), "constant")
        args = (const, some, list(base.shape), list(base.stride()), base.storage_offset())
        return self.add_node(aten.as_strided_scatter.default, args, {}, [const, some], [flat])[0]

    # ---------------------------------------------------------------- nodes
    def add_node(self, op, args, kwargs, inputs: list[Value], outs: list[Any]) -> list[Value | None]:
        scope = self.scope[-1] if self.scope else ""
        node = Node(len(self.nodes), op, args, kwargs, inputs, [], scope, self.module_types.get(scope))
        # Float values depend on the inputs through float activations (or a lookup indexed by token ids);
        # integer values derived from token ids (views, position ids) stay tied to them, but a float cast
        # of an integer input (an attention mask) is not an activation.
        act = any(v.is_activation and v.is_float for v in inputs)
        int_act = any(v.is_activation for v in inputs)
        if not act and node.packet in _INDEXING_PACKETS:
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
        when needed); leaves (inputs, parameters) cannot be, so they get a copy.
        """
        key = _storage_key(t)
        st = self.storages.get(key) if key is not None else None
        if st is None:
            return
        snap = None
        for v in st.values:
            if v.producer is not None:
                v.data = None
                continue
            if snap is None:
                snap = t.untyped_storage().clone()
            old = v.data
            v.data = torch.empty(0, dtype=old.dtype, device=old.device).set_(
                snap, old.storage_offset(), old.shape, old.stride()
            )
        st.values = []

    # ---------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pos, kw, functional, metadata_only = _op_info(func)
        if not pos and not kw:
            inputs: list[Value] = []
            margs = self.map_args(args, inputs)
            mkwargs = {k: self.map_args(v, inputs) for k, v in kwargs.items()}
            out = func(*args, **kwargs)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            self.add_node(func, margs, mkwargs, inputs, outs)
            return out
        return self.dispatch_write(func, args, kwargs, pos, kw, functional, metadata_only)

    def dispatch_write(self, func, args, kwargs, pos, kw, functional, metadata_only):
        written = [args[i] for i in pos if i < len(args)] + [kwargs[k] for k in kw if k in kwargs]
        written = [t for t in written if isinstance(t, torch.Tensor)]
        if functional is None:
            # out= overloads and writes without a functional twin: fine on constants, not on activations.
            inputs: list[Value] = []
            self.map_args(args, inputs)
            for v in kwargs.values():
                self.map_args(v, inputs)
            if any(v.is_activation for v in inputs) and func is not aten.copy_.default:
                raise TraceError(
                    f"cannot record in-place/out= operation {func} on a tensor derived from the model inputs "
                    f"(module '{self.scope[-1] if self.scope else ''}'): no functional counterpart is known"
                )
        if func is aten.copy_.default:
            functional = aten.copy.default
        inputs = []
        margs = self.map_args(args, inputs)
        mkwargs = {k: self.map_args(v, inputs) for k, v in kwargs.items()}
        target = written[0]
        if metadata_only:
            out = func(*args, **kwargs)
            outs = self.add_node(functional, margs, mkwargs, inputs, [target.detach()])
            self.by_id[id(target)] = outs[0]
            return out
        partial = not _covers_storage(target)
        key = _storage_key(target)
        st = self.storages.get(key)
        old_root = self.root(st) if (partial and st is not None) else None
        self.invalidate(target)
        out = func(*args, **kwargs)
        if st is not None:
            st.version += 1
        new = self.add_node(functional, margs, mkwargs, inputs, [target.detach()])[0]
        if partial and old_root is not None:
            n = target.untyped_storage().nbytes() // target.element_size()
            live = torch.empty(0, dtype=target.dtype, device=target.device).set_(
                target.untyped_storage(), 0, (n,), (1,)
            )
            geo = (list(target.shape), list(target.stride()), target.storage_offset())
            root = self.add_node(aten.as_strided_scatter.default, (old_root, new, *geo), {}, [old_root, new], [live])[0]
            st.owner = root
        self.by_id[id(target)] = new
        return out


@contextmanager
def _module_scope(recorder: _Recorder, model: torch.nn.Module):
    """Track the module path of every op via process-wide hooks that never touch the model."""
    names = recorder.module_names
    stack = recorder.scope

    def pre(module, _args):
        name = names.get(id(module))
        if name is not None:
            stack.append(name)
            recorder.module_types.setdefault(name, type(module))

    def post(module, _args, _out):
        if names.get(id(module)) is not None and stack:
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
        pairs = [_prepare_inputs(v, recorder, values) for v in obj]
        return type(obj)(p[0] for p in pairs), type(obj)(p[1] for p in pairs)
    return obj, obj


@contextmanager
def preserved(model: torch.nn.Module):
    """Restore parameters' ``requires_grad`` and modules' training flags, also on error."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, rg in flags:
            p.requires_grad_(rg)
        for m, tr in modes:
            m.training = tr


def trace(model: torch.nn.Module | Any, *args: Any, **kwargs: Any) -> Graph:
    """Run ``model(*args, **kwargs)`` once and record every ATen operation it executes.

    ``model`` may be an ``nn.Module`` or any callable (then no module paths or parameter names are
    known, and tensors it closes over are constants). The model's parameters, ``requires_grad``
    flags and training modes are the same afterwards, also when the forward pass raises.
    """
    return record(model, args, kwargs)


def record(model: torch.nn.Module | Any, args: tuple, kwargs: dict, post: Any = None) -> Graph:
    """:func:`trace` with explicit arguments; ``post(output)`` runs inside the recording too."""
    with torch.inference_mode(False):
        return _record(model, args, kwargs, post)


def _record(model, args: tuple, kwargs: dict, post: Any) -> Graph:
    module = model if isinstance(model, torch.nn.Module) else None
    names: dict[int, str] = {}
    module_names: dict[int, str] = {}
    if module is not None:
        for n, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), f"param:{n}")
        for n, b in module.named_buffers(remove_duplicate=False):
            names.setdefault(id(b), f"buffer:{n}")
        for n, m in module.named_modules(remove_duplicate=False):
            module_names.setdefault(id(m), n)
    rec = _Recorder(names, module_names)
    input_values: list[Value] = []
    args2, arg_spec = _prepare_inputs(tuple(args), rec, input_values)
    kwargs2, kw_spec = _prepare_inputs(dict(kwargs), rec, input_values)
    has_float = any(v.is_float for v in input_values)
    with preserved(module if module is not None else torch.nn.Module()):
        if module is not None:
            # Grad must be on for the autograd kernels, but only one side needs it: the inputs when they
            # are float, else the parameters (token models), so attention never takes inference paths.
            for p in module.parameters():
                p.requires_grad_(not has_float)
        with torch.inference_mode(False), torch.enable_grad(), _module_scope(rec, module or torch.nn.Module()):
            with rec:
                output = model(*args2, **kwargs2)
                if post is not None:
                    output = post(output)
        output_values = [rec.lookup(t) for t in _flatten(output, [])]
        # The output's autograd history would keep every tensor autograd saved alive (the whole
        # forward): the graph holds detached data only.
        output = _detached(output)
    for v in rec.values:  # drop autograd history: the graph holds data only
        if v.data is not None and v.data.requires_grad:
            v.data = v.data.detach()
    rec.keep.clear()
    params = {v.name: v for v in rec.values if v.kind == "param"}
    graph = Graph(
        rec.nodes, rec.values, input_values, (arg_spec, kw_spec), output, output_values, params, dict(rec.module_types)
    )
    if module is not None:
        graph.module_types.update({n: type(m) for n, m in module.named_modules()})
    return graph
