"""Pay for recording once per input shape: a caller-owned plan that replays the recorded op sequence.

Why: :func:`relprop.explain` records every batch with a ``TorchDispatchMode`` tape, which costs tens of
microseconds of Python per ATen op, although a dataset run executes the same op sequence batch after
batch. A :class:`Plan` records once, then, for a batch that looks the same, re-runs each recorded
node's ATen op on the new tensors in order (parameters and buffers read live from the model) and hands
the result to the usual graph preparation and reverse pass. The plan is an object the caller holds: no
hidden cache, nothing process-wide, and dropping the plan frees the recording.

What the plan checks before (and while) replaying; anything that differs makes it record again
(transparently: :attr:`Plan.rerecords` counts it, :attr:`Plan.last_reason` says why):

* the inputs' structure, shapes, strides, dtypes and devices, which inputs share a storage, and any
  non-tensor input (by value for numbers/strings/dtypes/devices, by identity for other objects). Storage
  offsets only where the recording holds an op that reads absolute offsets (``as_strided``, ``set_``...,
  :data:`_OFFSET_OPS`; the recorder itself emits ``as_strided`` to re-derive an alias after an in-place
  write): every other op reads its input relative to the input's offset, so batches sliced from one
  tensor (``X[i:i + 16]``) replay;
* the ``training`` flag (and identity) of every module, and its forward (pre-)hooks and the global ones;
* every parameter and buffer: the object, its ``_version`` (bumped by in-place edits such as
  ``p.mul_()`` / ``p.copy_()`` under ``torch.no_grad()``), its data pointer, shape and dtype. A forward
  that writes a buffer in place (batch norm's ``num_batches_tracked`` in training mode) has the write
  redirected to a private copy by every recording, but autograd still bumps the buffer's ``_version``:
  the plan notes which tensors its recording bumped, with their content, and takes a later bump of
  one of them (by ``relprop.explain`` or a ``verify`` recording) as no edit while the content is equal;
* the autocast state and default dtype, and (for a callable ``target``, whose ops are part of the
  recording) the identity of the callable (held by the plan, so a new lambda never passes for an old one);
* during the replay: every value the forward read back into Python through an ATen op
  (``.item()``, ``bool(t)``, ``int(t)`` -> ``aten._local_scalar_dense``, ``torch.equal``...) must equal the
  recorded one, and every op output must have the recorded shape, dtype and strides (this catches
  data-dependent shapes such as ``nonzero``'s). A replay that diverges is abandoned for a recording.

What it cannot see (document it for your model, or use ``verify=True`` / ``verify_every=N``, which record
again and compare the op sequence and every value with the replay, warning on a mismatch):

* branches on Python state that is not a tensor read: a flag attribute on the model, a global, the
  time, a random module choice made with Python's ``random``, what a callable target closes over;
* tensor data read without an ATen op: ``.tolist()`` and ``.numpy()`` read memory directly;
* tensors captured as constants that are not parameters or buffers (plain tensor attributes, closure
  tensors) are read live, like parameters, but their edits are not checked;
* an edit through ``p.data`` (``p.data.mul_(2)``) does not bump ``p._version``: the replay reads the
  parameter live, so the result is still that of the edited model, but no re-recording happens;
* random draws from an explicit ``torch.Generator`` (draws from the default generators are seen).

Random forwards: if the recording drew random numbers from the default CPU/CUDA generator (dropout in
training mode, ``torch.randn`` in ``forward``), the plan never replays it -- reusing the drawn mask would
explain a forward that did not run. Every call then records (``Plan.replayable`` is False and
``Plan.last_reason`` says why), so the result is what :func:`relprop.explain` gives. The same holds for a
forward containing a custom ``torch.autograd.Function`` (its backward can only be evaluated at the
recorded inputs).
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .canonical import _is_eval_bn
from .graph import Graph, Node, Value
from .methods._validate import validate_call
from .methods.core import Explanation, Inputs, Target, run_backward, split_inputs
from .rules.attention import note_normal, release_scores
from .rules.composites import Composite, GradientComposite, resolve_composite
from .trace import _flatten, _storage_key, _unwrap_compiled, record, warn_training

__all__ = ["Plan", "PlanMismatch", "plan"]

aten_ops = torch.ops.aten

_UNSET: Any = object()
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


class _Slot:
    """Placeholder for the i-th output value in an output skeleton."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


@dataclass
class _Template:
    """What one recording leaves behind for replays: structure and checks, not activations."""

    graph: Graph  # the recording (its activation data is released by the reverse pass; structure kept)
    signature: tuple
    constants: dict[int, torch.Tensor]  # constant value index -> its tensor (live object where it was one)
    leaves: list[tuple[int, str | None]]  # (value index, "param"/"buffer" name) read live from the model
    strides: dict[int, tuple[int, ...] | None]
    scalars: dict[int, tuple]  # node index -> the non-tensor results the forward read back
    skeleton: Any  # the output structure with _Slot(i) for output value i
    target: Any  # a callable target, held so that its id (in the signature) cannot be reused by another object
    steps: list[_Step]  # the nodes, precompiled for replay
    replayable: bool
    reason: str | None
    # Parameters/buffers whose version counter the recording bumped without changing them (a write the
    # recorder redirected to a private copy: batch norm's num_batches_tracked in training mode) -> a copy
    # of their content. A later bump of one of them is accepted where the content still equals the copy.
    bumped: dict[str, torch.Tensor] = field(default_factory=dict)
    # Whether the signature holds the inputs' storage offsets (the recording reads absolute offsets).
    offsets: bool = True
    # Batch-norm outputs the replay holds instead of the norms' inputs (:func:`_norm_swaps`).
    held_norms: set[int] = field(default_factory=set)


