"""Data specs: an embedded dataset, an image folder, text/image tables, saved datasets and tar shards.

Data specs (``load_data``)::

    zoo:NAME                 an embedded dataset (digits, faces, chest_xray), held in memory
    DIR                      a folder of images with one sub-folder per class (DIR/CLASS/IMAGE.png)
    FILE.csv / FILE.jsonl    texts with labels (columns ``text`` and ``label`` by default)
    FILE.parquet             a table: a text column, or an image column of encoded bytes, and labels
    DIR (save_to_disk)       a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``; relprop[data])
    FILE.tar / DIR of .tar   WebDataset shards (``KEY.png`` + ``KEY.cls`` members), also ``s-{000..009}.tar``

Everything but ``zoo:`` is read lazily (:mod:`.sources`): ``Data.images`` / ``Data.texts`` are sequences
that read and decode item ``i`` when it is asked for, so memory is bounded by the batch, not the dataset.
Labels and class names are read up front from the cheap part (folder names, the label column alone, the
tar members' names and ``.cls`` members). ``Data.select`` takes the first N (``--limit``) and/or a seeded
random N (``--subset``).

Images are read as they are stored: 16-bit files are scaled by the bit depth they declare (PNG
``sBIT``, TIFF ``BitsPerSample``) or else by their data type's range, palette and alpha images are
converted, and the EXIF orientation is applied. A value range that fills only a small part of the
declared depth is reported (it often means a 12-bit image stored without ``sBIT``).
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .errors import SpecError, closest, first_line, install_hint
from .hashing import tensor_bytes
from .labels import group_spellings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class Data:
    """A labelled dataset: raw images in [0, 1] (``(C, H, W)`` each) or texts.

    ``images`` / ``texts`` are a tensor or list (in memory) or a lazy sequence of :mod:`.sources` that
    reads item ``i`` on ``data.images[i]``; code that indexes them works with both. ``loader_workers``:
    DataLoader worker processes that decode ahead during the accuracy pass (0: decode in this process).
    """

    spec: str
    name: str
    kind: str  # "image" | "text"
    labels: torch.Tensor
    class_names: list[str]
    images: Sequence[torch.Tensor] | torch.Tensor | None = None
    texts: Sequence[str] | None = None
    info: dict = field(default_factory=dict)
    model_ready: torch.Tensor | None = None  # zoo datasets: already-normalised inputs for zoo models
    #: notes about the inputs (e.g. 16-bit images using a small part of their range), shown to the user
    warnings: list[str] = field(default_factory=list)
    loader_workers: int = 0
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def fingerprint(self) -> str:
        """A hash of every value the models see: the class names, labels, and every input.

        In-memory data hashes the decoded values; lazy data (:mod:`.sources`) hashes each item's raw
        stored bytes (file bytes, tar member, table cell; the text itself), streamed one item at a time
        so that the hash never holds the dataset. Either way the selected items only (``select``).
        """
        if self._fingerprint is None:
            h = hashlib.sha256(self.spec.encode())
            h.update(json.dumps(self.class_names).encode())
            h.update(json.dumps(self.info.get("selection"), sort_keys=True).encode())
            tensor_bytes(h, self.labels)
            seq = self.texts if self.texts is not None else self.images
            digest = getattr(seq, "digest", None)
            if digest is not None:  # lazy: raw bytes per item
                h.update(b"raw")
                for i in range(len(self)):
                    digest(h, i)
            elif self.texts is not None:
                for t in self.texts:
                    h.update(t.encode() + b"\x00")
            else:
                images = self.images
                ims: Sequence[torch.Tensor] = [images] if isinstance(images, torch.Tensor) else images or []
                for im in ims:
                    tensor_bytes(h, im)
                if self.model_ready is not None:
                    tensor_bytes(h, self.model_ready)
            self._fingerprint = h.hexdigest()[:20]
        return self._fingerprint

    def __getstate__(self) -> dict:
        """Pickled (the Ray engine ships the data to its workers) with its cache key, so that a worker does not
        read every stored item again to hash it."""
        self.fingerprint()
        return dict(self.__dict__)

    def select(self, limit: int | None = None, subset: int | None = None, seed: int = 0) -> Data:
        """The first ``limit`` examples, then ``subset`` of them drawn at random with ``seed`` (kept in
        dataset order); ``self`` when neither is given. Lazy inputs stay lazy (a view on the chosen
        indices). Selecting again with the same arguments returns the selection unchanged, so a
        :class:`~relprop.report.compare.Job` may apply its settings to data the caller already selected.
        """
        for v, flag in ((limit, "--limit"), (subset, "--subset")):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise SpecError(f"{flag} must be a positive whole number, got {v!r}")
        if limit is None and subset is None:
            return self
        sel = {"limit": limit, "subset": subset, "seed": seed}
        if self.info.get("selection") == sel:
            return self
        n = len(self)
        idx = np.arange(min(n, limit) if limit else n)
        warnings = list(self.warnings)
        if limit and limit > n:  # as for --subset: a limit that selects nothing is said, not passed over
            warnings.append(f"--limit {limit} is more than the {n} examples: all {n} are used")
        if subset and subset < len(idx):
            idx = np.sort(np.random.RandomState(seed).choice(len(idx), subset, replace=False))
        elif subset and subset > len(idx):  # nothing to draw from: say so rather than run on all of them silently
            warnings.append(
                f"--subset {subset} is more than the {len(idx)} examples"
                + (f" left by --limit {limit}" if limit and limit < n else "")
                + f": all {len(idx)} are used"
            )
        from .sources import take

        chosen = [int(i) for i in idx]
        labels = self.labels[chosen]
        info = dict(self.info, selection=sel, selected_from=n, classes_present=sorted(set(labels.tolist())))
        # example i of the selection is example selected_indices[i] of the data (--limit: i itself)
        base = self.info.get("selected_indices")
        info["selected_indices"] = [base[i] for i in chosen] if base else chosen if subset else None
        if "files" in self.info:
            info["files"] = [self.info["files"][i] for i in chosen]
        return replace(
            self,
            labels=labels,
            images=take(self.images, chosen),
            texts=take(self.texts, chosen),
            model_ready=None if self.model_ready is None else self.model_ready[chosen],
            info=info,
            warnings=warnings,
            _fingerprint=None,
        )


def labels_from_values(raw: Sequence, where: str, column: str) -> tuple[torch.Tensor, list[str], bool, str | None]:
    """Labels of a table/shard column: ``(labels, class_names, named, note)``.

    Whole numbers (ints or digit strings) are class indices (class names "0".."max"); anything else is a
    class name, and spellings that differ only in case/spaces/underscores are one class, as for folders
    (``note`` names the merged spellings).
    """
    note: str | None = None
    if not len(raw):
        raise SpecError(f"{where} has no rows")
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in raw):
        ints = [int(v) for v in raw]
        if min(ints) < 0:
            raise SpecError(f"{where}: negative class index {min(ints)} in column '{column}'")
        class_names = [str(i) for i in range(max(ints) + 1)]
        labels = torch.tensor(ints, dtype=torch.long)
        named = False
    else:  # spellings that differ only in case/spaces/underscores are one class, as for folders
        class_names, index, note = group_spellings([str(v) for v in raw])
        labels = torch.tensor(index, dtype=torch.long)
        named = True
    return labels, class_names, named, note


# ------------------------------------------------------------------------------------ images
def _png_sbit(fh: BinaryIO) -> int | None:
    """Significant bits declared by a PNG's ``sBIT`` chunk (the largest over channels), else None."""
    try:
        fh.seek(0)
        if fh.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = fh.read(8)
            if len(head) < 8:
                return None
            length, ctype = struct.unpack(">I4s", head)
            if ctype == b"sBIT":
                data = fh.read(length)
                return max(data) if data else None
            if ctype in (b"IDAT", b"IEND"):
                return None
            fh.seek(length + 4, 1)
    except OSError:
        return None


