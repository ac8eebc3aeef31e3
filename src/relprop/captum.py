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


def _target(target):
    if target is None:
        return lambda out: out.reshape(out.shape[0], -1).sum(1) if out.dim() > 1 else out
    if isinstance(target, tuple) or (isinstance(target, list) and target and isinstance(target[0], tuple)):
        raise ValueError(
            "target: tuple targets for outputs with more than two dims are not supported; pass a callable target"
        )
    return target


def _out(attr, is_tuple):
    if is_tuple:
        return tuple(attr) if isinstance(attr, (tuple, list)) else (attr,)
    return attr


class _Attribution:
    method = ""

    def __init__(self, forward_func: Callable, *args, **kwargs):
        self.forward_func = forward_func

    def _run(self, inputs, target, additional_forward_args, **options):
        model = _model(self.forward_func, inputs, additional_forward_args)
        e = explain(model, inputs, target=_target(target), method=self.method, **options)
        return e

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return getattr(self, "_multiply_by_inputs", False)


def _delta(model_fn, inputs, baselines, target, attributions, additional_forward_args):
    """f(x) - f(x0) minus the attribution sum, per sample (Captum's convergence delta)."""
    model = _model(model_fn, inputs, additional_forward_args)
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
            return target_score(model(*args), _target(target), args[0].shape[0])[0]

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
        model = _model(inner.forward_func, inputs, extra)
        e = explain(
            model,
            inputs,
            target=_target(target),
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
        model = _model(self.forward_func, inputs, additional_forward_args)
        e = explain(
            model,
            inputs,
            target=_target(target),
            method="gradcam",
            layer=self.layer,
            attribute_to_layer_input=attribute_to_layer_input,
            relu_attributions=relu_attributions,
            attr_dim_summation=attr_dim_summation,
            reshape=reshape,
            prefix_tokens=prefix_tokens,
        )
        return e.attributions


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
        model = _model(self.forward_func, inputs, additional_forward_args)
        e = explain(
            model,
            inputs,
            target=_target(target),
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
            strides=strides,
            baselines=baselines,
            perturbations_per_eval=perturbations_per_eval,
        )
        return _out(e.attributions, is_tuple)


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
