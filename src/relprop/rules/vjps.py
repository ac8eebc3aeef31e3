"""The one table of per-op backward shortcuts, consulted only by :func:`relprop.rules.base.vjp`.

Every rule that needs a vector-Jacobian product (the gradient rule, routing, the z-rule of sums and
products, the linear LRP rules on *modified* weights, DeepLIFT's max-pool rule) goes through
``base.vjp``, so an entry here speeds up (or corrects) all of them at once, and the gradient method
and the LRP methods can never drift apart on an op.

An entry is ``fn(node, grads, tensors, wrt) -> list | None``:

* ``grads``: one cotangent per node output (``None`` where nothing arrived);
* ``tensors``: one tensor per node input, the recorded ones (a lazy :class:`RecordedInputs`) or
  replacements (modified weights, a reference input), so a kernel must read operands from
  ``tensors``, never from the node's Values (shapes through :func:`shape_of`);
* ``wrt``: the float inputs wanted;
* return one entry per input (``None`` outside ``wrt``), or ``None`` to decline: ``base.vjp`` then
  re-runs the op under autograd (exact for any op, only slower).

Two kinds of entries: *shortcuts* (a direct backward kernel, equal to autograd's formula) and
*corrections* (ops whose autograd formula is missing or not what propagation needs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

from ..graph import Node, Value

aten = torch.ops.aten

Grads = Sequence[torch.Tensor | None]
VJP = Callable[[Node, Grads, Sequence, list[int]], list | None]

#: packet name (``convolution``, ``view``...) -> VJP kernel (see the module docstring).
VJPS: dict[str, VJP] = {}


class RecordedInputs(Sequence):
    """A node's recorded input tensors, read (recomputed if their data was dropped) only when indexed.

    ``base.vjp`` passes this when no replacement tensors are given, so a kernel that needs only
    shapes, or the node's output (``relu``), does not force the recomputation of an input that an
    in-place op overwrote.
    """

    def __init__(self, node: Node) -> None:
        self.node = node

    def __len__(self) -> int:
        return len(self.node.inputs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [v.tensor for v in self.node.inputs[i]]
        return self.node.inputs[i].tensor


def shape_of(node: Node, tensors: Sequence, i: int) -> torch.Size:
    """Shape of input ``i`` without reading recorded data."""
    if isinstance(tensors, RecordedInputs):
        shape = node.inputs[i].shape
        if shape is None:
            raise RuntimeError(f"internal: input {i} of {node!r} has no recorded shape")
        return shape
    return tensors[i].shape


def register_vjp(*packets: str) -> Callable[[VJP], VJP]:
    """Decorator: use ``fn`` as the VJP of the ATen op packets ``packets`` (in every rule)."""

    def deco(fn: VJP) -> VJP:
        for p in packets:
            VJPS[p] = fn
        return fn

    return deco


def input_index(node: Node, argpos: int) -> int | None:
    """Index into ``node.inputs`` (and so into ``tensors``) of positional argument ``argpos``, if a tensor."""
    count = 0
    for i, a in enumerate(node.args):
        if i == argpos:
            return count if isinstance(a, Value) else None
        if isinstance(a, Value):
            count += 1
        elif isinstance(a, (list, tuple)):
            count += sum(isinstance(x, Value) for x in a)
    return None


def autograd_vjp(node: Node, grads: Grads, tensors: Sequence, wrt: Sequence[int]) -> list[torch.Tensor | None]:
    """Re-run the op under autograd on detached ``tensors`` and differentiate w.r.t. inputs ``wrt``."""
    tensors = list(tensors)
    result: list[torch.Tensor | None] = [None] * len(tensors)
    if not wrt:
        return result
    leaves = {}
    run_inputs = []
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.is_inference():
            # Made inside a torch.inference_mode() block in forward: such a tensor can be neither a leaf
            # nor saved for backward; a normal copy (same values) can.
            t = t.clone()
        if i in wrt and i not in leaves:
            # The same Value may appear twice (x * x): one leaf per position keeps both gradients.
            leaf = t.detach().requires_grad_(True)
            leaves[i] = leaf
            run_inputs.append(leaf)
        else:
            run_inputs.append(t.detach() if isinstance(t, torch.Tensor) else t)
    with torch.inference_mode(False), torch.enable_grad():
        out = node.run(run_inputs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    if not pairs:
        for i in wrt:
            result[i] = torch.zeros_like(tensors[i])
        return result
    order = list(leaves)
    got = torch.autograd.grad(
        [o for o, _ in pairs], [leaves[i] for i in order], [g for _, g in pairs], allow_unused=True
    )
    for i, g in zip(order, got):
        result[i] = g if g is not None else torch.zeros_like(tensors[i])
    return result


# ------------------------------------------------------------------------------------ corrections
@register_vjp("as_strided_scatter")
def _as_strided_scatter(node, grads, tensors, wrt):
    # PyTorch's formula w.r.t. ``self`` keeps the written window and drops the rest (pytorch#77128).
    g = grads[0]
    res: list = [None] * len(tensors)
    size, stride, offset = node.arg(2), node.arg(3), node.arg(4)
    if g is None:
        return [torch.zeros_like(t) if i in wrt else None for i, t in enumerate(tensors)]
    if 0 in wrt:
        res[0] = g.as_strided_scatter(torch.zeros_like(tensors[1]), size, stride, offset)
    if 1 in wrt:
        res[1] = g.as_strided(size, stride, offset).clone()
    return res


@register_vjp("copy")
def _copy(node, grads, tensors, wrt):
    """``copy(self, src)`` returns ``src`` broadcast into ``self``'s shape and dtype (no autograd formula)."""
    g = grads[0]
    res: list = [None] * len(tensors)
    if 0 in wrt:
        res[0] = torch.zeros_like(tensors[0])
    if 1 in wrt:
        src = tensors[1]
        res[1] = torch.zeros_like(src) if g is None else g.sum_to_size(src.shape).to(src.dtype)
    return res