class PlanMismatch(RuntimeWarning):
    """``verify``: the replay and a fresh recording of the same batch differed (the plan records again)."""


class Plan:
    """A recording of ``model`` for one input shape, replayed for later batches that look the same.

    Made by :func:`relprop.plan`; see the module docstring for what is checked and what is not.
    Attributes: ``records`` (recordings made, the first included), ``rerecords`` (recordings after the
    first because something differed or the forward is random), ``replays``, ``mismatches``
    (``verify`` found the replay wrong), ``last_reason`` (why the latest call recorded), ``replayable``.
    A plan is not shared state: calls on one plan are serialised by a lock; use one plan per thread
    for parallelism.
    """

    def __init__(
        self,
        model: Any,
        *,
        method: str,
        composite: Composite,
        times_output: bool,
        target: Target,
        verify: bool,
        verify_every: int,
        release: Callable[[Node], bool] | None = None,
    ) -> None:
        self.model = model
        self.method = method
        self.composite = composite
        self.times_output = times_output
        self.target = target
        self.verify = bool(verify)
        self.verify_every = int(verify_every or 0)
        #: The recordings' release policy (:func:`relprop.trace.record`); the replay frees what they released.
        self.release = release
        self.records = 0
        self.rerecords = 0
        self.replays = 0
        self.mismatches = 0
        self.last_reason: str | None = None
        self._calls = 0
        self._template: _Template | None = None
        self._callable: Any = None  # the callable target of the call in progress
        self._lock = threading.Lock()

    @property
    def replayable(self) -> bool:
        """False when the current recording is random or holds a custom autograd Function."""
        return self._template is not None and self._template.replayable

    # ------------------------------------------------------------------ public
    def explain(
        self,
        inputs: Inputs,
        *,
        target: Target = _UNSET,
        layers: Sequence[str] | None = None,
        keep_graph: bool = False,
        params: bool | Sequence[str] = False,
    ) -> Explanation:
        """The same :class:`~relprop.Explanation` as ``relprop.explain(model, inputs, target=..., method=...)``.

        ``target`` defaults to the plan's. A batch that matches the recording is replayed, anything else
        is recorded (and becomes the plan's recording for the next batches).
        """
        target = self.target if target is _UNSET else target
        with self._lock, torch.inference_mode(False):
            self._calls += 1
            key = id(target) if callable(target) and not isinstance(target, torch.Tensor) else None
            self._callable = target if key is not None else None

            def recorder(model: Any, args: tuple, kwargs: dict, post: Any = None, release: Any = None) -> Graph:
                # The plan's own policy governs its recordings and replays (set at ``relprop.plan``). A kept graph
                # holds every value, as ``relprop.explain(keep_graph=True)``'s does (run_backward asks for no
                # release): that call records without the policy and leaves the plan's recording as it is.
                if keep_graph and self.release is not None:
                    self.last_reason = "keep_graph=True: recorded holding every value"
                    return record(model, args, kwargs, post=post, release=None)
                return self._graph_for(model, args, kwargs, post, key)

            return run_backward(
                self.model,
                inputs,
                target=target,
                composite=self.composite,
                method=self.method,
                times_output=self.times_output,
                layers=layers,
                keep_graph=keep_graph,
                params=params,
                recorder=recorder,
            )

    # ------------------------------------------------------------------ recording / replay
    def _record(
        self,
        model: Any,
        args: tuple,
        kwargs: dict,
        post: Any,
        key: int | None,
        reason: str | None,
        sig0: tuple | None = None,
    ) -> Graph:
        """Record, and make the recording the plan's; ``sig0``: the signature taken just before (if at hand)."""
        if sig0 is None:
            sig0, _ = _signature(model, args, kwargs, key)
        before = _rng_state()
        graph = record(model, args, kwargs, post=post, release=self.release)
        random = _rng_state() != before
        # Taken after recording: the recording may bump version counters of buffers it never changes
        # (batch norm's num_batches_tracked in training mode); those tensors are noted with their content.
        offsets = _reads_offsets(graph)
        sig, live = _signature(model, args, kwargs, key, offsets)
        self.records += 1
        if self.records > 1:
            self.rerecords += 1
        self._template = _template(graph, sig, random, self._callable, offsets, self.composite)
        self._template.bumped = _bumped(sig0, sig, live)
        self.last_reason = reason if self._template.replayable else self._template.reason
        return graph

    def _graph_for(self, model: Any, args: tuple, kwargs: dict, post: Any, target_key: int | None) -> Graph:
        tpl = self._template
        sig, live = _signature(model, args, kwargs, target_key, tpl is None or tpl.offsets)
        # (``sig`` doubles as the signature before a recording: only its version counters are compared there)
        if tpl is None:
            return self._record(model, args, kwargs, post, target_key, "first recording", sig)
        if not tpl.replayable:  # (the reason is the new recording's own where it cannot replay either)
            why = tpl.reason if sig == tpl.signature else _what_differs(tpl.signature, sig)
            return self._record(model, args, kwargs, post, target_key, why, sig)
        if sig != tpl.signature:
            if not _own_bumps(tpl, sig, live):
                return self._record(model, args, kwargs, post, target_key, _what_differs(tpl.signature, sig), sig)
            tpl.signature = sig  # only recordings' bumps (another explain, a verify) since: content unchanged
        notes: dict[int, bool | None] = {}  # this replay's own (never the recording's)
        env, why = _replay(tpl, args, kwargs, live, notes)
        if env is None:
            return self._record(model, args, kwargs, post, target_key, why, sig)
        verify = self.verify or (self.verify_every > 0 and self._calls % self.verify_every == 0)
        if verify:
            sig0 = sig
            before = _rng_state()
            fresh = record(model, args, kwargs, post=post, release=self.release)
            random = _rng_state() != before
            offsets = _reads_offsets(fresh)
            sig, live = _signature(model, args, kwargs, target_key, tpl.offsets or offsets)
            diff = _compare(tpl.graph, env, fresh, tpl.held_norms)
            if diff is not None:
                self.mismatches += 1
                warnings.warn(
                    f"relprop.plan: the replay differs from a fresh recording of the same batch ({diff}); the "
                    "forward depends on something the plan cannot see (see relprop.plan's docstring). Using the "
                    "fresh recording and recording again from now on when needed.",
                    PlanMismatch,
                    stacklevel=4,
                )
                self.records += 1
                self.rerecords += 1
                self.last_reason = f"verify: {diff}"
                self._template = _template(fresh, sig, random, self._callable, offsets, self.composite)
                self._template.bumped = _bumped(sig0, sig, live)
                return fresh
            tpl.signature = sig  # this verify recording's own version bumps (contents unchanged)
        self.replays += 1
        self.last_reason = None
        if isinstance(model, torch.nn.Module) and any(m[1] for m in sig[1]):  # the signature has every flag
            warn_training(model, stacklevel=5)  # as a recording warns (trace.record)
        return _instantiate(tpl, env, notes)


