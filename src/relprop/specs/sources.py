"""Lazy data sources: image folders, CSV/JSONL and Parquet tables, saved Hugging Face datasets, tar shards.

Why lazy sequences rather than a new streaming interface: every consumer of :class:`~.data.Data`
(``relprop compare``'s accuracy pass and sample preparation, ``relprop sample``, the Ray engine) indexes
``data.images[i]`` / ``data.texts[i]`` for the examples it needs. Making those sequences read and decode
item ``i`` on access keeps one interface for in-memory and on-disk data, and memory bounded by what a
caller holds (a batch), not by the dataset. There is no cache: an item is decoded again when it is asked
for again (a compare run asks for each example once in the accuracy pass and once more if it is one of
the metric samples), and a cache would either hold the dataset or need a size to tune.

What is read up front is what every run needs and what is cheap: the labels and class names (folder
names; the label column alone for Parquet and saved datasets; the ``.cls``/``.json`` members in a
single pass over the tar headers; the label field in one pass over a CSV/JSONL that records where each
row starts). The full pass of the accuracy computation reads batches through a
``torch.utils.data.DataLoader`` (:func:`batches`), with ``Data.loader_workers`` worker processes that
decode the next batches while the model runs on this one (0: decode in this process).

The cache key (:meth:`Data.fingerprint`) of lazy data hashes each item's stored bytes (the file, the tar
member, the table cell), one item at a time: the decoded tensors are a function of those bytes and of
the decoder, which is relprop's code (in the key) and Pillow.

Pickles: a tar member ``.pyd``/``.pickle`` is a pickle, which can run code when loaded, and is refused
unless ``trust_pickle``. ``.pt``/``.pth`` members are loaded with ``torch.load(weights_only=True)`` (no
code runs), as relprop loads checkpoints; one that needs more is refused unless ``trust_pickle``, and
every input ``.pt`` member is checked for that when the shards are listed (:func:`_pt_refusal`: the
globals its pickle names, read statically from its small ``data.pkl`` record, no tensor data), so a bad
member late in a shard fails before any work rather than hours into a run. Other
members are preferred when an example has them: images (png, jpg, ...), then ``.npy`` (read with
``allow_pickle=False``), then ``.pt``/``.pth``, then pickles.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import dataclasses
import io
import json
import operator
import pickle
import re
import tarfile
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast, overload

import numpy as np
import torch

from .data import IMAGE_SUFFIXES, Data, array_image, decode_image, labels_from_values
from .errors import SpecError, closest, extra_hint, first_line

T = TypeVar("T")
DATA_EXTRA = extra_hint("data")
#: images checked for a 16-bit range that fills little of its depth at load time (spread over the data)
PROBE = 16


@dataclass(frozen=True)
class Columns:
    """The column names of a table / saved dataset (``--text-column``, ``--label-column``, ``--image-column``)."""

    text: str = "text"
    label: str = "label"
    image: str = "image"


# ------------------------------------------------------------------------------------ lazy sequences
class Lazy(Sequence[T]):
    """Items read on ``seq[i]`` (no cache). Subclasses define ``__len__``, ``read(i)`` (the item),
    ``raw(i)`` (its stored bytes) and ``name(i)`` (where it is stored, for messages and the hash)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> T:
        raise NotImplementedError

    def raw(self, i: int) -> bytes:
        raise NotImplementedError

    def name(self, i: int) -> str:
        return str(i)

    #: whether pickled members may be loaded (tar shards with ``--trust-pickle``); decoding follows it
    trust_pickle: bool = False

    def pack(self, i: int) -> Any:
        """Item ``i`` as stored, for a process that may not reach the source (:class:`Shipped`): a text
        itself, an image member as ``(kind, stored bytes, name)``; :func:`unpack` decodes it as ``read(i)``."""
        raise NotImplementedError

    def digest(self, h, i: int) -> None:
        """Feed item ``i``'s name and stored bytes into hash ``h``."""
        r = self.raw(i)
        h.update(f"{self.name(i)}\x00{len(r)}\x00".encode())
        h.update(r)

    @overload
    def __getitem__(self, i: int) -> T: ...

    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.read(j) for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {i} of a dataset of {n}")
        return self.read(i)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {len(self)} items, read on access>"


class Take(Lazy[T]):
    """``base`` at the given indices (``Data.select``): still lazy, and hashed by the chosen items only."""

    def __init__(self, base: Sequence[T], indices: list[int]):
        self.base, self.indices = base, list(indices)
        self.trust_pickle = bool(getattr(base, "trust_pickle", False))

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int) -> T:
        return self.base[self.indices[i]]

    def raw(self, i: int) -> bytes:
        return self.base.raw(self.indices[i])  # type: ignore[attr-defined]

    def name(self, i: int) -> str:
        return self.base.name(self.indices[i])  # type: ignore[attr-defined]

    def pack(self, i: int) -> Any:
        return self.base.pack(self.indices[i])  # type: ignore[attr-defined]


