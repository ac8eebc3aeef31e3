"""Graph passes that put a recorded graph into the form LRP rules expect.

* **Batch-norm merge.** An eval-mode batch norm right after a convolution or a dense op is folded
  into it, so rules see the effective weights (what Zennit's canonizers do per architecture, done
  here once for every architecture: the pattern is found in the op graph, not in module classes).
* **Normaliser detection.** In ``x * rsqrt(mean(x^2) + eps)`` (RMSNorm), ``(x - m) / sqrt(var)``
  (hand-written LayerNorm) or ``x / x.norm()``, the second factor is a function of the first through
  a reduction; LRP holds it constant (:func:`normalizer_operands`).
* **Attention weights** (for CP-LRP): products whose operand comes from a softmax
  (:func:`attention_weight_operands`).

The marking passes return their findings (node index -> constant input positions) instead of writing
into the nodes: a recorded graph is shared data, and the same recording may be explained with several
rule sets, from several threads. The batch-norm merge builds new nodes and leaves the input graph as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .graph import Graph, Node, RegionOp, Value

aten = torch.ops.aten

_NORM_CHAIN = {
    "pow",
    "mean",
    "sum",
    "var",
    "var_mean",
    "std",
    "std_mean",
    "add",
    "sub",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "div",
    "mul",
    "_to_copy",
    "clamp",
    "clamp_min",
    "expand",
    "view",
    "_unsafe_view",
    "unsqueeze",
    "squeeze",
    "linalg_vector_norm",
    "norm",
    "abs",
    "square",
    "detach",
    "alias",
    "clone",
    "amax",
    "max",
    "select",
}
_REDUCTIONS = {"mean", "sum", "var", "var_mean", "std", "std_mean", "linalg_vector_norm", "norm", "amax", "max"}
_PASSTHROUGH = {
    "_to_copy",
    "view",
    "_unsafe_view",
    "clone",
    "alias",
    "expand",
    "contiguous",
    "native_dropout",
    "dropout",
    "unsqueeze",
    "squeeze",
    "reshape",
    "select",
    "getitem",
    "detach",
}


def _sources(v: Value, limit: int = 8) -> set[int]:
    """``v`` and the values it is a cast/view/copy of."""
    out = {v.index}
    while limit and v.producer is not None and v.producer.packet in _PASSTHROUGH and v.producer.inputs:
        v = v.producer.inputs[0]
        out.add(v.index)
        limit -= 1
    return out


def _near_ancestors(v: Value, depth: int = 3) -> set[int]:
    """``v``'s sources plus the values it was computed from within ``depth`` ops (``sum(x1 * x2)`` -> x1, x2)."""
    out = set(_sources(v))
    frontier = [v]
    for _ in range(depth):
        nxt = []
        for u in frontier:
            if u.producer is not None:
                for w in u.producer.inputs:
                    if w.index not in out:
                        out.update(_sources(w))
                        nxt.append(w)
        frontier = nxt
    return out


def is_normalizer(candidate: Value, of: Value, max_nodes: int = 24) -> bool:
    """Is ``candidate`` computed, through a reduction and arithmetic only, from what ``of`` is computed from?

    Covers ``x * rsqrt(mean(x^2))``, ``(x - m) / sqrt(var)``, ``x / ||x||`` and cosine similarity's
    ``sum(a * b) / (||a|| ||b||)``.
    """
    targets = _near_ancestors(of)
    frontier = [(candidate, False)]
    seen: set[int] = set()
    while frontier and len(seen) < max_nodes:
        v, reduced = frontier.pop()
        p = v.producer
        if p is None or p.index in seen or p.packet not in _NORM_CHAIN:
            continue
        seen.add(p.index)
        red = reduced or p.packet in _REDUCTIONS
        for u in p.inputs:
            if red and u.index in targets:
                return True
            frontier.append((u, red))
    return False


def normalizer_operands(graph: Graph, constant: dict[int, tuple[int, ...]] | None = None) -> dict[int, tuple[int, ...]]:
    """Operands of ``mul``/``div`` nodes that normalise the other operand: node index -> input positions.

    Returns a new dict (``constant`` merged in); the graph is not modified, so one recording can be
    prepared for several rule sets.
    """
    out = dict(constant or {})
    for node in graph.nodes:
        if node.packet not in ("mul", "div"):
            continue
        acts = node.activation_inputs()
        if len(acts) != 2:
            continue
        a, b = acts
        const = set(out.get(node.index, ()))
        if is_normalizer(node.inputs[b], node.inputs[a]):
            const.add(b)
        elif node.packet == "mul" and is_normalizer(node.inputs[a], node.inputs[b]):
            const.add(a)
        if const:
            out[node.index] = tuple(sorted(const))
    return out


