"""Model parameter randomisation sanity check (Adebayo et al., 2018).

Layers are re-initialised one after another, cascading from the top (output)
layer down; after each, the explanations are recomputed and compared with the
original ones. An explanation that does not depend on the model keeps
similarity 1. The user's model is never modified: all work happens on a
``copy.deepcopy``.

The new weights are drawn on the CPU from a local ``torch.Generator`` seeded from the call's ``seed`` and
then moved to the model's device, so a seed gives the same weights on every device, and no global random
generator (CPU or CUDA) is seeded, read or advanced: relprop is called from threads, servers and notebooks.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ._utils import (
    TargetLike,
    check_inputs,
    check_target_range,
    check_targets,
    forward,
    nanmean,
    progress_bar,
    resolve_similarity,
)
from .sensitivity import ExplainFn, _explain


@dataclass
class RandomisationResult:
    """``similarity[l, b]``: similarity of sample ``b``'s explanation after
    randomising ``layers[: l + 1]`` (cascading) or only ``layers[l]``
    (independent) to the original explanation."""

    layers: list[str]
    similarity: torch.Tensor
    mean_similarity: torch.Tensor
    original: torch.Tensor
    cascading: bool
    similarity_name: str

    @property
    def final_similarity(self) -> float:
        """Mean similarity after the last randomisation step."""
        return float(self.mean_similarity[-1]) if len(self.layers) else float("nan")

    def plot(self, ax=None, **kwargs):
        from .plots import plot_randomisation

        return plot_randomisation(self, ax=ax, **kwargs)


def randomisable_layers(model: torch.nn.Module) -> list[str]:
    """Names of modules owning parameters, in registration order (bottom-up)."""
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


#: Random ops that take a ``generator=`` (tensor methods and ``torch`` functions); ``torch.nn.init``'s
#: functions are recognised by their ``generator`` parameter.
_RANDOM_OPS = frozenset(
    {"uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_", "cauchy_", "log_normal_"}
    | {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson", "binomial"}
    | {"rand_like", "randn_like", "randint_like"}
)


def _takes_generator(func: Callable) -> bool:
    name = getattr(func, "__name__", "")
    if name in _RANDOM_OPS:
        return True
    if getattr(func, "__module__", None) != torch.nn.init.__name__:
        return False
    try:
        return "generator" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


class _LocalGenerator(TorchFunctionMode):
    """Give every random draw without an explicit ``generator=`` the local one, so that a module's own
    ``reset_parameters`` (which calls ``torch.nn.init`` or ``tensor.uniform_`` with the global generator)
    draws from ``generator`` instead. A torch function mode is per thread: other threads are unaffected."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("generator") is None and _takes_generator(func):
            kwargs["generator"] = self.generator
        return func(*args, **kwargs)


def _cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` with its parameters and buffers on the CPU (no second copy on the device)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(module, memo)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Re-initialise ``module``'s own parameters (its ``reset_parameters``, or a normal draw at the
    parameter's scale) from a CPU generator seeded with ``seed``, and copy them to ``module``'s device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        if not callable(getattr(module, "reset_parameters", None)):
            # no module copy: a root module owning parameters (a ViT's cls_token) would copy the whole model
            for p in module.parameters(recurse=False):
                std = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.1
                p.copy_(torch.empty(p.shape, dtype=p.dtype).normal_(0.0, std, generator=gen))
            return
        cpu = _cpu_copy(module)
        reset: Callable[[], None] = getattr(cpu, "reset_parameters")  # noqa: B009 (a module attribute is typed Tensor | Module)
        with _LocalGenerator(gen):
            reset()
        # reset_parameters may be deterministic (e.g. norm layers: 1 / 0)
        params = [p for p in cpu.parameters(recurse=False)]
        if all(torch.all(p == p.reshape(-1)[0]) for p in params if p.numel() > 1):
            for p in params:
                p.normal_(0.0, 1.0, generator=gen)
        # reset_parameters may also reset children and buffers (batch norm's running statistics)
        pairs = [*zip(module.parameters(), cpu.parameters()), *zip(module.buffers(), cpu.buffers())]
        for dst, src in pairs:
            dst.copy_(src)


def model_parameter_randomisation(
    model: torch.nn.Module,
    inputs,
    explain_fn: ExplainFn,
    target: TargetLike = None,
    *,
    layers: Sequence[str] | None = None,
    cascading: bool = True,
    similarity: str | Callable = "spearman",
    abs: bool = False,
    seed: int = 42,
    progress: bool = False,
) -> RandomisationResult:
    """Cascading (top-down) model parameter randomisation test.

    ``explain_fn(model, inputs, targets) -> tensor`` computes explanations
    (it receives the randomised copy). ``target`` defaults to the original
    model's predicted class and is kept fixed. ``layers`` (module names,
    bottom-up) defaults to every module owning parameters; they are randomised
    top-down. ``cascading=False`` randomises each layer independently.
    """
    if not callable(explain_fn):
        raise ValueError(
            f"explain_fn must be a callable (model, inputs, targets) -> tensor, got {type(explain_fn).__name__}"
        )
    x = check_inputs(inputs)
    t = check_targets(target, x.shape[0])
    out = forward(model, x)
    if t is None:
        t = out.argmax(1)
    else:
        check_target_range(t, out.shape[1])
    sim = resolve_similarity(similarity)
    all_layers = randomisable_layers(model)
    if layers is None:
        chosen = all_layers
    else:
        unknown = [n for n in layers if n not in dict(model.named_modules())]
        if unknown:
            raise ValueError(f"layers must name modules of the model, unknown: {unknown}")
        chosen = list(layers)
    if not chosen:
        raise ValueError("model has no parameterised layers to randomise")
    top_down = list(reversed(chosen))

    def prep(a: torch.Tensor) -> torch.Tensor:
        return a.abs() if abs else a

    device = next(iter(model.parameters())).device
    x_dev = x.to(device)
    original = _explain(explain_fn, model, x_dev, t.to(device), "explain_fn")
    sims = []
    work = copy.deepcopy(model)
    pristine = copy.deepcopy(model.state_dict()) if not cascading else None
    with progress_bar(len(top_down), progress, "randomisation") as bar:
        for i, name in enumerate(top_down):
            if pristine is not None:  # not cascading: each layer is randomised alone
                work.load_state_dict(pristine)
            _randomise(work.get_submodule(name), seed + i)
            a = _explain(explain_fn, work, x_dev, t.to(device), "explain_fn")
            sims.append(sim(prep(original), prep(a)))
            bar.update(1)
    s = torch.stack(sims)
    return RandomisationResult(
        layers=top_down,
        similarity=s,
        mean_similarity=torch.tensor([nanmean(r) for r in s], dtype=torch.float64),
        original=original.reshape(x.shape[0], *original.shape[1:]),
        cascading=cascading,
        similarity_name=similarity if isinstance(similarity, str) else getattr(similarity, "__name__", "callable"),
    )
