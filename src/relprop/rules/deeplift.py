"""DeepLIFT (rescale rule) as a rule set over the operation graph.

DeepLIFT propagates *multipliers* ``m = d(out)/d(in)`` with every nonlinearity's local derivative
replaced by the secant between the input and a reference (baseline) point:

    m_x = m_y * (f(x) - f(x0)) / (x - x0)       (the gradient where |x - x0| < eps, as Captum)

Linear ops keep their exact VJP, so the attribution ``(x - x0) * m_x`` sums to ``f(x) - f(x0)``
(completeness) for any network whose nonlinearities are elementwise.

Where Captum hooks ``nn.ReLU``/``nn.Sigmoid``... modules (so functional ``torch.relu``, a module used
twice or ``torch.exp`` silently fall back to the gradient or fail), this rule set is keyed on the
ATen ops of the recorded graph. The reference activations come from replaying the recorded ops on
the baseline, or from a second recording of the model on the baseline aligned node by node with the
recording on the input (:meth:`DeepLiftComposite.prepare`), so it works whatever the batch layout of
inner tensors is.

Max pooling follows Captum's rule (contributions routed through the arg-max of both the input and
the reference), and softmax Captum's rescale-and-recentre rule (recentred per softmax row).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from ..canonical import is_normalizer
from ..graph import Graph, Node, RegionOp
from .base import HALF, PreparedGraph, Rule, RuleContext, to_float32, vjp
from .composites import GradientComposite
from .gradient import gradient_rule
from .reduction import logsumexp_multiplier

#: Module types whose ops Captum's DeepLift rescales (``captum.attr._core.deep_lift.SUPPORTED_NON_LINEAR``).
CAPTUM_NONLINEAR = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus)
CAPTUM_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
CAPTUM_SOFTMAX = (nn.Softmax,)

MAXPOOL_PACKETS = (
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "max_pool1d_with_indices",
)


def _ref(ctx: RuleContext) -> tuple[list, list] | None:
    return ctx.notes.reference if ctx.notes is not None else None


def secant(
    ctx: RuleContext, delta_out: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, eps: float, a: int
) -> torch.Tensor:
    """``delta_out / (x - x0)``, with the exact gradient w.r.t. input ``a`` where ``|x - x0| < eps``.

    On a bfloat16/float16 model the rules get float32 copies of the recorded values (:class:`_ReferenceRule`), so
    the quotient is taken in float32: in half precision ``x - x0`` can be a subnormal (6e-8 in float16) and the
    quotient overflows to inf (then NaN at the next ``0 * inf``), although the multiplier is an ordinary float32.
    """
    dx = x - x0
    small = ~(dx.abs() >= eps)  # NaN: -inf at both points (a masked score), where the gradient is the limit
    m = delta_out / torch.where(small, torch.ones_like(dx), dx)
    if small.any():
        exact = gradient_rule(ctx)[a]
        if exact is None:
            raise RuntimeError(f"internal: no gradient for input {a} of {ctx.node!r}")
        m = torch.where(small, exact, m)
    return m


class _ReferenceRule:
    """A DeepLIFT rule: needs the reference values of its node and one float activation input;
    anything else (no reference recorded, several activation inputs) gets the exact gradient."""

    #: the single activation input must be operand 0 (max-pool, softmax) or may be any (elementwise)
    first_operand_only = True

    def __init__(self, eps: float = 1e-10):
        self.eps = eps

    def __call__(self, ctx: RuleContext) -> list:
        ref = _ref(ctx)
        acts = ctx.activation_inputs()
        g = ctx.relevance[0]
        usable = acts == [0] if self.first_operand_only else len(acts) == 1
        if ref is None or not usable or g is None:
            return gradient_rule(ctx)
        a = acts[0]
        res: list = [None] * len(ctx.node.inputs)
        # Half-precision values are read as exact float32 copies: the secant's division and the multipliers
        # it makes are float32 (see :func:`secant`; the VJPs that follow widen to float32 as for LRP).
        x, y, x0, y0 = (to_float32(t) for t in (ctx.inputs[a], ctx.out, ref[0][a], ref[1][0]))
        m = self.multiplier(ctx, to_float32(g), x, y, x0, y0, a)
        if m is None:
            return gradient_rule(ctx)
        res[a] = m
        return res

    def multiplier(self, ctx, g, x, y, x0, y0, a) -> torch.Tensor | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps})"


class Rescale(_ReferenceRule):
    """DeepLIFT's rescale rule for a unary elementwise op (other ops: exact gradient)."""

    first_operand_only = False

    def multiplier(self, ctx, g, x, y, x0, y0, a):
        if y.shape != x.shape:
            return None
        return secant(ctx, g * (y - y0), x, x0, self.eps, a)