def _declared_bits(im, fh: BinaryIO, fmt: str | None) -> int | None:
    """The pixel range a file declares, in bits: PNG ``sBIT``; TIFF ``BitsPerSample``, one less for signed
    samples (``SampleFormat`` 2: a 32-bit signed TIFF's range ends at ``2**31 - 1``)."""
    if fmt == "PNG":
        return _png_sbit(fh)
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 258 in tags:
        bps = tags[258]
        fmt_tag = tags.get(339, 1)
        signed = (max(fmt_tag) if isinstance(fmt_tag, tuple) else fmt_tag) == 2
        return int(max(bps) if isinstance(bps, tuple) else bps) - signed
    return None


def _type_bits(mode: str, fmt: str | None) -> int:
    """The value range of PIL's integer modes, in bits: ``I;16*`` 16; ``I`` (int32) 31, except that PNG and
    PPM/PGM samples have at most 16 bits (older Pillow opens 16-bit PNGs as ``I``)."""
    if mode.startswith("I;16") or fmt in ("PNG", "PPM"):
        return 16
    return 31


def int_pixels(
    a: np.ndarray,
    name: str,
    notes: list[str] | None = None,
    *,
    bits: int | None = None,
    declared: int | None = None,
    what: str | None = None,
) -> np.ndarray:
    """Integer pixels -> float32 in [0, 1]: the one rule for image files and stored arrays.

    ``bits`` is the value range of the stored type (default: ``a``'s dtype, where a signed type's range ends
    at ``2**(bits-1) - 1``: int32 has 31 bits of pixel range, not 32); ``declared`` a depth the file states
    (PNG ``sBIT``, TIFF ``BitsPerSample``); ``what`` names the stored kind in errors (default: ``an int64
    array``). Negative values are refused (signed types too: pixels count from 0); 8 bits are divided by 255;
    other integers (int8 too: by 127) by ``2**depth - 1``, the declared depth where the values fit in it, else the type's range.
    Values that fill less than 1/16 of that range are noted in ``notes`` (a 12-bit image stored as 16-bit
    without ``sBIT``), and refused when the range is wider than 16 bits: a 32/64-bit range is no pixel depth
    (NumPy's default integer, or a 32-bit TIFF, holding 8- or 16-bit values), and dividing by it would give a
    black image, a silently wrong input.
    """
    if bits is None:
        bits = 8 * a.dtype.itemsize - (a.dtype.kind == "i")
    if a.size and a.min() < 0:  # signed or not, a pixel counts up from 0 (black): no offset is guessed
        raise SpecError(
            f"cannot read image {name}: negative pixel values ({what or f'an {a.dtype} array'} with values in "
            f"[{a.min()}, {a.max()}]); relprop reads integer pixels from 0 (black) up to the type's maximum: store "
            f"them as uint8 (0-255), uint16 or floats in [0, 1]"
        )
    if bits == 8:  # uint8; int8 (7 bits of range) is scaled by its maximum, 127, as every signed type
        return a.astype(np.float32) / 255.0
    peak = float(a.max()) if a.size else 0.0
    depth = min(declared, bits) if declared and peak <= 2**declared - 1 else bits  # a wrong declaration: the type's
    scale = float(2**depth - 1)
    if 0 < peak < scale / 16:
        if depth > 16:
            raise SpecError(
                f"cannot read image {name}: {what or f'an {a.dtype} array'} with values in [{a.min()}, {a.max()}] "
                f"fills less than 1/16 of its type's range (0-{2**depth - 1}), by which relprop scales integer pixels "
                f"(the image would be black); store it as uint8 (0-255), uint16 or floats in [0, 1]"
            )
        if notes is not None:
            notes.append(
                f"{name}: values use {100 * peak / scale:.1f}% of the {depth}-bit range (max {peak:.0f}); "
                f"scaled by {scale:.0f} "
                + ("as the file declares" if declared == depth else "(the file declares no bit depth)")
                + ", so the image is dark"
            )
    return (a.astype(np.float64) / scale).astype(np.float32)


