"""Token perturbation: ABPC and insertion/deletion for text models, on the shared engine.

Tokens are replaced by a fill token id (the tokenizer's mask token, say); special tokens and
padding are never replaced. The schedule puts ``round(f * n)`` of a sample's ``n`` content tokens
into the copy at fraction ``f`` of ``linspace(0, 1, steps + 1)``, so every sample's curve runs from
the clean text to all content tokens replaced whatever its length. ABPC is the same
:func:`~relprop.metrics._engine.area_between` as for images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._engine import evaluate_steps, evaluation_device
from ._utils import TargetLike, check_positive_int, check_targets
from .baselines import Fill
from .perturbation import ABPCResult, InsertionDeletionResult


@dataclass
class TokenPerturbationResult:
    """Target-probability curves ``(B, steps + 1)`` over ``fractions`` of the content tokens replaced."""

    fractions: torch.Tensor
    morf: torch.Tensor
    lerf: torch.Tensor
    insertion: torch.Tensor
    target: torch.Tensor
    fill_id: int

    @property
    def abpc(self) -> ABPCResult:
        return ABPCResult.from_curves(self.morf, self.lerf)

    @property
    def insertion_deletion(self) -> InsertionDeletionResult:
        return InsertionDeletionResult.from_curves(self.fractions, self.insertion, self.morf)


def _schedule(scores: torch.Tensor, content: torch.Tensor, order: str, steps: int) -> torch.Tensor:
    """``step_of_elem`` ``(B, L)``: when each token is replaced; ``steps`` (never) outside ``content``."""
    b, length = scores.shape
    fr = np.linspace(0, 1, steps + 1)
    out = torch.full((b, length), steps, dtype=torch.long)
    for i in range(b):
        pos = torch.nonzero(content[i]).reshape(-1)
        n = len(pos)
        if n == 0:
            continue
        ranked = pos[torch.argsort(scores[i, pos], descending=(order == "morf"), stable=True)]
        counts = np.round(fr * n).astype(int)  # tokens replaced at each point
        step_of_rank = np.searchsorted(counts, np.arange(n), side="right") - 1  # last point with count <= r
        out[i, ranked] = torch.from_numpy(step_of_rank).long()
    return out


def token_perturbation(
    model,
    input_ids: torch.Tensor,
    attributions: torch.Tensor,
    target: TargetLike = None,
    *,
    fill_id: int,
    attention_mask: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    steps: int = 16,
    batch_size: int | None = None,
    progress: bool = False,
) -> TokenPerturbationResult:
    """MoRF and LeRF deletion curves and the MoRF insertion curve of a text model.

    ``model(ids, attention_mask)`` (or ``model(ids)`` without a mask) returns logits ``(B, classes)``;
    ``attributions`` are per token ``(B, L)``; ``exclude`` marks positions never replaced (special
    tokens). Insertion starts from every content token replaced by ``fill_id`` and restores the most
    relevant first. ``batch_size``: copies per forward pass, ``None`` to measure the fastest in the call
    (as :func:`~relprop.metrics.region_perturbation` does).
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"input_ids must be integer token ids shaped (batch, length), got {tuple(ids.shape)}")
    a = torch.as_tensor(attributions).detach().float().cpu()
    if a.shape != ids.shape:
        raise ValueError(f"attributions must have the shape of input_ids {tuple(ids.shape)}, got {tuple(a.shape)}")
    steps = check_positive_int(steps, "steps")
    bs = None if batch_size is None else check_positive_int(batch_size, "batch_size")
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    content = (mask.bool() & ~(torch.zeros_like(ids, dtype=torch.bool) if exclude is None else exclude.bool())).cpu()
    t = check_targets(target, ids.shape[0])

    device = evaluation_device(model, ids)
    ids, mask = ids.to(device), mask.to(device)  # copies are built on the model's device

    def fn(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(x, mask[rows]) if attention_mask is not None else model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().float()

    fill = Fill("scalar", torch.full((ids.shape[0],), int(fill_id), dtype=ids.dtype, device=device))
    curves = {}
    for name, order, ins in (("morf", "morf", False), ("lerf", "lerf", False), ("insertion", "morf", True)):
        soe = _schedule(a, content, order, steps)
        f = fill
        if ins:  # insertion starts from the fill on the content tokens only; the rest stays
            f = Fill("tensor", torch.where(content.to(device), torch.as_tensor(int(fill_id), dtype=ids.dtype), ids))
        c = evaluate_steps(fn, ids, soe, steps, f, t, bs, progress, f"token {name}", insertion=ins, device=device)
        t = final_target = c.target
        bs = c.batch_size  # measured once (MoRF), kept for LeRF and insertion
        curves[name] = c.prob
    return TokenPerturbationResult(
        torch.from_numpy(np.linspace(0, 1, steps + 1)),
        curves["morf"],
        curves["lerf"],
        curves["insertion"],
        final_target,
        int(fill_id),
    )