def plan(
    model: Any,
    example_inputs: Inputs,
    *,
    method: str = "lrp",
    target: Target = None,
    verify: bool = False,
    verify_every: int = 0,
    release: Callable[[Node], bool] | None = None,
    **options: Any,
) -> Plan:
    """Record ``model`` on ``example_inputs`` once and return a :class:`Plan` that replays it.

    ``plan.explain(batch, target=...)`` returns what ``relprop.explain(model, batch, target=...,
    method=method, **options)`` returns; batches with the example's shapes (and an unchanged model) are
    replayed without the recording's per-op bookkeeping. ``method`` is ``"lrp"`` (with ``composite=`` and
    its options) or ``"gradient"``. ``verify=True`` records every call as well and compares (a safety net
    for forwards that branch on what the plan cannot see); ``verify_every=N`` does so every N-th call.
    ``release(node) -> bool``: nodes whose outputs the recordings need not hold (see
    :func:`relprop.trace.record`); the replay frees them after their last use in the forward too, and a
    rule that reads one recomputes it (equal bits, tests/test_plan_release.py). The default is what
    :func:`relprop.explain` uses, :func:`relprop.rules.attention.release_scores` (eager attention's scaled
    and masked scores); ``release=lambda node: False`` holds everything.
    """
    if release is None:
        release = release_scores
    if method == "lrp":
        comp = resolve_composite(options.pop("composite", "epsilon"), options)
        times_output = True
    elif method == "gradient":
        if options:
            raise ValueError(f"method='gradient' takes no options, got {sorted(options)}")
        comp = GradientComposite()
        times_output = False
    else:
        raise ValueError(
            f"relprop.plan supports method='lrp' and method='gradient', not {method!r}: call "
            f"relprop.explain(model, inputs, method={method!r}, ...) for it"
        )
    if verify_every < 0:
        raise ValueError(f"verify_every must be >= 0, got {verify_every}")
    model = _unwrap_compiled(model)
    p = Plan(
        model,
        method=method,
        composite=comp,
        times_output=times_output,
        target=target,
        verify=verify,
        verify_every=verify_every,
        release=release,
    )
    batch = validate_call(model, example_inputs, target)
    args, kwargs = split_inputs(example_inputs)
    key = id(target) if callable(target) and not isinstance(target, torch.Tensor) else None
    post = None
    if key is not None:
        from .methods.core import check_callable_score

        p._callable = fn = target
        assert callable(fn)

        def post(output):
            return check_callable_score(fn(output), batch)

    with torch.inference_mode(False):
        graph = p._record(model, args, kwargs, post, key, "first recording")
    for v in graph.values:  # the example's activations are not needed: only the structure is kept
        v.data = None
    return p


