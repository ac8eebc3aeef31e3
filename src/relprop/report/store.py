"""Files beside ``results.json``: per-example values (Parquet) and raw attributions (.npy/.pt/.safetensors),
and :class:`Output`, the one place every file of a report is written through (a local folder or any
fsspec URL).

``examples.parquet`` has one row per model x method x example with the columns of
:data:`relprop.report.scores.EXAMPLE_COLUMNS`. :func:`append_examples` adds rows to an existing file
with the same schema (a later or distributed run appends its own rows; ``run`` tells them apart);
``pyarrow.dataset.dataset([...files])`` reads several workers' files as one table.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..specs.errors import SpecError, extra_hint, first_line
from .scores import EXAMPLE_COLUMNS

ATTRIBUTION_FORMATS = ("npy", "pt", "safetensors")


# ------------------------------------------------------------------------------------ the output
def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp_name)`` then rename over ``path``: a reader never sees a half-written file. The temporary
    name ends with ``path``'s suffix (``np.save`` and ``savefig`` read the format from it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Output:
    """Where a report is written: a local folder (a path, or a ``file://`` URL) or any fsspec URL
    (``memory://``, ``s3://``, ``gs://``, ...; credentials as fsspec finds them). Every file of the report
    (results.json, examples.parquet, figures, index.html, the cache, attributions) goes through
    :meth:`write`, so the local and the remote report are made by the same code.

    A write never leaves half a file for a reader: locally a temporary file renamed over the name; elsewhere
    the file is made in a local temporary folder and sent with one ``pipe_file`` (an object store's put is
    atomic). Names are relative to the output, with ``/``. A bad URL (unknown protocol, a protocol whose
    package is missing, no fsspec) raises :class:`~relprop.specs.SpecError` with one line."""

    url: str  # as given
    local: Path | None  # the folder, for a local path or a file:// URL
    fs: Any  # the fsspec file system of any other URL (None when local)
    root: str  # the folder in ``fs``
    flag: str  # how errors name it (``--out``, ``out``)

    def __init__(self, where: str | Path | Output, flag: str = "--out"):
        if isinstance(where, Output):
            self.url, self.local, self.fs = where.url, where.local, where.fs
            self.root, self.flag = where.root, where.flag
            return
        self.flag = flag
        self.url = str(where)
        self.fs = None
        self.root = ""
        self.local = None
        if isinstance(where, Path) or "://" not in self.url:  # a local path: no fsspec needed
            # Absolute: Ray's workers (on a cluster joined with --address) run in other working folders.
            self.local = Path(where).absolute()
            return
        try:
            import fsspec
            from fsspec.implementations.local import LocalFileSystem
        except ImportError:
            raise SpecError(f"{flag} {self.url}: writing to a URL needs fsspec: {extra_hint('report')}") from None
        try:
            fs, root = fsspec.core.url_to_fs(self.url)
        except ValueError as e:  # fsspec: "Protocol not known: foo"
            proto = self.url.split("://", 1)[0]
            raise SpecError(
                f"{flag} {self.url}: unknown protocol '{proto}' ({first_line(e)}); use a folder or an fsspec URL "
                f"(file://, memory://, s3://, gs://, ...)"
            ) from None
        except ImportError as e:  # fsspec: "Install s3fs to access S3"
            raise SpecError(f"{flag} {self.url}: {first_line(e)} (the package fsspec uses for this protocol)") from None
        if isinstance(fs, LocalFileSystem):  # file://: the local folder, with its atomic rename
            self.local = Path(root)
        else:
            self.fs, self.root = fs, root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return self.local is not None

    @property
    def in_process(self) -> bool:
        """A ``memory://`` file system: it lives in this process only (lost at exit, unseen by Ray's workers)."""
        proto = self.fs.protocol if self.fs is not None else ()
        return "memory" in ((proto,) if isinstance(proto, str) else proto)

    def check_folder(self) -> None:
        """A local report folder that is a file fails here, before any work (it failed at the end, writing)."""
        if self.local is not None and self.local.exists() and not self.local.is_dir():
            raise SpecError(f"{self.flag} {self.url} is a file; the report is a folder: give a new or existing folder")

    def where(self, name: str = "") -> str:
        """The full location of ``name`` (a path, or the URL), for messages and for other writers."""
        if self.local is not None:
            return str(self.local / name) if name else str(self.local)
        assert self.fs is not None
        return self.fs.unstrip_protocol(f"{self.root}/{name}" if name else self.root)

    def _full(self, name: str) -> str:
        return f"{self.root}/{name}"

    def write(self, name: str, write: Callable[[str], object]) -> str:
        """``write(tmp_name)`` writes a local file that becomes ``name`` whole; returns ``name``."""
        if self.local is not None:
            atomic_write(self.local / name, write)
            return name
        assert self.fs is not None
        with tempfile.TemporaryDirectory(prefix="relprop-out-") as d:
            tmp = os.path.join(d, "file" + Path(name).suffix)
            write(tmp)
            data = Path(tmp).read_bytes()
        return self.write_bytes(name, data)

    def write_bytes(self, name: str, data: bytes) -> str:
        if self.local is not None:
            return self.write(name, lambda tmp: Path(tmp).write_bytes(data))
        assert self.fs is not None
        full = self._full(name)
        self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(full, data)  # one put: an object store's is atomic
        return name

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode("utf-8"))

    def exists(self, name: str) -> bool:
        if self.local is not None:
            return (self.local / name).exists()
        assert self.fs is not None
        return bool(self.fs.exists(self._full(name)))

    def read_bytes(self, name: str) -> bytes:
        if self.local is not None:
            return (self.local / name).read_bytes()
        assert self.fs is not None
        return bytes(self.fs.cat_file(self._full(name)))

    def listdir(self, name: str) -> list[str]:
        """The names of the files under folder ``name`` (relative to it); empty when it does not exist."""
        if self.local is not None:
            d = self.local / name
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        assert self.fs is not None
        full = self._full(name)
        if not self.fs.isdir(full):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(full, detail=False))


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"per-example values are written as Parquet and need pyarrow: {extra_hint('report')}"
        ) from None
    return pa, pq


