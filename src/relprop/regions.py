"""Element-wise regions: an activation written as several element-wise ops becomes one nonlinearity.

GPT-2's ``gelu_new`` is ``0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))`` in Python, so the tape holds
eight ATen ops. Rule by rule, LRP would give the last multiply the product rule and let the ``1 +``
absorb a share, scaling relevance through every GELU by ``(1+2t)/(2(1+t))`` (``t = tanh(...)``):
about one half, and of the wrong sign below ``x = -0.675``. AttnLRP and LXT apply the identity rule
to the whole element-wise function. :func:`find_elementwise_regions` finds each such function in a
graph and replaces it by one region node (:class:`relprop.graph.RegionOp`, ``kind="elementwise"``,
``family="nonlinear"``) whose single input is the variable ``x`` and single output is the function's
value, so a composite's nonlinearity rule sees the function, not its pieces.

What may join a region (each condition keeps a rule that would otherwise be overruled):

* **Element-wise ops only** (unary math, arithmetic, comparisons, ``where``, casts, clamps). A
  reduction (``mean`` in RMSNorm), a view or a matrix product ends the region, so attention,
  ``x[:, None] * x[None]`` (views of ``x``: two variables) and a normaliser ``x * rsqrt(mean(x^2) + eps)``
  are never one region (its ``rsqrt(. + eps)``, a function of the mean alone, may be; normaliser
  detection follows the recorded producers, which regions leave in place, and still finds it).
* **One variable.** Every value in the region is computed from the same tensor ``x`` (the same
  recorded value: ``x * x`` qualifies, a product of two different activations such as SwiGLU's
  ``silu(g) * u``, a gate or ``q * k`` does not and keeps the product rule). Every value has the
  shape of ``x``: constants may broadcast, ``x`` may not.
* **Constants:** Python scalars and tensors that depend on neither an input nor a parameter or
  buffer. A parameter or buffer ends the region, so a bias add or LayerScale's ``x * gamma``
  keeps its own rule.
* **No value leaves early.** A value used outside the region (other than by dead nodes such as
  the ``detach`` autograd records for saved tensors) must be the region's output, so the region has
  one output, and relevance asked for at an intermediate value cannot go missing.
* **One module.** All ops ran in the same module, so module-scoped rules (``module_names=``,
  ``module_types=``) and ``layers=`` see the same boundaries as without regions.
* **Nonlinear and more than one op.** A lone op already gets its own rule; a region of only affine
  pieces (``x * 2 + 1``, casts) is a linear layer with a constant bias, whose constant keeps its
  share of relevance as a bias does.

A custom ``torch.autograd.Function`` (a region node of kind ``"autograd_function"``) whose forward is
such a function of its one input and whose ``backward`` is that function's derivative (checked on
one cotangent) is a fused activation, e.g. BLOOM's ``GeLUFunction``: it gets ``family="nonlinear"``
and keeps its own backward as VJP. Any other Function (a straight-through estimator, gradient
reversal) still needs a rule registered for it.

The pass returns a new graph and leaves its input alone. :class:`relprop.rules.composites.Composite`
runs it for LRP rule sets only; the gradient composite never does (a region's VJP re-runs its inner
nodes under autograd, so gradient-based rules on a region are exact anyway).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from numbers import Real

import torch

from .graph import Graph, Node, RegionOp, Value, region_node, replace_with_regions

#: ATen packets computed element by element (output element ``i`` depends on input elements ``i``).
ELEMENTWISE = frozenset(
    {
        # unary math and activations
        "abs", "neg", "positive", "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "exp", "exp2",
        "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "reciprocal", "square", "sin", "cos",
        "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "erf", "erfc", "erfinv",
        "elu", "celu", "selu", "leaky_relu", "hardtanh", "hardswish", "hardsigmoid", "mish", "softplus",
        "softshrink", "hardshrink", "threshold", "logit", "sign", "sgn", "floor", "ceil", "round", "trunc",
        "frac", "nan_to_num", "clamp", "clamp_min", "clamp_max", "special_erfcx", "sinc", "lgamma",
        "digamma", "i0", "bitwise_not", "logical_not",
        # casts and copies
        "_to_copy", "clone",
        # binary / ternary arithmetic, comparisons, selection
        "add", "sub", "rsub", "mul", "div", "pow", "maximum", "minimum", "fmax", "fmin", "where",
        "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor",
        "xlogy", "atan2", "hypot", "copysign", "lerp", "addcmul", "addcdiv", "fmod", "remainder",
        "floor_divide", "heaviside",
    }
)  # fmt: skip

#: Packets that are affine in their variable operand (given the checks in :func:`_affine`).
_AFFINE = frozenset({"add", "sub", "rsub", "neg", "positive", "_to_copy", "clone"})

#: Packet of every element-wise region node (a composite's ``ops``/``rules=`` may name it).
PACKET = "elementwise"


def find_elementwise_regions(graph: Graph, keep_ops: Iterable[str] = ()) -> Graph:
    """A new graph in which each maximal univariate element-wise function is one region node.

    Args:
        graph: a recorded (possibly already prepared) graph; it is not modified.
        keep_ops: op packets or full names (``'tanh'``, ``'aten.tanh.default'``) that must stay
            single nodes, e.g. because the rule set has its own rule for them.

    Returns ``graph`` itself when no region is found. See the module docstring for the conditions.

    Custom autograd Functions (region nodes of kind ``"autograd_function"``) whose forward is a
    univariate element-wise function and whose ``backward`` is that function's derivative (a fused or
    memory-saving activation such as BLOOM's ``GeLUFunction``) become nonlinearities too; a Function
    whose backward is something else (a straight-through estimator) keeps needing a rule of its own.
    """
    keep = set(keep_ops)
    graph = _functions_as_nonlinearities(graph, keep)
    regions = elementwise_regions(graph, keep)
    return replace_with_regions(graph, regions) if regions else graph


def elementwise_regions(graph: Graph, keep_ops: Iterable[str] = ()) -> list[RegionOp]:
    """The :class:`RegionOp` of every region :func:`find_elementwise_regions` would form, in graph order."""
    keep = set(keep_ops)
    variable = _Variable()
    candidates = [n for n in graph.nodes if _candidate(n, keep, variable)]
    if len(candidates) < 2:
        return []  # a region has two ops at least
    outputs = {v.index for v in graph.output_values}
    consumers = _live_consumers(graph, outputs, {n.first_output.index for n in candidates})
    found: list[list[Node]] = []
    for cone in _cones(candidates, consumers, outputs):
        found.extend(_univariate(cone, consumers, outputs, variable))
    ops = []
    for nodes in found:
        op = _region(nodes, variable)
        if op is not None:
            ops.append(op)
    ops.sort(key=lambda op: op.nodes[-1].index)
    return ops


def describe_regions(graph: Graph) -> list[tuple[str, int]]:
    """``(RegionOp.describe(), count)`` for the region nodes of ``graph``, most frequent first."""
    counts: dict[str, int] = defaultdict(int)
    for n in graph.nodes:
        if n.region is not None:
            counts[n.region.describe()] += 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


# ---------------------------------------------------------------------------------------- analysis


class _Variable:
    """Memoised "depends on a model input" (float or not) and "a constant free of parameters" tests.

    ``Value.is_activation`` is False for a float cast of a mask computed from an activation
    (``(x > 0).float()``); for a region that mask is still a function of ``x``, not a constant.
    """

    def __init__(self) -> None:
        self._var: dict[int, bool] = {}
        self._const: dict[int, bool] = {}

    def __call__(self, v: Value) -> bool:
        return _memo(v, self._var, self._var_leaf, any)

    def constant(self, v: Value) -> bool:
        """No input, parameter or buffer anywhere upstream (``torch.full``, a tensor literal...)."""
        return _memo(v, self._const, self._const_leaf, all)

    @staticmethod
    def _var_leaf(u: Value) -> bool | None:
        if u.is_activation or u.kind == "input":
            return True
        return False if u.producer is None else None

    def _const_leaf(self, u: Value) -> bool | None:
        if self(u):
            return False
        if u.producer is None:
            # A parameter, a buffer or a named constant (merged batch norm weights) is not free.
            return u.kind == "constant" and u.name is None
        return None


def _memo(v: Value, memo: dict[int, bool], leaf, combine) -> bool:
    """``leaf(u)`` where it decides, else ``combine`` over the producer's inputs; iterative, so a
    long chain of ops cannot hit the recursion limit."""
    stack = [v]
    while stack:
        u = stack[-1]
        if u.index in memo:
            stack.pop()
            continue
        decided = leaf(u)
        if decided is not None:
            memo[u.index] = decided
            stack.pop()
            continue
        producer = u.producer
        if producer is None:  # every leaf rule decides producer-less values
            raise RuntimeError(f"internal: no decision for leaf value {u!r}")
        todo = [w for w in producer.inputs if w.index not in memo]
        if todo:
            stack.extend(todo)
            continue
        memo[u.index] = bool(combine(memo[w.index] for w in producer.inputs))
        stack.pop()
    return memo[v.index]


def _live_consumers(graph: Graph, outputs: set[int], wanted: set[int]) -> dict[int, list[Node]]:
    """Value index (of ``wanted``) -> nodes of ``graph`` that use it and whose result is used.

    Dead nodes are the ``detach`` calls autograd records for tensors it saves (``tanh`` saves its
    output) and anything else whose results reach nothing; they must not split a region. The
    consumers come from ``graph.nodes``, not ``Value.consumers``: a prepared graph has new nodes
    (merged batch norms) that the recording's lists do not know.
    """
    used = set(outputs)
    consumers: dict[int, list[Node]] = defaultdict(list)
    for n in reversed(graph.nodes):
        for v in n.outputs:
            if v is not None and v.index in used:
                break
        else:
            continue  # dead
        for v in n.inputs:
            used.add(v.index)
            if v.index in wanted:
                consumers[v.index].append(n)
    return consumers


def _candidate(n: Node, keep: set[str], variable: _Variable) -> bool:
    op = n.op
    if not isinstance(op, torch._ops.OpOverload):
        return False  # a region already, or something foreign
    name = op.overloadpacket.__name__
    packet = name.rstrip("_") or name
    if packet not in ELEMENTWISE or len(n.outputs) != 1 or n.outputs[0] is None:
        return False
    if keep and (name in keep or packet in keep or n.op_name in keep):
        return False
    out = n.outputs[0]
    if not variable(out):
        return False
    has_var = False
    for u in n.inputs:
        if variable(u):
            if u.shape != out.shape:
                return False  # the variable is broadcast: not a function of one element
            has_var = True
        elif not variable.constant(u):
            return False  # a parameter or buffer (bias, LayerScale) ends the region
    return has_var


def _cones(nodes: list[Node], consumers: dict[int, list[Node]], outputs: set[int]) -> list[list[Node]]:
    """Group ``nodes`` (in graph order) into single-exit cones.

    Walking backwards, a node joins the cone of its consumers when all of them are in one cone of
    the same module and its value is not a graph output; otherwise its value is an exit and it
    starts a cone. Each cone then has exactly one value used outside it: its last node's output.
    """
    cone_of: dict[int, int] = {}
    cones: list[list[Node]] = []
    for n in reversed(nodes):
        out = n.first_output
        cons = consumers.get(out.index, [])
        joined = None
        if out.index not in outputs and cons:
            ids = {cone_of.get(id(c), -1) for c in cons}
            if len(ids) == 1 and -1 not in ids:
                cid = ids.pop()
                if cones[cid][0].module == n.module:
                    joined = cid
        if joined is None:
            joined = len(cones)
            cones.append([])
        cones[joined].append(n)
        cone_of[id(n)] = joined
    return [list(reversed(c)) for c in cones]


def _external_variables(nodes: list[Node], variable: _Variable) -> list[Value]:
    inner = {v.index for n in nodes for v in n.outputs if v is not None}
    seen: dict[int, Value] = {}
    for n in nodes:
        for u in n.inputs:
            if u.index not in inner and variable(u):
                seen.setdefault(u.index, u)
    return list(seen.values())


def _univariate(
    cone: list[Node], consumers: dict[int, list[Node]], outputs: set[int], variable: _Variable
) -> list[list[Node]]:
    """``cone`` if it is a function of one value; otherwise its univariate sub-cones.

    In ``gelu_new(a) * b`` the final product depends on ``a`` and ``b``: it is dropped, the nodes
    that depend on ``a`` alone are regrouped into cones, and so on (each round drops at least the
    cone's exit, so this ends).
    """
    if len(_external_variables(cone, variable)) <= 1:
        return [cone]
    roots: dict[int, frozenset[int]] = {}
    groups: dict[frozenset[int], list[Node]] = defaultdict(list)
    for n in cone:
        r: frozenset[int] = frozenset()
        for u in n.inputs:
            if variable(u):
                r = r | roots.get(u.index, frozenset((u.index,)))
        roots[n.first_output.index] = r
        if len(r) == 1:
            groups[r].append(n)
    result = []
    for group in groups.values():
        for sub in _cones(group, consumers, outputs):
            result.extend(_univariate(sub, consumers, outputs, variable))
    return result


def _affine(n: Node, variable: _Variable) -> bool:
    """Is ``n`` affine in its variable operand(s) (so a region of such ops alone is a linear layer)?"""
    packet = n.packet.rstrip("_") or n.packet
    var = [i for i, u in enumerate(n.inputs) if variable(u)]
    if packet in _AFFINE:
        return True
    if packet == "mul":
        return len(var) == 1
    if packet == "div":
        num = n.arg(0)
        return len(var) == 1 and isinstance(num, Value) and variable(num) and n.kwargs.get("rounding_mode") is None
    if packet in ("where", "masked_fill"):
        cond = n.arg(0) if packet == "where" else n.arg(1)
        return not (isinstance(cond, Value) and variable(cond))
    return False


def _region(nodes: list[Node], variable: _Variable) -> RegionOp | None:
    if len(nodes) < 2:
        return None  # a lone op keeps its own rule
    ext = _external_variables(nodes, variable)
    if len(ext) != 1:
        return None
    x, out = ext[0], nodes[-1].first_output
    if not (x.is_float and out.is_float):
        return None
    if all(_affine(n, variable) for n in nodes):
        return None
    return RegionOp("elementwise", expression(nodes, x), PACKET, nodes, [x], [out], family="nonlinear")


# ------------------------------------------------------------------------ custom autograd Functions

#: Ops that only pass their input on (the reads of activations a Function's no-grad forward makes).
_TRANSPARENT = frozenset({"detach", "alias", "view", "_unsafe_view", "lift_fresh"})


def _functions_as_nonlinearities(graph: Graph, keep: set[str]) -> Graph:
    swap: dict[int, Node] = {}
    variable = _Variable()
    for n in graph.nodes:
        op = n.region
        if op is None or op.kind != "autograd_function" or op.family == "nonlinear" or op.packet in keep:
            continue
        new = _function_nonlinearity(n, op, variable)
        if new is not None:
            node = region_node(new, n.index)
            node.module, node.module_type = n.module, n.module_type
            swap[id(n)] = node
    if not swap:
        return graph
    return dataclasses.replace(graph, nodes=[swap.get(id(n), n) for n in graph.nodes])


def _function_nonlinearity(node: Node, op: RegionOp, variable: _Variable) -> RegionOp | None:
    """``op`` with family ``nonlinear`` if it is one element-wise function of one input with its derivative as
    backward, else ``None``."""
    if op.vjp is None or len(op.inputs) != 1 or len(op.outputs) != 1 or op.outputs[0] is None:
        return None
    x, out = op.inputs[0], op.outputs[0]
    if not (x.is_float and out.is_float and variable(x) and out.shape == x.shape):
        return None
    dep = {x.index}  # values computed from x inside the Function
    for n in op.nodes:
        if not isinstance(n.op, torch._ops.OpOverload) or len([v for v in n.outputs if v is not None]) != 1:
            return None
        uses = [u for u in n.inputs if u.index in dep]
        if not uses:
            if all(variable.constant(u) for u in n.inputs):
                continue  # a constant computed inside the forward
            return None
        name = n.op.overloadpacket.__name__
        packet = name.rstrip("_") or name
        if packet not in ELEMENTWISE and packet not in _TRANSPARENT:
            return None
        if any(u.shape != x.shape for u in uses) or any(v.shape != x.shape for v in n.outputs if v is not None):
            return None
        if not all(u.index in dep or variable.constant(u) for u in n.inputs):
            return None  # another variable, a parameter or a buffer
        dep.update(v.index for v in n.outputs if v is not None)
    if out.index not in dep or not _backward_is_derivative(node, op, x, out):
        return None
    return RegionOp(op.kind, op.name, op.packet, op.nodes, op.inputs, op.outputs, family="nonlinear", vjp=op.vjp)


def _backward_is_derivative(node: Node, op: RegionOp, x: Value, out: Value) -> bool:
    """Does the Function's ``backward`` give the VJP of its recorded forward ops (checked on one cotangent)?"""
    xt = x.tensor
    gen = torch.Generator(device=xt.device).manual_seed(0)  # a local generator: no global RNG state
    if out.shape is None or op.vjp is None:
        return False
    g = torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)
    try:
        custom = op.vjp(node, [g], [xt], [0])[0]
    except Exception:  # its backward cannot be evaluated here: not a plain activation
        return False
    leaf = xt.detach().requires_grad_(True)
    env: dict[int, torch.Tensor] = {x.index: leaf}
    with torch.inference_mode(False), torch.enable_grad():
        for n in op.nodes:
            name = n.packet
            ins = [env[v.index] if v.index in env else v.tensor for v in n.inputs]
            if name in ("detach", "alias", "lift_fresh") and n.inputs and n.inputs[0].index in env:
                res = ins[0]  # the Function reads its input through detach: differentiate through it
            else:
                res = n.run(ins)
            outs = list(res) if isinstance(res, (tuple, list)) else [res]
            for v, o in zip(n.outputs, outs):
                if v is not None:
                    env[v.index] = o
        y = env[out.index]
        if not y.requires_grad:
            derivative = torch.zeros_like(xt)
        else:
            (derivative,) = torch.autograd.grad(y, leaf, g, allow_unused=True)
            derivative = torch.zeros_like(xt) if derivative is None else derivative
    if custom is None or custom.shape != derivative.shape:
        return False
    rtol = 1e-2 if xt.element_size() <= 2 else 1e-4
    scale = derivative.abs().max().item() if derivative.numel() else 0.0
    return bool(torch.allclose(custom.to(derivative.dtype), derivative, rtol=rtol, atol=rtol * scale + 1e-30))