def take(seq, indices: list[int]):
    """``seq`` at ``indices``: a lazy view of a lazy sequence, else the chosen items (tensor or list)."""
    if seq is None:
        return None
    if isinstance(seq, torch.Tensor):
        return seq[indices]
    if isinstance(seq, Lazy):
        return Take(seq, indices)
    return [seq[i] for i in indices]


class Cells:
    """Values of one column, read one row at a time (a file, a table, a tar member...)."""

    root: Path | None = None  # relative image paths in cells are relative to this folder

    def __len__(self) -> int:
        raise NotImplementedError

    def cell(self, i: int) -> Any:
        raise NotImplementedError

    def name(self, i: int) -> str:
        return str(i)


class ListCells(Cells):
    def __init__(self, values: list, names: list[str] | None = None):
        self.values, self.names = values, names

    def __len__(self) -> int:
        return len(self.values)

    def cell(self, i: int) -> Any:
        return self.values[i]

    def name(self, i: int) -> str:
        return self.names[i] if self.names else str(i)


class Texts(Lazy[str]):
    """Texts of a column; the stored bytes are the text's UTF-8."""

    def __init__(self, cells: Cells, where: str, column: str):
        self.cells, self.where, self.column = cells, where, column

    def __len__(self) -> int:
        return len(self.cells)

    def read(self, i: int) -> str:
        v = self.cells.cell(i)
        if v is None:
            raise SpecError(f"{self.where}: row {self.cells.name(i)} has no value in column '{self.column}'")
        return v if isinstance(v, str) else str(v)

    def raw(self, i: int) -> bytes:
        return self.read(i).encode()

    def pack(self, i: int) -> str:
        return self.read(i)

    def name(self, i: int) -> str:
        return self.cells.name(i)


class Images(Lazy[torch.Tensor]):
    """Images of a column whose cells are encoded bytes, ``{"bytes", "path"}`` records (Hugging Face),
    file paths (relative to the table's folder) or, from tar shards, ``(ext, bytes)`` members."""

    def __init__(self, cells: Cells, where: str, trust_pickle: bool = False):
        self.cells, self.where, self.trust_pickle = cells, where, trust_pickle

    def __len__(self) -> int:
        return len(self.cells)

    def name(self, i: int) -> str:
        return self.cells.name(i)

    def _source(self, i: int) -> tuple[str, bytes | Path]:
        """``(kind, bytes or path)``: kind "image" (encoded), "npy", "pt" or "pickle"."""
        v = self.cells.cell(i)
        if isinstance(v, tuple):
            return v
        if isinstance(v, dict):
            if v.get("bytes") is not None:
                return "image", bytes(v["bytes"])
            v = v.get("path")
        if isinstance(v, (bytes, bytearray, memoryview)):
            return "image", bytes(v)
        if isinstance(v, str) and v:
            p = Path(v).expanduser()
            if not p.is_absolute() and self.cells.root is not None:
                p = self.cells.root / p
            if not p.exists():
                raise SpecError(f"{self.where}: row {self.name(i)}: image file not found: {p}")
            return "image", p
        raise SpecError(
            f"{self.where}: row {self.name(i)} holds {type(v).__name__} where an image (encoded bytes or a path) belongs"
        )

    @contextlib.contextmanager
    def open(self, i: int) -> Iterator[tuple[str, BinaryIO]]:
        """``(kind, stream)`` of example ``i``'s input, for reading its header without reading it whole: a
        tar member is read in place, a file opened; other cells (table rows) hold their bytes already."""
        if isinstance(self.cells, _TarCells):
            with self.cells.open(i) as got:
                yield got
            return
        kind, src = self._source(i)
        if isinstance(src, Path):
            with open(src, "rb") as fh:
                yield kind, fh
        else:
            yield kind, io.BytesIO(src)

    def raw(self, i: int) -> bytes:
        _, src = self._source(i)
        return src.read_bytes() if isinstance(src, Path) else src

    def _named(self, i: int) -> tuple[str, bytes | Path, str]:
        kind, src = self._source(i)
        if isinstance(src, Path):
            return kind, src, str(src)
        name = self.name(i)  # tar members are named "SHARD:KEY.EXT" already
        return kind, src, name if isinstance(self.cells, _TarCells) else f"{self.where}:{name}"

    def read(self, i: int) -> torch.Tensor:
        kind, src, name = self._named(i)
        return decode_member(kind, src, name, self.trust_pickle)

    def pack(self, i: int) -> tuple[str, bytes, str]:
        kind, src, name = self._named(i)
        return kind, src.read_bytes() if isinstance(src, Path) else src, name