# ---------------------------------------------------------------------- signature
#: Ops that read absolute storage offsets (or a storage itself): the same op on an input at another
#: offset reads other memory. Every other ATen op reads its inputs relative to their offsets.
_OFFSET_OPS = frozenset({"as_strided", "as_strided_", "as_strided_copy", "as_strided_scatter", "set_", "_set"})


def _reads_offsets(graph: Graph) -> bool:
    """Does the recording hold an op whose result depends on its inputs' absolute storage offsets?"""
    return any(n.packet in _OFFSET_OPS for n in graph.nodes)


def _describe(obj: Any, out: list, offsets: bool = True) -> None:
    if isinstance(obj, torch.Tensor):
        offset = obj.storage_offset() if offsets else None
        out.append(("T", obj.shape, obj.stride(), offset, obj.dtype, obj.device, obj.layout))
    elif isinstance(obj, dict):
        out.append(("D", tuple(obj.keys())))
        for v in obj.values():
            _describe(v, out, offsets)
    elif isinstance(obj, (list, tuple)):
        out.append(("L", type(obj), len(obj)))
        for v in obj:
            _describe(v, out, offsets)
    elif isinstance(obj, _PLAIN):
        out.append(("P", type(obj), obj))
    else:
        out.append(("O", id(obj)))


def _sharing(args: tuple, kwargs: dict) -> tuple:
    """Per input tensor, the index of the first input tensor on the same storage: which inputs alias.

    Why: the recorder re-derives a stale alias from its storage's root value after an in-place write; on
    inputs that no longer share a storage (or newly do) that replay would read the wrong memory.
    """
    first: dict[Any, int] = {}
    out = []
    for i, t in enumerate(_flatten((tuple(args), dict(kwargs)), [])):
        key = _storage_key(t)
        out.append(i if key is None else first.setdefault(key, i))
    return tuple(out)


def _signature(
    model: Any, args: tuple, kwargs: dict, target_key: int | None, offsets: bool = True
) -> tuple[tuple, dict]:
    """What the plan compares between calls, and the model's live parameters/buffers by name.

    ``offsets``: whether the inputs' storage offsets count (see :func:`_reads_offsets`).
    """
    inputs: list = []
    _describe((tuple(args), dict(kwargs)), inputs, offsets)
    inputs.append(("S", _sharing(args, kwargs)))
    live: dict[str, torch.Tensor] = {}
    modules: tuple = ()
    tensors: list = []
    if isinstance(model, torch.nn.Module):
        # One walk over the modules (every module under each of its names, as named_parameters(remove_duplicate=
        # False) walks them), not one each for the modules, the parameters and the buffers: it runs every call.
        # A hook added or removed changes what the forward runs: its handle ids are part of the signature.
        mods = []
        for prefix, m in model.named_modules(remove_duplicate=False):
            mods.append((id(m), m.training, tuple(m._forward_pre_hooks), tuple(m._forward_hooks)))
            for members in (m._parameters, m._buffers):
                for k, t in members.items():
                    if t is None:
                        continue
                    n = f"{prefix}.{k}" if prefix else k
                    live[n] = t
                    tensors.append((n, id(t), t._version, t.data_ptr(), t.shape, t.dtype, t.device))
        modules = tuple(mods)
    else:
        modules = (("callable", id(model)),)
    hooks = torch.nn.modules.module
    autocast = (
        torch.is_autocast_enabled("cpu"),
        torch.is_autocast_enabled("cuda"),
        torch.get_default_dtype(),
        tuple(hooks._global_forward_pre_hooks),
        tuple(hooks._global_forward_hooks),
    )
    return (tuple(inputs), modules, tuple(tensors), autocast, target_key), live


