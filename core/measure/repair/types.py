"""What a repair is asked and gives back: its methods, RepairConfig, RepairResult, QuantizedLayer and the cancel contract."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

METHODS: tuple[str, ...] = ("none", "bn", "bias", "reconstruct")


class RepairCancelled(RuntimeError):
    """The repair was stopped through its ``cancel`` argument; no model was produced."""

    def __init__(self, done: int, total: int):
        super().__init__(f"repair cancelled after {done} of {total} layers; nothing was changed or returned")
        self.done, self.total = done, total


def raise_if_cancelled(cancel, done: int, total: int) -> None:
    """Raise :class:`RepairCancelled` (``done`` of ``total`` layers) when ``cancel`` is set.

    ``cancel``: None (never), a ``threading.Event`` (set) or a callable (returns True).
    """
    if cancel is None:
        return
    stop = cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())
    if stop:
        raise RepairCancelled(done, total)


@dataclass(frozen=True)
class RepairConfig:
    """How to repair.

    * ``method``: ``"none"``, ``"bn"``, ``"bias"`` or ``"reconstruct"`` (each includes the ones before).
    * ``n_images``: calibration images that fit the repair (at most, when images are given).
    * ``n_holdout``: further images, never fitted, on which the per-layer output error is
      measured before and after (0: no error table, and a little faster).
    * ``ridge``: λ relative to the mean of the Gram matrix's diagonal (reconstruction).
    * ``positions``: output positions sampled per image and conv layer for the Gram
      matrices (0: all); a layer with fewer positions uses all of them.
    * ``seed``: which training images are drawn, and which positions are sampled.
    * ``batch_size``: images per forward batch.
    """

    method: str = "reconstruct"
    n_images: int = 512
    n_holdout: int = 128
    ridge: float = 1e-3
    positions: int = 16
    seed: int = 0
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"repair method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name, low in (("n_images", 1), ("n_holdout", 0), ("positions", 0), ("seed", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a whole number, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be ≥ {low}, got {value}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)):
            raise TypeError(f"ridge must be a number, got {self.ridge!r}")
        if not (math.isfinite(self.ridge) and self.ridge > 0):
            raise ValueError(f"ridge must be a finite number > 0 (relative to the Gram diagonal), got {self.ridge}")
        object.__setattr__(self, "ridge", float(self.ridge))

    @property
    def level(self) -> int:
        return METHODS.index(self.method)


@dataclass(frozen=True)
class QuantizedLayer:
    """A reconstructed layer's quantized form: ``weight == codes · scales[bits][channel]`` exactly.

    ``bits``: per weight, 0 where pruned; ``codes``: int8 (0 where pruned or at 16 bits, whose
    values are the float16 weights themselves); ``scales``: per integer bit-width used, one
    fp32 scale per output channel (the engine's ``channel_scales`` of the solved weights).
    """

    bits: torch.Tensor
    codes: torch.Tensor
    scales: dict[int, torch.Tensor]


@dataclass(frozen=True)
class RepairResult:
    """A repaired model and what the repair did.

    ``seconds``: the repair's wall time (the held-out error table's is ``error_seconds``).
    ``n_images`` / ``n_holdout``: the calibration images fitted / measured on.
    ``changed``: the state_dict entries whose values differ from the pruned model's.
    ``quantized``: per reconstructed layer with bit-widths, its codes and scales.
    ``errors``: one row per pruned layer: ``name``, ``kind``, ``kept``, ``numel``, ``action``
    (what was done, or why not), ``err_before`` / ``err_after`` (relative squared error of the
    layer's output against the dense model's, ‖y − y_dense‖² / ‖y_dense‖², on the held-out
    images, for the pruned and the repaired model; NaN without held-out images) and
    ``seconds`` (the layer's own repair time).
    """

    model: nn.Module
    method: str
    seconds: float
    changed: tuple[str, ...]
    errors: pd.DataFrame
    n_images: int
    n_holdout: int
    config: RepairConfig
    quantized: dict[str, QuantizedLayer] = field(default_factory=dict, repr=False)
    error_seconds: float = 0.0
