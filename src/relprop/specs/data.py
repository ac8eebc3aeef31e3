"""Data specs: an embedded dataset, a folder of class sub-folders, or a CSV/JSONL of texts.

Data specs (``load_data``)::

    zoo:NAME                 an embedded dataset (digits, faces, chest_xray)
    DIR                      a folder of images with one sub-folder per class (DIR/CLASS/IMAGE.png)
    FILE.csv / FILE.jsonl    texts with labels (columns ``text`` and ``label`` by default)

Images are read as they are stored: 16-bit files are scaled by the bit depth they declare (PNG
``sBIT``, TIFF ``BitsPerSample``) or else by their data type's range, palette and alpha images are
converted, and the EXIF orientation is applied. A value range that fills only a small part of the
declared depth is reported (it often means a 12-bit image stored without ``sBIT``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import SpecError, closest, first_line, install_hint
from .hashing import tensor_bytes
from .labels import group_spellings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class Data:
    """A labelled dataset: raw images in [0, 1] (``(C, H, W)`` each) or texts."""

    spec: str
    name: str
    kind: str  # "image" | "text"
    labels: torch.Tensor
    class_names: list[str]
    images: list[torch.Tensor] | torch.Tensor | None = None
    texts: list[str] | None = None
    info: dict = field(default_factory=dict)
    model_ready: torch.Tensor | None = None  # zoo datasets: already-normalised inputs for zoo models
    #: notes about the inputs (e.g. 16-bit images using a small part of their range), shown to the user
    warnings: list[str] = field(default_factory=list)
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def fingerprint(self) -> str:
        """A hash of every value the models see: all image bytes (as decoded), texts, labels, class names."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.spec.encode())
            h.update(json.dumps(self.class_names).encode())
            tensor_bytes(h, self.labels)
            if self.texts is not None:
                for t in self.texts:
                    h.update(t.encode() + b"\x00")
            else:
                images = self.images
                ims = images if isinstance(images, list) else [] if images is None else [images]
                for im in ims:
                    tensor_bytes(h, im)
                if self.model_ready is not None:
                    tensor_bytes(h, self.model_ready)
            self._fingerprint = h.hexdigest()[:20]
        return self._fingerprint


# ------------------------------------------------------------------------------------ images
def _png_sbit(path: Path) -> int | None:
    """Significant bits declared by a PNG's ``sBIT`` chunk (the largest over channels), else None."""
    try:
        with open(path, "rb") as fh:
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


def _declared_bits(im, path: Path) -> int | None:
    if path.suffix.lower() == ".png":
        return _png_sbit(path)
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 258 in tags:
        bps = tags[258]
        return int(max(bps) if isinstance(bps, tuple) else bps)
    return None