_SDPA = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


@register_vjp(*_SDPA)
def _sdpa(node, grads, tensors, wrt):
    """Fused attention kernels have no derivative for the mask: it gets none (as an attention mask should)."""
    res = autograd_vjp(node, grads, tensors, [i for i in wrt if i < 3])
    for i in wrt:
        if i >= 3:
            res[i] = torch.zeros_like(tensors[i])
    return res


# -------------------------------------------------------------------------------------- shortcuts
def _scalar_operand(node: Node, grads: Grads, tensors: Sequence, wrt: list[int]) -> int | float | None:
    """``c`` of ``aten.{add,sub,mul,div}.Tensor(x, c)`` with a Python int or float ``c`` (no alpha), when the cotangent
    has ``x``'s shape and dtype (see :func:`_elementwise`), else None."""
    c = node.args[1] if len(node.args) == 2 else None
    if type(c) not in (int, float) or node.kwargs or not isinstance(node.args[0], Value):
        return None
    if _elementwise(node, grads, tensors, wrt, f"aten.{node.packet}.Tensor") is None:
        return None
    return c


@register_vjp("add", "sub")
def _add(node, grads, tensors, wrt):
    """``a +/- b``: the VJP is ``(g, +/-g)`` reduced to each operand's shape; no re-run needed.

    ``x +/- c`` with a Python number ``c`` (``+ eps`` in a norm): ``grad`` itself, AddBackward1/SubBackward1."""
    g = grads[0]
    if _scalar_operand(node, grads, tensors, wrt) is not None:
        return [g]
    if g is None or len(tensors) != 2 or len(node.args) != 2 or node.kwargs:
        return None  # alpha=: autograd
    if not all(isinstance(a, Value) for a in node.args):
        return None
    out = node.outputs[0]
    if out is None or any(v.dtype != out.dtype for v in node.inputs):
        return None  # type promotion (float32 + float64): autograd hands each operand its own dtype
    res: list = [None] * 2
    for i in wrt:
        gi = g if (i == 0 or node.packet == "add") else -g
        shape = shape_of(node, tensors, i)
        res[i] = gi.sum_to_size(shape) if gi.shape != shape else gi
    return res


