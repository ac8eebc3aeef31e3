"""Model inputs from data: image batches, tokenised texts, and a first forward pass that checks them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import SpecError, first_line
from .models import LoadedModel
from .preprocess import Preprocess


def image_batch(model: LoadedModel, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, display)`` for raw images: model inputs and the resized [0, 1] images to show."""
    pre = model.preprocess or Preprocess()
    shown = [pre.display(im) for im in images]
    shapes = {tuple(s.shape) for s in shown}
    if len(shapes) > 1:
        raise SpecError(
            f"the images have different sizes {sorted(shapes)[:3]} and model '{model.name}' has no input "
            f"size in its configuration; pass --image-size H W"
        )
    disp = torch.stack(shown)
    return pre.normalize(disp), disp


def position_limit(model: LoadedModel) -> int | None:
    """The most tokens the model takes: its config's ``max_position_embeddings`` and the tokenizer's
    ``model_max_length`` (the smaller; None when neither is stated). Longer texts are truncated to it, as to
    ``max_length``: a model with fewer positions than ``max_length`` would fail on a long row with torch's
    "expanded size" error."""
    found = []
    for m in model.module.modules():
        n = getattr(getattr(m, "config", None), "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            found.append(n)
            break
    n = getattr(model.tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < 1_000_000:  # tokenizers without a limit state ~1e30
        found.append(n)
    return min(found) if found else None


def text_batch(model: LoadedModel, texts: Sequence[str], max_length: int = 128, pad_to: int | None = None) -> dict:
    """``input_ids`` and ``attention_mask`` of ``texts``, truncated at ``max_length`` tokens (at most the model's
    :func:`position_limit`) and padded to the
    longest of them, or to ``pad_to`` tokens when given (no text is longer: a Ray shard pads to the length of
    its whole run, :func:`relprop.report.distributed.pad_length`, because the padding changes the bits)."""
    tok = model.tokenizer
    if pad_to is None:
        limit = position_limit(model)
        max_length = max_length if limit is None else min(max_length, limit)
        enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    else:
        enc = tok(list(texts), padding="max_length", truncation=True, max_length=int(pad_to), return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def check_forward(model: LoadedModel, inputs: Any) -> torch.Tensor:
    """Run the model once; a failure becomes a one-line :class:`SpecError` naming the input shape."""
    try:
        with torch.no_grad():
            out = model.module(**inputs) if isinstance(inputs, dict) else model.module(inputs)
    except Exception as e:
        shape = {k: tuple(v.shape) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(inputs.shape)
        raise SpecError(
            f"model '{model.name}' cannot take an input of shape {shape}: {type(e).__name__}: {first_line(e)[:200]}"
        ) from None
    from ..methods.core import select_output

    out = select_output(out)
    if model.kind != "similarity" and out.dim() != 2:
        raise SpecError(
            f"model '{model.name}' returned an output of shape {tuple(out.shape)}; expected class scores "
            f"(batch, classes)"
        )
    if model.class_names is None or (out.dim() == 2 and len(model.class_names) != out.shape[-1]):
        if model.class_names and out.dim() == 2 and model.info.get("classes_from") == "--classes":
            raise SpecError(
                f"--classes lists {len(model.class_names)} classes but model '{model.name}' outputs {out.shape[-1]}"
            )
        model.class_names = [str(i) for i in range(out.shape[-1])] if out.dim() == 2 else None
        model.class_aliases = None
    return out
