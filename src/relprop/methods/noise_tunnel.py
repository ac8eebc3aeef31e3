"""Noise tunnel over any method: SmoothGrad, SmoothGrad-squared and VarGrad (as Captum's ``NoiseTunnel``).

Gaussian noise is drawn exactly as Captum draws it (``torch.normal`` per input tensor and per partition
of ``nt_samples_batch_size`` samples, inputs repeated with ``repeat_interleave``), so with the same
``torch.manual_seed`` the numbers are Captum's. Token inputs get their noise in embedding space.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..trace import training_warned
from ._common import (
    baseline_specs,
    check_positive_int,
    embedding_edit,
    expand_target,
    format_baselines,
    is_float,
    leaves,
    rebuild,
)
from ._validate import validate_call, warn_training
from .core import Explanation
from .explain import METHODS, register_method

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def _stdevs(stdevs: Any, n: int) -> list[float]:
    if isinstance(stdevs, (int, float)) and not isinstance(stdevs, bool):
        vals = [float(stdevs)] * n
    elif isinstance(stdevs, (tuple, list)) and len(stdevs) == n:
        vals = [float(s) for s in stdevs]
    else:
        raise ValueError(
            f"stdevs: expected a non-negative number or a tuple of {n} numbers (one per input), got {stdevs!r}"
        )
    if any(s < 0 for s in vals):
        raise ValueError(f"stdevs: expected non-negative values, got {stdevs!r}")
    return vals


@register_method("noise_tunnel")
def noise_tunnel(
    model,
    inputs,
    *,
    target,
    base_method="saliency",
    nt_type="smoothgrad",
    nt_samples=5,
    nt_samples_batch_size=None,
    stdevs=1.0,
    draw_baseline_from_distrib=False,
    **base_options,
) -> Explanation:
    """Average (``smoothgrad``), mean square (``smoothgrad_sq``) or variance (``vargrad``) of ``base_method``'s
    attributions over ``nt_samples`` noisy copies of the inputs (Gaussian, std ``stdevs``).

    Args:
        base_method: any name in ``relprop.METHODS`` (``"saliency"``, ``"integrated_gradients"``, ``"lrp"``...);
            ``base_options`` go to it (e.g. ``baselines=``, ``n_steps=``, ``composite=``).
        nt_samples_batch_size: noisy samples per pass (``None``: all at once).
        draw_baseline_from_distrib: with a baseline distribution (a tensor of several baselines), draw one at
            random per noisy sample, as Captum.

    A model in training mode gets a warning: the noisy copies of a sample are rows of one batch (per
    ``nt_samples_batch_size`` chunk), and dropout draws an independent mask for every row, so each noisy
    sample is explained through its own dropout mask (the mask that ran in its forward pass; the graph
    methods record it as a constant) and the average also smooths over dropout; batch norm in training
    mode normalises with the statistics of the noisy batch.

    ``Explanation.score`` and ``output`` are the means over the noisy copies: the smoothed function whose
    gradient SmoothGrad estimates.
    """
    batch = validate_call(model, inputs, target, same_batch=True)
    warn_training(model, "noise_tunnel", "each noisy sample draws its own dropout mask")
    if nt_type not in NT_TYPES:
        raise ValueError(f"nt_type: expected one of {', '.join(NT_TYPES)}, got {nt_type!r}")
    if base_method not in METHODS or base_method in ("noise_tunnel", "smoothgrad", "smoothgrad_sq", "vargrad"):
        raise ValueError(
            f"base_method: expected a method name other than the noise tunnel "
            f"({', '.join(sorted(m for m in METHODS if m not in NT_TYPES and m != 'noise_tunnel'))}), "
            f"got {base_method!r}"
        )
    check_positive_int("nt_samples", nt_samples)
    if nt_samples_batch_size is not None:
        check_positive_int("nt_samples_batch_size", nt_samples_batch_size)
    fn = METHODS[base_method]
    xs = leaves(inputs)
    sd = _stdevs(stdevs, len(xs))
    per = nt_samples if nt_samples_batch_size is None else min(nt_samples, nt_samples_batch_size)
    chunks = [per] * (nt_samples // per) + ([nt_samples % per] if nt_samples % per else [])
    base_b = base_options.pop("baselines", None)
    has_baselines = base_b is not None or base_method in ("integrated_gradients", "ig", "deeplift", "occlusion")
    sums: list = [None] * len(xs)
    sums_sq: list = [None] * len(xs)
    means: dict = {}
    first = None
    for k in chunks:
        noisy = []
        for x, s in zip(xs, sd):
            if is_float(x):
                size = (x.shape[0] * k,) + tuple(x.shape[1:])
                noise = torch.normal(0, torch.tensor(s, device=x.device).repeat(size))
                noisy.append(x.repeat_interleave(k, dim=0) + noise.to(x.dtype))
            else:
                noisy.append(x.repeat_interleave(k, dim=0))
        opts = dict(base_options)
        if has_baselines:
            opts["baselines"] = _expand_baselines(inputs, base_b, k, draw_baseline_from_distrib, batch)
        int_pos = [i for i, x in enumerate(xs) if not is_float(x)]
        ids = [noisy[i] for i in int_pos]

        def edit(j, emb, weight, sd=sd, int_pos=int_pos):
            return emb + torch.normal(0.0, sd[int_pos[j]], emb.shape).to(emb.dtype)

        with embedding_edit(ids, edit), training_warned():  # warned once above, for the whole call
            e = fn(model, rebuild(inputs, noisy), target=expand_target(target, batch, k, interleave=True), **opts)
        if first is None:
            first = e
        # The explained score is the mean over the noisy copies (SmoothGrad is the gradient of the
        # smoothed function E[f(x + noise)]): mean of the per-copy scores and outputs.
        for key, t in (("score", e.score), ("output", e.output)):
            if t.shape[0] == batch * k:
                part = t.reshape(batch, k, *t.shape[1:]).sum(1)
                means[key] = part if key not in means else means[key] + part
        for i, a in enumerate(e.tensors()):
            a = a.reshape(batch, k, *a.shape[1:])
            s1, s2 = a.sum(1), (a * a).sum(1)
            sums[i] = s1 if sums[i] is None else sums[i] + s1
            sums_sq[i] = s2 if sums_sq[i] is None else sums_sq[i] + s2
    mean = [s / nt_samples for s in sums]
    mean_sq = [s / nt_samples for s in sums_sq]
    if nt_type == "smoothgrad":
        out = mean
    elif nt_type == "smoothgrad_sq":
        out = mean_sq
    else:
        out = [q - m * m for m, q in zip(mean, mean_sq)]
    if first is None:  # nt_samples >= 1 is validated: at least one chunk ran
        raise RuntimeError("internal: noise tunnel ran no noisy copy")
    return dataclasses.replace(
        first,
        attributions=rebuild(inputs, out),
        method=f"noise_tunnel({base_method})",
        output=means["output"] / nt_samples if "output" in means else first.output,
        score=means["score"] / nt_samples if "score" in means else first.score,
        target=None if first.target is None else first.target[:: chunks[0]][:batch],
        layers={},
        activations={},
        graph=None,
        at_values={},
        convergence_delta=None,  # the base method's, of one chunk of noisy copies: not this explanation's
    )


def _expand_baselines(inputs, baselines, k, draw, batch):
    xs = leaves(inputs)
    if draw and isinstance(baselines, torch.Tensor) and len(xs) == 1:
        idx = torch.randint(baselines.shape[0], (batch * k,), device=baselines.device)
        return (baselines[idx],)
    # A leaf given no baseline stays None: the base method chooses its default for the noisy batch (DeepLIFT
    # holds an attention mask at its own value; zeros here would mask every token).
    given = baseline_specs(inputs, baselines)
    per = format_baselines(inputs, baselines)
    return tuple(None if g is None else b.repeat_interleave(k, dim=0) for g, b in zip(given, per))


def _alias(nt_type: str, default_base: str):
    def method(model, inputs, *, target, base_method=default_base, **options) -> Explanation:
        if "nt_type" in options:
            raise ValueError(f"nt_type: method '{nt_type}' fixes it; use method='noise_tunnel' to choose")
        return noise_tunnel(model, inputs, target=target, base_method=base_method, nt_type=nt_type, **options)

    method.__doc__ = f"Noise tunnel with ``nt_type='{nt_type}'`` over ``base_method`` (default '{default_base}')."
    return method


register_method("smoothgrad")(_alias("smoothgrad", "gradient"))
register_method("smoothgrad_sq")(_alias("smoothgrad_sq", "gradient"))
register_method("vargrad")(_alias("vargrad", "gradient"))