class MaxPoolRule(_ReferenceRule):
    """Captum's DeepLIFT max-pool rule: ``g * (max(y, y0) - y0)`` routed through the arg-max of ``x``, plus
    ``g * (y - max(y, y0))`` through the arg-max of ``x0``, divided by ``x - x0`` (gradient where equal)."""

    def multiplier(self, ctx, g, x, y, x0, y0, a):
        ymax = torch.maximum(y, y0)
        others = list(ctx.inputs)
        grads: list[torch.Tensor | None] = [None] * len(ctx.node.outputs)
        grads[0] = g * (ymax - y0)
        through_x = vjp(ctx.node, grads, others, [0])[0]
        grads[0] = g * (y - ymax)
        through_x0 = vjp(ctx.node, grads, [x0] + others[1:], [0])[0]
        if through_x is None or through_x0 is None:
            raise RuntimeError(f"internal: no gradient through the max-pool input of {ctx.node!r}")
        return secant(ctx, through_x + through_x0, x, x0, self.eps, 0)


class SoftmaxRescale(_ReferenceRule):
    """Captum's DeepLIFT softmax rule: elementwise rescale, then recentred (mean subtracted) along the
    softmax dimension (Captum subtracts the mean over the whole batch; here per softmax row)."""

    def multiplier(self, ctx, g, x, y, x0, y0, a):
        m = secant(ctx, g * (y - y0), x, x0, self.eps, 0)
        return m - m.mean(ctx.node.arg(1, -1), keepdim=True)


class SoftmaxExact(_ReferenceRule):
    """DeepLIFT for softmax that sums to delta: the rescale rule on ``softmax(x) = exp(x - logsumexp(x))``
    (``exp`` rescaled elementwise, ``logsumexp`` by its own ``exp -> sum -> log`` decomposition, as
    :class:`LogSumExpRescale`), exact where Captum's rescale-and-recentre rule is not. Everything is read in
    log space (``x - logsumexp(x)`` <= 0), so nothing overflows; masked entries (``-inf`` at both points)
    get no multiplier."""

    def multiplier(self, ctx, g, x, y, x0, y0, a):
        return softmax_multiplier(g, x, y, x0, y0, ctx.node.arg(1, -1), self.eps)


def softmax_multiplier(g, x, y, x0, y0, dim: int, eps: float) -> torch.Tensor:
    """:class:`SoftmaxExact`'s multipliers of ``y = softmax(x, dim)`` against ``x0`` (``y0``), times ``g``."""
    lse, lse0 = torch.logsumexp(x, dim, keepdim=True), torch.logsumexp(x0, dim, keepdim=True)
    m_z = _secant_or(g * (y - y0), (x - lse) - (x0 - lse0), g * y, eps)
    # z = x - logsumexp(x): the multiplier of x is m_z minus what reaches logsumexp, sum(m_z), times its own
    c = torch.maximum(lse, lse0)
    ex, ex0 = torch.exp(x - c), torch.exp(x0 - c)
    s, s0 = torch.exp(lse - c), torch.exp(lse0 - c)
    m_exp = _secant_or(ex - ex0, x - x0, ex, eps)
    m_log = _secant_or(lse - lse0, s - s0, 1 / s, eps)
    return m_z - m_z.sum(dim, keepdim=True) * m_log * m_exp


