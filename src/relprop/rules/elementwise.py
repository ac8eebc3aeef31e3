"""Rules for elementwise ops: nonlinearities (identity rule) and products of activations (uniform rule).

* A unary nonlinearity ``y = f(x)`` passes relevance unchanged (``R_x = R_y``): the identity rule of
  AttnLRP, which for ReLU coincides with Zennit's plain-gradient pass-through.
* A product of two activations (a gate ``a * b``, ``q @ k^T``, ``A @ v``) splits the epsilon-LRP
  relevance of each product term evenly between its factors (AttnLRP's uniform rule). A factor that
  is a normaliser of the other (RMSNorm's ``x * rsqrt(mean(x^2))``) or that the rule set declares
  constant (CP-LRP's attention weights) is treated as a constant: the other factor takes everything.
"""

from __future__ import annotations

import torch

from .base import HALF, RuleContext, register_family
from .linear import contributions


class Identity:
    """``R_x = R_y`` for the (first) activation operand of an elementwise op."""

    def __call__(self, ctx: RuleContext) -> list:
        res: list = [None] * len(ctx.node.inputs)
        acts = ctx.activation_inputs()
        if acts and ctx.relevance[0] is not None:
            a = acts[0]
            r = ctx.relevance[0]
            v = ctx.node.inputs[a]  # only shape and dtype: no need to touch (or recompute) the data
            if v.shape is not None and r.shape != v.shape:
                r = r.sum_to_size(v.shape) if r.dim() >= len(v.shape) else r.expand(v.shape)
            if v.dtype is not None and r.dtype != v.dtype:  # a region that ends in a cast (x -> f(x).double())
                if not (v.dtype in HALF and r.dtype == torch.float32):  # half model: relevance stays float32
                    r = r.to(v.dtype)
            res[a] = r
        return res

    def __repr__(self) -> str:
        return "Identity()"


class Uniform:
    """Epsilon-LRP over the product terms, each term's share split evenly among its activation factors.

    For a single activation factor this is the epsilon rule (relevance passes to it entirely).

    ``epsilon=0`` (the default in every composite, as AttnLRP/LXT define the rule) divides by the product
    itself; where the product is exactly 0 (``relu(x) * g``, a closed gate) its factors have nothing to
    share and the relevance arriving there is absorbed (``linear.stabilize``), instead of the overflow to
    inf and ``inf * 0 = NaN`` that a denominator of ``finfo.tiny`` gave under Flat. A positive ``epsilon``
    is Zennit's ``z + epsilon * sign(z)`` (sign(0) = +1) and also absorbs part of small products.
    """

    def __init__(self, epsilon: float = 0.0):
        self.epsilon = epsilon

    def __call__(self, ctx: RuleContext) -> list:
        acts = ctx.activation_inputs()
        res: list = [None] * len(ctx.node.inputs)
        if not acts or ctx.relevance[0] is None:
            return res
        node = ctx.node
        if len(acts) == 1 and node.packet in ("mul", "div") and node.inputs[acts[0]].shape == node.first_output.shape:
            # x * c: the z-rule share of x is all of R. Shapes from the Values: the data (an attention-sized
            # score tensor) is neither read nor recomputed.
            res[acts[0]] = ctx.relevance[0]
            return res
        for a, r in contributions(ctx, acts, self.epsilon).items():
            res[a] = r.div_(len(acts))  # a new tensor of ours (contributions): no temporary
        return res

    def __repr__(self) -> str:
        return f"Uniform(epsilon={self.epsilon})"


class Stop:
    """Nothing flows back (``detach``, comparisons, ``*_like`` constructors...)."""

    def __call__(self, ctx: RuleContext) -> list:
        return [None] * len(ctx.node.inputs)

    def __repr__(self) -> str:
        return "Stop()"


register_family(
    "nonlinear",
    "relu",
    "gelu",
    "silu",
    "sigmoid",
    "tanh",
    "exp",
    "exp2",
    "expm1",
    "log",
    "log2",
    "log10",
    "log1p",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "pow",
    "abs",
    "neg",
    "elu",
    "leaky_relu",
    "hardtanh",
    "hardswish",
    "hardsigmoid",
    "mish",
    "softplus",
    "erf",
    "erfc",
    "sin",
    "cos",
    "clamp",
    "clamp_min",
    "clamp_max",
    "relu6",
    "celu",
    "selu",
    "glu",
    "logit",
    "threshold",
    "square",
    "log_sigmoid_forward",
    "prelu",
    "_prelu_kernel",
    "rrelu_with_noise",
    "gelu_",
    "atan",
    "asin",
    "acos",
    "sinh",
    "cosh",
    "tan",
    "sgn",
    "frac",
    "nan_to_num",
    "_log_softmax",
    "log_softmax",
    "softshrink",
    "hardshrink",
    "tanhshrink",
    "xlogy",
    "special_erfcx",
    "lerp",
    # derivative 1 w.r.t. self (piecewise shifts): routed by their exact VJP, identity under LRP
    "fmod",
    "remainder",
)
register_family("product", "mul", "div", "_weight_norm_interface")
register_family(
    "stop",
    "detach",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
    "randint_like",
    "sign",
    "floor",
    "ceil",
    "round",
    "trunc",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "argmax",
    "argmin",
    "bernoulli",
    "isnan",
    "isinf",
    "isfinite",
    "logical_not",
    "logical_and",
    "logical_or",
    "bitwise_and",
    "bitwise_or",
    "bitwise_not",
    "fill",
    "zero",
    "uniform",
    "normal",
    "random",
    "exponential",
    "bucketize",
    "searchsorted",
    "floor_divide",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "new_empty_strided",
    "_local_scalar_dense",
    "all",
    "any",
    "nonzero",
    "masked_select_backward",
    "lift_fresh_copy",
    "scalar_tensor",
    "arange",
    "zeros",
    "ones",
    "full",
    "empty",
    "empty_strided",
    "randn",
    "rand",
    "randint",
    "linspace",
    "eye",
    "randperm",
    "_to_dense",
    "sort_indices",
    "_assert_async",
    "_assert_tensor_metadata",
    "_functional_assert_async",
)
