"""Softmax and fused attention.

Softmax (AttnLRP, Achtibat et al. 2024, Prop. 3.1): ``R_x = x * (R - s * sum(R))``, which is the
input times the softmax gradient of ``R / s``; it needs no division, and positions with ``-inf``
scores (masked) get zero. Fused scaled-dot-product attention kernels are explained as their parts:
scores ``q k^T * scale (+ mask)``, softmax, weighted sum ``A v``, each product with the uniform
rule. CP-LRP (Ali et al. 2022) holds the attention weights constant: all relevance goes to ``v``.
"""

from __future__ import annotations

import math

import torch

from .base import HALF, RuleContext, register_family
from .linear import stabilize, writable


class SoftmaxRule:
    def __call__(self, ctx: RuleContext) -> list:
        res: list = [None] * len(ctx.node.inputs)
        if ctx.relevance[0] is None or not ctx.needs[0]:
            return res
        dim = ctx.node.args[1]
        x, s, r = ctx.inputs[0], ctx.out, ctx.relevance[0]
        res[0] = _softmax_input_relevance(x.to(r.dtype), s.to(r.dtype), r, dim).to(x.dtype)
        return res

    def __repr__(self) -> str:
        return "SoftmaxRule()"


def _softmax_input_relevance(x: torch.Tensor, s: torch.Tensor, r: torch.Tensor, dim: int) -> torch.Tensor:
    g = s * r.sum(dim, keepdim=True)
    if writable(g, r, g) and writable(g, x, g):
        # The same operations written into the one new tensor (attention-score sized: five temporaries
        # fewer); equal bits to the expression below (tests/test_lrp_fast.py).
        torch.sub(r, g, out=g)
        # ``not |x| < inf`` is ``not isfinite(x)`` (NaN compares false), in fewer passes than isfinite's.
        return g.mul_(x).masked_fill_(torch.lt(x.abs(), float("inf")).logical_not_(), 0.0)
    g = r - g
    return torch.where(torch.isfinite(x), x * g, torch.zeros_like(g))


class AttentionRule:
    """Fused SDPA kernels as scores -> softmax -> weighted sum, with uniform/softmax rules."""

    def __init__(self, epsilon: float = 0.0, constant_weights: bool = False):
        self.epsilon = epsilon
        self.constant_weights = constant_weights

    def __call__(self, ctx: RuleContext) -> list:
        node = ctx.node
        q, k, v = ctx.inputs[:3]
        res: list = [None] * len(node.inputs)
        r = ctx.relevance[0]
        if r is None:
            return res
        # Half-precision model, float32 relevance (LRP): the rule runs in float32 on the recorded values.
        if r.dtype == torch.float32 and q.dtype in HALF:
            q, k, v = q.float(), k.float(), v.float()
        mask_value = node.kwargs.get(
            "attn_mask", node.arg(3) if node.packet == "_scaled_dot_product_efficient_attention" else None
        )
        mask = (
            ctx.inputs[node.inputs.index(mask_value)] if mask_value is not None and mask_value in node.inputs else None
        )
        causal = bool(
            node.kwargs.get("is_causal", node.arg(4, False) if "flash" in node.packet else node.arg(6, False))
        )
        scale = node.kwargs.get("scale")
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        rep = q.shape[-3] // k.shape[-3] if q.dim() >= 3 and k.shape[-3] != q.shape[-3] else 1
        kk = k.repeat_interleave(rep, dim=-3) if rep > 1 else k
        vv = v.repeat_interleave(rep, dim=-3) if rep > 1 else v
        qk = (q @ kk.transpose(-1, -2)) * scale
        scores = qk
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if causal:
            L, S = q.shape[-2], kk.shape[-2]
            keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L)
            scores = scores.masked_fill(~keep, float("-inf"))
        a = torch.softmax(scores, dim=-1)
        out = a @ vv
        s = r / stabilize(out, self.epsilon)
        share = 1.0 if self.constant_weights else 0.5
        r_v = share * vv * (a.transpose(-1, -2) @ s)
        if rep > 1:
            r_v = r_v.unflatten(-3, (k.shape[-3], rep)).sum(-3)
        res[2] = r_v.to(v.dtype)
        if not self.constant_weights:
            r_a = 0.5 * a * (s @ vv.transpose(-1, -2))
            g = r_a - a * r_a.sum(-1, keepdim=True)  # softmax rule, in gradient form
            g = torch.where(torch.isfinite(scores), g, torch.zeros_like(g))
            # scores = qk + mask: the mask is a constant, qk takes its proportional share qk * g
            r_q = 0.5 * q * ((g * scale) @ kk)
            r_k = 0.5 * kk * ((g * scale).transpose(-1, -2) @ q)
            if rep > 1:
                r_k = r_k.unflatten(-3, (k.shape[-3], rep)).sum(-3)
            res[0], res[1] = r_q.to(q.dtype), r_k.to(k.dtype)
        return res

    def __repr__(self) -> str:
        return f"AttentionRule(constant_weights={self.constant_weights})"


register_family("softmax", "_softmax", "softmax", "_safe_softmax")
register_family(
    "attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math",
    "scaled_dot_product_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
