"""Rules for reductions: sums of activations (``add``, ``sub``, ``sum``, ``mean``, average pooling,
``cumsum``...) and the smooth maximum ``logsumexp``.

Sums: relevance is split in proportion to each operand's contribution to the sum (Zennit's ``Norm``
rule, the epsilon rule with no parameters): ``R_i = x_i * J_i^T (R / stab(z))``. Constant and parameter
operands (a bias, an attention mask) absorb their share, as a bias does in the epsilon rule.

``logsumexp`` is a reduction, not an element-wise function: it gets :class:`SoftmaxShare` (family
``"smoothmax"``), which splits the relevance of each output over the reduced inputs with the softmax
weights of that reduction.
"""

from __future__ import annotations

import torch

from .base import RuleContext, register_family
from .linear import contributions


class Proportional:
    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = stabilizer

    def __call__(self, ctx: RuleContext) -> list:
        acts = ctx.activation_inputs()
        res: list = [None] * len(ctx.node.inputs)
        if not acts or ctx.relevance[0] is None:
            return res
        for a, r in contributions(ctx, acts, self.stabilizer).items():
            res[a] = r
        return res

    def __repr__(self) -> str:
        return f"Proportional(stabilizer={self.stabilizer})"


class SoftmaxShare:
    """``R_i = softmax(x)_i * R_y`` over the reduced dims, for ``y = logsumexp(x)``.

    Definition: the relevance of each output is split over the inputs it reduces in proportion to
    their softmax weights ``p_i = exp(x_i - y)``. Why this rule:

    * It is a deep Taylor decomposition (Montavon et al. 2017) with no remainder. ``logsumexp`` is
      translation-equivariant, ``f(x + c 1) = f(x) + c``, so it is exactly linear along the direction
      ``1``; the root point on that line is ``r = x - y 1`` (``f(r) = 0``), and the first-order expansion
      ``f(x) = f(r) + grad f(r) . (x - r) = p . (y 1)`` is exact (``grad f(r) = p`` by shift invariance of the
      softmax). Its terms, ``p_i y``, scaled to the arriving ``R_y``, are this rule.
    * It conserves exactly: ``sum_i p_i = 1``, whatever the sign of ``y`` (no stabiliser, no 0/0).
    * It is the smooth version of the winner-take-all rule for max pooling (LSE tends to max and ``p``
      to the one-hot of the argmax as the inputs' scale grows).

    ``p_i R_y`` is the op's vector-Jacobian product applied to ``R_y``, so the rule is computed with the
    op's own VJP (any ``dim``/``keepdim``, the same numbers as the gradient). The identity rule it had as
    an "element-wise nonlinearity" failed on the shape change (the audit's D11).
    """

    def __call__(self, ctx: RuleContext) -> list:
        acts = ctx.activation_inputs()
        res: list = [None] * len(ctx.node.inputs)
        if not acts or ctx.relevance[0] is None:
            return res
        return ctx.vjp([ctx.relevance[0]], None, acts)

    def __repr__(self) -> str:
        return "SoftmaxShare()"


def logsumexp_multiplier(
    node, g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, eps: float
) -> torch.Tensor:
    """DeepLIFT multipliers of ``y = logsumexp(x, dim, keepdim)`` against the reference ``x0`` (``y0``), times ``g``.

    The rescale rule applied to the op's own decomposition ``exp -> sum -> log`` (what DeepLIFT computes
    when the function is written out): ``m_i = (y - y0) / (s - s0) * (e^x_i - e^x0_i) / (x_i - x0_i)`` with
    ``s = sum e^x``. It sums to delta exactly, ``sum_i m_i (x_i - x0_i) = y - y0``; the exact gradient at
    ``x`` (``softmax(x)``) does not. Exponentials are shifted by ``max(y, y0)`` (no overflow); where
    ``|x_i - x0_i|`` or ``|s - s0|`` is below ``eps`` the derivative replaces the secant.
    """
    nd = x.dim()
    dims = node.arg(1, None)
    dims = [dims] if isinstance(dims, int) else list(dims or range(nd))
    dims = sorted(d % nd for d in dims) if nd else []
    if not node.arg(2, False):
        for d in dims:
            y, y0, g = y.unsqueeze(d), y0.unsqueeze(d), g.unsqueeze(d)
    c = torch.maximum(y, y0)
    ex, ex0 = torch.exp(x - c), torch.exp(x0 - c)
    s, s0 = torch.exp(y - c), torch.exp(y0 - c)  # sum of exp(x - c): exp(y - c) <= 1
    dx, ds = x - x0, s - s0
    small_x, small_s = dx.abs() < eps, ds.abs() < eps
    m_exp = torch.where(small_x, ex, (ex - ex0) / torch.where(small_x, torch.ones_like(dx), dx))
    m_log = torch.where(small_s, 1 / s, (y - y0) / torch.where(small_s, torch.ones_like(ds), ds))
    return g * m_log * m_exp


register_family("smoothmax", "logsumexp")
register_family(
    "sum",
    "add",
    "sub",
    "rsub",
    "sum",
    "mean",
    "nansum",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "cumsum",
    "scatter_add",
    "index_add",
    "upsample_bilinear2d",
    "upsample_linear1d",
    "upsample_bicubic2d",
    "upsample_trilinear3d",
    "_upsample_bilinear2d_aa",
    "addcmul",
    "addcdiv",
    "trace",
    "diff",
    "im2col",
    "col2im",
    "mean_dim",
    # ||x|| = sqrt(sum x^2) is homogeneous of degree 1: the z-rule splits it as x_i^2 / ||x||^2.
    "linalg_vector_norm",
    "norm",
    "frobenius_norm",
)
