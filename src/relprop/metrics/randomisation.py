"""Model parameter randomisation sanity check (Adebayo et al., 2018).

Layers are re-initialised one after another, cascading from the top (output)
layer down; after each, the explanations are recomputed and compared with the
original ones. An explanation that does not depend on the model keeps
similarity 1. The user's model is never modified: all work happens on a
``copy.deepcopy`` and the global RNG state is restored.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

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


def _randomise(module: torch.nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                module.reset_parameters()
                # reset_parameters may be deterministic (e.g. norm layers: 1 / 0)
                params = [p for p in module.parameters(recurse=False)]
                if all(torch.all(p == p.reshape(-1)[0]) for p in params if p.numel() > 1):
                    for p in params:
                        p.normal_(0.0, 1.0)
            else:
                for p in module.parameters(recurse=False):
                    std = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.1
                    p.normal_(0.0, std)


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
