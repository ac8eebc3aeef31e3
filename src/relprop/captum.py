"""Captum-compatible classes: change ``from captum.attr import X`` to ``from relprop.captum import X``.

Same names, constructors and ``attribute(...)`` signatures as Captum; the work is done by
:func:`relprop.explain` over the traced operation graph (no module hooks), so functional ops and
reused modules are handled. ``additional_forward_args`` are appended to the positional inputs as
Captum does; Captum options that have no meaning here (``show_progress``, ``grad_kwargs``...) are
accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .methods._validate import score as target_score
from .methods.explain import explain

__all__ = [
    "Deconvolution",
    "DeepLift",
    "GuidedBackprop",
    "GuidedGradCam",
    "InputXGradient",
    "IntegratedGradients",
    "LRP",
    "LayerAttribution",
    "LayerGradCam",
    "NoiseTunnel",
    "Occlusion",
    "Saliency",
]


def _fmt(inputs):
    """(inputs for explain, was it a tuple?)."""
    return inputs, isinstance(inputs, tuple)


class _Wrapped(torch.nn.Module):
    """``forward_func`` with ``additional_forward_args`` appended (Captum's convention)."""

    def __init__(self, fn: Callable, n_inputs: int, extra: tuple):
        super().__init__()
        self.fn = fn
        self.n, self.extra = n_inputs, extra

    def forward(self, *args):
        return self.fn(*args, *self.extra)


def _model(fn, inputs, additional_forward_args):
    if additional_forward_args is None:
        return fn
    extra = additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
    n = len(inputs) if isinstance(inputs, tuple) else 1
    return _Wrapped(fn, n, extra)


class _Flat(torch.nn.Module):
    """The model with its output flattened after the batch dim, so a Captum index tuple is one class."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        out = self.fn(*args)
        return out.reshape(out.shape[0], -1)


def _flat_index(t: tuple, shape: tuple[int, ...], target) -> int:
    """Captum's ``out[:, *t]`` as an index into the flattened output; it must pick one number."""
    if len(t) > len(shape):
        raise ValueError(
            f"target {target!r} has {len(t)} indices but the output has only {len(shape)} dims after the batch {shape}"
        )
    rest = shape[len(t) :]
    if int(np.prod(rest)) != 1:
        raise ValueError(
            f"target {target!r} selects {int(np.prod(rest))} outputs per example from an output of shape "
            f"(batch, {', '.join(map(str, shape))}); as in Captum, indices start at dim 1: give one per output "
            f"dim, e.g. target={tuple([0] * len(shape))}"
        )
    for i, (k, n) in enumerate(zip(t, shape)):
        if not -n <= int(k) < n:
            raise ValueError(f"target {target!r}: index {k} is out of range for dim {i + 1} of size {n}")
    full = tuple(int(k) % n for k, n in zip(t, shape)) + (0,) * len(rest)
    return int(np.ravel_multi_index(full, shape))


def _model_and_target(fn, inputs, additional_forward_args, target):
    """The model relprop explains and its target, following Captum's conventions.

    Captum indexes targets from dim 1: an int or a tuple picks ``out[:, *target]`` for every example, a
    list holds one int (2-d outputs) or one tuple per example, a tensor one class per example (2-d
    outputs). Outputs with more than 2 dims are flattened after the batch dim and the indices turned
    into flat class indices, so every relprop method (which batch-expands targets for IG, SmoothGrad...)
    sees an ordinary per-example class. ``None`` keeps relprop's sum over outputs; callables pass through.
    """
    model = _model(fn, inputs, additional_forward_args)
    if target is None:
        return model, lambda out: out.reshape(out.shape[0], -1).sum(1) if out.dim() > 1 else out
    if callable(target):
        return model, target
    t = target
    if isinstance(t, torch.Tensor):
        if t.numel() == 1:
            t = int(t.item())
        elif t.dim() == 1:
            t = [int(v) for v in t.tolist()]
        else:
            raise ValueError(f"target: a tensor target has one element or one per example, got {tuple(t.shape)}")
    if isinstance(t, bool) or not isinstance(t, (int, tuple, list)):
        raise ValueError(f"target: expected an int, a tuple, a list or a tensor, got {target!r}")
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        out = model(*xs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    shape = tuple(out.shape[1:])
    b = out.shape[0]
    if isinstance(t, list):
        if len(t) != b:
            raise ValueError(f"target: a list target needs one entry per example ({b}), got {len(t)}")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in t):
            if len(shape) != 1:
                raise ValueError(
                    f"target: one class per example needs a 2-d output, got {tuple(out.shape)}; give one tuple of "
                    f"indices per example (Captum's rule)"
                )
            return model, torch.tensor(t)
        if not all(isinstance(v, tuple) for v in t):
            raise ValueError(f"target: a list target holds ints or tuples of ints, got {target!r}")
        flat = torch.tensor([_flat_index(v, shape, target) for v in t])
        return (_Flat(model), flat) if len(shape) > 1 else (model, flat)
    k = _flat_index(t if isinstance(t, tuple) else (t,), shape, target)
    return (_Flat(model), k) if len(shape) > 1 else (model, k)


def _out(attr, is_tuple):
    if is_tuple:
        return tuple(attr) if isinstance(attr, (tuple, list)) else (attr,)
    return attr


class _Attribution:
    method = ""

    def __init__(self, forward_func: Callable, *args, **kwargs):
        self.forward_func = forward_func

    def _run(self, inputs, target, additional_forward_args, **options):
        model, t = _model_and_target(self.forward_func, inputs, additional_forward_args, target)
        return explain(model, inputs, target=t, method=self.method, **options)

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return getattr(self, "_multiply_by_inputs", False)


def _delta(model_fn, inputs, baselines, target, attributions, additional_forward_args):
    """f(x) - f(x0) minus the attribution sum, per sample (Captum's convergence delta)."""
    model, t = _model_and_target(model_fn, inputs, additional_forward_args, target)
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    if baselines is None:
        bs = tuple(torch.zeros_like(x) for x in xs)
    elif isinstance(baselines, tuple):
        bs = tuple(torch.zeros_like(x) + b for x, b in zip(xs, baselines))
    else:
        bs = (torch.zeros_like(xs[0]) + baselines,)
    with torch.no_grad():

        def score(args):
            # The same score as the attributions explain (one definition: methods._validate.score).
            return target_score(model(*args), t, args[0].shape[0])[0]

        diff = score(xs) - score(bs)
    attrs = attributions if isinstance(attributions, tuple) else (attributions,)
    total = sum(a.reshape(a.shape[0], -1).sum(1) for a in attrs)
    return total - diff


class Saliency(_Attribution):
    method = "saliency"

    def attribute(self, inputs, target=None, abs: bool = True, additional_forward_args=None):
        inputs, is_tuple = _fmt(inputs)
        return _out(self._run(inputs, target, additional_forward_args, abs=abs).attributions, is_tuple)


class InputXGradient(_Attribution):
    method = "input_x_gradient"

    def attribute(self, inputs, target=None, additional_forward_args=None):
        inputs, is_tuple = _fmt(inputs)
        return _out(self._run(inputs, target, additional_forward_args).attributions, is_tuple)


class GuidedBackprop(_Attribution):
    method = "guided_backprop"

    def __init__(self, model):
        super().__init__(model)
        self.model = model

    def attribute(self, inputs, target=None, additional_forward_args=None):
        inputs, is_tuple = _fmt(inputs)
        return _out(self._run(inputs, target, additional_forward_args).attributions, is_tuple)


class Deconvolution(GuidedBackprop):
    method = "deconvnet"


class IntegratedGradients(_Attribution):
    method = "integrated_gradients"

    def __init__(self, forward_func: Callable, multiply_by_inputs: bool = True):
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        return True

    def attribute(
        self,
        inputs,
        baselines=None,
        target=None,
        additional_forward_args=None,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size=None,
        return_convergence_delta: bool = False,
    ):
        inputs, is_tuple = _fmt(inputs)
        e = self._run(
            inputs,
            target,
            additional_forward_args,
            baselines=baselines,
            n_steps=n_steps,
            approximation=method,
            internal_batch_size=internal_batch_size,
            multiply_by_inputs=self._multiply_by_inputs,
        )
        attr = _out(e.attributions, is_tuple)
        if return_convergence_delta:
            return attr, _delta(self.forward_func, inputs, baselines, target, attr, additional_forward_args)
        return attr


class DeepLift(_Attribution):
    method = "deeplift"

    def __init__(self, model, multiply_by_inputs: bool = True, eps: float = 1e-10):
        super().__init__(model)
        self.model = model
        self._multiply_by_inputs = multiply_by_inputs
        self.eps = eps

    def has_convergence_delta(self) -> bool:
        return True

    def attribute(
        self,
        inputs,
        baselines=None,
        target=None,
        additional_forward_args=None,
        return_convergence_delta: bool = False,
        custom_attribution_func=None,
    ):
        inputs, is_tuple = _fmt(inputs)
        e = self._run(
            inputs,
            target,
            additional_forward_args,
            baselines=baselines,
            eps=self.eps,
            multiply_by_inputs=self._multiply_by_inputs and custom_attribution_func is None,
        )
        attr = _out(e.attributions, is_tuple)
        if custom_attribution_func is not None:
            xs = inputs if isinstance(inputs, tuple) else (inputs,)
            from .methods._common import format_baselines

            bs = tuple(
                format_baselines(
                    xs, baselines if isinstance(baselines, tuple) or baselines is None else (baselines,) * len(xs)
                )
            )
            mult = attr if is_tuple else (attr,)
            res = (
                custom_attribution_func(mult, xs, bs)
                if custom_attribution_func.__code__.co_argcount == 3
                else custom_attribution_func(mult)
            )
            attr = _out(res, is_tuple) if is_tuple else (res[0] if isinstance(res, tuple) else res)
        if return_convergence_delta:
            return attr, _delta(self.model, inputs, baselines, target, attr, additional_forward_args)
        return attr


class NoiseTunnel:
    """Noise tunnel over a relprop.captum attribution object (or a Captum-named method name)."""

    def __init__(self, attribution_method):
        self.attribution_method = attribution_method
        if not isinstance(attribution_method, _Attribution):
            raise ValueError(
                "attribution_method: expected an attribution object from relprop.captum, got "
                f"{type(attribution_method).__name__}"
            )
        self.is_delta_supported = False

    def attribute(
        self,
        inputs,
        nt_type: str = "smoothgrad",
        nt_samples: int = 5,
        nt_samples_batch_size=None,
        stdevs=1.0,
        draw_baseline_from_distrib: bool = False,
        **kwargs: Any,
    ):
        inner = self.attribution_method
        inputs, is_tuple = _fmt(inputs)
        target = kwargs.pop("target", None)
        extra = kwargs.pop("additional_forward_args", None)
        kwargs.pop("return_convergence_delta", None)
        options = _inner_options(inner, kwargs)
        model, t = _model_and_target(inner.forward_func, inputs, extra, target)
        e = explain(
            model,
            inputs,
            target=t,
            method="noise_tunnel",
            base_method=inner.method,
            nt_type=nt_type,
            nt_samples=nt_samples,
            nt_samples_batch_size=nt_samples_batch_size,
            stdevs=stdevs,
            draw_baseline_from_distrib=draw_baseline_from_distrib,
            **options,
        )
        return _out(e.attributions, is_tuple)


def _inner_options(inner, kwargs: dict) -> dict:
    opts = dict(kwargs)
    if isinstance(inner, IntegratedGradients):
        if "method" in opts:
            opts["approximation"] = opts.pop("method")
        opts.setdefault("multiply_by_inputs", inner._multiply_by_inputs)
    elif isinstance(inner, DeepLift):
        opts.setdefault("eps", inner.eps)
        opts.setdefault("multiply_by_inputs", inner._multiply_by_inputs)
    elif isinstance(inner, LRP):
        opts.setdefault("composite", inner.composite)
    elif isinstance(inner, Occlusion):
        opts.pop("show_progress", None)
    return opts


class LayerAttribution:
    @staticmethod
    def interpolate(layer_attribution, interpolate_dims, interpolate_mode: str = "nearest"):
        return F.interpolate(layer_attribution, interpolate_dims, mode=interpolate_mode)


class LayerGradCam(_Attribution, LayerAttribution):
    method = "gradcam"

    def __init__(self, forward_func: Callable, layer, device_ids=None):
        super().__init__(forward_func)
        self.layer = layer
        self.device_ids = device_ids

    def attribute(
        self,
        inputs,
        target=None,
        additional_forward_args=None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        attr_dim_summation: bool = True,
        grad_kwargs=None,
        reshape="auto",
        prefix_tokens=None,
    ):
        model, t = _model_and_target(self.forward_func, inputs, additional_forward_args, target)
        if not attribute_to_layer_input:
            outs = _layer_outputs(model, inputs, self.layer)
            if len(outs) > 1:  # Captum: one map per element of the layer's output tuple
                return _tuple_grad_cam(
                    model, inputs, t, self.layer, outs, relu_attributions, attr_dim_summation, reshape, prefix_tokens
                )
        e = explain(
            model,
            inputs,
            target=t,
            method="gradcam",
            layer=self.layer,
            attribute_to_layer_input=attribute_to_layer_input,
            relu_attributions=relu_attributions,
            attr_dim_summation=attr_dim_summation,
            reshape=reshape,
            prefix_tokens=prefix_tokens,
        )
        return e.attributions


def _layer_outputs(model, inputs, layer) -> list[torch.Tensor]:
    """What ``layer`` returns on ``inputs`` (several tensors when it returns a tuple)."""
    from .methods.gradcam import layer_name

    root = model if isinstance(model, torch.nn.Module) else None
    if root is None:
        return []
    mod = dict(root.named_modules()).get(layer_name(root, layer)) if not isinstance(layer, torch.nn.Module) else layer
    if mod is None:
        raise ValueError(f"layer {layer!r}: no such submodule in the model")
    box: dict = {}
    handle = mod.register_forward_hook(lambda m, i, o: box.setdefault("out", o))
    try:
        with torch.no_grad():
            model(*(inputs if isinstance(inputs, tuple) else (inputs,)))
    finally:
        handle.remove()
    out = box.get("out")
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    return [out] if isinstance(out, torch.Tensor) else []


def _tuple_grad_cam(model, inputs, target, layer, outs, relu, summation, reshape, prefix_tokens):
    """Grad-CAM on each tensor a layer returns, from one traced backward pass.

    The recorded values the layer hands to the rest of the model are matched to the returned tuple in
    order of production (value and shape must agree); an element the model never uses has no gradient
    and is refused, as Captum's autograd would be."""
    from .methods.core import run_backward
    from .methods.gradcam import grad_cam_map, layer_name, to_grid
    from .rules.composites import GradientComposite

    name = layer_name(model, layer)
    picked: list = []

    def extra(graph):
        cands = list(graph.module_outputs(name))
        for o in outs:
            hit = next((v for v in cands if tuple(v.tensor.shape) == tuple(o.shape) and torch.equal(v.tensor, o)), None)
            if hit is None:
                raise ValueError(
                    f"layer '{name}': an element of its output tuple (shape {tuple(o.shape)}) is not used by the "
                    f"rest of the model, so it has no gradient for Grad-CAM"
                )
            cands.remove(hit)
            picked.append(hit)
        return picked

    e = run_backward(
        model, inputs, target=target, composite=GradientComposite(), method="gradcam", times_output=False,
        extra_values=extra,
    )  # fmt: skip
    maps = []
    for v in picked:
        g, a = to_grid(e.at_values[v.index], reshape, prefix_tokens), to_grid(v.tensor, reshape, prefix_tokens)
        maps.append(grad_cam_map(g, a, relu, summation).detach())
    return tuple(maps)


class GuidedGradCam(_Attribution):
    method = "guided_gradcam"

    def __init__(self, model, layer, device_ids=None):
        super().__init__(model)
        self.model = model
        self.layer = layer

    def attribute(
        self,
        inputs,
        target=None,
        additional_forward_args=None,
        interpolate_mode: str = "nearest",
        attribute_to_layer_input: bool = False,
    ):
        inputs, is_tuple = _fmt(inputs)
        model, t = _model_and_target(self.forward_func, inputs, additional_forward_args, target)
        e = explain(
            model,
            inputs,
            target=t,
            method="guided_gradcam",
            layer=self.layer,
            interpolate_mode=interpolate_mode,
            attribute_to_layer_input=attribute_to_layer_input,
        )
        return _out(e.attributions, is_tuple)


class Occlusion(_Attribution):
    method = "occlusion"

    def attribute(
        self,
        inputs,
        sliding_window_shapes,
        strides=None,
        baselines=None,
        target=None,
        additional_forward_args=None,
        perturbations_per_eval: int = 1,
        show_progress: bool = False,
    ):
        inputs, is_tuple = _fmt(inputs)
        e = self._run(
            inputs,
            target,
            additional_forward_args,
            sliding_window_shapes=sliding_window_shapes,
            strides=_per_input_strides(strides, sliding_window_shapes, inputs),
            baselines=baselines,
            perturbations_per_eval=perturbations_per_eval,
        )
        return _out(e.attributions, is_tuple)


def _per_input_strides(strides, windows, inputs):
    """Captum's stride forms for several inputs: one entry per input, each an int (the same stride along
    every dim of that input's window) or a tuple; expanded to one tuple per input for relprop."""
    if not (isinstance(inputs, tuple) and len(inputs) > 1) or strides is None or isinstance(strides, int):
        return strides
    if not (isinstance(strides, tuple) and len(strides) == len(inputs)):
        return strides  # relprop's own check names the problem
    if not (isinstance(windows, tuple) and len(windows) == len(inputs)):
        return strides
    out = []
    for s, w in zip(strides, windows):
        if isinstance(s, int) and not isinstance(s, bool):
            n = len(w) if isinstance(w, tuple) else 1
            out.append((s,) * n)
        else:
            out.append(s)
    return tuple(out)


class LRP(_Attribution):
    """Captum's ``LRP`` signature; the rules come from a relprop composite (``composite=``, default epsilon)."""

    method = "lrp"

    def __init__(self, model, epsilon: float = 1e-9, composite: Any = "epsilon"):
        super().__init__(model)
        self.model = model
        self.composite = composite
        self.epsilon = epsilon

    def has_convergence_delta(self) -> bool:
        return True

    def attribute(
        self,
        inputs,
        target=None,
        additional_forward_args=None,
        return_convergence_delta: bool = False,
        verbose: bool = False,
    ):
        inputs, is_tuple = _fmt(inputs)
        opts = {"composite": self.composite}
        if isinstance(self.composite, str):
            opts["epsilon"] = self.epsilon
        e = self._run(inputs, target, additional_forward_args, **opts)
        attr = _out(e.attributions, is_tuple)
        if return_convergence_delta:
            total = sum(a.reshape(a.shape[0], -1).sum(1) for a in (attr if is_tuple else (attr,)))
            return attr, total - e.score
        return attr
