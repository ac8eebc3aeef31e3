"""Rules for sums of activations: ``add``, ``sub``, ``sum``, ``mean``, average pooling, ``cumsum``...

Relevance is split in proportion to each operand's contribution to the sum (Zennit's ``Norm`` rule,
the epsilon rule with no parameters): ``R_i = x_i * J_i^T (R / stab(z))``. Constant and parameter
operands (a bias, an attention mask) absorb their share, as a bias does in the epsilon rule.
"""

from __future__ import annotations

from .base import RuleContext, register_family, vjp
from .linear import stabilize


class Proportional:
    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = stabilizer

    def __call__(self, ctx: RuleContext) -> list:
        acts = ctx.activation_inputs()
        res: list = [None] * len(ctx.node.inputs)
        if not acts or ctx.relevance[0] is None:
            return res
        s = ctx.rel / stabilize(ctx.out, self.stabilizer)
        node = ctx.node
        if node.packet in ("add", "sub") and len(node.inputs) == 2 and len(node.args) == 2 and not node.kwargs:
            # z = a +/- b: the VJP is (s, +/-s) reduced to each operand's shape; no re-run needed.
            for a in acts:
                x = ctx.inputs[a]
                g = s if (a == 0 or node.packet == "add") else -s
                res[a] = x * (g.sum_to_size(x.shape) if g.shape != x.shape else g)
            return res
        grads = vjp(node, [s], None, acts)
        for a in acts:
            res[a] = ctx.inputs[a] * grads[a]
        return res

    def __repr__(self) -> str:
        return f"Proportional(stabilizer={self.stabilizer})"


register_family(
    "sum",
    "add", "sub", "rsub", "sum", "mean", "nansum", "avg_pool1d", "avg_pool2d", "avg_pool3d", "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "cumsum", "scatter_add", "index_add",
    "upsample_bilinear2d", "upsample_linear1d", "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_bilinear2d_aa",
    "addcmul", "addcdiv", "trace", "diff", "im2col", "col2im", "mean_dim",
)