SDPA_PACKETS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
)


def _named_arg(node: Node, name: str, default=None):
    args = node.op._schema.arguments if not isinstance(node.op, RegionOp) else []
    i = next((i for i, a in enumerate(args) if a.name == name), None)
    return default if i is None else node.arg(i, default)


class AttentionExact:
    """DeepLIFT for a fused ``scaled_dot_product_attention`` kernel that sums to delta: the op written out,
    ``softmax(q @ k^T * scale + mask) @ v``, with :class:`ProductRule` at both products and
    :func:`softmax_multiplier` at the softmax (scores recomputed at ``x`` and ``x0``: one score-sized tensor per
    point, as eager attention holds; grouped-query heads repeated and summed back). Dropout: the gradient at ``x``."""

    def __init__(self, eps: float):
        self.eps = eps

    def __call__(self, ctx: RuleContext) -> list:
        ref, node, g = _ref(ctx), ctx.node, ctx.relevance[0]
        pos = [next((i for i, v in enumerate(node.inputs) if v is node.arg(j)), None) for j in range(3)]
        mask_v = _named_arg(node, "attn_mask", _named_arg(node, "attn_bias"))
        if ref is None or g is None or _named_arg(node, "dropout_p", 0.0):
            return gradient_rule(ctx)
        ip = [i for i in pos if i is not None]
        if len(ip) != 3:
            return gradient_rule(ctx)
        xs = [to_float32(ctx.inputs[i]) for i in ip]
        x0s = [to_float32(ref[0][i]) for i in ip]
        heads, kv_heads = xs[0].shape[-3] if xs[0].dim() > 2 else 1, xs[1].shape[-3] if xs[1].dim() > 2 else 1
        group = heads // kv_heads if heads % kv_heads == 0 else 0
        if group == 0:
            return gradient_rule(ctx)
        if group > 1:  # grouped-query attention: each key/value head serves `group` query heads
            for t in (xs, x0s):
                t[1], t[2] = t[1].repeat_interleave(group, -3), t[2].repeat_interleave(group, -3)
        masks: list[torch.Tensor | None] = [None, None]  # at x and at x0 (a mask computed from held inputs: equal)
        if mask_v is not None:
            j = next(i for i, v in enumerate(node.inputs) if v is mask_v)
            for n, m in enumerate((ctx.inputs[j], ref[0][j])):
                masks[n] = (
                    to_float32(m)
                    if m.dtype != torch.bool
                    else torch.zeros(m.shape, device=m.device).masked_fill(~m, -torch.inf)
                )
        q, k, v = xs
        q0, k0, v0 = x0s
        scale = _named_arg(node, "scale")
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        causal = bool(_named_arg(node, "is_causal", False))

        def probs(q, k, mask):
            sc = q @ k.transpose(-1, -2) * scale
            if causal:
                sc = sc.masked_fill(torch.ones(sc.shape[-2:], dtype=torch.bool, device=sc.device).triu(1), -torch.inf)
            if mask is not None:
                sc = sc + mask
            return sc, torch.softmax(sc, -1)

        (sc, p), (sc0, p0) = probs(q, k, masks[0]), probs(q0, k0, masks[1])
        g = to_float32(g)
        m_p = g @ ((v + v0) / 2).transpose(-1, -2)
        m_v = ((p + p0) / 2).transpose(-1, -2) @ g
        m_s = softmax_multiplier(m_p, sc, p, sc0, p0, -1, self.eps) * scale
        m_s = torch.nan_to_num(m_s, nan=0.0) if causal or mask_v is not None else m_s  # fully masked rows: no flow
        m_q = m_s @ ((k + k0) / 2)
        m_k = m_s.transpose(-1, -2) @ ((q + q0) / 2)
        if group > 1:
            m_k, m_v = (m.unflatten(-3, (kv_heads, group)).sum(-3) for m in (m_k, m_v))
        res: list = [None] * len(node.inputs)
        acts = node.activation_inputs()
        for i, m in zip(ip, (m_q, m_k, m_v)):
            if i in acts:
                res[i] = m
        return res

    def __repr__(self) -> str:
        return f"AttentionExact(eps={self.eps})"