def schema():
    """The pyarrow schema of ``examples.parquet``."""
    pa, _ = _pa()
    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}
    return pa.schema([(name, types[t]) for name, t in EXAMPLE_COLUMNS])


def example_rows(run: str, model: dict, cell: dict) -> list[dict]:
    """Rows of one finished cell (``cell["examples"]``: lists over the cell's examples)."""
    ex = cell.get("examples") or {}
    n = len(ex.get("example", []))
    rows = []
    for i in range(n):
        row = {"run": run, "model": model["spec"], "model_name": model.get("name"), "method": cell["method"]}
        for name, _ in EXAMPLE_COLUMNS:
            if name not in row:
                vals = ex.get(name)
                row[name] = vals[i] if vals is not None and i < len(vals) else None
        rows.append(row)
    return rows


def _split(path: str | Path, out: Output | None) -> tuple[Output, str]:
    """(output, name): ``path`` relative to ``out``, or a file path on its own (its folder the output)."""
    if out is not None:
        return out, str(path)
    p = Path(path)
    return Output(p.parent), p.name


def write_examples(path: str | Path, rows: Iterable[dict], out: Output | None = None) -> str:
    """Write rows as ``path`` (replacing it; relative to ``out`` when given), with the documented schema."""
    pa, pq = _pa()
    table = pa.Table.from_pylist(list(rows), schema=schema())
    o, name = _split(path, out)
    o.write(name, lambda tmp: pq.write_table(table, tmp))
    return o.where(name)


def append_examples(path: str | Path, rows: Iterable[dict], out: Output | None = None) -> str:
    """Add rows to ``path`` (created if absent; relative to ``out`` when given); the file's schema must be
    :func:`schema`."""
    pa, pq = _pa()
    new = pa.Table.from_pylist(list(rows), schema=schema())
    o, name = _split(path, out)
    if o.exists(name):
        old = pq.read_table(pa.BufferReader(o.read_bytes(name)))
        if not old.schema.equals(schema()):
            raise ValueError(f"{o.where(name)} has a different schema than relprop's examples table; write a new file")
        new = pa.concat_tables([old, new])
    o.write(name, lambda tmp: pq.write_table(new, tmp))
    return o.where(name)


def run_id(command: str, settings: dict) -> str:
    return hashlib.sha256(repr((command, sorted(settings.items()))).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------ attributions
def attribution_format(path_or_fmt: str | Path) -> str:
    s = str(path_or_fmt).lower()
    fmt = s.rsplit(".", 1)[-1] if "." in s else s
    if fmt not in ATTRIBUTION_FORMATS:
        raise ValueError(f"attributions are saved as .npy, .pt or .safetensors, got {path_or_fmt!r}")
    return fmt


def save_tensor(path: str | Path, tensor: torch.Tensor, name: str = "attributions", out: Output | None = None):
    """One tensor to ``.npy`` (numpy), ``.pt`` (``torch.save``) or ``.safetensors`` (key ``name``);
    ``path`` relative to ``out`` when given. Returns where it went (a path, or the URL)."""
    fmt = attribution_format(path)
    t = tensor.detach().cpu().contiguous()

    def write(tmp: str) -> None:
        if fmt == "npy":
            np.save(tmp, t.numpy())
        elif fmt == "pt":
            torch.save(t, tmp)
        else:
            from safetensors.torch import save_file

            save_file({name: t}, tmp)

    o, rel = _split(path, out)
    o.write(rel, write)
    return Path(o.where(rel)) if o.is_local else o.where(rel)


def save_attributions(out: str | Path | Output, model_spec: str, method: str, attr, fmt: str) -> str:
    """``OUT/attributions/<model>__<method>.<fmt>``: every evaluated example's attributions, in the order
    of the ``example`` column of ``examples.parquet``. Returns the name relative to ``out``."""
    fmt = attribution_format(fmt)
    a = attr["input_ids"] if isinstance(attr, dict) else attr
    name = f"attributions/{_safe(model_spec)}__{_safe(method)}.{fmt}"
    save_tensor(name, torch.as_tensor(a), out=Output(out))
    return name


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-.")[:80] or "x"