def decode_member(
    kind: str, src: bytes | Path, name: str, trust_pickle: bool = False, notes: list[str] | None = None
) -> torch.Tensor:
    """One stored image as ``(C, H, W)`` in [0, 1]: ``kind`` "image" (encoded: a file or its bytes), "npy",
    "pt" or "pickle" (bytes). The one decoder of :class:`Images` and of items shipped to other processes;
    ``notes`` collects the note on integers that fill little of their range (:func:`~.data.read_image`)."""
    if kind == "image":
        return decode_image(src, notes, name=name)
    if isinstance(src, Path):
        src = src.read_bytes()
    if kind == "npy":
        try:
            a = np.load(io.BytesIO(src), allow_pickle=False)
        except ValueError as e:  # an object array: a pickle inside the .npy
            raise SpecError(f"cannot read {name}: {first_line(e)} (relprop reads .npy without pickles)") from None
        return array_image(a, name, notes)
    return array_image(_unpickle(kind, src, name, trust_pickle), name, notes)


WEIGHTS_ONLY = "holds more than tensors (weights_only)"


def _pickle_refusal(name: str, what: str = "is a pickle") -> str:
    return (
        f"{name} {what}, which can run code when loaded: refused. Pass --trust-pickle (trust_pickle=True) if you "
        f"trust the shards, or store the inputs as .npy/.png members"
    )


def _unpickle(kind: str, b: bytes, name: str, trust: bool) -> np.ndarray:
    """A ``.pt``/``.pth`` member (``weights_only`` unless trusted) or a pickle (trusted only) as an array;
    a tensor is taken as ``(C, H, W)`` (torch's layout), an array as ``(H, W[, C])``."""
    if kind == "pickle":
        if not trust:
            raise SpecError(_pickle_refusal(name))
        obj = pickle.loads(b)
    else:
        try:
            obj = torch.load(io.BytesIO(b), map_location="cpu", weights_only=not trust)
        except pickle.UnpicklingError:
            raise SpecError(_pickle_refusal(name, WEIGHTS_ONLY)) from None
        except Exception as e:
            raise SpecError(f"cannot read {name}: {first_line(e)}") from None
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        return t.numpy()
    if isinstance(obj, np.ndarray):
        return obj
    raise SpecError(f"{name} holds a {type(obj).__name__}; relprop reads a tensor or an array as an image")


def _npy_needs_check(f: BinaryIO) -> bool:
    """Whether a ``.npy`` file's header declares an integer type wider than 8 bits (a note, or refused), a
    signed one (negative values are refused) or a shape that is no image: decoding it at load time says so before any work, naming the first such member.
    Reads only the header from ``f`` (numpy bounds it: 10,000 bytes), never the array."""
    try:
        major, _ = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = header(f)
    except ValueError:
        return True  # decoding it says what is wrong
    image = len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3))
    return not image or dtype.kind == "i" or (dtype.kind == "u" and dtype.itemsize > 1)  # signed: negatives


def bit_depth_warnings(images: Images, k: int = PROBE) -> list[str]:
    """The 16-bit note of :func:`~.data.read_image` for up to ``k`` images spread over the data, decoding
    only 16-bit PNGs and TIFFs (read from their headers), so that a lazy dataset warns at load time."""
    n = len(images)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, min(n, k))}) if n else []
    notes: list[str] = []
    for i in picks:
        with images.open(i) as (kind, f):  # headers only: a large member is not read to be probed
            if kind == "npy":  # the header tells the data type; only integers wider than 8 bits are decoded
                deep = _npy_needs_check(f)
            else:
                head = f.read(32) if kind == "image" else b""
                deep_png = head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 24 and head[24] == 16
                deep = deep_png or head[:4] in (b"II*\x00", b"MM\x00*")
        if deep and kind == "npy":
            decode_member(kind, *images._named(i)[1:], notes=notes)
        elif deep:
            src = images._source(i)[1]
            decode_image(src, notes, name=images.name(i) if not isinstance(src, Path) else str(src))
    if not notes:
        return []
    checked = f"{len(picks)}" if len(picks) == n else f"{len(picks)} checked (of {n})"
    return [
        f"{len(notes)} of {checked} images use less than 1/16 of their declared bit depth "
        f"(first: {notes[0]}); if they are 12-bit images, save them with a PNG sBIT chunk "
        f"(.npy: as floats in [0, 1])"
    ]


# ------------------------------------------------------------------------------------ other processes
def unpack(item: Any, trust_pickle: bool = False) -> Any:
    """An item of :meth:`Lazy.pack` decoded as the source's ``read`` decodes it (:func:`decode_member`)."""
    if isinstance(item, str):
        return item
    kind, b, name = item
    return decode_member(kind, b, name, trust_pickle)