class LayerNormExact(_ReferenceRule):
    """DeepLIFT for ``native_layer_norm`` that sums to delta: ``y = c * rstd * w + b`` with ``c = x - mean(x)``,
    decomposed as :class:`ProductRule`'s ``"exact"`` order does a normaliser: ``c`` through the scale at its
    value at ``x`` (LRP's LN rule), the scale's change ``rstd - rstd0`` (secant of ``rsqrt`` between the two
    variances, whose change is ``mean((c + c0) * (c - c0))``) through ``c0``; then centring's transpose.
    ``y - y0 = (c - c0) * rstd * w + c0 * (rstd - rstd0) * w`` exactly."""

    def multiplier(self, ctx, g, x, y, x0, y0, a):
        node = ctx.node
        if node.packet != "native_layer_norm":
            return None
        dims = tuple(range(x.dim() - len(node.arg(1)), x.dim()))
        wv = node.arg(2)
        w = next((t for v, t in zip(node.inputs, ctx.inputs) if v is wv), None) if wv is not None else None
        gw = g if w is None else g * to_float32(w)
        eps = float(node.arg(4, 1e-5))
        c, c0 = x - x.mean(dims, keepdim=True), x0 - x0.mean(dims, keepdim=True)
        v, v0 = (c * c).mean(dims, keepdim=True), (c0 * c0).mean(dims, keepdim=True)
        r, r0 = torch.rsqrt(v + eps), torch.rsqrt(v0 + eps)
        sr = _secant_or(r - r0, v - v0, -0.5 * r**3, self.eps)
        n = math.prod(x.shape[d] for d in dims)
        m_c = gw * r + (gw * c0).sum(dims, keepdim=True) * sr * (c + c0) / n
        return m_c - m_c.mean(dims, keepdim=True)


def _secant_or(dy: torch.Tensor, dx: torch.Tensor, derivative: torch.Tensor, eps: float) -> torch.Tensor:
    """``dy / dx``, ``derivative`` where ``|dx| < eps`` or ``dx`` is NaN (``-inf - -inf``: a masked entry)."""
    small = ~(dx.abs() >= eps)
    return torch.where(small, derivative, dy / torch.where(small, torch.ones_like(dx), dx))


class LogSumExpRescale(_ReferenceRule):
    """DeepLIFT for ``logsumexp``: the rescale rule on its ``exp -> sum -> log`` decomposition (sums to
    delta exactly; :func:`relprop.rules.reduction.logsumexp_multiplier`). Captum has no such rule."""

    def multiplier(self, ctx, g, x, y, x0, y0, a):
        return logsumexp_multiplier(ctx.node, g, x, y, x0, y0, self.eps)


#: Ops that multiply two activations (bilinear in them): :class:`ProductRule`.
PRODUCT_PACKETS = ("mul", "mm", "bmm", "matmul", "div")