@register_vjp("mul")
def _mul(node, grads, tensors, wrt):
    """``a * b`` of two tensors of one real dtype: ``(g * b, g * a)`` reduced to each operand's shape.

    Autograd's ``MulBackward0`` formula (``grad * other``, then the engine's ``sum_to`` for a broadcast
    operand), without re-running the product under autograd (equal bits: tests/test_decoder_fast.py).
    """
    g = grads[0]
    c = _scalar_operand(node, grads, tensors, wrt)
    if c is not None:
        return [g * c]  # ``x * c`` (attention's scaling): ``grad * other`` with the same wrapped number
    if g is None or len(tensors) != 2 or len(node.args) != 2 or node.kwargs:
        return None
    a, b = tensors[0], tensors[1]
    if not (a.dtype == b.dtype == g.dtype and a.is_floating_point()):
        return None  # promotion / complex: autograd casts and conjugates
    res: list = [None] * 2
    for i in wrt:
        gi = g * (b if i == 0 else a)
        shape = shape_of(node, tensors, i)
        res[i] = gi.sum_to_size(shape) if gi.shape != shape else gi
    return res


@register_vjp("div")
def _div(node, grads, tensors, wrt):
    """``x / c`` with a Python number ``c``: DivBackward0's ``div_tensor_self_backward``, ``grad / other``."""
    c = _scalar_operand(node, grads, tensors, wrt)
    return None if c is None else [grads[0] / c]


@register_vjp("convolution")
def _conv(node, grads, tensors, wrt):
    g = grads[0]
    if g is None or node.kwargs or len(node.args) != 9:
        return None
    if not (isinstance(node.args[0], Value) and isinstance(node.args[1], Value)):
        return None
    has_bias = isinstance(node.args[2], Value)
    if has_bias and 2 in wrt:
        return None  # bias gradient: autograd's own reduction
    x, w = tensors[0], tensors[1]
    stride, padding, dilation, transposed, out_pad, groups = node.args[3:9]
    mask = [0 in wrt, 1 in wrt, False]
    gx, gw, _ = aten.convolution_backward(g, x, w, None, stride, padding, dilation, transposed, out_pad, groups, mask)
    res: list = [None] * len(tensors)
    res[0], res[1] = gx, gw
    return res


def _strides_of(node: Node, tensors: Sequence, i: int) -> tuple[int, ...]:
    """Strides of input ``i`` as the forward saw them (the recorded layout; a replacement tensor's own)."""
    if isinstance(tensors, RecordedInputs):
        s = node.inputs[i].strides
        if s is not None:
            return tuple(s)
    return tuple(tensors[i].stride())


def _column_major(node: Node, tensors: Sequence, i: int) -> bool:
    """Is 2-D input ``i`` column-major (strides ``(1, rows)``)? Autograd's ``mm_mat1_backward``/``mm_mat2_backward``
    then compute that operand's gradient as the transpose of a product in the other order (other rounding)."""
    shape, strides = shape_of(node, tensors, i), _strides_of(node, tensors, i)
    return len(shape) == 2 and strides[0] == 1 and strides[1] == shape[0]


def _mm_grads(node, g, tensors, wrt, first: int) -> list:
    """``mat1 @ mat2`` (inputs ``first``, ``first + 1``): each operand's gradient by autograd's own formula and
    operand order (``mm_mat1_backward``/``mm_mat2_backward``: a column-major operand gets ``(... ).t()``)."""
    res: list = [None] * len(tensors)
    a, b = first, first + 1
    two_d = node.packet != "bmm"
    if a in wrt:
        if two_d and _column_major(node, tensors, a):
            res[a] = tensors[b].mm(g.t()).t()
        else:
            res[a] = g @ tensors[b].transpose(-1, -2)
    if b in wrt:
        if two_d and _column_major(node, tensors, b):
            res[b] = g.t().mm(tensors[a]).t()
        else:
            res[b] = tensors[a].transpose(-1, -2) @ g
    return res


@register_vjp("mm", "bmm")
def _mm(node, grads, tensors, wrt):
    g = grads[0]
    if g is None or len(tensors) != 2 or node.kwargs:
        return None
    return _mm_grads(node, g, tensors, wrt, 0)