def _bumped(before: tuple, after: tuple, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors whose version counter changed between two signatures, with a copy of their content."""
    old = {t[0]: t[2] for t in before[2]}
    return {t[0]: live[t[0]].detach().clone() for t in after[2] if old.get(t[0], t[2]) != t[2]}


def _own_bumps(tpl: _Template, sig: tuple, live: dict[str, torch.Tensor]) -> bool:
    """Does ``sig`` differ from the template's only by version bumps that recordings make (see
    :attr:`_Template.bumped`), on tensors whose content is still the recorded one?

    Why not restore the counters instead: that needs a private autograd setter on the user's tensors. A
    user's own write (``bn.num_batches_tracked.add_(1)``) changes the content and is still seen; one
    that writes back the same content changes nothing the replay could read (it reads buffers live).
    A host read (``torch.equal``) per bumped tensor, only when the counters moved.
    """
    old = tpl.signature
    if not tpl.bumped or sig[:2] != old[:2] or sig[3:] != old[3:] or len(sig[2]) != len(old[2]):
        return False
    for a, b in zip(old[2], sig[2]):
        if a == b:
            continue
        if a[:2] != b[:2] or a[3:] != b[3:] or a[0] not in tpl.bumped:
            return False
        t, saved = live[a[0]], tpl.bumped[a[0]]
        if t.dtype != saved.dtype or t.shape != saved.shape or not torch.equal(t.detach(), saved):
            return False
    return True


_PARTS = (
    "inputs (structure, shapes, strides, dtypes or devices)",
    "modules (a training flag or a module changed)",
    "parameters or buffers (replaced, or edited in place: _version)",
    "autocast state, default dtype or global module hooks",
    "the callable target",
)


_FIELDS = ("shape", "strides", "storage offset", "dtype", "device", "layout")


def _show(x: Any) -> str:
    return str(tuple(x)) if isinstance(x, (torch.Size, tuple)) else str(x)


def _inputs_differ(old: tuple, new: tuple) -> str:
    """What changed between two input descriptions: ``input 0: storage offset 0 -> 16``."""
    if len(old) != len(new) or any(a[0] != b[0] or (a[0] not in "TS" and a != b) for a, b in zip(old, new)):
        return "inputs: their structure or a non-tensor input"
    parts, k = [], 0
    for a, b in zip(old, new):
        if a[0] == "S":
            if a != b:
                parts.append(f"inputs sharing a storage: {list(a[1])} -> {list(b[1])} (first input on each one)")
            continue
        if a[0] != "T":
            continue
        for name, x, y in zip(_FIELDS, a[1:], b[1:]):
            if x != y:
                parts.append(f"input {k}: {name} {_show(x)} -> {_show(y)}")
        k += 1
    return ", ".join(parts)


def _what_differs(old: tuple, new: tuple) -> str:
    parts = [_inputs_differ(a, b) if i == 0 else name for i, (name, a, b) in enumerate(zip(_PARTS, old, new)) if a != b]
    return "changed: " + ", ".join(parts)


def _rng_state() -> tuple:
    """The default generators' states: a change during recording means the forward drew random numbers."""
    state = [bytes(torch.random.default_generator.get_state().numpy())]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            state.append(bytes(torch.cuda.get_rng_state(i).numpy()))
    return tuple(state)


# ---------------------------------------------------------------------- template
def _returns_non_tensor(op: Any) -> bool:
    schema = getattr(op, "_schema", None)
    return schema is not None and any(
        "Tensor" not in str(r.type) for r in schema.returns
    )  # int, float, bool, Scalar, int[]


def _skeleton(obj: Any, slots: dict[int, int], counter: list[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        i = counter[0]
        counter[0] += 1
        return _Slot(i)
    if isinstance(obj, dict):
        new = copy.copy(obj)
        for k in list(obj.keys()):
            new[k] = _skeleton(obj[k], slots, counter)
        return new
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_skeleton(v, slots, counter) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_skeleton(v, slots, counter) for v in obj)
    return obj


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.i]
    if isinstance(obj, dict):
        new = copy.copy(obj)
        for k in list(obj.keys()):
            new[k] = _fill(obj[k], tensors)
        return new
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_fill(v, tensors) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def _template(
    graph: Graph, sig: tuple, random: bool, target: Any, offsets: bool, composite: Composite | None = None
) -> _Template:
    """The replay's template of ``graph``; ``offsets``: :func:`_reads_offsets` of it (the caller has it at hand);
    ``composite``: the plan's rule set (see :func:`_norm_swaps`)."""
    reason = None
    if random:
        reason = "the forward draws random numbers (dropout in training mode?): every call records"
    regions = [n.region for n in graph.nodes if n.region is not None]
    if regions and reason is None:
        reason = f"the forward runs custom autograd Function '{regions[0].name}': every call records"
    constants = {v.index: v.data for v in graph.values if v.kind == "constant" and v.data is not None}
    if any(v.kind == "constant" and v.data is None for v in graph.values):
        reason = reason or "internal: a recorded constant has no data: every call records"
    leaves = [(v.index, v.name) for v in graph.values if v.kind in ("param", "buffer")]
    strides = {v.index: v.strides for v in graph.values}  # kept for values the recording released too
    scalars: dict[int, tuple] = {}
    if reason is None:
        with torch.no_grad():
            for node in graph.nodes:
                if _returns_non_tensor(node.op):
                    out = node.run([v.tensor for v in node.inputs])
                    scalars[node.index] = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    skeleton = _skeleton(graph.output, {}, [0])
    steps = [_Step(n, strides, scalars.get(n.index)) for n in graph.nodes] if reason is None else []
    # Values the recording released because an in-place op overwrote them (``relu_`` after a batch norm)
    # are released by the replay too, after their last use in the forward: the replay then holds the
    # same memory as a recording, and a rule that reads such a value recomputes it the same way.
    last: dict[int, int] = {}
    for k, n in enumerate(graph.nodes):
        for v in n.inputs:
            last[v.index] = k
    pos = {id(n): k for k, n in enumerate(graph.nodes)}
    out_idx = {v.index for v in graph.output_values}
    swaps = _norm_swaps(graph, composite, pos, out_idx) if steps else {}
    held_norms = set(swaps.values())
    for v in graph.values:
        released = (v.data is None or v.index in swaps) and v.index not in held_norms
        if steps and released and id(v.producer) in pos and v.index not in out_idx:
            steps[last.get(v.index, pos[id(v.producer)])].free.append(v.index)
    for step in steps:
        step.inplace = _inplace_twin(step)
    tpl = _Template(graph, sig, constants, leaves, strides, scalars, skeleton, target, steps, reason is None, reason)
    tpl.offsets = offsets
    tpl.held_norms = held_norms
    return tpl