class ProductRule:
    """DeepLIFT for a bilinear op of two activations ``y = f(a, b)`` (``mul``, ``mm``, ``bmm``; and ``a / b``), exact:
    the multipliers give ``f(a, b) - f(a0, b0)`` to rounding, where the gradient at ``x`` (Captum's: autograd
    through the product) misses it by ``f(a - a0, b - b0)``.

    Both VJPs at ``((a + a0) / 2, (b + b0) / 2)`` (the bilinear secant, symmetric in ``a, b``), except for a
    normaliser's scale ``h * rsqrt(mean(h^2) + eps)`` (the operand
    :func:`relprop.canonical.is_normalizer` finds): ``h`` gets the VJP with the scale at its value at ``x``
    (LRP's LN rule) and the scale the VJP at ``h0`` (``f(h, s) - f(h0, s0) = f(h - h0, s) + f(h0, s - s0)``).
    With a zero baseline ``h0 = 0`` and the scale's huge reference value ``1 / sqrt(eps)`` never enters; the
    midpoint would carry it (and cancel it) at every norm. ``a / b`` (not bilinear): ``a`` at ``b``'s value at
    ``x``, then ``b`` by the secant of ``1 / b`` at ``a0`` (the same order: a normaliser held at ``x``).
    """

    def __call__(self, ctx: RuleContext) -> list:
        ref = _ref(ctx)
        acts = ctx.node.activation_inputs()
        if ref is None or not _takes(ctx.node) or ctx.family == "stop" or all(g is None for g in ctx.relevance):
            return gradient_rule(ctx)
        grads = [to_float32(g) for g in ctx.relevance]
        xs = [to_float32(t) for t in ctx.inputs]
        x0s = [to_float32(t) for t in ref[0]]
        res: list = [None] * len(ctx.node.inputs)
        node = ctx.node
        if node.packet == "div":  # a / b - a0 / b0 = (a - a0) / b + a0 * (1/b - 1/b0), exact for any a, b
            if _named_arg(node, "rounding_mode") is not None:
                return gradient_rule(ctx)
            if 0 in acts:  # (a constant numerator, ``param / h``: a0 = a, only the secant of 1 / b)
                res[0] = vjp(ctx.node, grads, xs, [0])[0]
            m_b = -grads[0] * x0s[0] / (xs[1] * x0s[1])
            res[1] = m_b.sum_to_size(xs[1].shape)  # (b broadcast in the quotient: summed back, as autograd)
            return res
        a, b = acts
        scale = [s for s, h in ((b, a), (a, b)) if is_normalizer(node.inputs[s], node.inputs[h])]
        if len(scale) == 1 and node.packet == "mul":
            s = scale[0]
            h = a if b == s else b
            res[h] = vjp(ctx.node, grads, xs, [h])[h]
            at_h0 = list(xs)
            at_h0[h] = x0s[h]
            res[s] = vjp(ctx.node, grads, at_h0, [s])[s]
            return res
        mid = list(xs)
        for i in acts:
            mid[i] = (xs[i] + x0s[i]) / 2
        out = vjp(ctx.node, grads, mid, acts)
        for i in acts:
            res[i] = out[i]
        return res

    def __repr__(self) -> str:
        return "ProductRule()"


def _takes(node: Node) -> bool:
    """Does :class:`ProductRule` explain ``node`` exactly: a product of two activations, or a quotient whose
    denominator is an activation (``a / h`` and ``param / h``; a constant denominator is linear: the gradient)?"""
    acts = node.activation_inputs()
    if node.packet == "div":
        return len(node.inputs) >= 2 and acts in ([0, 1], [1])
    return node.packet in PRODUCT_PACKETS and len(acts) == 2


def promoted_gradient(ctx: RuleContext) -> list:
    """The exact VJP of an op that promotes half-precision inputs to a float32 output (an upcast copy
    ``h.to(torch.float32)``, ``h * rstd`` with a float32 ``rstd``: Hugging Face's RMSNorms, T5's layer norm),
    run on float32 copies of its inputs, so float32 multipliers reach the half-precision input unrounded.
    Autograd's formula rounds them to the input's dtype, where a multiplier over 65504 is inf."""
    if ctx.family == "stop" or not any(g is not None and g.dtype == torch.float32 for g in ctx.relevance):
        return gradient_rule(ctx)
    return ctx.vjp(ctx.relevance, [to_float32(t) for t in ctx.inputs])


def _promotes_half(node: Node) -> bool:
    """Half-precision float inputs, a float32 output: the op type-promotes (see :func:`promoted_gradient`)."""
    return any(v.is_float and v.dtype in HALF for v in node.inputs) and any(
        o is not None and o.dtype == torch.float32 for o in node.outputs
    )