# -------------------------------------------------------------------------------------- display

_INFIX = {"add": ("+", 1), "sub": ("-", 1), "mul": ("*", 2), "div": ("/", 2)}


def expression(nodes: list[Node], x: Value) -> str:
    """The region's function as a short formula in ``x`` (``x*sigmoid(x)``), for names and reports."""
    text: dict[int, tuple[str, int]] = {x.index: ("x", 9)}

    def fmt(a, prec: int, strict: bool = False) -> str:
        if isinstance(a, Value):
            s, p = text.get(a.index) or (_const_text(a), 9)
        elif isinstance(a, bool) or a is None:
            s, p = str(a), 9
        elif isinstance(a, Real):
            s, p = f"{a:.5g}", 9 if float(a) >= 0 else 0
        else:
            s, p = str(a), 9
        return f"({s})" if p < prec or (strict and p == prec) else s

    for n in nodes:
        packet = n.packet.rstrip("_") or n.packet
        args = list(n.args)
        if packet in _INFIX and len(args) >= 2:
            sym, prec = _INFIX[packet]
            alpha = n.kwargs.get("alpha", args[2] if len(args) > 2 else 1)
            right = fmt(args[1], prec + (packet in ("sub", "div")))
            if alpha != 1:
                right = f"{alpha:.4g}*{fmt(args[1], 3)}"
            s, p = f"{fmt(args[0], prec)}{sym}{right}", prec
        elif packet == "rsub" and len(args) >= 2:
            s, p = f"{fmt(args[1], 1)}-{fmt(args[0], 2)}", 1
        elif packet == "pow" and len(args) >= 2:
            s, p = f"{fmt(args[0], 4, strict=True)}^{fmt(args[1], 4, strict=True)}", 4
        elif packet == "neg":
            s, p = f"-{fmt(args[0], 3)}", 3
        elif packet in ("_to_copy", "clone"):
            s, p = text.get(args[0].index, ("x", 9)) if isinstance(args[0], Value) else (str(args[0]), 9)
        else:
            inner = ", ".join(fmt(a, 0) for a in args if not isinstance(a, (list, tuple)))
            s, p = f"{packet}({inner})", 9
        text[n.first_output.index] = (s, p)
    return text[nodes[-1].first_output.index][0]


def _const_text(v: Value) -> str:
    t = v.data
    if t is not None and t.numel() == 1 and not t.is_meta:
        return f"{t.item():.5g}"
    return "c"
