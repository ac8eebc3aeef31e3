"""How raw images become model inputs: resize, crop, channel conversion, normalisation.

Kept apart from the loaders so that a model kind only has to say *which* preprocessing its model
expects (zoo metadata, timm's data config, a Hugging Face image processor), never how to apply it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import SpecError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """How raw ``[0, 1]`` images ``(C, H, W)`` become model inputs."""

    size: tuple[int, int] | None = None  # (H, W); None: keep the image's size
    channels: int | None = None  # None: keep
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"
    crop_pct: float | None = None  # resize to size / crop_pct, then centre-crop (timm convention)
    source: str = "defaults"

    def describe(self) -> dict:
        return {
            "size": list(self.size) if self.size else None,
            "channels": self.channels,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "source": self.source,
        }

    def display(self, raw: torch.Tensor) -> torch.Tensor:
        """Resize/crop/convert a raw ``(C, H, W)`` image in [0, 1]; not normalised (for showing)."""
        x = raw.float()
        if x.dim() == 2:
            x = x[None]
        if self.channels is not None and x.shape[0] != self.channels:
            if self.channels == 3 and x.shape[0] == 1:
                x = x.expand(3, *x.shape[1:])
            elif self.channels == 1 and x.shape[0] in (3, 4):
                x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
            elif self.channels == 3 and x.shape[0] == 4:
                x = x[:3]
            else:
                raise SpecError(f"cannot convert an image with {x.shape[0]} channels to the model's {self.channels}")
        if self.size is not None and tuple(x.shape[-2:]) != tuple(self.size):
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
            h, w = self.size
            if self.crop_pct:
                rh, rw = int(round(h / self.crop_pct)), int(round(w / self.crop_pct))
            else:
                rh, rw = h, w
            x = torch.nn.functional.interpolate(
                x[None],
                size=(rh, rw),
                mode=mode,
                align_corners=False if mode != "nearest" else None,
                antialias=mode != "nearest" and (rh < x.shape[-2] or rw < x.shape[-1]),
            )[0]
            if (rh, rw) != (h, w):
                top, left = (rh - h) // 2, (rw - w) // 2
                x = x[:, top : top + h, left : left + w]
        return x.clamp(0, 1).contiguous()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None and self.std is None:
            return x
        c = x.shape[-3]
        _check_counts(self.mean, self.std, c, "the images have")
        mean = torch.as_tensor(self.mean if self.mean is not None else (0.0,), dtype=x.dtype)
        std = torch.as_tensor(self.std if self.std is not None else (1.0,), dtype=x.dtype)
        shape = (-1, 1, 1)
        return (x - mean.reshape(shape)) / std.reshape(shape)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.display(raw))


def _values(v) -> tuple | None:
    """A number is one value (``std=0.5``); a sequence is one value per channel; None stays None."""
    if v is None:
        return None
    if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.dim() == 0):
        return (float(v),)
    return tuple(v)


def _check_counts(mean, std, channels: int | None, where: str, given: tuple[str, ...] | None = None) -> None:
    """Per-channel values fit ``channels`` (one value, or one per channel) and each other.

    The message names only what the user gave (``given``): a model's own 3-value std is "the model's own
    std", and a std nobody gave (one value by default) is not mentioned at all; None: plain "mean"/"std".
    """
    counts = {"mean": len(mean) if mean is not None else 1, "std": len(std) if std is not None else 1}

    def name(k: str) -> str:
        return k if given is None else f"--{k}" if k in given else f"the model's own {k}"

    fix = "give --mean/--std one value or one per channel"
    if channels is not None:
        bad = [k for k in ("mean", "std") if counts[k] not in (1, channels)]
        if bad:
            has = " and ".join(f"{name(k)} has {counts[k]} value{'s' * (counts[k] != 1)}" for k in bad)
            raise SpecError(f"{has} but {where} {channels} channel{'s' * (channels != 1)}; {fix}")
    if counts["mean"] > 1 and counts["std"] > 1 and counts["mean"] != counts["std"]:
        raise SpecError(f"{name('mean')} has {counts['mean']} values and {name('std')} {counts['std']}; {fix}")


def check_overrides(*, image_size=None, mean=None, std=None, channels=None) -> None:
    """One clear error for preprocessing overrides that cannot work, before any model or data is loaded.

    The CLI's ``--image-size/--mean/--std/--channels`` and ``run_compare(preprocess_overrides=...)`` go
    through here (:func:`override_preprocess` calls it too): a zero or non-finite std made every input
    infinite, so each method failed only after the model and data were loaded. A number for ``mean``/``std``
    is one value for every channel.
    """
    mean, std = _values(mean), _values(std)
    if image_size is not None and len(image_size) not in (1, 2):
        raise SpecError(f"--image-size takes H or H W, got {len(image_size)} values")
    if image_size is not None and any(int(v) < 1 for v in image_size):
        raise SpecError(f"--image-size must be positive, got {' '.join(map(str, image_size))}")
    if std is not None and not (len(std) and all(float(s) > 0 and math.isfinite(float(s)) for s in std)):
        raise SpecError(f"--std must be positive and finite, got {' '.join(map(str, std)) or 'nothing'}")
    if mean is not None and not (len(mean) and all(math.isfinite(float(m)) for m in mean)):
        raise SpecError(f"--mean must be finite, got {' '.join(map(str, mean)) or 'nothing'}")
    if channels is not None and int(channels) not in (1, 3):
        raise SpecError(f"--channels converts images to 1 or 3 channels, got {channels}")
    given = tuple(k for k, v in (("mean", mean), ("std", std)) if v is not None)
    _check_counts(mean, std, int(channels) if channels else None, "--channels gives", given)


def override_preprocess(pre: Preprocess | None, *, image_size=None, mean=None, std=None, channels=None) -> Preprocess:
    """Apply the command-line flags (or ``run_compare``'s ``preprocess_overrides``) on top of a model's own
    preprocessing; bad values raise :class:`SpecError` (:func:`check_overrides`), as does a mean/std whose
    count does not fit the channels the model takes."""
    check_overrides(image_size=image_size, mean=mean, std=std, channels=channels)
    mean, std = _values(mean), _values(std)
    pre = Preprocess(**{k: getattr(pre, k) for k in Preprocess.__dataclass_fields__}) if pre else Preprocess()
    changed = False
    if image_size:
        pre.size, pre.crop_pct, changed = (int(image_size[0]), int(image_size[-1])), None, True
    if mean is not None:
        pre.mean, changed = tuple(float(v) for v in mean), True
    if std is not None:
        pre.std, changed = tuple(float(v) for v in std), True
    if channels:
        pre.channels, changed = int(channels), True
    if changed:
        pre.source = f"{pre.source} + flags" if pre.source != "defaults" else "flags"
        given = tuple(k for k, v in (("mean", mean), ("std", std)) if v is not None)
        _check_counts(pre.mean, pre.std, pre.channels, "the model takes", given)
    return pre