def _norm_swaps(graph: Graph, composite: Composite | None, pos: dict[int, int], out_idx: set[int]) -> dict[int, int]:
    """Batch norms the rule set merges into their linear op: norm input value -> norm output value (indices).

    Why: a merged norm's rule (the linear op's, with the merged weights) reads the norm's *output* ``z`` and
    never its input ``y`` (the linear op's own output, read by the norm only). The recording holds ``y`` and
    drops ``z`` where an in-place op overwrote it (``relu_``, ``out += identity``), so each rule recomputed the
    norm from ``y`` -- a pass per norm, and ``y`` itself stayed in memory to the end of the reverse pass (no
    node of the merged graph releases it). The replay holds ``z`` instead (the op that overwrote it runs out of
    place, into the memory ``y`` leaves) and frees ``y`` after the norm: as many tensors held, no
    recomputation, and the reverse pass frees ``z`` once its rule is done. ``z`` is the norm's own output of the
    forward, so the bits are the recording's (tests/test_plan_norms.py). ``y`` is recomputed (by the linear
    op) only if something reads it (``layers=`` may not name that layer: ``methods.core.prepared_layer``).

    Only where ``y`` is held by the recording, has the norm as its one consumer, is no output, and no node of
    the rule set's prepared graph (region nodes' inner nodes included) reads it.
    """
    if composite is None or not any(_is_eval_bn(n) for n in graph.nodes):
        return {}
    prepared = composite.prepare(graph).graph
    merged = {n.index for n in prepared.nodes if "merged_batch_norm" in n.meta}
    if not merged:
        return {}
    read: set[int] = set()
    stack = list(prepared.nodes)
    while stack:
        n = stack.pop()
        read.update(v.index for v in n.inputs)
        read.update(v.index for v in n.outputs if v is not None)
        if n.region is not None:
            stack.extend(n.region.nodes)
    swaps: dict[int, int] = {}
    for lin in graph.nodes:
        if lin.index not in merged or not lin.outputs or lin.outputs[0] is None:
            continue
        y = lin.outputs[0]
        norm = y.consumers[0] if len(y.consumers) == 1 else None
        z = norm.outputs[0] if norm is not None and norm.outputs else None
        if (
            norm is None
            or z is None
            or not _is_eval_bn(norm)
            or id(norm) not in pos
            or y.data is None
            or y.index in read
            or y.index in out_idx
            or z.shape != y.shape
            or z.dtype != y.dtype
        ):
            continue
        swaps[y.index] = z.index
    return swaps


#: Ops whose (first) output is always a new tensor, never an alias of an input: an in-place write into
#: it cannot reach a leaf (an input, a parameter) or another value.
_FRESH = {"convolution", "native_batch_norm", "_native_batch_norm_legit_no_training", "addmm", "mm", "bmm"}


def _inplace_twin(step: _Step) -> Any:
    """The in-place twin (``relu_`` for ``relu``) the replay may run for ``step``, or None.

    Where the recording overwrote a value in place (``relu_`` after a batch norm, ``out += identity``),
    the replay runs the op in place too instead of allocating its output: a new large tensor costs page
    faults on top of the pass (the out-of-place ``relu`` took ~6x the in-place one's time at ResNet-50
    size). Only for a point-wise op whose first argument is a value the recording overwrote, that the
    replay frees right after this step (no later op reads it), that a non-aliasing op made (so its memory
    is no input's, parameter's or constant's), and with the output's shape and dtype. The replay checks
    at run time that no other argument shares its memory. Same kernel, same bits
    (tests/test_lrp_fast.py::test_plan_replays_in_place_writes).
    """
    node = step.node
    op = node.op
    if step.generic or not isinstance(op, torch._ops.OpOverload) or torch.Tag.pointwise not in op.tags:
        return None
    first = node.args[0] if node.args else None
    out = node.outputs[0] if len(node.outputs) == 1 else None
    if not isinstance(first, Value) or out is None or first.index not in step.free:
        return None
    prod = first.producer
    if (
        prod is None
        or first.kind != "op"
        or not (prod.packet in _FRESH or torch.Tag.pointwise in getattr(prod.op, "tags", ()))
    ):
        return None
    if first.shape != out.shape or first.dtype != out.dtype:
        return None
    packet = getattr(aten_ops, node.packet + "_", None)
    twin = getattr(packet, op._overloadname, None) if packet is not None else None
    if twin is None:
        return None
    names = [a.name for a in twin._schema.arguments]
    written = twin._schema.arguments[0].alias_info
    if names != [a.name for a in op._schema.arguments] or written is None or not written.is_write:
        return None
    return getattr(twin, "_op", twin)