@register_vjp("addmm")
def _addmm(node, grads, tensors, wrt):
    g = grads[0]
    if g is None or len(tensors) != 3 or node.kwargs or len(node.args) != 3:
        return None  # beta/alpha given
    res = _mm_grads(node, g, tensors, wrt, 1)
    if 0 in wrt:
        shape = shape_of(node, tensors, 0)
        res[0] = g.sum_to_size(shape) if g.shape != shape else g
    return res


@register_vjp("view", "_unsafe_view", "reshape", "_reshape_alias", "unsqueeze", "squeeze")
def _view(node, grads, tensors, wrt):
    g = grads[0]
    if g is None:
        return None
    res: list = [None] * len(tensors)
    res[0] = g.reshape(shape_of(node, tensors, 0))
    return res


# The routing ops of a decoder layer (rotary halves, GQA's repeat_kv, contiguous copies): autograd's own
# backward formulas, called directly instead of re-running the op under autograd (tests/test_lrp_fast.py
# compares each with autograd_vjp).
def _single(node, grads, wrt) -> torch.Tensor | None:
    g = grads[0]
    return g if g is not None and list(wrt) == [0] and not node.kwargs else None


@register_vjp("expand")
def _expand(node, grads, tensors, wrt):
    g = _single(node, grads, wrt)
    if g is None:
        return None
    shape = shape_of(node, tensors, 0)
    return [g.sum_to_size(shape) if g.shape != shape else g] + [None] * (len(tensors) - 1)  # ExpandBackward0


@register_vjp("clone", "alias")
def _identity(node, grads, tensors, wrt):
    # ``clone(x, memory_format=...)`` (``.contiguous()``, GQA's repeat_kv): CloneBackward0 passes the gradient as is.
    g = grads[0] if list(wrt) == [0] and set(node.kwargs) <= {"memory_format"} else None
    if g is None or g.shape != shape_of(node, tensors, 0):
        return None
    return [g] + [None] * (len(tensors) - 1)


@register_vjp("slice")
def _slice(node, grads, tensors, wrt):
    g = _single(node, grads, wrt)
    if g is None or node.op_name != "aten.slice.Tensor":
        return None
    dim, start, end, step = node.arg(1, 0), node.arg(2), node.arg(3), node.arg(4, 1)
    start = 0 if start is None else start
    end = sys.maxsize if end is None else end
    if not all(type(a) is int for a in (dim, start, end, step)):
        return None
    return [aten.slice_backward(g, list(shape_of(node, tensors, 0)), dim, start, end, step)]


@register_vjp("select")
def _select(node, grads, tensors, wrt):
    g = _single(node, grads, wrt)
    if g is None or node.op_name != "aten.select.int":
        return None
    dim, index = node.arg(1), node.arg(2)
    if not (type(dim) is int and type(index) is int):
        return None
    return [aten.select_backward(g, list(shape_of(node, tensors, 0)), dim, index)]


@register_vjp("cat")
def _cat(node, grads, tensors, wrt):
    g = grads[0]
    items = node.args[0] if node.args else None
    if g is None or node.op_name != "aten.cat.default" or node.kwargs or not isinstance(items, (list, tuple)):
        return None
    if len(items) != len(node.inputs) or any(a is not v for a, v in zip(items, node.inputs)):
        return None  # a non-Value entry: inputs do not map one to one
    dim = node.arg(1, 0)
    if type(dim) is not int:
        return None
    dim %= g.dim()
    res: list = [None] * len(tensors)
    offset = 0
    for i in range(len(items)):
        shape = shape_of(node, tensors, i)
        if len(shape) != g.dim():
            return None  # a legacy empty (0,) operand: autograd's formula skips it
        if i in wrt:
            res[i] = g.narrow(dim, offset, shape[dim])  # CatBackward0: slices of the cotangent
        offset += shape[dim]
    return res