def read_image(path: Path, notes: list[str] | None = None) -> torch.Tensor:
    """An image file as a float tensor ``(C, H, W)`` in [0, 1] (C = 1 for grayscale, else 3).

    8-bit images are divided by 255. 16/32-bit integer images are divided by ``2**bits - 1`` where
    ``bits`` is the depth the file declares (PNG ``sBIT``, TIFF ``BitsPerSample``), else the data
    type's range; when the largest value uses less than 1/16 of that range a note is added to
    ``notes`` (a list the caller shows). Float images must already be in [0, 1]. Palette images are
    expanded, alpha is composited onto black, and the EXIF orientation is applied.
    """
    path = Path(path)
    if not path.exists():
        raise SpecError(f"input file not found: {path}")
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise SpecError(f"reading images needs Pillow ({install_hint('PIL')})") from None
    try:
        with Image.open(path) as opened:
            opened.load()
            im = ImageOps.exif_transpose(opened)
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA")
                mode = "RGBA"
            a: np.ndarray  # float64 while scaling 16/32-bit data, float32 in the end
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                a = np.asarray(im).astype(np.float64)
                dtype_bits = 16 if mode.startswith("I;16") else 32
                declared = _declared_bits(im, path)
                bits = declared or dtype_bits
                scale = float(2**bits - 1)
                peak = float(a.max()) if a.size else 0.0
                if a.size and a.min() < 0:
                    raise SpecError(f"cannot read image {path}: negative pixel values in a {mode} image")
                if peak > scale:  # the declared depth is wrong; the data type's range is not
                    bits, scale = dtype_bits, float(2**dtype_bits - 1)
                if notes is not None and 0 < peak < scale / 16:
                    notes.append(
                        f"{path.name}: values use {100 * peak / scale:.1f}% of the {bits}-bit range (max {peak:.0f}); "
                        f"scaled by {2**bits - 1:.0f} "
                        + ("as the file declares" if declared == bits else "(the file declares no bit depth)")
                        + ", so the image is dark"
                    )
                a = (a / scale).astype(np.float32)
            elif mode == "F":
                a = np.asarray(im, dtype=np.float32)
                if a.size and (a.min() < 0 or a.max() > 1):
                    raise SpecError(
                        f"cannot read image {path}: a floating-point image with values in "
                        f"[{a.min():.3g}, {a.max():.3g}]; relprop expects floats in [0, 1]"
                    )
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
    except Exception as e:
        raise SpecError(f"cannot read image {path}: {first_line(e)}") from None
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t[None].contiguous() if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _image_folder(path: Path, spec: str) -> Data:
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
    notes: list[str] = []
    images = [read_image(f, notes) for f, _ in files]
    warnings = []
    if notes:
        warnings.append(
            f"{len(notes)} of {len(files)} images use less than 1/16 of their declared bit depth "
            f"(first: {notes[0]}); if they are 12-bit images, save them with a PNG sBIT chunk"
        )
    labels = torch.tensor([lab for _, lab in files], dtype=torch.long)
    present = sorted({c for _, c in files})
    return Data(
        spec=spec,
        name=path.name,
        kind="image",
        labels=labels,
        class_names=classes,
        images=images,
        info={"source": str(path), "files": [str(f.relative_to(path)) for f, _ in files], "classes_present": present},
        warnings=warnings,
    )


def _text_file(path: Path, spec: str, text_column: str, label_column: str) -> Data:
    rows: list[dict] = []
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        else:
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise SpecError(f"{path}: line {n} is not valid JSON") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a UTF-8 text file") from None
    if not rows:
        raise SpecError(f"data file {path} has no rows")
    cols = list(rows[0].keys())
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in rows[0]:
            raise SpecError(
                f"data file {path} has no column '{col}' (columns: {', '.join(map(str, cols))}).{closest(col, cols)} "
                f"Choose one with {flag}"
            )
    texts = [str(r[text_column]) for r in rows]
    raw = [r[label_column] for r in rows]
    note: str | None = None
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in raw):
        ints = [int(v) for v in raw]
        if min(ints) < 0:
            raise SpecError(f"data file {path}: negative class index {min(ints)} in column '{label_column}'")
        class_names = [str(i) for i in range(max(ints) + 1)]
        labels = torch.tensor(ints, dtype=torch.long)
        named = False
    else:  # spellings that differ only in case/spaces/underscores are one class, as for folders
        class_names, index, note = group_spellings([str(v) for v in raw])
        labels = torch.tensor(index, dtype=torch.long)
        named = True
    return Data(
        spec=spec,
        name=path.stem,
        kind="text",
        labels=labels,
        class_names=class_names,
        texts=texts,
        info={"source": str(path), "named_labels": named, "classes_present": sorted(set(labels.tolist()))},
        warnings=[note] if note else [],
    )


def load_data(spec: str, *, split: str = "test", text_column: str = "text", label_column: str = "label") -> Data:
    """Load a dataset from a spec string (see the module docstring)."""
    from .. import zoo

    spec = spec.strip()
    prefix, _, rest = spec.partition(":")
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
        return Data(
            spec=spec,
            name=rest,
            kind="image",
            labels=ds.labels,
            class_names=list(ds.class_names),
            images=ds.raw_images,
            info={"source": f"relprop.zoo ({ds.info.get('source')})", "split": ds.split},
            model_ready=ds.images,
        )
    path = Path(spec).expanduser()
    if not path.exists():
        if spec in zoo.list_datasets():
            return load_data(f"zoo:{spec}", split=split)
        raise SpecError(
            f"data not found: {spec} (expected zoo:NAME, a folder of class sub-folders, or a .csv/.jsonl file)"
        )
    if path.is_dir():
        return _image_folder(path, spec)
    if path.suffix.lower() in (".csv", ".jsonl", ".json", ".ndjson"):
        return _text_file(path, spec, text_column, label_column)
    raise SpecError(f"data spec {spec}: expected zoo:NAME, a folder of class sub-folders, or a .csv/.jsonl file")