class Shipped(Lazy[Any]):
    """A lazy sequence's stand-in in a process that may not reach its source (a Ray worker on another node):
    the same length, no paths, file handles or readers; it holds the packed items it is given
    (:meth:`hold`, replacing the previous ones) and decodes them with the source's decoder (:func:`unpack`)."""

    def __init__(self, n: int, trust_pickle: bool = False):
        self.n, self.trust_pickle = n, trust_pickle
        self.items: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.n

    def hold(self, items: dict[int, Any]) -> None:
        self.items = dict(items)

    def _item(self, i: int) -> Any:
        if i not in self.items:
            raise SpecError(f"internal: example {i} was not shipped to this process (it holds {sorted(self.items)})")
        return self.items[i]

    def read(self, i: int) -> Any:
        return unpack(self._item(i), self.trust_pickle)

    def pack(self, i: int) -> Any:
        return self._item(i)

    def raw(self, i: int) -> bytes:
        item = self._item(i)
        return item.encode() if isinstance(item, str) else item[1]

    def name(self, i: int) -> str:
        item = self.items.get(i)
        return item[2] if isinstance(item, tuple) else str(i)


def _inputs(data: Data):
    return data.texts if data.kind == "text" else data.images


def detach(data: Data) -> Data:
    """``data`` for processes that may not reach its files: lazy inputs replaced by an empty :class:`Shipped`
    (fed with :func:`pack_items` per unit of work); labels, class names and the cache key (computed here,
    where the source is) kept. In-memory data is returned as is."""
    seq = _inputs(data)
    if not isinstance(seq, Lazy):
        return data
    data.fingerprint()
    shipped = Shipped(len(seq), seq.trust_pickle)
    text = data.kind == "text"
    return dataclasses.replace(data, images=None if text else shipped, texts=shipped if text else None)


def pack_items(data: Data, indices: Sequence[int]) -> dict[int, Any] | None:
    """``{i: stored item}`` of examples ``indices`` for :meth:`Shipped.hold` (read here, one at a time), or
    None for in-memory data (shipped whole)."""
    seq = _inputs(data)
    if not isinstance(seq, Lazy):
        return None
    return {int(i): seq.pack(int(i)) for i in dict.fromkeys(indices)}


def hold_items(data: Data, items: dict[int, Any] | None) -> None:
    """Give ``data``'s :class:`Shipped` inputs (see :func:`detach`) the items of :func:`pack_items`."""
    seq = _inputs(data)
    if items is not None:
        if not isinstance(seq, Shipped):
            raise SpecError("internal: items shipped for data that was not detached")
        seq.hold(items)


# ------------------------------------------------------------------------------------ batches
def batches(data: Data, indices: Sequence[int], size: int) -> Iterator[tuple[list[int], list | None]]:
    """``(indices, items)`` in batches of ``size``: the items read through a ``DataLoader`` with
    ``data.loader_workers`` workers (which decode ahead, at most two batches per worker), or ``None`` for
    in-memory data (the caller indexes it). Memory: a few batches, whatever the dataset's size."""
    idx = [int(i) for i in indices]
    seq = data.texts if data.kind == "text" else data.images
    if not isinstance(seq, Lazy):
        for a in range(0, len(idx), size):
            yield idx[a : a + size], None
        return
    from torch.utils.data import DataLoader

    loader: DataLoader = DataLoader(
        seq,  # type: ignore[arg-type]
        batch_size=size,
        sampler=idx,
        num_workers=data.loader_workers,
        collate_fn=list,
    )
    for a, items in zip(range(0, len(idx), size), loader):
        yield idx[a : a + size], items


def _data(spec: str, name: str, kind: str, labels_info, seq, info: dict, warnings: list[str]) -> Data:
    labels, class_names, named, note = labels_info
    return Data(
        spec=spec,
        name=name,
        kind=kind,
        labels=labels,
        class_names=class_names,
        images=seq if kind == "image" else None,
        texts=seq if kind == "text" else None,
        info=dict(info, named_labels=named, classes_present=sorted(set(labels.tolist()))),
        warnings=([note] if note else []) + warnings,
    )


def _pick_kind(where: str, names: list[str], columns: Columns) -> str:
    """ "text" when the text column is there, else "image" when the image column is; the label column must be."""
    if columns.label not in names:
        raise SpecError(
            f"{where} has no column '{columns.label}' (columns: {', '.join(map(str, names))})."
            f"{closest(columns.label, names)} Choose one with --label-column"
        )
    if columns.text in names:
        return "text"
    if columns.image in names:
        return "image"
    asked_image = columns.image != Columns.image and columns.text == Columns.text  # --image-column given
    missing = columns.image if asked_image else columns.text
    raise SpecError(
        f"{where} has no column '{missing}' (columns: {', '.join(map(str, names))})."
        f"{closest(missing, names)} Choose one with "
        + ("--image-column" if asked_image else "--text-column (texts) or --image-column (images)")
    )


