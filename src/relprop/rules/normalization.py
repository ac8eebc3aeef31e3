"""Rules for normalisation layers: layer norm, batch norm (eval), group norm, fused RMS norm.

LRP treats the normalising scale (1/std) as a constant, which makes the layer linear in its
input (AttnLRP; LXT implements it as a stop-gradient on the std). With the scale constant, a
layer norm is ``y = (x - mean(x)) * c * w + b`` and the epsilon rule on that linear map gives
``R_x = x * J^T (R / y)``; without centering (RMS norm, batch norm in eval) this reduces to the
identity rule up to the bias's share.
"""

from __future__ import annotations

import torch

from ..graph import Value
from .base import RuleContext, register_family
from .linear import ratio


def _is_eval_batch_norm(node) -> bool:
    if node.packet == "_native_batch_norm_legit_no_training":
        return True
    if node.packet in ("native_batch_norm", "_native_batch_norm_legit", "batch_norm"):
        return not bool(node.arg(5, False))
    return False


def _is_train_batch_norm(node) -> bool:
    """A batch norm normalising by the statistics of the batch itself (training mode)."""
    return node.packet in ("native_batch_norm", "_native_batch_norm_legit", "batch_norm") and bool(node.arg(5, False))


class ConstantScale:
    """Epsilon rule on the normalisation with its scale held constant (LXT's LayerNorm/RMSNorm rule)."""

    def __init__(self, stabilizer: float = 0.0):
        self.stabilizer = stabilizer

    def __call__(self, ctx: RuleContext) -> list:
        node = ctx.node
        res: list = [None] * len(node.inputs)
        if ctx.relevance[0] is None or not ctx.needs[0]:
            return res
        x, y = ctx.inputs[0], ctx.out
        s = ratio(ctx.rel, y, self.stabilizer)
        p = node.packet
        if p == "native_layer_norm":
            shape = node.args[1]
            dims = tuple(range(x.dim() - len(shape), x.dim()))
            w = node.arg(2)
            rstd = ctx.output(2)
            g = s * (ctx.inputs[1] if isinstance(w, Value) else 1.0) * rstd
            g = g - g.mean(dims, keepdim=True)
            res[0] = x * g
        elif p == "native_group_norm":
            n, c, _hw, groups = node.args[3], node.args[4], node.args[5], node.args[6]
            w = node.arg(1)
            scale = ctx.inputs[1].view(1, c, *[1] * (x.dim() - 2)) if isinstance(w, Value) else 1.0
            rstd = ctx.output(2).view(n, groups, 1)
            g = (s * scale).reshape(n, groups, -1)
            g = g * rstd
            g = g - g.mean(-1, keepdim=True)
            res[0] = x * g.reshape(x.shape)
        elif _is_train_batch_norm(node):
            # Batch statistics: y = (x - mean_batch(x)) * invstd * w + b, the layer-norm rule over the
            # batch and spatial dims (centering kept, the scale invstd held constant).
            shape = [1, -1] + [1] * (x.dim() - 2)
            dims = (0, *range(2, x.dim()))
            w = node.arg(1)
            g = s * ctx.output(2).view(shape)
            if isinstance(w, Value):
                g = g * _tensor_of(ctx, w).view(shape)
            g = g - g.mean(dims, keepdim=True)
            res[0] = x * g
        else:  # eval batch norm, fused RMS norm: no centering w.r.t. x, scale constant -> z-rule of x * c
            res[0] = x * _constant_scale(ctx) * s
        return res

    def __repr__(self) -> str:
        return f"ConstantScale(stabilizer={self.stabilizer})"


def _constant_scale(ctx: RuleContext) -> torch.Tensor:
    """The per-element factor ``dy/dx`` with the statistics held constant."""
    node = ctx.node
    x = ctx.inputs[0]
    if _is_eval_batch_norm(node):
        shape = [1, -1] + [1] * (x.dim() - 2)
        w, var = node.arg(1), node.arg(4)
        eps = node.arg(7) if node.packet != "_native_batch_norm_legit_no_training" else node.arg(6)
        var_t = _tensor_of(ctx, var)
        scale = torch.rsqrt(var_t + eps).view(shape)
        if w is not None:
            scale = scale * _tensor_of(ctx, w).view(shape)
        return scale
    # _fused_rms_norm(x, normalized_shape, weight, eps) -> (y, rstd)
    rstd = ctx.outputs[1] if len(ctx.outputs) > 1 else None
    w = node.arg(2)
    scale = rstd if rstd is not None else torch.ones_like(x)
    if w is not None:
        scale = scale * _tensor_of(ctx, w)
    return scale


def _tensor_of(ctx: RuleContext, value) -> torch.Tensor:
    return ctx.inputs[ctx.node.inputs.index(value)]


class PassThrough:
    """Zennit's ``Pass`` for an unmerged batch norm: ``R_x = R_y``."""

    def __call__(self, ctx: RuleContext) -> list:
        res: list = [None] * len(ctx.node.inputs)
        if ctx.needs[0] and ctx.relevance[0] is not None:
            res[0] = ctx.relevance[0]
        return res

    def __repr__(self) -> str:
        return "PassThrough()"


register_family(
    "norm",
    "native_layer_norm",
    "native_group_norm",
    "_native_batch_norm_legit_no_training",
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_fused_rms_norm",
    "layer_norm",
    "group_norm",
    "batch_norm",
    "rms_norm",
    "instance_norm",
)
