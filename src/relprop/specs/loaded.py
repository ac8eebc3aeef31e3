"""A loaded model and what is known about its inputs; the wrappers that give Hugging Face models a
plain ``tensor -> logits`` forward; the LRP composite chosen when none is given."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .hashing import module_code_hash, state_hash
from .preprocess import Preprocess

TEXT_ZOO = ("minilm-similarity",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
TRUST_PICKLE_HELP = (
    "load a whole model pickled with torch.save(model) from a .pt/.pth/.bin file. Unpickling runs "
    "arbitrary code from the file as you: use it only for files you made or fully trust"
)


@dataclass(frozen=True)
class LoadOptions:
    """What a loader may need besides the spec (all optional)."""

    weights: str | None = None
    num_classes: int | None = None
    trust_pickle: bool = False
    classes_file: str | None = None


@dataclass
class LoadedModel:
    """A model ready to explain: an ``nn.Module`` in eval mode with what is known about its inputs."""

    spec: str
    name: str
    module: nn.Module
    kind: str = "image"  # "image" | "text" | "similarity"
    preprocess: Preprocess | None = None
    tokenizer: Any = None
    class_names: list[str] | None = None
    info: dict = field(default_factory=dict)
    #: other names of each class (e.g. ImageNet WordNet ids ``n01440764``), matched against data labels
    class_aliases: list[list[str]] | None = None
    #: files whose bytes determine the model (a checkpoint, a ``python:`` spec's file)
    source_files: list[str] = field(default_factory=list)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names else None

    @property
    def named_classes(self) -> bool:
        """True when the class names are real names, not placeholders like ``0`` or ``LABEL_0``."""
        names = self.class_names or []
        return bool(names) and not all(str(n) in (str(i), f"LABEL_{i}") for i, n in enumerate(names))

    def fingerprint(self) -> str:
        """Keys the result cache: the spec, every weight byte, the code of every class in the model and
        the bytes of its source files (checkpoint, ``python:`` file), and the preprocessing."""
        if self._fingerprint is None:
            import hashlib

            h = hashlib.sha256(self.spec.encode())
            h.update(state_hash(self.module).encode())
            h.update(module_code_hash(self.module, tuple(self.source_files)).encode())
            h.update(json.dumps(self.class_names).encode())
            self._fingerprint = h.hexdigest()[:20]
        return self._fingerprint


class TextClassifier(nn.Module):
    """``input_ids`` (and optional ``attention_mask``) -> logits of a Hugging Face sequence classifier."""

    def __init__(self, model: nn.Module, pad_id: int):
        super().__init__()
        self.model = model
        self.pad_id = int(pad_id)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_id).long()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class ImageClassifier(nn.Module):
    """``pixel_values`` -> logits of a Hugging Face image classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _has_attention(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.MultiheadAttention)
        or "attention" in type(m).__name__.lower()
        or type(m).__name__ in ("Attention",)
        for m in model.modules()
    )


def default_composite(model: LoadedModel) -> str:
    """The LRP composite used when none is given: AttnLRP for transformers, else epsilon-plus-flat."""
    if model.kind in ("text", "similarity") or _has_attention(model.module):
        return "attnlrp"
    return "epsilon_plus_flat"