def _in_module(types: tuple) -> Callable[[Node], bool]:
    return lambda node: node.module_type is not None and issubclass(node.module_type, types)


class DeepLiftComposite(GradientComposite):
    """Gradient composite with DeepLIFT's rules on nonlinear, max-pool and softmax ops.

    Args:
        reference: ``fn(baselines) -> Graph``: a recording of the model on the baseline tensors, aligned node by
            node with the graph being explained (used when no replay is asked for, or the replay is not trusted).
        baselines: the baseline tensors, one per graph input, or ``fn(graph) -> tensors`` choosing them from the
            recording on the inputs (``relprop.deeplift`` holds integer inputs that feed no embedding lookup,
            such as attention masks, at their own value).
        replay: ``prepare`` first re-runs the recorded ops on the baselines (much cheaper than a second
            recording); ``False``: always record.
        verify_forward: ``fn(baselines) -> output`` of a plain forward pass on the baselines; the replayed output
            must match it, or the second recording is used.
        allow_appended_ops: the recording on the inputs may end with ops the baseline recording lacks
            (a callable target appends its own ops after the model's).
        eps: below this ``|x - x0|`` the rule uses the gradient.
        scope: ``"all"``: every nonlinear op of the graph (functional, reused modules, ``exp``...);
            ``"captum"``: only ops inside the module types Captum's ``DeepLift`` hooks (for comparisons).
        exact: rules that sum to delta where Captum's do not: products of two activations (:class:`ProductRule`),
            softmax (:class:`SoftmaxExact`), ``native_layer_norm`` (:class:`LayerNormExact`) and fused attention
            (:class:`AttentionExact`). ``None`` (default): on for ``scope="all"`` except at ``nn.Softmax`` modules, where
            Captum has a rule of its own (recentred, not exact) that is kept; off for ``scope="captum"`` (Captum's: the
            gradient at ``x`` through products and layer norms). ``True``: everywhere, ``nn.Softmax`` included.

    The reference values go into the per-call notes of the prepared graph (``NodeNotes.reference``);
    the composite itself holds only its configuration.

    On a bfloat16/float16 model the multipliers are carried in float32 from the seed on
    (``float32_relevance``, read by :func:`relprop.methods.core.run_backward`), and every rescale divides in
    float32: a multiplier ``delta_y / delta_x`` overflows half precision where ``delta_x`` is tiny. An op that
    promotes half-precision inputs to float32 gets its VJP on float32 copies (:func:`promoted_gradient`).
    """

    #: Seed and carry the multipliers in float32 on a half-precision model (as LRP carries its relevance).
    float32_relevance = True

    def __init__(
        self,
        reference: Callable[[list[torch.Tensor]], Graph],
        *,
        baselines: Sequence[torch.Tensor] | Callable[[Graph], Sequence[torch.Tensor]],
        replay: bool = True,
        verify_forward: Callable[[list[torch.Tensor]], object] | None = None,
        allow_appended_ops: bool = False,
        eps: float = 1e-10,
        scope: str = "all",
        exact: bool | None = None,
    ):
        if scope not in ("all", "captum"):
            raise ValueError(f"scope: expected 'all' or 'captum', got {scope!r}")
        if exact is not None and not isinstance(exact, bool):
            raise ValueError(f"exact: expected True, False or None, got {exact!r}")
        super().__init__(name="deeplift")
        self.reference = reference
        self.baselines = baselines if callable(baselines) else list(baselines)
        self.replay = replay
        self.verify_forward = verify_forward
        self.allow_appended_ops = allow_appended_ops
        self.eps = eps
        self.scope = scope
        self.rescale = Rescale(eps)
        self.maxpool = MaxPoolRule(eps)
        self.softmax = SoftmaxRescale(eps)
        self.logsumexp = LogSumExpRescale(eps)
        self.exact = scope == "all" if exact is None else exact
        # Captum has a softmax rule of its own (on nn.Softmax modules): kept unless exact=True is asked for
        self.exact_softmax_modules = exact is True
        self.product = ProductRule()
        self.softmax_exact = SoftmaxExact(eps)
        self.layer_norm = LayerNormExact(eps)
        self.attention = AttentionExact(eps)

    def prepare(self, graph: Graph) -> PreparedGraph:
        plain = super().prepare(graph)
        base = list(self.baselines(graph) if callable(self.baselines) else self.baselines)
        refs = self._replayed(graph, base) if self.replay else None
        if refs is None:
            refs = self._recorded(graph, base)
        notes = {i: replace(n, reference=refs[i]) if i in refs else n for i, n in plain.notes.items()}
        return PreparedGraph(graph, notes)

    def _replayed(self, graph: Graph, base: list[torch.Tensor]) -> dict[int, tuple[list, list]] | None:
        ref = replay_on(graph, base)
        verify = self.verify_forward
        if ref is None or not _same_output(graph, ref, None if verify is None else lambda: verify(base)):
            return None
        return {
            node.index: (
                [ref.get(v.index, v.tensor) for v in node.inputs],
                [None if v is None else ref.get(v.index) for v in node.outputs],
            )
            for node in graph.nodes
        }

    def _recorded(self, graph: Graph, base: list[torch.Tensor]) -> dict[int, tuple[list, list]]:
        ref = self.reference(base)
        extra = len(graph.nodes) - len(ref.nodes)
        if extra < 0 or (extra > 0 and not self.allow_appended_ops):
            raise ValueError(_other_path(graph, ref))
        refs = {}
        for node, rnode in zip(graph.nodes, ref.nodes):
            if not _same_op(node, rnode) or len(node.inputs) != len(rnode.inputs):
                raise ValueError(_other_path(graph, ref))
            refs[node.index] = (
                [v.tensor for v in rnode.inputs],
                [None if v is None else v.tensor for v in rnode.outputs],
            )
        return refs

    def rule_for(self, prepared: PreparedGraph, node: Node) -> Rule | None:
        fam = prepared.notes_of(node).family
        captum = self.scope == "captum"
        if self.exact and _takes(node):
            return self.product
        if self.exact and node.packet == "native_layer_norm":
            return self.layer_norm
        if self.exact and node.packet in SDPA_PACKETS:
            return self.attention
        if node.packet in MAXPOOL_PACKETS:
            if not captum or _in_module(CAPTUM_MAXPOOL)(node):
                return self.maxpool
        elif fam == "nonlinear":
            if not captum or _in_module(CAPTUM_NONLINEAR)(node):
                return self.rescale
        elif fam == "softmax":
            if self.exact and (self.exact_softmax_modules or not _in_module(CAPTUM_SOFTMAX)(node)):
                return self.softmax_exact
            if not captum or _in_module(CAPTUM_SOFTMAX)(node):
                return self.softmax
        elif fam == "smoothmax" and not captum:
            return self.logsumexp
        elif _promotes_half(node):
            return promoted_gradient
        return super().rule_for(prepared, node)

    def __repr__(self) -> str:
        return f"DeepLiftComposite(eps={self.eps}, scope={self.scope!r}, exact={self.exact})"