def _check_float(a: np.ndarray, name: str) -> np.ndarray:
    a = a.astype(np.float32)
    if a.size and not np.isfinite(a).all():
        bad = "NaN" if np.isnan(a).any() else "infinite"
        raise SpecError(
            f"cannot read image {name}: a floating-point image with {bad} values "
            f"({int((~np.isfinite(a)).sum())} of {a.size}); relprop expects floats in [0, 1]"
        )
    if a.size and (a.min() < 0 or a.max() > 1):
        raise SpecError(
            f"cannot read image {name}: a floating-point image with values in "
            f"[{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]; relprop expects floats in [0, 1]"
        )
    return a


def _to_chw(a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t[None].contiguous() if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def array_image(a: np.ndarray, name: str, notes: list[str] | None = None) -> torch.Tensor:
    """A stored array (``.npy``) as an image ``(C, H, W)`` in [0, 1]: ``(H, W)``, ``(H, W, 1)`` or
    ``(H, W, 3)`` (the layout PIL and NumPy image code use), scaled as :func:`read_image` scales files:
    8-bit by 255, wider integers by their type's range (no file declares a depth here; a 32/64-bit array
    whose values fill less than 1/16 of it is refused, a 16-bit one noted in ``notes``), floats must
    already be in [0, 1]."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise SpecError(
            f"cannot read image {name}: an array of shape {tuple(a.shape)}; relprop reads (H, W) or (H, W, 3) arrays"
            + ("; for (C, H, W) store a.transpose(1, 2, 0)" if a.ndim == 3 and a.shape[0] in (1, 3) else "")
        )
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if a.dtype.kind in "ui":
        return _to_chw(int_pixels(a, name, notes))
    if a.dtype.kind == "f":
        return _to_chw(_check_float(a, name))
    raise SpecError(f"cannot read image {name}: an array of {a.dtype}; relprop reads integer or float pixels")


def decode_image(source: Path | bytes, notes: list[str] | None = None, name: str | None = None) -> torch.Tensor:
    """An encoded image (a file, or its bytes) as a float tensor ``(C, H, W)`` in [0, 1]; see :func:`read_image`."""
    name = str(name if name is not None else source if isinstance(source, Path) else "<bytes>")
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise SpecError(f"reading images needs Pillow ({install_hint('PIL')})") from None
    try:
        fh: BinaryIO = open(source, "rb") if isinstance(source, Path) else io.BytesIO(source)
        with fh, Image.open(fh) as opened:
            opened.load()
            fmt = opened.format
            im = ImageOps.exif_transpose(opened)
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA")
                mode = "RGBA"
            a: np.ndarray
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                declared = _declared_bits(opened, fh, fmt)  # (exif_transpose's copy has no TIFF tags)
                what = "a 16-bit image" if mode.startswith("I;16") else "a 32-bit signed integer image (mode I)"
                a = int_pixels(np.asarray(im), name, notes, bits=_type_bits(mode, fmt), declared=declared, what=what)
            elif mode == "F":
                a = _check_float(np.asarray(im, dtype=np.float32), name)
            else:
                if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
                    base = "L" if mode.startswith("L") else "RGB"
                    bg = Image.new(base, im.size, 0)
                    bg.paste(im.convert(base), mask=im.getchannel("A"))
                    im = bg
                gray = im.mode in ("L", "1")
                a = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0
    except SpecError:
        raise
    except Image.UnidentifiedImageError:  # PIL's message names a file object, not the file
        raise SpecError(
            f"cannot read image {name}: not an image file Pillow can read (empty, truncated or another format)"
        ) from None
    except Exception as e:
        raise SpecError(f"cannot read image {name}: {first_line(e)}") from None
    return _to_chw(a)


def read_image(path: Path, notes: list[str] | None = None) -> torch.Tensor:
    """An image file as a float tensor ``(C, H, W)`` in [0, 1] (C = 1 for grayscale, else 3).

    8-bit images are divided by 255. 16/32-bit integer images are divided by ``2**bits - 1`` where
    ``bits`` is the depth the file declares (PNG ``sBIT``, TIFF ``BitsPerSample``), else the data
    type's range (a signed type's maximum: ``2**31 - 1`` for 32-bit signed TIFFs); when the largest value
    uses less than 1/16 of that range a note is added to ``notes`` (a list the caller shows), and a
    32-bit image is refused (:func:`int_pixels`). Float images must already be in [0, 1]. Palette images are
    expanded, alpha is composited onto black, and the EXIF orientation is applied.
    """
    path = Path(path)
    if not path.exists():
        raise SpecError(f"input file not found: {path}")
    return decode_image(path, notes, name=str(path))


def load_data(
    spec: str,
    *,
    split: str = "test",
    text_column: str = "text",
    label_column: str = "label",
    image_column: str = "image",
    trust_pickle: bool = False,
    limit: int | None = None,
    subset: int | None = None,
    seed: int = 0,
    loader_workers: int = 0,
) -> Data:
    """Load a dataset from a spec string (see the module docstring).

    ``split``: of a zoo dataset or a saved ``DatasetDict``; ``text_column``/``image_column``/``label_column``:
    the columns of a table or saved dataset (and the ``.json`` key of a shard's label); ``trust_pickle``:
    read pickled shard members (``.pyd``/``.pickle``/``.pt``/``.pth``), which can run code; ``limit``/
    ``subset``/``seed``: :meth:`Data.select`; ``loader_workers``: see :class:`Data`.
    """
    from .. import zoo
    from . import sources

    if isinstance(loader_workers, bool) or not isinstance(loader_workers, int) or loader_workers < 0:
        raise SpecError(f"loader workers must be a whole number >= 0, got {loader_workers!r}")
    spec = spec.strip()
    prefix, _, rest = spec.partition(":")
    data: Data
    if prefix == "zoo" and rest:
        names = zoo.list_datasets()
        if rest not in names:
            raise SpecError(f"unknown zoo dataset '{rest}' (available: {', '.join(names)}).{closest(rest, names)}")
        try:
            ds = zoo.load_dataset(rest, split=split)
        except ImportError as e:
            name = getattr(e, "name", None) or ""
            hint = install_hint(name) if name else ""
            msg = first_line(e)
            if hint and hint not in msg:
                msg = f"{msg} ({hint})"
            raise SpecError(f"zoo:{rest}: {msg}") from None
        except (ValueError, FileNotFoundError) as e:
            raise SpecError(f"zoo:{rest}: {first_line(e)}") from None
        data = Data(
            spec=spec,
            name=rest,
            kind="image",
            labels=ds.labels,
            class_names=list(ds.class_names),
            images=ds.raw_images,
            info={"source": f"relprop.zoo ({ds.info.get('source')})", "split": ds.split},
            model_ready=ds.images,
        )
    else:
        shards = sources.shard_paths(spec)
        path = Path(spec).expanduser()
        if shards is None and not path.exists():
            if spec in zoo.list_datasets():
                return load_data(
                    f"zoo:{spec}", split=split, limit=limit, subset=subset, seed=seed, loader_workers=loader_workers
                )
            raise SpecError(f"data not found: {spec} (expected {FORMS})")
        columns = sources.Columns(text=text_column, label=label_column, image=image_column)
        if shards is not None:
            data = sources.tar_shards(shards, spec, columns, trust_pickle)
        elif path.is_dir() and sources.is_saved_dataset(path):
            data = sources.saved_dataset(path, spec, columns, split)
        elif path.is_dir():
            data = sources.image_folder(path, spec)
        elif path.suffix.lower() in (".csv", ".jsonl", ".json", ".ndjson"):
            data = sources.text_file(path, spec, columns)
        elif path.suffix.lower() in (".parquet", ".pq"):
            data = sources.parquet_table(path, spec, columns)
        else:
            raise SpecError(f"data spec {spec}: expected {FORMS}")
    data.loader_workers = loader_workers
    return data.select(limit=limit, subset=subset, seed=seed)


FORMS = (
    "zoo:NAME, a folder of class sub-folders, a .csv/.jsonl/.parquet file, a saved Hugging Face dataset folder "
    "or WebDataset .tar shards"
)
