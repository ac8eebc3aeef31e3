"""Integrated gradients (Sundararajan et al. 2017) over the traced graph, as Captum computes it.

The path from the baseline to the input is sampled at ``n_steps`` points (Gauss-Legendre nodes, or
left/right/middle/trapezoid Riemann sums); the steps are concatenated along the batch and sent
through one traced backward pass per internal batch (``internal_batch_size`` rows at most).
Token inputs are interpolated in embedding space (each lookup of the token ids is replaced by
``e(x0) + alpha * (e(x) - e(x0))``), and scored per token (summed over the hidden dim).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..rules.composites import GradientComposite
from ..trace import record
from ._common import (
    backward,
    check_positive_int,
    embedding_edit,
    expand_target,
    format_baselines,
    is_float,
    leaves,
    rebuild,
)
from ._validate import score as target_score
from ._validate import select_output, updating_norms, validate_call, warn_training
from .core import Explanation, split_inputs
from .explain import register_method

APPROXIMATIONS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def step_sizes_and_alphas(n_steps: int, approximation: str = "gausslegendre") -> tuple[list[float], list[float]]:
    """Quadrature weights and points in [0, 1] (the same numbers as ``captum.attr._utils.approximation_methods``)."""
    if approximation == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return (0.5 * weights).tolist(), (0.5 * (1 + nodes)).tolist()
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"approximation: expected one of {', '.join(APPROXIMATIONS)}, got {approximation!r}")
    if n_steps < 2:
        raise ValueError(f"n_steps: Riemann approximations need n_steps >= 2, got {n_steps}")
    kind = approximation.split("_")[1]
    sizes = [1 / n_steps] * n_steps
    if kind == "trapezoid":
        sizes[0] /= 2
        sizes[-1] /= 2
        alphas = torch.linspace(0, 1, n_steps).tolist()
    elif kind == "left":
        alphas = torch.linspace(0, 1 - 1 / n_steps, n_steps).tolist()
    elif kind == "middle":
        alphas = torch.linspace(1 / (2 * n_steps), 1 - 1 / (2 * n_steps), n_steps).tolist()
    else:
        alphas = torch.linspace(1 / n_steps, 1, n_steps).tolist()
    return sizes, alphas


@register_method("integrated_gradients", "ig")
def integrated_gradients(
    model,
    inputs,
    *,
    target,
    baselines=None,
    n_steps=50,
    approximation="gausslegendre",
    internal_batch_size=None,
    multiply_by_inputs=True,
    engine="auto",
) -> Explanation:
    """Integrated gradients, as Captum's ``IntegratedGradients.attribute``.

    Args:
        baselines: ``None`` (zeros; token id 0), a number, a tensor broadcastable to the input, one per input
            tensor (tuple), or a dict for dict inputs.
        n_steps: number of points on the path.
        approximation: ``"gausslegendre"`` (Captum's default) or ``"riemann_left"``, ``"riemann_right"``,
            ``"riemann_middle"``, ``"riemann_trapezoid"`` (Captum's ``method=``).
        internal_batch_size: at most this many rows (steps x samples) per backward pass (``None``: 32).
        multiply_by_inputs: multiply the path-averaged gradient by ``x - x0`` (True) or return it alone.
        engine: ``"graph"``: one traced backward pass per internal batch; ``"autograd"``: ``torch.autograd.grad``
            with the parameters frozen (the same gradient, without recording; float inputs only);
            ``"auto"`` (default): autograd for float inputs in eval mode, the graph otherwise, and the graph
            where autograd refuses an in-place write into a tensor it saved (``torch.relu(h).mul_(3)``);
            ``"autograd"`` raises :class:`InPlaceAutogradError` there.

    ``Explanation.score`` and ``output`` are the model's on ``inputs`` (one extra point, alpha = 1 with
    weight 0, is evaluated with the first internal batch).

    A model in training mode (active dropout or batch norm) gets a warning, because the path is then not
    a path through one function: each internal batch is a new forward pass, and dropout draws an
    independent mask for every row of it, i.e. for every (step, sample) pair; the gradient at a step is
    the gradient of the forward that ran with that step's mask (the graph engine records the drawn mask
    as a constant; autograd differentiates the same forward), so the integral mixes as many different
    networks as there are steps. Batch norm in training mode normalises with the statistics of the
    internal batch (interpolated inputs of several steps and samples), so the result depends on
    ``internal_batch_size``. In training mode ``"auto"`` uses the graph engine, whose forward does not
    update batch-norm running statistics; ``engine="autograd"`` is refused when a batch norm would update
    them. Call ``model.eval()`` to explain the model's predictions.
    """
    if engine not in ("auto", "graph", "autograd"):
        raise ValueError(f"engine: expected 'auto', 'graph' or 'autograd', got {engine!r}")
    check_positive_int("n_steps", n_steps)
    if internal_batch_size is not None:
        check_positive_int("internal_batch_size", internal_batch_size)
    if not isinstance(multiply_by_inputs, bool):
        raise ValueError(f"multiply_by_inputs: expected True or False, got {multiply_by_inputs!r}")
    sizes, alphas = step_sizes_and_alphas(n_steps, approximation)
    # One more point, alpha = 1 with weight 0, first: the forward pass at the input itself, so that
    # ``output`` and ``score`` are the model's on ``inputs`` (not on the first path point).
    sizes, alphas = [0.0, *sizes], [1.0, *alphas]
    batch = validate_call(model, inputs, target, same_batch=True)
    xs = leaves(inputs)
    base = format_baselines(inputs, baselines)
    # None: about 32 rows per pass (same numbers as all at once, up to summation order; smaller passes are
    # faster on CPU and bound the memory)
    rows = 32 if internal_batch_size is None else internal_batch_size
    per_chunk = max(1, rows // batch)
    int_pos = [i for i, x in enumerate(xs) if not is_float(x)]
    if engine == "autograd" and int_pos:
        raise ValueError("engine: 'autograd' needs float inputs; token inputs need engine='graph' (or 'auto')")
    training = warn_training(model, "integrated_gradients", "each path point draws its own dropout mask")
    norms = updating_norms(model)
    if engine == "autograd" and norms:
        raise ValueError(
            f"engine: 'autograd' runs the model as it is, and in training mode its batch norms "
            f"({', '.join(norms[:3])}) would update their running statistics; call model.eval() or use engine='graph'"
        )
    use_autograd = engine == "autograd" or (engine == "auto" and not int_pos and not training)
    total: list = [None] * len(xs)
    weights: dict[int, list] = {}
    expl = None
    for start in range(0, len(alphas), per_chunk):
        a = alphas[start : start + per_chunk]
        w = sizes[start : start + per_chunk]
        k = len(a)
        alpha_rows = torch.tensor(a, dtype=torch.float32, device=xs[0].device).repeat_interleave(batch)
        scaled = []
        for x, b0 in zip(xs, base):
            if is_float(x):
                al = alpha_rows.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
                scaled.append(b0.repeat(k, *([1] * (x.dim() - 1))) + al * (x - b0).repeat(k, *([1] * (x.dim() - 1))))
            else:
                scaled.append(x.repeat(k, *([1] * (x.dim() - 1))))
        ids = [scaled[i] for i in int_pos]
        base_ids = [base[i].repeat(k, *([1] * (base[i].dim() - 1))) for i in int_pos]

        tables: dict[int, list] = {}

        def edit(j, emb, weight, base_ids=base_ids, alpha_rows=alpha_rows, tables=tables):
            tables.setdefault(j, []).append(weight)
            e0 = F.embedding(base_ids[j], weight)
            al = alpha_rows.to(emb.dtype).view(-1, *([1] * (emb.dim() - 1)))
            return e0 + al * (emb - e0)

        bw = None
        if use_autograd:
            try:
                bw = autograd_backward(model, rebuild(inputs, scaled), expand_target(target, batch, k), k * batch)
            except InPlaceAutogradError:
                if engine == "autograd":
                    raise
                # The model writes in place into a tensor autograd saved: relprop's recorded gradient (equal
                # to autograd's bit for bit where autograd runs) differentiates it; this and later chunks.
                use_autograd = False
        if bw is None:
            with embedding_edit(ids, edit):
                bw = backward(
                    model,
                    rebuild(inputs, scaled),
                    target=expand_target(target, batch, k),
                    composite=GradientComposite(),
                    method="integrated_gradients",
                    recorder=functools.partial(record, warn=False),  # warned once above
                )
        wt = torch.tensor(w, dtype=torch.float64, device=xs[0].device)
        for i, x in enumerate(xs):
            if is_float(x):
                g = bw.grads[i]
                g = (g.reshape(k, -1) * wt.to(g.dtype).view(k, 1)).reshape(k, batch, *g.shape[1:]).sum(0)
                total[i] = g if total[i] is None else total[i] + g
            else:
                acc = []
                for emb, g in bw.grads[i]:
                    gs = (g.reshape(k, -1) * wt.to(g.dtype).view(k, 1)).reshape(k, batch, *g.shape[1:]).sum(0)
                    acc.append(gs)
                if total[i] is None:
                    total[i] = acc
                    weights[i] = tables.get(int_pos.index(i), [])
                else:
                    total[i] = [p + q for p, q in zip(total[i], acc)]
        if expl is None:
            expl = bw.expl
    out = []
    for i, x in enumerate(xs):
        if is_float(x):
            out.append(total[i] * (x - base[i]) if multiply_by_inputs else total[i])
        else:
            scores = torch.zeros(x.shape, device=x.device)
            for g, wmat in zip(total[i], weights.get(i, [])):
                d = (F.embedding(x, wmat) - F.embedding(base[i], wmat)) * g if multiply_by_inputs else g
                scores = scores + d.sum(-1).reshape(x.shape)
            out.append(scores)
    if expl is None:  # n_steps >= 1 is validated: at least one chunk ran
        raise RuntimeError("internal: integrated gradients ran no step")
    output = expl.output[:batch] if not callable(target) else expl.output
    return dataclasses.replace(
        expl,
        attributions=rebuild(inputs, out),
        method="integrated_gradients",
        output=output,
        score=expl.score[:batch],
        target=None if expl.target is None else expl.target[:batch],
        graph=None,
        at_values={},
    )


class InPlaceAutogradError(RuntimeError):
    """``torch.autograd`` cannot differentiate the model: it overwrites in place a tensor autograd saved."""


#: Autograd's refusals of an in-place write: into a saved tensor (at the backward pass), into a leaf that
#: requires grad (at the forward pass: the model writes into its input).
_INPLACE = ("modified by an inplace operation", "a leaf Variable that requires grad is being used in an in-place")


def _inplace_refusal(err: RuntimeError) -> InPlaceAutogradError | None:
    text = str(err)
    if not any(s in text for s in _INPLACE):
        return None
    detail = text.split(" Hint:")[0].strip()
    return InPlaceAutogradError(
        f"integrated_gradients: engine='autograd' cannot differentiate this model: it writes in place into a "
        f"tensor autograd needs for the backward pass (autograd: {detail}); use engine='graph' or 'auto' "
        "(relprop's recorded gradient, equal to autograd's, handles in-place ops), or make the op out of place "
        "(e.g. torch.relu(h) * 3 instead of torch.relu(h).mul_(3), nn.ReLU() instead of nn.ReLU(inplace=True))"
    )


def autograd_backward(model, inputs, target, rows: int | None = None):
    """Gradient of the target score w.r.t. float inputs with ``torch.autograd``.

    ``rows``: the number of samples in ``inputs`` (checked against the output). The model is left as it
    is: ``torch.autograd.grad`` with respect to the inputs alone computes no parameter gradient, so there
    is no need to switch ``requires_grad`` off on the parameters (which another thread may be training).
    """
    from ._common import Backward

    xs = [x.detach().requires_grad_(True) for x in leaves(inputs)]
    args, kwargs = split_inputs(rebuild(inputs, xs))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            raw = model(*args, **kwargs)
            score, idx = target_score(raw, target, rows)
            out = score if idx is None else select_output(raw)
            raw_grads: Sequence[torch.Tensor | None]
            if score.requires_grad:
                raw_grads = torch.autograd.grad(score.sum(), xs, allow_unused=True)
            else:  # the score does not depend on the inputs (or on anything differentiable)
                raw_grads = (None,) * len(xs)
    except RuntimeError as err:
        refusal = _inplace_refusal(err)
        if refusal is None:
            raise
        raise refusal from err
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, raw_grads)]
    expl = Explanation(
        attributions=None,
        output=out.detach(),
        target=idx,
        score=score.detach(),
        method="integrated_gradients",
        composite="gradient",
    )
    return Backward(expl, grads)