def _column_data(spec: str, path: Path, kind: str, cells: Cells, raw_labels, columns: Columns, info: dict) -> Data:
    where = str(path)
    labels_info = labels_from_values(raw_labels, f"data file {where}", columns.label)
    if kind == "text":
        return _data(spec, path.stem, kind, labels_info, Texts(cells, where, columns.text), info, [])
    images = Images(cells, where)
    return _data(spec, path.stem, kind, labels_info, images, info, bit_depth_warnings(images))


# ------------------------------------------------------------------------------------ image folders
def image_folder(path: Path, spec: str) -> Data:
    """DIR/CLASS/IMAGE: class names from the sub-folders (sorted), images read on access."""
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for i, c in enumerate(classes):
        for f in sorted((path / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f, i))
    if not files:
        loose = [f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        why = (
            f"its {len(loose)} image(s) are not in class sub-folders"
            if loose
            else "no images found"
            if classes
            else "it is empty"
        )
        raise SpecError(f"data folder {path} has no images in class sub-folders ({why}); expected DIR/CLASS/IMAGE.png")
    rel = [str(f.relative_to(path)) for f, _ in files]
    images = Images(ListCells([str(f) for f, _ in files], rel), str(path))
    labels = torch.tensor([lab for _, lab in files], dtype=torch.long)
    present = sorted({c for _, c in files})
    return Data(
        spec=spec,
        name=path.name,
        kind="image",
        labels=labels,
        class_names=classes,
        images=images,
        info={"source": str(path), "files": rel, "classes_present": present},
        warnings=bit_depth_warnings(images),
    )


# ------------------------------------------------------------------------------------ CSV / JSONL
def _lines(fh, pos: list[int]) -> Iterator[str]:
    """The lines of a binary file as text, with ``pos[0]`` the offset after the last line given out."""
    for raw in fh:
        pos[0] += len(raw)
        yield raw.decode("utf-8")


class _RowCells(Cells):
    """One column of a CSV/JSONL: row ``i`` is parsed from its recorded byte offset when asked for."""

    def __init__(self, path: Path, offsets: array, column: str, csv_index: int | None):
        self.path, self.offsets, self.column, self.csv_index = path, offsets, column, csv_index
        self.root = path.parent

    def __len__(self) -> int:
        return len(self.offsets)

    def name(self, i: int) -> str:
        return str(i + 1)

    def cell(self, i: int) -> Any:
        with open(self.path, "rb") as fh:
            fh.seek(self.offsets[i])
            try:
                if self.csv_index is None:
                    return json.loads(fh.readline().decode("utf-8")).get(self.column)
                row = next(csv.reader(_lines(fh, [0])))
            except UnicodeDecodeError:
                raise SpecError(f"{self.path} is not a UTF-8 text file") from None
        return row[self.csv_index] if self.csv_index < len(row) else None


def text_file(path: Path, spec: str, columns: Columns) -> Data:
    """A CSV (with a header) or JSONL (one object a line): one pass records where each row starts and
    its label; the text (or image path) of row ``i`` is read on access."""
    offsets = array("q")
    raw: list = []
    names: list[str] = []
    is_csv = path.suffix.lower() == ".csv"
    try:
        with open(path, "rb") as fh:
            pos = [0]
            if is_csv:
                reader = csv.reader(_lines(fh, pos))
                header = next(reader, None)
                if header is None:
                    raise SpecError(f"data file {path} has no rows")
                names = [h.lstrip("\ufeff") if k == 0 else h for k, h in enumerate(header)]
                kind = _pick_kind(f"data file {path}", names, columns)
                li = names.index(columns.label)
                start = pos[0]
                for row in reader:
                    if row:
                        if len(row) != len(names):
                            raise SpecError(
                                f"{path}: row {len(offsets) + 1} has {len(row)} fields; the header has {len(names)}"
                            )
                        offsets.append(start)
                        raw.append(row[li])
                    start = pos[0]
            else:
                kind = ""
                for n, line in enumerate(_lines(fh, pos), 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        raise SpecError(f"{path}: line {n} is not valid JSON") from None
                    if not isinstance(obj, dict):
                        raise SpecError(f"{path}: line {n} is not a JSON object")
                    if not kind:
                        names = list(obj)
                        kind = _pick_kind(f"data file {path}", names, columns)
                    if columns.label not in obj:
                        raise SpecError(f"{path}: line {n} has no '{columns.label}'")
                    offsets.append(pos[0] - len(line.encode("utf-8")))
                    raw.append(obj[columns.label])
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a UTF-8 text file") from None
    if not offsets:
        raise SpecError(f"data file {path} has no rows")
    column = columns.text if kind == "text" else columns.image
    cells = _RowCells(path, offsets, column, names.index(column) if is_csv else None)
    return _column_data(spec, path, kind, cells, raw, columns, {"source": str(path)})


# ------------------------------------------------------------------------------------ Parquet
class _ParquetCells(Cells):
    """One column of a Parquet file, read a row group at a time (the last one kept: sequential reads)."""

    def __init__(self, path: Path, column: str, starts: list[int], n: int):
        self.path, self.column, self.starts, self.n = path, column, starts, n
        self.root = path.parent
        self._group: tuple[int, Any] | None = None

    def __getstate__(self):  # DataLoader workers and Ray get the path, not the cached row group
        return dict(self.__dict__, _group=None)

    def __len__(self) -> int:
        return self.n

    def cell(self, i: int) -> Any:
        g = bisect.bisect_right(self.starts, i) - 1
        if self._group is None or self._group[0] != g:
            import pyarrow.parquet as pq

            with pq.ParquetFile(self.path) as pf:
                self._group = (g, pf.read_row_group(g, columns=[self.column]).column(0))
        return self._group[1][i - self.starts[g]].as_py()


def parquet_table(path: Path, spec: str, columns: Columns) -> Data:
    """A Parquet table: the label column is read alone; texts/images one row group at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SpecError(f"reading {path} needs pyarrow ({DATA_EXTRA})") from None
    try:
        with pq.ParquetFile(path) as pf:
            names = list(pf.schema_arrow.names)
            kind = _pick_kind(f"data file {path}", names, columns)
            raw = pf.read(columns=[columns.label]).column(0).to_pylist()
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
    except SpecError:
        raise
    except Exception as e:
        raise SpecError(f"cannot read {path} as Parquet: {first_line(e)}") from None
    starts = [int(s) for s in np.cumsum([0, *sizes[:-1]])] if sizes else [0]
    cells = _ParquetCells(path, columns.text if kind == "text" else columns.image, starts, len(raw))
    return _column_data(spec, path, kind, cells, raw, columns, {"source": str(path)})


# ------------------------------------------------------------------------------------ saved datasets
def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


class _DatasetCells(Cells):
    """One column of a memory-mapped ``datasets.Dataset`` (images not decoded by ``datasets``)."""

    def __init__(self, ds, column: str, root: Path):
        self.ds, self.column, self.root = ds, column, root

    def __len__(self) -> int:
        return len(self.ds)

    def cell(self, i: int) -> Any:
        return self.ds[i][self.column]


def saved_dataset(path: Path, spec: str, columns: Columns, split: str) -> Data:
    """A Hugging Face dataset saved to disk, opened memory-mapped with ``datasets.load_from_disk``.

    Labels: a ``ClassLabel`` column gives the class names (every class, in its order), else the values
    are read as a CSV's are. Images: an ``Image`` column is read undecoded and decoded by relprop (as
    files are: bit depth, EXIF), a binary column as encoded bytes, a string column as file paths.
    """
    try:
        import datasets
    except ImportError:
        raise SpecError(f"{path} is a saved Hugging Face dataset; reading it needs 'datasets' ({DATA_EXTRA})") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise SpecError(f"cannot open the saved dataset {path}: {first_line(e)}") from None
    where = f"{path}"
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            splits = list(ds)
            raise SpecError(
                f"saved dataset {path} has no split '{split}' (splits: {', '.join(splits)}).{closest(split, splits)} "
                f"Choose one with --split"
            )
        ds, where = ds[split], f"{path} [{split}]"
    names = list(ds.column_names)
    kind = _pick_kind(f"dataset {where}", names, columns)
    feature = ds.features[columns.label]
    raw = ds.with_format("arrow")[columns.label].to_pylist()
    if isinstance(feature, datasets.ClassLabel):
        if any(v is None or v < 0 for v in raw):
            raise SpecError(f"dataset {where}: unlabelled rows (-1) in column '{columns.label}'")
        labels = torch.tensor(raw, dtype=torch.long)
        labels_info: tuple = (labels, list(feature.names), True, None)
    else:
        labels_info = labels_from_values(raw, f"dataset {where}", columns.label)
    column = columns.text if kind == "text" else columns.image
    part = ds.select_columns([column])
    if kind == "image" and isinstance(part.features[column], datasets.Image):
        part = part.cast_column(column, datasets.Image(decode=False))
    cells = _DatasetCells(part, column, path)
    info = {"source": str(path), "split": split if where != str(path) else None}
    if kind == "text":
        return _data(spec, path.name, kind, labels_info, Texts(cells, where, column), info, [])
    images = Images(cells, where)
    return _data(spec, path.name, kind, labels_info, images, info, bit_depth_warnings(images))


# ------------------------------------------------------------------------------------ tar shards
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
IMAGE_EXTS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)
PICKLE_EXTS = {"pt": "pt", "pth": "pt", "pyd": "pickle", "pickle": "pickle"}


def _expand(spec: str) -> list[str]:
    """``a-{000..003}.tar`` -> ``a-000.tar`` ... ``a-003.tar`` (zero padding kept), ``{a,b}`` alternatives."""
    m = _BRACES.search(spec)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        width = len(m.group(1))
        return [x for k in range(lo, hi + 1) for x in _expand(spec[: m.start()] + f"{k:0{width}d}" + spec[m.end() :])]
    m = re.search(r"\{([^{}]*,[^{}]*)\}", spec)
    if m:
        return [x for alt in m.group(1).split(",") for x in _expand(spec[: m.start()] + alt + spec[m.end() :])]
    return [spec]


def shard_paths(spec: str) -> list[Path] | None:
    """The shards of a tar spec (``FILE.tar``, ``DIR`` of ``.tar`` files, ``s-{000..009}.tar``), else None."""
    if spec.startswith("zoo:"):
        return None
    if spec.lower().endswith((".tar", ".tar.gz", ".tgz")):  # braces expand in shard specs only
        names = _expand(spec)
        paths = [Path(s).expanduser() for s in names]
        missing = [n for n, p in zip(names, paths) if not p.is_file()]  # named as given (Path drops a URL's //)
        if missing:
            raise SpecError(
                f"shard not found: {missing[0]}" + (f" ({len(missing)} missing)" if len(missing) > 1 else "")
            )
        return paths
    p = Path(spec).expanduser()
    if p.is_dir() and not is_saved_dataset(p):
        tars = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".tar")
        if tars and not any(d.is_dir() and not d.name.startswith(".") for d in p.iterdir()):
            return tars
    return None


class _TarCells(Cells):
    """Each example's input member: ``(kind, bytes)`` read from its recorded offset in its shard."""

    def __init__(self, shards: list[str], shard: array, offset: array, size: array, kinds: list[str], keys: list[str]):
        self.shards, self.shard, self.offset, self.size, self.kinds, self.keys = (
            shards,
            shard,
            offset,
            size,
            kinds,
            keys,
        )

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, i: int) -> str:
        return self.keys[i]

    @contextlib.contextmanager
    def open(self, i: int) -> Iterator[tuple[str, BinaryIO]]:
        """``(kind, the member as a seekable stream read in place)``: for reading a header only."""
        with open(self.shards[self.shard[i]], "rb") as fh:
            yield self.kinds[i], cast(BinaryIO, io.BufferedReader(_Window(fh, self.offset[i], self.size[i])))

    def cell(self, i: int) -> Any:
        with open(self.shards[self.shard[i]], "rb") as fh:
            fh.seek(self.offset[i])
            b = fh.read(self.size[i])
        if self.kinds[i] == "text":
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError:
                raise SpecError(f"{self.keys[i]}: the .txt member is not UTF-8") from None
        return (self.kinds[i], b)