@register_vjp("_to_copy")
def _to_copy(node, grads, tensors, wrt):
    """A dtype/device copy (``x.to(...)``): the cotangent goes back as a copy to the input's dtype and device,
    autograd's formula without re-running the copy. Autograd would round a float32 cotangent to the copy's
    half-precision output dtype first; here LRP's float32 relevance (``base.vjp`` hands float32 inputs) stays
    exact through a model's entry cast (``relprop.report.device.Placed``)."""
    g = grads[0]
    if g is None or wrt != [0] or g.is_complex():
        return None
    x = tensors[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    return [g.to(device=x.device, dtype=x.dtype)] + [None] * (len(tensors) - 1)


@register_vjp("t", "transpose", "permute")
def _perm(node, grads, tensors, wrt):
    g = grads[0]
    if g is None:
        return None
    if node.packet == "t":
        gx = g.t()
    elif node.packet == "transpose":
        gx = g.transpose(node.arg(1), node.arg(2))
    else:
        dims = node.arg(1)
        inv = [0] * len(dims)
        for i, d in enumerate(dims):
            inv[d % len(dims)] = i
        gx = g.permute(inv)
    return [gx] + [None] * (len(tensors) - 1)


# Element-wise ops, softmax and layer norm: each kernel is autograd's own formula for the op
# (tools/autograd/derivatives.yaml of the torch it runs on, as autograd evaluates it with grad mode off),
# called directly; tests/test_vjp_shortcuts.py compares the bits with autograd's on every overload here.
def _elementwise(node: Node, grads: Grads, tensors: Sequence, wrt: list[int], op_name: str) -> torch.Tensor | None:
    """The cotangent of a one-tensor-input op ``op_name`` whose input has the cotangent's shape and dtype
    (the dtype the op runs in: a half-precision op widened by ``base.vjp`` runs in float32), else None."""
    g = grads[0]
    if g is None or node.op_name != op_name or wrt != [0] or len(tensors) != 1 or any(x is not None for x in grads[1:]):
        return None
    if not g.is_floating_point() or g.shape != shape_of(node, tensors, 0) or g.dtype != dtype_of(node, tensors, 0):
        return None
    return g


def dtype_of(node: Node, tensors: Sequence, i: int) -> torch.dtype:
    """The dtype of input ``i`` as a kernel reads it, without reading recorded data where none is converted."""
    if type(tensors) is RecordedInputs:  # not a subclass that converts (base.Float32Inputs): the recorded dtype
        dtype = node.inputs[i].dtype
        if dtype is None:
            raise RuntimeError(f"internal: input {i} of {node!r} has no recorded dtype")
        return dtype
    return tensors[i].dtype


def result_of(node: Node, tensors: Sequence, k: int = 0) -> torch.Tensor:
    """Output ``k`` of the op on ``tensors``: the recorded one where ``tensors`` are the recorded inputs as recorded
    and it is held, else the op run on ``tensors`` (replacements, float32 copies, a released output) without
    autograd. A kernel still checks the dtype: a recorded output need not be in its inputs' dtype."""
    if type(tensors) is RecordedInputs:
        v = node.outputs[k] if k < len(node.outputs) else None
        if v is not None and v.data is not None:
            return v.data
    with torch.no_grad():
        out = node.run(list(tensors))
    return out[k] if isinstance(out, (tuple, list)) else out


def _unary(fn: Callable[[Node, torch.Tensor, Sequence], torch.Tensor | None], op_name: str) -> VJP:
    """A VJP kernel from ``fn(node, g, tensors)``, the input's gradient (or None to decline) of the overload ``op_name``."""

    def kernel(node, grads, tensors, wrt):
        g = _elementwise(node, grads, tensors, wrt, op_name)
        gx = None if g is None else fn(node, g, tensors)
        return None if gx is None else [gx]

    kernel.__doc__ = fn.__doc__
    kernel.__name__ = fn.__name__
    return kernel


def _from_result(node: Node, g: torch.Tensor, tensors: Sequence) -> torch.Tensor | None:
    """The op's output for ``tensors`` if it has ``g``'s dtype, else None."""
    out = result_of(node, tensors)
    return out if out.dtype == g.dtype and out.shape == g.shape else None


def _relu(node, g, tensors):
    """ReluBackward0: ``threshold_backward(grad, result, 0)`` (grad where the result is > 0, else 0, also where grad
    is inf or NaN). The input gives the same mask: read it instead where the output is not held."""
    v = node.outputs[0]
    held = type(tensors) is RecordedInputs and v is not None and v.data is not None and v.data.dtype == g.dtype
    return aten.threshold_backward(g, v.data if held else tensors[0], 0)


def _tanh(node, g, tensors):
    """TanhBackward0: ``tanh_backward(grad, result)``."""
    out = _from_result(node, g, tensors)
    return None if out is None else aten.tanh_backward(g, out)


def _sigmoid(node, g, tensors):
    """SigmoidBackward0: ``sigmoid_backward(grad, result)``."""
    out = _from_result(node, g, tensors)
    return None if out is None else aten.sigmoid_backward(g, out)


def _exp(node, g, tensors):
    """ExpBackward0: ``grad * result``."""
    out = _from_result(node, g, tensors)
    return None if out is None else g * out


def _sqrt(node, g, tensors):
    """SqrtBackward0: ``grad / (2 * result)``."""
    out = _from_result(node, g, tensors)
    return None if out is None else g / (out * 2)


def _rsqrt(node, g, tensors):
    """RsqrtBackward0: ``-0.5 * grad * result.pow(3)`` (in that order)."""
    out = _from_result(node, g, tensors)
    return None if out is None else (g * -0.5) * out.pow(3)


def _neg(node, g, tensors):
    """NegBackward0: ``grad.neg()`` (reads no operand)."""
    return g.neg()


def _silu(node, g, tensors):
    """SiluBackward0 with grad mode off: ``silu_backward(grad, self)``."""
    return aten.silu_backward(g, tensors[0])


def _gelu(node, g, tensors):
    """GeluBackward0: ``gelu_backward(grad, self, approximate)``, for both approximations."""
    approximate = node.kwargs.get("approximate", "none")
    if set(node.kwargs) - {"approximate"} or len(node.args) != 1 or approximate not in ("none", "tanh"):
        return None
    return aten.gelu_backward(g, tensors[0], approximate=approximate)


def _pow(node, g, tensors):
    """PowBackward0, ``pow_backward(grad, self, exponent)``: zeros for exponent 0, else
    ``grad * (exponent * self.pow(exponent - 1))`` with the exponent as a double, as the C++ formula has it."""
    e = node.arg(1)
    if node.kwargs or type(e) not in (int, float):
        return None  # a complex or bool exponent, a symbolic one: autograd
    x = tensors[0]
    if e == 0:
        return torch.zeros_like(x, memory_format=torch.contiguous_format)
    e = float(e)
    return g * (x.pow(e - 1) * e)


for _fn, _packet, _op in (
    (_relu, "relu", "aten.relu.default"),
    (_tanh, "tanh", "aten.tanh.default"),
    (_sigmoid, "sigmoid", "aten.sigmoid.default"),
    (_exp, "exp", "aten.exp.default"),
    (_sqrt, "sqrt", "aten.sqrt.default"),
    (_rsqrt, "rsqrt", "aten.rsqrt.default"),
    (_neg, "neg", "aten.neg.default"),
    (_silu, "silu", "aten.silu.default"),
    (_gelu, "gelu", "aten.gelu.default"),
    (_pow, "pow", "aten.pow.Tensor_Scalar"),
):
    register_vjp(_packet)(_unary(_fn, _op))


@register_vjp("_softmax", "_log_softmax")
def _softmax(node, grads, tensors, wrt):
    """SoftmaxBackward0 / LogSoftmaxBackward0: ``_softmax_backward_data(grad, result, dim, self.scalar_type())``
    (``_log_softmax_backward_data``), from the op's output: no re-run of the op or of the chain that made its input."""
    if node.op_name not in ("aten._softmax.default", "aten._log_softmax.default") or node.kwargs:
        return None
    g = _elementwise(node, grads, tensors, wrt, node.op_name)
    dim = node.arg(1)
    if g is None or len(node.args) != 3 or type(dim) is not int or node.arg(2) is not False:
        return None  # half_to_float=True: the output's dtype is not the input's
    out = _from_result(node, g, tensors)
    if out is None:
        return None
    backward = aten._softmax_backward_data if node.packet == "_softmax" else aten._log_softmax_backward_data
    return [backward(g, out, dim, g.dtype)]


@register_vjp("native_layer_norm")
def _layer_norm(node, grads, tensors, wrt):
    """NativeLayerNormBackward0 w.r.t. the input only: ``native_layer_norm_backward(grad, input, normalized_shape,
    mean, rstd, weight, bias, [True, False, False])`` with the op's saved ``mean`` and ``rstd`` outputs."""
    g = grads[0]
    if g is None or node.op_name != "aten.native_layer_norm.default" or node.kwargs or len(node.args) != 5:
        return None
    if wrt != [0] or any(x is not None for x in grads[1:]) or not isinstance(node.args[0], Value):
        return None  # weight or bias gradients, cotangents on mean/rstd: autograd
    shape = node.args[1]
    wi, bi = input_index(node, 2), input_index(node, 3)
    if not isinstance(shape, (list, tuple)) or not all(type(s) is int for s in shape):
        return None
    if (wi is None and node.args[2] is not None) or (bi is None and node.args[3] is not None):
        return None
    if len(tensors) != 1 + (wi is not None) + (bi is not None):
        return None
    x = tensors[0]
    if g.dtype != x.dtype or g.shape != x.shape:
        return None
    held = type(tensors) is RecordedInputs and all(v is not None and v.data is not None for v in node.outputs[1:3])
    if held:
        mean, rstd = node.outputs[1].data, node.outputs[2].data
    else:
        with torch.no_grad():
            _, mean, rstd = node.run(list(tensors))
    weight = tensors[wi] if wi is not None else None
    bias = tensors[bi] if bi is not None else None
    gx = aten.native_layer_norm_backward(g, x, list(shape), mean, rstd, weight, bias, [True, False, False])[0]
    return [gx] + [None] * (len(tensors) - 1)


@register_vjp("_native_batch_norm_legit_no_training", "native_batch_norm")
def _bn_eval(node, grads, tensors, wrt):
    """Eval batch norm w.r.t. its input: ``g * weight / sqrt(var + eps)`` per channel."""
    g = grads[0]
    if g is None or node.kwargs or wrt != [0]:
        return None
    if node.packet == "native_batch_norm" and node.arg(5):
        return None  # training mode: statistics depend on the batch
    eps = node.arg(6) if node.packet == "_native_batch_norm_legit_no_training" else node.arg(7)
    wi, vi = input_index(node, 1), input_index(node, 4)
    if vi is None:
        return None
    scale = torch.rsqrt(tensors[vi] + eps)
    if wi is not None:
        scale = scale * tensors[wi]
    dim = len(shape_of(node, tensors, 0))
    return [g * scale.view([1, -1] + [1] * (dim - 2))] + [None] * (len(tensors) - 1)


@register_vjp("max_pool2d_with_indices")
def _maxpool(node, grads, tensors, wrt):
    g = grads[0]
    # The recorded arg-max indices are only valid for the recorded input (DeepLIFT passes a reference).
    if g is None or not isinstance(tensors, RecordedInputs) or node.kwargs or node.outputs[1] is None:
        return None
    x = tensors[0]
    kernel, stride, padding, dilation, ceil = (
        node.arg(1),
        node.arg(2, []),
        node.arg(3, 0),
        node.arg(4, 1),
        node.arg(5, False),
    )
    stride = stride or kernel
    padding = padding if isinstance(padding, (list, tuple)) else [padding] * 2
    dilation = dilation if isinstance(dilation, (list, tuple)) else [dilation] * 2
    indices = node.outputs[1].tensor
    return [aten.max_pool2d_with_indices_backward(g, x, kernel, stride, padding, dilation, ceil, indices)]


@register_vjp("mean")
def _mean(node, grads, tensors, wrt):
    g = grads[0]
    if g is None or node.op_name != "aten.mean.dim" or node.kwargs.get("dtype") is not None:
        return None
    shape = shape_of(node, tensors, 0)
    dims = node.arg(1)
    keep = node.arg(2, False)
    n = len(shape)
    dims = [d % n for d in (dims if isinstance(dims, (list, tuple)) else [dims])] or list(range(n))
    count = 1
    for d in dims:
        count *= shape[d]
    if not keep:
        for d in sorted(dims):
            g = g.unsqueeze(d)
    return [(g / count).expand(shape)]


__all__ = [
    "VJPS",
    "RecordedInputs",
    "autograd_vjp",
    "dtype_of",
    "input_index",
    "register_vjp",
    "result_of",
    "shape_of",
]