def _other_path(graph: Graph, ref: Graph) -> str:
    """The refusal of a baseline on which the model runs other ops: the first op that differs, where, and what to do."""
    both = zip(graph.nodes, ref.nodes)
    first = next(((n, r) for n, r in both if not _same_op(n, r) or len(n.inputs) != len(r.inputs)), None)
    if first is not None:
        n, r = first
        where = f"op #{n.index} is {n.op_name} in {n.location} on the inputs but {r.op_name} in {r.location} on the baseline"
    else:
        longer, name = (ref, "baseline") if len(ref.nodes) > len(graph.nodes) else (graph, "inputs")
        n = longer.nodes[min(len(graph.nodes), len(ref.nodes))]
        where = f"the {name} run on with op #{n.index}, {n.op_name} in {n.location}"
    return (
        f"baselines: the model runs other operations on the baseline than on the inputs: {where} "
        f"({len(graph.nodes)} ops on the inputs, {len(ref.nodes)} on the baseline). DeepLIFT compares one computation "
        "at two points; Python control flow on input values (a branch on an attention mask, a length, a value read "
        "with .item()) took another path here. Pass baselines= that take the same path as the inputs: keep inputs "
        "that select the path at their own value (e.g. baselines={'input_ids': ref_ids, 'attention_mask': mask}, or "
        "a tuple with the mask itself in its place), or change the baseline value that triggers the branch"
    )


