"""How an image becomes a model's input: resize, centre crop, scale to [0, 1], normalise per channel.

:class:`Preprocess` is the same recipe as torchvision's ``ImageClassification`` transform (the
``transforms()`` of every pretrained weight): resize the shorter side to ``resize_size``
(bilinear, antialiased), crop the centre ``image_size`` square, divide by 255, subtract ``mean``
and divide by ``std``. :meth:`Preprocess.from_weights` reads those numbers from a weights'
transform; the defaults are ImageNet's (224 px, resize 256). Files record it as
:meth:`Preprocess.to_dict` and :meth:`Preprocess.from_dict` reads it back, every field checked.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from core.common.formatting import printable
from core.workloads.models import CheckpointError

MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 1024
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest")


def _triple(value: object, what: str, label: str, positive: bool) -> tuple[float, float, float]:
    ok = (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3
          and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
                  and (float(v) > 0 or not positive) and abs(float(v)) <= 1e3 for v in value))
    if not ok:
        kind = "positive numbers" if positive else "numbers"
        raise CheckpointError(f"{label} gives the {what} {printable(repr(value), 60)}; it must be three finite "
                              f"{kind} (one per RGB channel).")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _size(value: object, what: str, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise CheckpointError(f"{label} gives the {what} {printable(repr(value), 40)}; it must be a whole number "
                              f"of pixels from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}.")
    return value


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize_size``, crop ``image_size``², normalise with ``mean``/``std``.

    ``source`` says where the numbers come from (shown to the user; not part of equality).
    """

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    source: str = "defaults"

    def __post_init__(self) -> None:
        label = "the pre-processing"
        _size(self.image_size, "image size", label)
        _size(self.resize_size, "resize size", label)
        object.__setattr__(self, "mean", _triple(self.mean, "mean", label, False))
        object.__setattr__(self, "std", _triple(self.std, "standard deviation", label, True))
        if self.interpolation not in INTERPOLATIONS:
            raise CheckpointError(f"{label} names the interpolation {printable(repr(self.interpolation), 30)}; "
                                  f"use one of {', '.join(INTERPOLATIONS)}.")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preprocess) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def key(self) -> tuple:
        """Everything that changes the pixels a model sees (not ``source``)."""
        return (self.image_size, self.resize_size, self.mean, self.std, self.interpolation)

    def tag(self) -> str:
        """A short tag of :meth:`key` for cache keys: ``<image size>px-<8 hex digits>``."""
        import hashlib

        return f"{self.image_size}px-{hashlib.sha256(repr(self.key()).encode()).hexdigest()[:8]}"

    @classmethod
    def for_size(cls, image_size: int, mean: Sequence[float], std: Sequence[float],
                 source: str = "set by the user") -> "Preprocess":
        """A square input of ``image_size``: resized to 256/224 of it first (ImageNet's ratio), except at
        CIFAR sizes (≤ 64 px) where the image is resized straight to ``image_size``."""
        resize = image_size if image_size <= 64 else min(MAX_IMAGE_SIZE, round(image_size * 256 / 224))
        return cls(int(image_size), int(resize), tuple(mean), tuple(std), "bilinear", source)

    @classmethod
    def from_weights(cls, transform: object, source: str) -> "Preprocess":
        """The numbers of a torchvision ``ImageClassification`` transform (a pretrained weights' ``transforms()``)."""
        crop = int(transform.crop_size[0])
        resize = int(transform.resize_size[0])
        interpolation = getattr(transform.interpolation, "value", str(transform.interpolation))
        return cls(crop, resize, tuple(transform.mean), tuple(transform.std), interpolation, source)

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "resize_size": self.resize_size, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, data: object, label: str = "the file") -> "Preprocess":
        """The inverse of :meth:`to_dict`, every field checked; :class:`CheckpointError` names the bad one."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{label} records its pre-processing as something other than an object.")
        unknown = [k for k in data if k not in ("image_size", "resize_size", "mean", "std", "interpolation")]
        if unknown:
            raise CheckpointError(f"{label} records an unknown pre-processing field {printable(repr(unknown[0]), 40)}.")
        size = _size(data.get("image_size", 224), "image size", label)
        resize = _size(data.get("resize_size", size), "resize size", label)
        mean = _triple(data.get("mean", (0.485, 0.456, 0.406)), "mean", label, False)
        std = _triple(data.get("std", (0.229, 0.224, 0.225)), "standard deviation", label, True)
        interpolation = data.get("interpolation", "bilinear")
        if interpolation not in INTERPOLATIONS:
            raise CheckpointError(f"{label} names the interpolation {printable(repr(interpolation), 30)}; "
                                  f"use one of {', '.join(INTERPOLATIONS)}.")
        return cls(size, resize, mean, std, interpolation, f"recorded in {label}")

    def describe(self) -> str:
        mean = ", ".join(f"{v:.3f}" for v in self.mean)
        std = ", ".join(f"{v:.3f}" for v in self.std)
        return (f"resize to {self.resize_size} px, centre crop {self.image_size} px, mean ({mean}), "
                f"std ({std}) — {self.source}")

    def resize_crop(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 3×H×W → uint8 3×S×S (S = ``image_size``): resize the shorter side, crop the centre."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        mode = InterpolationMode(self.interpolation)
        resized = TF.resize(image, [self.resize_size], interpolation=mode, antialias=True)
        return TF.center_crop(resized, [self.image_size, self.image_size])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N×)3×S×S → float32 ``(x/255 − mean)/std``."""
        shape = (-1, 1, 1) if images.dim() == 3 else (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32).view(shape)
        return (images.float().div_(255.0) - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`, as uint8 (for previews)."""
        shape = (-1, 1, 1) if images.dim() == 3 else (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32).view(shape)
        return ((images * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