def _may_write(a: list) -> bool:
    """May the in-place twin write into ``a[0]``: not a view, and no other argument shares its memory."""
    t = a[0]
    if not isinstance(t, torch.Tensor) or t._base is not None or t.requires_grad:
        return False
    ptr = t.untyped_storage().data_ptr()
    return not any(isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() == ptr for x in a[1:])


# ---------------------------------------------------------------------- replay
def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # both NaN
    return type(a) is type(b) and a == b


class _Step:
    """One recorded node, precompiled for replay: the op, its arguments with value slots, the checks."""

    __slots__ = (
        "node",
        "fn",
        "args",
        "slots",
        "lists",
        "kwargs",
        "generic",
        "outs",
        "n_outs",
        "scalar",
        "free",
        "inplace",
        "note",
        "ins",
        "outs_at",
        "names",
    )

    def __init__(self, node: Node, strides: dict[int, tuple | None], scalar: tuple | None) -> None:
        self.node = node
        self.fn = getattr(node.op, "_op", node.op)  # the C++ callable behind an OpOverload (one frame less)
        self.args = list(node.args)
        self.slots: list[tuple[int, int]] = []
        self.lists: list[tuple[int, type, list[tuple[bool, Any]]]] = []
        self.generic = any(_has_value(v) for v in node.kwargs.values())
        self.kwargs = node.kwargs
        for i, a in enumerate(node.args):
            if isinstance(a, Value):
                self.slots.append((i, a.index))
            elif isinstance(a, (list, tuple)) and any(_has_value(x) for x in a):
                if any(isinstance(x, (list, tuple, dict)) and _has_value(x) for x in a):
                    self.generic = True
                items = [(True, x.index) if isinstance(x, Value) else (False, x) for x in a]
                self.lists.append((i, type(a), items))
        self.outs = [
            (k, v.index, v.shape, v.dtype, strides.get(v.index)) for k, v in enumerate(node.outputs) if v is not None
        ]
        self.n_outs = len(node.outputs)
        self.scalar = scalar
        self.free: list[int] = []  # values to release after this step (see _template)
        self.inplace: Any = None  # the op's in-place twin where the replay may write into the first argument
        # outputs the recording noted (Value.normal: released attention scores): the replay notes its own
        self.note = [v.index for v in node.outputs if v is not None and v.normal is not None]
        # for _instantiate: the input and output value indices, and the op's names (graph._once's per-node cache,
        # filled in for each new Node instead of formatting the op's name again for every node of every call)
        self.ins = [v.index for v in node.inputs]
        self.outs_at = [None if v is None else v.index for v in node.outputs]
        self.names = {"op_name": node.op_name, "packet": node.packet}


def _has_value(obj: Any) -> bool:
    if isinstance(obj, Value):
        return True
    if isinstance(obj, (list, tuple)):
        return any(_has_value(x) for x in obj)
    if isinstance(obj, dict):
        return any(_has_value(x) for x in obj.values())
    return False


def _replay(
    tpl: _Template,
    args: tuple,
    kwargs: dict,
    live: dict[str, torch.Tensor],
    notes: dict[int, bool | None] | None = None,
):
    """Run the recorded ops on new inputs; ``(env, None)`` or ``(None, why it diverged)``.

    ``notes``: filled with :attr:`Value.normal` of the outputs the recording noted, taken from this replay's
    tensors right after their op ran (a later op may write into the memory before it is freed).
    """
    graph = tpl.graph
    env: dict[int, torch.Tensor] = dict(tpl.constants)
    new_inputs = _flatten((tuple(args), dict(kwargs)), [])
    if len(new_inputs) != len(graph.inputs):
        return None, "inputs: a different number of tensors"
    for v, t in zip(graph.inputs, new_inputs):
        if t.is_inference():
            t = t.clone()
        env[v.index] = t.detach()
    for idx, name in tpl.leaves:
        t = live.get(name) if name is not None else None
        if t is None:
            return None, f"parameter/buffer '{name}' is gone"
        env[idx] = t.detach()
    Tensor = torch.Tensor
    with torch.no_grad():
        for step in tpl.steps:
            if step.generic:
                node = step.node
                out = node.run([env[v.index] for v in node.inputs])
            else:
                a = step.args.copy()
                for i, idx in step.slots:
                    a[i] = env[idx]
                for i, kind, items in step.lists:
                    a[i] = kind([env[x] if is_value else x for is_value, x in items])
                inplace = step.inplace
                out = (inplace if inplace is not None and _may_write(a) else step.fn)(*a, **step.kwargs)
            if isinstance(out, Tensor):
                if step.n_outs != 1:
                    return None, _diverged(step, "returned a different number of outputs")
                outs: Any = (out,)
            elif isinstance(out, (tuple, list)):
                outs = out
                if len(outs) != step.n_outs:
                    return None, _diverged(step, "returned a different number of outputs")
            else:
                outs = (out,)
            if step.scalar is not None:
                seen = step.scalar
                if len(seen) != len(outs) or not all(_same_scalar(x, y) for x, y in zip(seen, outs)):
                    return None, _diverged(
                        step, f"read back a different value into Python (recorded {seen}, now {tuple(outs)})"
                    )
            for k, idx, shape, dtype, stride in step.outs:
                o = outs[k]
                if not isinstance(o, Tensor) or o.shape != shape or o.dtype != dtype:
                    got = tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__
                    return None, _diverged(
                        step, f"gave shape {got}, recorded {tuple(shape or ())} (a data-dependent shape)"
                    )
                if stride is not None and o.stride() != stride:
                    return None, _diverged(step, "gave other strides than recorded")
                env[idx] = o
            if step.note and notes is not None:
                for idx in step.note:
                    notes[idx] = note_normal(env[idx])
            for idx in step.free:
                del env[idx]
    return env, None