def _same_op(a: Node, b: Node) -> bool:
    """The same ATen overload; for region nodes (one per recording), the same kind of region."""
    ra, rb = a.region, b.region
    if ra is None or rb is None:
        return ra is None and rb is None and a.op is b.op
    return ra.kind == rb.kind and ra.packet == rb.packet and len(ra.nodes) == len(rb.nodes)


#: Ops whose result Python code can branch on; a replay that changes them is not trusted.
_CONTROL = {"_local_scalar_dense", "is_nonzero", "item", "equal", "allclose", "any", "all", "nonzero"}


def replay_on(graph: Graph, inputs: list[torch.Tensor]) -> dict[int, torch.Tensor] | None:
    """Re-run the recorded ops on other input tensors (one per ``graph.inputs``): value index -> tensor.

    Much cheaper than a second recording (no dispatch mode, no snapshots). Written operands of in-place
    ops are cloned first so every value keeps the data it had when produced. ``None`` if an op fails.
    """
    from ..trace import written_args

    ref: dict[int, torch.Tensor] = {v.index: t for v, t in zip(graph.inputs, inputs)}
    try:
        with torch.no_grad():
            for node in graph.nodes:
                if not any(v.index in ref for v in node.inputs):
                    continue
                pos = () if isinstance(node.op, RegionOp) else written_args(node.op)
                tensors = [ref.get(v.index, v.tensor) for v in node.inputs]
                if pos:
                    written = {id(node.args[i]) for i in pos if i < len(node.args)}
                    tensors = [t.clone() if id(v) in written else t for v, t in zip(node.inputs, tensors)]
                out = node.run(tensors)
                outs = list(out) if isinstance(out, (tuple, list)) else [out]
                if node.packet in _CONTROL:
                    # a value read back into Python (``if x.sum() > 0``): control flow may depend on it
                    orig = node.run([v.tensor for v in node.inputs])
                    orig = list(orig) if isinstance(orig, (tuple, list)) else [orig]
                    for o, r in zip(outs, orig):
                        same = torch.equal(o, r) if isinstance(o, torch.Tensor) else o == r
                        if not same:
                            return None
                for v, o in zip(node.outputs, outs):
                    if v is not None and isinstance(o, torch.Tensor):
                        if o.shape != v.tensor.shape or o.dtype != v.tensor.dtype:
                            return None
                        ref[v.index] = o
    except Exception:  # noqa: BLE001  (fall back to a second recording)
        return None
    return ref


def _same_output(graph: Graph, ref: dict[int, torch.Tensor], expected: Callable[[], object] | None) -> bool:
    """Check the replayed model output against a plain forward pass on the baseline."""
    if expected is None:
        return True
    try:
        want = expected()
    except Exception:  # noqa: BLE001
        return False
    flat = [t for t in (want if isinstance(want, (tuple, list)) else [want]) if isinstance(t, torch.Tensor)]
    if not flat and hasattr(want, "logits"):
        flat = [want.logits]
    if not flat:
        return False
    got = [ref.get(v.index) for v in graph.output_values]
    for w in flat:
        if not any(g is not None and g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-5) for g in got):
            return False
    return True


__all__ = ["CAPTUM_NONLINEAR", "DeepLiftComposite", "MaxPoolRule", "Rescale", "SoftmaxRescale", "replay_on"]
