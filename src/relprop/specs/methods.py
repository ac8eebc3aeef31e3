"""Method specs for the command line: ``NAME[:KEY=VALUE[:KEY=VALUE...]]``, checked before any work.

Values are JSON (``n_steps=32``, ``abs=false``, ``baselines=0.5``), a tuple written ``3x3`` or
``[1,4,4]`` (commas inside brackets do not split the method list), or else a plain string
(``composite=epsilon``, ``layer=layer4``). Unknown keys get a "did you mean", values of the wrong
type are named, and methods that need a setting get one from the input when the user gives none:
occlusion's window and stride from the input size, Grad-CAM's layer as the last spatial layer.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SpecError, closest

#: Options a method gets in ``compare`` unless the method spec sets them (kept cheap on CPUs).
METHOD_DEFAULTS: dict[str, dict] = {
    "integrated_gradients": {"n_steps": 16},
    "ig": {"n_steps": 16},
    "smoothgrad": {"nt_samples": 8, "stdevs": 0.15},
    "smoothgrad_sq": {"nt_samples": 8, "stdevs": 0.15},
    "vargrad": {"nt_samples": 8, "stdevs": 0.15},
}

#: Short names accepted on the command line.
ALIASES: dict[str, dict[str, str]] = {
    "occlusion": {"window": "sliding_window_shapes", "stride": "strides"},
}

_CAM = ("gradcam", "grad_cam", "guided_gradcam", "guided_grad_cam")
_NOISE = ("smoothgrad", "smoothgrad_sq", "vargrad")
_LRP_COMPOSITE_KEYS = ("epsilon", "stabilizer", "gamma", "low", "high", "alpha", "beta", "fallback")


def split_methods(text: str | list[str] | None) -> list[str]:
    """Split ``a,b:k=[1,2],c`` on the commas outside brackets."""
    if text is None:
        return []
    chunks = [text] if isinstance(text, str) else list(text)
    out: list[str] = []
    for chunk in chunks:
        depth, cur = 0, ""
        for ch in chunk:
            if ch in "[(":
                depth += 1
            elif ch in "])":
                depth -= 1
            if ch == "," and depth <= 0:
                out.append(cur)
                cur = ""
            else:
                cur += ch
        out.append(cur)
    return [s.strip() for s in out if s.strip()]


def parse_value(v: str) -> Any:
    v = v.strip()
    if re.fullmatch(r"\d+(x\d+)+", v):
        return tuple(int(p) for p in v.split("x"))
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        return v
    return tuple(val) if isinstance(val, list) and all(isinstance(i, int) for i in val) else val


@dataclass
class MethodSpec:
    """``name[:key=value[:key=value...]]``, e.g. ``lrp:composite=epsilon`` or ``occlusion:window=4x4``."""

    label: str
    name: str
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        parts = [p for p in text.strip().split(":")]
        name, opts = parts[0].strip(), {}
        for p in parts[1:]:
            if "=" not in p:
                raise SpecError(f"method spec '{text}': option '{p}' is not KEY=VALUE (e.g. lrp:composite=epsilon)")
            k, v = p.split("=", 1)
            k = k.strip()
            k = ALIASES.get(name, {}).get(k, k)
            if k in opts:
                raise SpecError(f"method spec '{text}': option '{k}' given twice")
            opts[k] = parse_value(v)
        return cls(label=text.strip(), name=name, options=opts)

    def options_for(self, model, composite: str | None, inputs: Any = None) -> dict:
        """The options one call gets: compare's cheap defaults, the LRP composite, input-dependent
        defaults (when ``inputs`` are given), then the user's options."""
        from .models import default_composite

        opts = dict(METHOD_DEFAULTS.get(self.name, {}))
        if self.name == "lrp" and "composite" not in self.options:
            opts["composite"] = composite if composite and composite != "auto" else default_composite(model)
        if inputs is not None:
            opts.update(input_defaults(self.name, self.options, model, inputs))
        opts.update(self.options)
        if self.name == "occlusion" and isinstance(inputs, torch.Tensor):
            for key in ("sliding_window_shapes", "strides"):  # HxW on a CxHxW input: every channel at once
                v = opts.get(key)
                if isinstance(v, tuple) and len(v) == inputs.dim() - 2:
                    opts[key] = (int(inputs.shape[1]), *v)
        return opts