def _choose(members: dict[str, tuple]) -> tuple[str, str] | None:
    """The input member of one example: ``(ext, kind)`` in the order of preference, or None."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext, "image"
    if "npy" in members:
        return "npy", "npy"
    if "txt" in members:
        return "txt", "text"
    for ext in ("pt", "pth", "pyd", "pickle"):
        if ext in members:
            return ext, PICKLE_EXTS[ext]
    return None


class _Window(io.RawIOBase):
    """``length`` bytes of ``fh`` from ``start`` as a seekable file (a tar member, read in place)."""

    def __init__(self, fh: Any, start: int, length: int):
        self.fh, self.start, self.length, self.pos = fh, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        if not n:
            return 0
        self.fh.seek(self.start + self.pos)
        got = self.fh.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def _pt_refusal(fh: Any, start: int, length: int, name: str) -> str | None:
    """Why the ``.pt`` member at ``start`` of tar file ``fh`` cannot be loaded with ``weights_only`` (the
    message), or None. The globals its pickle names are read statically from the zip's ``data.pkl``
    (``torch.serialization.get_unsafe_globals_in_checkpoint``: about 30 KB read whatever the tensors' size); a
    legacy (non-zip) file, or a torch without that function, is loaded once instead. Reading still loads
    with ``weights_only``: this check only moves the refusal to listing time, it is not what keeps code from
    running."""
    unsafe_globals = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    window = io.BufferedReader(_Window(fh, start, length))
    if unsafe_globals is not None and window.peek(4)[:4] == b"PK\x03\x04":
        try:
            unsafe = unsafe_globals(window)
        except Exception as e:
            return f"cannot read {name}: {first_line(e)}"
        return f"{_pickle_refusal(name, WEIGHTS_ONLY)} (it names {', '.join(sorted(unsafe)[:3])})" if unsafe else None
    window.seek(0)
    try:
        _unpickle("pt", window.read(), name, False)
    except SpecError as e:
        return str(e)
    return None


def tar_shards(shards: list[Path], spec: str, columns: Columns, trust_pickle: bool = False) -> Data:
    """WebDataset shards: members ``KEY.EXT`` grouped by key (the name up to the first dot of its file name).

    One pass over the tar headers records where each example's input member lies; the label comes from
    the ``.cls`` member (a class index or name) or the ``.json`` member's ``label`` field (``--label-column``).
    Uncompressed ``.tar`` only: a member is then read by seeking to it.
    """
    shard_names = [str(s) for s in shards]
    shard_ix, offset, size = array("i"), array("q"), array("q")
    kinds: list[str] = []
    keys: list[str] = []
    raw_labels: list = []
    for si, path in enumerate(shards):
        pt_members: list[tuple[int, int, int]] = []  # (example, offset, size) of input .pt members
        with open(path, "rb") as fh:
            if fh.read(2) == b"\x1f\x8b" or path.suffix.lower() in (".gz", ".tgz"):
                raise SpecError(
                    f"{path} is compressed; relprop reads uncompressed .tar shards (it seeks to each member): "
                    f"gunzip it first"
                )
        examples: dict[str, dict[str, tuple[int, int, bytes | None]]] = {}
        try:
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    d, _, base = m.name.rpartition("/")
                    if base.startswith(".") or "." not in base:
                        continue
                    stem, _, ext = base.partition(".")
                    key = f"{d}/{stem}" if d else stem
                    ext = ext.lower()
                    small = None
                    if ext in ("cls", "json"):
                        f = tf.extractfile(m)
                        small = f.read() if f is not None else b""
                    got = examples.setdefault(key, {})
                    if ext in got:
                        raise SpecError(f"{path}: two members {key}.{ext}")
                    got[ext] = (m.offset_data, m.size, small)
        except tarfile.TarError as e:
            raise SpecError(f"cannot read {path} as a tar file: {first_line(e)}") from None
        for key, members in examples.items():
            where = f"{path}:{key}"
            pick = _choose(members)
            if pick is None:
                raise SpecError(
                    f"{where} has no input member (members: {', '.join(sorted(members))}); relprop reads "
                    f"{'/'.join(IMAGE_EXTS[:4])}/npy images or txt texts"
                )
            ext, kind = pick
            if kind == "pickle" and not trust_pickle:
                raise SpecError(_pickle_refusal(f"{where}.{ext}"))
            if "cls" in members:
                label: Any = (members["cls"][2] or b"").decode("utf-8", "replace").strip()
            elif "json" in members:
                try:
                    meta = json.loads(members["json"][2] or b"{}")
                except json.JSONDecodeError:
                    raise SpecError(f"{where}.json is not valid JSON") from None
                label = meta.get(columns.label) if isinstance(meta, dict) else None
            else:
                label = None
            if label is None or label == "":
                raise SpecError(f"{where} has no label (a .cls member, or '{columns.label}' in its .json member)")
            if kind == "pt" and not trust_pickle:
                pt_members.append((len(keys), *members[ext][:2]))
            shard_ix.append(si)
            offset.append(members[ext][0])
            size.append(members[ext][1])
            kinds.append(kind)
            keys.append(f"{Path(path).name}:{key}.{ext}")
            raw_labels.append(label)
        if pt_members:
            with open(path, "rb") as fh:
                for i, start, length in pt_members:
                    why = _pt_refusal(fh, start, length, keys[i])
                    if why:
                        raise SpecError(why)
    if not keys:
        raise SpecError(f"data {spec}: the shards hold no examples")
    modes = {"text" if k == "text" else "image" for k in kinds}
    if len(modes) > 1:
        raise SpecError(f"data {spec}: some examples are texts (.txt) and some images")
    kind = modes.pop()
    cells = _TarCells(shard_names, shard_ix, offset, size, kinds, keys)
    labels_info = labels_from_values(raw_labels, f"data {spec}", columns.label)
    info = {"source": spec, "shards": len(shards)}
    if kind == "text":
        return _data(spec, Path(shard_names[0]).stem, kind, labels_info, Texts(cells, spec, "txt"), info, [])
    images = Images(cells, spec, trust_pickle)
    return _data(spec, Path(shard_names[0]).stem, kind, labels_info, images, info, bit_depth_warnings(images))


__all__ = [
    "Columns",
    "Images",
    "Lazy",
    "Shipped",
    "Take",
    "Texts",
    "batches",
    "decode_member",
    "detach",
    "hold_items",
    "image_folder",
    "pack_items",
    "parquet_table",
    "saved_dataset",
    "shard_paths",
    "tar_shards",
    "take",
    "text_file",
    "unpack",
]
