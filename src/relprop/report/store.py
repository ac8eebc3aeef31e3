"""Files beside ``results.json``: per-example values (Parquet) and raw attributions (.npy/.pt/.safetensors).

``examples.parquet`` has one row per model x method x example with the columns of
:data:`relprop.report.scores.EXAMPLE_COLUMNS`. :func:`append_examples` adds rows to an existing file
with the same schema (a later or distributed run appends its own rows; ``run`` tells them apart);
``pyarrow.dataset.dataset([...files])`` reads several workers' files as one table.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..specs.errors import extra_hint
from .scores import EXAMPLE_COLUMNS

ATTRIBUTION_FORMATS = ("npy", "pt", "safetensors")


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


def write_examples(path: Path, rows: Iterable[dict]) -> Path:
    """Write rows as ``path`` (replacing it), with the documented schema."""
    pa, pq = _pa()
    rows = list(rows)
    table = pa.Table.from_pylist(rows, schema=schema())
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def append_examples(path: Path, rows: Iterable[dict]) -> Path:
    """Add rows to ``path`` (created if absent); the file's schema must be :func:`schema`."""
    pa, pq = _pa()
    new = pa.Table.from_pylist(list(rows), schema=schema())
    if Path(path).exists():
        old = pq.read_table(path)
        if not old.schema.equals(schema()):
            raise ValueError(f"{path} has a different schema than relprop's examples table; write a new file")
        new = pa.concat_tables([old, new])
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    pq.write_table(new, tmp)
    tmp.replace(path)
    return Path(path)


def run_id(command: str, settings: dict) -> str:
    return hashlib.sha256(repr((command, sorted(settings.items()))).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------ attributions
def attribution_format(path_or_fmt: str | Path) -> str:
    s = str(path_or_fmt).lower()
    fmt = s.rsplit(".", 1)[-1] if "." in s else s
    if fmt not in ATTRIBUTION_FORMATS:
        raise ValueError(f"attributions are saved as .npy, .pt or .safetensors, got {path_or_fmt!r}")
    return fmt


def save_tensor(path: str | Path, tensor: torch.Tensor, name: str = "attributions") -> Path:
    """One tensor to ``.npy`` (numpy), ``.pt`` (``torch.save``) or ``.safetensors`` (key ``name``)."""
    path = Path(path)
    fmt = attribution_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = tensor.detach().cpu().contiguous()
    if fmt == "npy":
        np.save(path, t.numpy())
    elif fmt == "pt":
        torch.save(t, path)
    else:
        from safetensors.torch import save_file

        save_file({name: t}, str(path))
    return path


def save_attributions(out: Path, model_spec: str, method: str, attr, fmt: str) -> str:
    """``OUT/attributions/<model>__<method>.<fmt>``: every evaluated example's attributions, in the order
    of the ``example`` column of ``examples.parquet``. Returns the path relative to ``out``."""
    fmt = attribution_format(fmt)
    a = attr["input_ids"] if isinstance(attr, dict) else attr
    name = f"{_safe(model_spec)}__{_safe(method)}.{fmt}"
    path = Path(out) / "attributions" / name
    save_tensor(path, torch.as_tensor(a))
    return str(path.relative_to(out))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-.")[:80] or "x"
