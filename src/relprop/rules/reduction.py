"""Rules for sums of activations: ``add``, ``sub``, ``sum``, ``mean``, average pooling, ``cumsum``...

Relevance is split in proportion to each operand's contribution to the sum (Zennit's ``Norm`` rule,
the epsilon rule with no parameters): ``R_i = x_i * J_i^T (R / stab(z))``. Constant and parameter
operands (a bias, an attention mask) absorb their share, as a bias does in the epsilon rule.
"""

from __future__ import annotations

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