_GATES = {"silu", "gelu", "sigmoid", "tanh", "relu", "hardswish", "hardsigmoid", "mish", "elu", "softplus"}


def _is_gate(p: Node) -> bool:
    """An activation as one op (``silu``) or as a region standing for one written out (T5 v1.1's ``gelu_new``
    ``0.5*x*(1+tanh(...))``, a fused ``autograd.Function``): LXT's CP-LRP stops the gradient at the gate's
    pre-activation (``act(stop_gradient(gate_proj(x))) * up_proj(x)``), however the activation is written."""
    if isinstance(p.op, RegionOp):
        return p.op.kind in ("elementwise", "autograd_function") and p.op.family == "nonlinear"
    return p.packet in _GATES


def attention_weight_operands(
    graph: Graph, constant: dict[int, tuple[int, ...]] | None = None
) -> dict[int, tuple[int, ...]]:
    """CP-LRP: attention weights (softmax outputs) and gates (``act(g) * u``) held constant in products.

    Returns node index -> constant input positions (``constant`` merged in); the graph is not modified.
    """
    out = dict(constant or {})
    # A region's output keeps its inner producer (data is recomputed through it): look the region up.
    region_of = {v.index: n for n in graph.nodes if isinstance(n.op, RegionOp) for v in n.outputs if v is not None}
    for node in graph.nodes:
        acts = node.activation_inputs()
        if len(acts) < 2 or node.packet not in ("mul", "bmm", "mm", "matmul", "baddbmm", "einsum"):
            continue
        const = set(out.get(node.index, ()))
        for i in acts:
            v = node.inputs[i]
            for _ in range(8):
                p = region_of.get(v.index, v.producer)
                if p is None:
                    break
                if p.packet in ("_softmax", "softmax", "_safe_softmax") or (node.packet == "mul" and _is_gate(p)):
                    const.add(i)
                    break
                if p.packet not in _PASSTHROUGH | {"expand", "clone", "_unsafe_view"} or not p.inputs:
                    break
                v = p.inputs[0]
        if const and len(const) < len(acts):
            out[node.index] = tuple(sorted(const))
    return out


def _is_eval_bn(node: Node) -> bool:
    if node.packet == "_native_batch_norm_legit_no_training":
        return True
    return node.packet == "native_batch_norm" and not bool(node.arg(5, False))


def merge_batch_norms(graph: Graph) -> Graph:
    """A copy of ``graph`` with each eval batch norm folded into the linear op that feeds it."""
    values = list(graph.values)
    replace: dict[int, Node | None] = {}
    for bn in graph.nodes:
        if not _is_eval_bn(bn) or not bn.inputs:
            continue
        x = bn.inputs[0]
        lin = x.producer
        if lin is None or len(x.consumers) != 1 or lin.index in replace:
            continue
        if any(o is not None and o.consumers for o in bn.outputs[1:]):
            continue
        merged = _merge(lin, bn, values)
        if merged is not None:
            replace[lin.index] = merged
            replace[bn.index] = None
            # (the pre-norm output stays: a later rule that reads the norm output recomputes it from there)
    if not replace:
        return graph
    replaced = [replace.get(n.index, n) for n in graph.nodes]
    nodes = [n for n in replaced if n is not None]
    return graph.with_nodes(nodes, values)


def _value(node: Node, argpos: int) -> Value | None:
    a = node.arg(argpos)
    return a if isinstance(a, Value) else None


#: Half-precision dtypes: a merge computes in float32 for them (see :class:`_MergeBatchNorm`).
_HALF = (torch.bfloat16, torch.float16)