def input_defaults(name: str, given: dict, model, inputs: Any) -> dict:
    """Settings that depend on the input: occlusion's window/stride, Grad-CAM's layer."""
    out: dict[str, Any] = {}
    if name == "occlusion" and isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
        c, h, w = inputs.shape[1:]
        if "sliding_window_shapes" not in given:
            win = (int(c), max(1, h // 8), max(1, w // 8))
            out["sliding_window_shapes"] = win
        else:
            win = given["sliding_window_shapes"]
            win = (int(c), *win) if isinstance(win, tuple) and len(win) == 2 else win
        if "strides" not in given and isinstance(win, tuple) and len(win) == 3:
            out["strides"] = (int(c), max(1, win[1] // 2), max(1, win[2] // 2))
    if name in _CAM and "layer" not in given:
        from .models import default_cam_layer

        module = model.module if hasattr(model, "module") else model
        out["layer"] = default_cam_layer(module, inputs[:1] if isinstance(inputs, torch.Tensor) else inputs)
    if name in ("gradcam", "grad_cam") and "interpolate" not in given and isinstance(inputs, torch.Tensor):
        if inputs.dim() == 4:  # a map at the input's size, as metrics and overlays need
            out["interpolate"] = "bilinear"
    return out


def _params(fn) -> tuple[dict[str, inspect.Parameter], bool]:
    sig = inspect.signature(fn)
    params = {
        n: p
        for n, p in sig.parameters.items()
        if n not in ("model", "inputs", "target") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    return params, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def allowed_options(name: str, options: dict | None = None) -> dict[str, inspect.Parameter] | None:
    """Every option method ``name`` accepts (None: cannot be known before running it)."""
    import relprop

    fn = relprop.METHODS[name]
    params, var = _params(fn)
    if not var:
        return params
    if name == "lrp":
        from ..rules.composites import named_composite

        extra, _ = _params(named_composite)
        extra.pop("name", None)
        return {**params, **extra, "fallback": inspect.Parameter("fallback", inspect.Parameter.KEYWORD_ONLY)}
    if name in _NOISE or name == "noise_tunnel":
        nt, _ = _params(relprop.METHODS["noise_tunnel"])
        param = params.get("base_method") or nt.get("base_method")
        base = (options or {}).get("base_method", param.default if param is not None else None)
        if isinstance(base, str) and base in relprop.METHODS and base not in _NOISE and base != "noise_tunnel":
            b, bvar = _params(relprop.METHODS[base])
            if not bvar:
                return {**nt, **b, **params}
        return None
    return None


def _type_error(key: str, value: Any, default: Any) -> str | None:
    if default is None or default is inspect.Parameter.empty:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a name"
    return None


def check_method(spec: MethodSpec) -> None:
    """Unknown method, unknown option keys (with "did you mean") and values of the wrong type."""
    import relprop

    if spec.name not in relprop.METHODS:
        names = sorted(relprop.METHODS)
        raise SpecError(f"unknown method '{spec.name}'.{closest(spec.name, names, 0.4)} Available: {', '.join(names)}")
    allowed = allowed_options(spec.name, spec.options)
    if allowed is None:
        return
    for key, value in spec.options.items():
        if key not in allowed:
            shown = sorted(allowed) + sorted(ALIASES.get(spec.name, {}))
            raise SpecError(
                f"method '{spec.label}': unknown option '{key}'.{closest(key, shown)} "
                f"Options of {spec.name}: {', '.join(shown) or 'none'}"
            )
        want = _type_error(key, value, allowed[key].default)
        if want:
            raise SpecError(f"method '{spec.label}': {key} must be {want}, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and key.startswith(("n_", "nt_")) and value < 1:
            raise SpecError(f"method '{spec.label}': {key} must be at least 1, got {value}")


def parse_methods(text: str | list[str] | None, default: list[str]) -> list[MethodSpec]:
    """Method specs from ``--methods`` (``default`` when not given; given but naming none, e.g. ``,``, is an
    error rather than the defaults, which would run methods nobody asked for)."""
    given = split_methods(text)
    if text is not None and not given:
        shown = text if isinstance(text, str) else ",".join(text)
        raise SpecError(f"no method named in {shown!r}; leave the option out for the default methods")
    specs = [MethodSpec.parse(t) for t in (given or default)]
    for s in specs:
        check_method(s)
    labels = [s.label for s in specs]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise SpecError(f"method given twice: {', '.join(sorted(dup))}")
    return specs