def _diverged(step: _Step, what: str) -> str:
    return f"{step.node.op_name} in module '{step.node.module}' {what}"


def _swap(obj: Any, values: list[Value]) -> Any:
    if isinstance(obj, Value):
        return values[obj.index]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap(x, values) for x in obj)
    if isinstance(obj, dict):
        return {k: _swap(x, values) for k, x in obj.items()}
    return obj


def _instantiate(tpl: _Template, env: dict[int, torch.Tensor], notes: dict[int, bool | None] | None = None) -> Graph:
    """A fresh graph with the recording's structure and the replayed tensors (new Value/Node objects,
    so what the reverse pass releases or a kept graph holds is never the plan's); ``notes``: the replay's
    :attr:`Value.normal` (:func:`_replay`), the only ones the new Values get."""
    g = tpl.graph
    values = [Value(v.index, env.get(v.index), v.kind, None, v.output_index, v.name, v.is_activation) for v in g.values]
    for idx, normal in (notes or {}).items():
        values[idx].normal = normal
    for v, nv in zip(g.values, values):
        if nv.data is None:  # never materialised (e.g. an unused leaf): keep the metadata
            nv.dtype, nv.shape, nv.device, nv.strides = v.dtype, v.shape, v.device, v.strides
    nodes = []
    for step in tpl.steps:
        n = step.node
        if step.generic:
            args, kwargs = _swap(n.args, values), _swap(n.kwargs, values)
        else:  # the replay's precompiled slots, filled with the new Values
            a = step.args.copy()
            for i, idx in step.slots:
                a[i] = values[idx]
            for i, kind, items in step.lists:
                a[i] = kind([values[x] if is_value else x for is_value, x in items])
            args, kwargs = tuple(a), dict(n.kwargs)
        ins = [values[i] for i in step.ins]
        outs = [None if i is None else values[i] for i in step.outs_at]
        node = Node(n.index, n.op, args, kwargs, ins, outs, n.module, n.module_type, dict(n.meta))
        node.__dict__.update(step.names)
        for o in outs:
            if o is not None:
                o.producer = node
        for v in ins:
            v.consumers.append(node)
        nodes.append(node)
    out_values = [values[v.index] for v in g.output_values]
    output = _fill(tpl.skeleton, [v.tensor for v in out_values])
    return Graph(
        nodes,
        values,
        [values[v.index] for v in g.inputs],
        _swap(g.input_spec, values),
        output,
        out_values,
        {k: values[v.index] for k, v in g.params.items()},
        dict(g.module_types),
    )


# ---------------------------------------------------------------------- verify
def _static(obj: Any) -> Any:
    if isinstance(obj, Value):
        return ("V", obj.index)
    if isinstance(obj, (list, tuple)):
        return tuple(_static(x) for x in obj)
    if isinstance(obj, dict):
        return tuple((k, _static(x)) for k, x in obj.items())
    if isinstance(obj, torch.Tensor):
        return ("T", obj.shape, obj.dtype)
    return obj


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    return torch.equal(a, b)


def _compare(
    old: Graph, env: dict[int, torch.Tensor], fresh: Graph, held: frozenset[int] | set[int] = frozenset()
) -> str | None:
    """First difference between the replay (``old``'s structure, ``env``'s data) and ``fresh``, or None.

    ``held``: norm outputs the replay holds (:func:`_norm_swaps`); where ``fresh`` dropped one, it is recomputed
    there from the recorded norm input for the comparison, then dropped again.
    """
    if len(old.nodes) != len(fresh.nodes) or len(old.values) != len(fresh.values):
        return f"{len(old.nodes)} recorded ops, {len(fresh.nodes)} now"
    for a, b in zip(old.nodes, fresh.nodes):
        if a.op_name != b.op_name or _static(a.args) != _static(b.args) or _static(a.kwargs) != _static(b.kwargs):
            return f"op #{a.index}: {a.op_name} in '{a.module}' recorded, {b.op_name} in '{b.module}' now"
    for v in fresh.values:
        t = env.get(v.index)
        data = v.data
        if t is not None and data is None and v.index in held:
            data = v.tensor
            v.data = None
        if t is None or data is None:
            continue
        if not _close(t, data):
            where = v.producer.op_name if v.producer is not None else v.kind
            return f"value {v.index} ({where}) differs"
    return None