class _MergeBatchNorm:
    """``(weight, bias, gamma, beta, mean, var) -> (merged weight, merged bias)`` for a conv or dense op.

    The producer of a merged weight's Values: they start without data and are computed when a rule
    first reads them (:func:`relprop.graph.recompute`), i.e. during the reverse pass, after most
    activations were released, so the merged copies do not add to the peak memory. Rules that modify
    weights (z+, alpha-beta, gamma, flat) build them one block of output channels at a time through
    :class:`MergedScale` instead, with the same arithmetic (equal bits).

    Half-precision models (bfloat16/float16): the merge is computed in float32 and the merged weight
    and bias stay float32, as the rest of the LRP rule pass (rounding ``W * gamma / sqrt(var + eps)``
    to 8 bits of mantissa leaked conservation: ``tests/test_dtype_batch_norm.py``).

    No cache across calls: a cache keyed on tensor identity goes stale when a user edits
    ``param.data`` in place (``.data`` has its own version counter) and keeps merged copies of every
    model alive; checking freshness by content costs about as much as the merge itself (one pass over
    the weights: 25-70 ms of CPU time for ResNet-50, measured with ``bench/bench_lrp.py``).
    """

    def __init__(self, kind: str, eps: float) -> None:
        self.kind, self.eps = kind, eps
        #: The merged weight's output-channel dim (a dense op's weight is ``mat2``: ``in x out``).
        self.dim = 0 if kind == "conv" else 1

    def scale(self, gamma: torch.Tensor | None, var: torch.Tensor) -> torch.Tensor:
        """The norm's per-channel factor ``gamma / sqrt(var + eps)`` (one place for the merge and the fast path).

        Float32 for a half-precision norm (everything computed from it then promotes to float32).
        """
        with torch.no_grad():
            if var.dtype in _HALF:
                var = var.float()
            scale = torch.rsqrt(var + self.eps)
            return scale * gamma if gamma is not None else scale

    def weight(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``w`` (or a block of its output channels) times the matching factors ``scale`` (1-D)."""
        with torch.no_grad():
            if self.kind == "conv":
                return w * scale.view(-1, *[1] * (w.dim() - 1))
            return w * scale.view(1, -1)

    def bias(self, b, beta, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The merged bias ``b * scale + beta - mean * scale`` (``b``, ``beta`` may be ``None``)."""
        with torch.no_grad():
            shift = -mean * scale + (beta if beta is not None else 0)
            return (b * scale if b is not None else 0) + shift

    def __call__(self, w, b, gamma, beta, mean, var) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale(gamma, var)
        return self.weight(w, scale), self.bias(b, beta, mean, scale)

    def __str__(self) -> str:
        return f"relprop.merge_batch_norm.{self.kind}"


def _data(a):
    return a.tensor if isinstance(a, Value) else a


@dataclass(frozen=True)
class MergedScale:
    """A merged node's linear op before the merge: ``op(x, W * scale) == op(x, W) * scale`` per output channel.

    What the epsilon rule needs on a merged node: ``J^T s`` with the merged weight is ``J_W^T (scale * s)``
    with the model's W, so it never builds the merged weight (one pass over every weight of the model
    per call) and scales the (smaller, or similar) relevance quotient instead. Rules that modify the
    weights build blocks of the merged weight (:meth:`merged_weight`) and the merged bias on their own,
    never the whole merged weight next to its modified copy.
    """

    #: Input position of the merged weight in the merged node (``W`` goes there instead).
    weight_pos: int
    #: The model's weight (the merge's input).
    weight: Value
    #: Per-channel factor shaped to broadcast against the node's output.
    scale: torch.Tensor
    #: Input position of the merged bias in the merged node.
    bias_pos: int
    #: The per-channel factor, 1-D (float32 under half precision).
    factor: torch.Tensor
    #: The merge and its arguments ``(w, b, gamma, beta, mean, var)`` (Values or ``None``).
    merge: _MergeBatchNorm
    args: tuple

    @property
    def dim(self) -> int:
        """The output-channel dim of the weight."""
        return self.merge.dim

    def merged_weight(self, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Output channels ``start:start + length`` (all by default) of the merged weight: the merge's bits."""
        w, f = self.weight.tensor, self.factor
        if length is not None:
            w, f = w.narrow(self.dim, start, length), f.narrow(0, start, length)
        return self.merge.weight(w, f)

    def merged_bias(self) -> torch.Tensor:
        """The merged bias (the merge's bits), without building the merged weight."""
        _, b, _, beta, mean, _ = (_data(a) for a in self.args)
        return self.merge.bias(b, beta, mean, self.factor)


def merged_scale(node: Node) -> MergedScale | None:
    """For a node made by :func:`merge_batch_norms` whose merged weight was not built yet: its parts, else None."""
    if "merged_batch_norm" not in node.meta:
        return None
    pos, bias_pos = (1, 2) if node.packet == "convolution" else (2, 0)
    if len(node.inputs) <= pos:
        return None
    wv = node.inputs[pos]
    prod = wv.producer
    merge = prod.op if prod is not None else None
    if not isinstance(merge, _MergeBatchNorm) or wv.data is not None or prod is None:
        return None
    w, _, gamma, _, _, var = prod.args
    factor = merge.scale(_data(gamma), var.tensor)
    scale = factor
    out = node.outputs[0]
    if merge.kind == "conv" and out is not None and out.shape is not None:
        scale = factor.view(-1, *[1] * (len(out.shape) - 2))
    return MergedScale(pos, w, scale, bias_pos, factor, merge, tuple(prod.args))


def _merged(kind: str, w: Value, b: Value | None, bn: Node, values: list[Value]) -> tuple[Value, Value] | None:
    """Values for the merged weight and bias (computed on first read), or ``None`` if the norm cannot merge."""
    gamma, beta = _value(bn, 1), _value(bn, 2)
    mean, var = _value(bn, 3), _value(bn, 4)
    if mean is None or var is None or w.shape is None or not all(v.is_float for v in (w, mean, var)):
        return None
    eps = bn.arg(6 if bn.packet == "_native_batch_norm_legit_no_training" else 7)
    args = (w, b, gamma, beta, mean, var)
    merge = _MergeBatchNorm(kind, eps)  # a pseudo-op: only graph.recompute runs this producer, rules never see it
    producer = Node(-1, merge, args, {}, [v for v in args if v is not None], [], bn.module, None)  # type: ignore[arg-type]
    out_shapes = (w.shape, torch.Size([w.shape[0] if kind == "conv" else w.shape[1]]))
    outs = []
    dtype = torch.float32 if w.dtype in _HALF else w.dtype  # merged in float32 under half precision
    for j, shape in enumerate(out_shapes):
        v = Value(len(values), None, "constant", producer=producer, output_index=j, name="merged_batch_norm")
        v.dtype, v.shape, v.device = dtype, shape, w.device
        values.append(v)
        outs.append(v)
    producer.outputs = list(outs)
    return outs[0], outs[1]


def _merge(lin: Node, bn: Node, values: list[Value]) -> Node | None:
    acts = lin.activation_inputs()
    if len(acts) != 1:
        return None
    if lin.packet == "convolution" and acts[0] == 0 and not lin.args[6]:
        w, b = _value(lin, 1), _value(lin, 2)
        merged = _merged("conv", w, b, bn, values) if w is not None else None
        if merged is None:
            return None
        wv, bv = merged
        args = (lin.args[0], wv, bv) + tuple(lin.args[3:])
        inputs = [lin.inputs[0], wv, bv]
    elif lin.packet in ("addmm", "mm") and lin.inputs[acts[0]] is lin.arg(0 if lin.packet == "mm" else 1):
        wt = _value(lin, 1 if lin.packet == "mm" else 2)
        b = _value(lin, 0) if lin.packet == "addmm" else None
        ok = wt is not None and wt.shape is not None and len(wt.shape) == 2
        merged = _merged("dense", wt, b, bn, values) if ok and wt is not None else None
        if merged is None:
            return None
        wv, bv = merged
        x = lin.inputs[acts[0]]
        args, inputs = (bv, x, wv), [bv, x, wv]
        lin = Node(lin.index, aten.addmm.default, args, {}, inputs, [], lin.module, lin.module_type)
        return _finish(lin, bn)
    else:
        return None
    node = Node(lin.index, lin.op, args, {}, inputs, [], lin.module, lin.module_type)
    return _finish(node, bn)


def _finish(node: Node, bn: Node) -> Node:
    node.outputs = [bn.outputs[0]]
    node.meta["merged_batch_norm"] = bn.module
    # The norm's input: read by no node of the merged graph (only by the recompute of the norm's output), so the
    # rule pass releases it with this node (propagate._release).
    node.meta["norm_input"] = bn.inputs[0]
    return node
