"""Content hashes that key the ``relprop compare`` cache.

A cached result may only be reused when everything that produced it is the same: the input bytes,
the model's weights *and code*, relprop's own code and every option. Version numbers are not enough
(an editable install keeps one version while its code changes), so each part is a hash of content.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from pathlib import Path

import torch
from torch import nn


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tensor_bytes(h, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and every byte of its values into hash ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


@functools.cache
def relprop_source_hash() -> str:
    """A hash of every ``.py`` file of the installed relprop package (read once per process)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def _class_file(cls: type) -> str | None:
    try:
        return inspect.getsourcefile(cls)
    except (TypeError, OSError):
        mod = sys.modules.get(cls.__module__)
        return getattr(mod, "__file__", None)


def module_code_hash(model: nn.Module, extra_files: tuple[str, ...] = ()) -> str:
    """A hash of the source files that define the classes of ``model`` and its submodules.

    Editing a model's ``forward()`` changes its explanations without changing any weight, so the
    files of every class in the module tree (and ``extra_files``, e.g. a ``python:`` spec's file)
    are hashed; torch's own classes are covered by the torch version instead. Files are named by
    the modules they define (an extra file by its name), never by where they lie: the nodes of a Ray
    cluster install Python under different paths and must still agree.
    """
    labels: dict[str, set[str]] = {f: {Path(f).name} for f in extra_files}
    names: set[str] = set()
    for m in model.modules():
        cls = type(m)
        names.add(f"{cls.__module__}.{cls.__qualname__}")
        if cls.__module__.startswith("torch."):
            continue
        f = _class_file(cls)
        if f:
            labels.setdefault(f, set()).add(cls.__module__)
    h = hashlib.sha256(torch.__version__.encode())
    for n in sorted(names):
        h.update(n.encode())
    parts = []
    for f, modules in labels.items():
        try:
            content = Path(f).read_bytes()
        except OSError:
            content = b"<unreadable>"
        parts.append((" ".join(sorted(modules)), hashlib.sha256(content).hexdigest()))
    for label, digest in sorted(parts):
        h.update(label.encode())
        h.update(digest.encode())
    return h.hexdigest()[:20]


def state_hash(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            tensor_bytes(h, v)
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:20]
