"""The Explore page's weight histogram: one layer's signed weights binned, split by what the setting does.

The bins are fixed per layer (±max|W|), and each weight's bin is computed once, in the
engine's rank order (ascending |W|, stable). A setting splits the ranks into three runs,
``[0, p)`` pruned, ``[p, h)`` kept at b_low and ``[h, N)`` kept at b_high, so each split
is three ``bincount`` calls over slices: exactly the engine's split, ties included.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from core.method.engine import CompressionResult
from core.method.snapshot import RankedLayer

HIST_BINS = 81


@dataclass(frozen=True, kw_only=True)
class HistogramData:
    """Counts per bin of one layer's signed weights, split by what the setting does to them.

    ``pruned``: |W| < β; ``low``/``high``: kept at b_low / b_high (``high`` holds every kept
    weight when the setting does not quantize). ``theta`` is the absolute θ of the layer
    (for ``fraction`` mode: the smallest |W| held in high precision), None without θ.
    """

    layer: str
    edges: np.ndarray
    pruned: np.ndarray
    low: np.ndarray
    high: np.ndarray
    beta: float
    theta: float | None
    max_abs: float
    quantized: bool
    numel: int

    @property
    def centers(self) -> np.ndarray:
        return (self.edges[:-1] + self.edges[1:]) / 2

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"left": self.edges[:-1], "right": self.edges[1:], "center": self.centers,
                             "pruned": self.pruned, "kept_low": self.low, "kept_high": self.high})


class LayerBins:
    """A layer's bins: the bin of each rank (ranks by ascending |W|, stable, as the engine ranks them).

    Holds one int16 bin index per weight, and reads |W| at one rank where a ``fraction`` θ
    needs it (from the engine's snapshot: the weights are not copied here).
    """

    def __init__(self, weight: torch.Tensor, bins: int = HIST_BINS):
        flat = weight.reshape(-1).float()
        _, order = torch.sort(flat.abs(), stable=True)
        ranked = flat[order]
        self._setup(ranked, bins, lambda rank: float(ranked[rank].abs()))

    @classmethod
    def from_ranked(cls, layer: RankedLayer, bins: int = HIST_BINS) -> "LayerBins":
        """Bins of an engine's ranked layer, in the engine's rank order."""
        bins_of = cls.__new__(cls)
        bins_of._setup(layer.ranked_values(), bins, layer.magnitude_at)
        return bins_of

    def _setup(self, ranked: torch.Tensor, bins: int, magnitude_at: Callable[[int], float]) -> None:
        self._magnitude_at = magnitude_at
        top = float(ranked[-1].abs()) if ranked.numel() else 0.0
        span = top if top > 0 else 1.0
        self.edges = torch.linspace(-span, span, bins + 1, dtype=torch.float64)
        index = torch.bucketize(ranked.double(), self.edges[1:-1], right=True)
        self.bin_of_rank = index.clamp_(0, bins - 1).to(torch.int16)
        self.bins = bins
        self.numel = ranked.numel()

    def counts(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros(self.bins, dtype=np.int64)
        return torch.bincount(self.bin_of_rank[start:stop], minlength=self.bins).numpy()

    def split(self, result: CompressionResult, layer: str) -> HistogramData:
        """The histogram of ``layer`` under ``result`` (these bins must be that layer's)."""
        rows = result.stats.set_index("name")
        if layer not in rows.index:
            raise KeyError(f"layer '{layer}' is not compressed by this setting")
        row = rows.loc[layer]
        numel, kept, n_high = int(row["numel"]), int(row["kept"]), int(row["n_high"])
        p, h = numel - kept, numel - n_high
        quantized = result.config.quantized
        theta = None
        if quantized:
            theta = float(row["theta"]) if math.isfinite(row["theta"]) else (
                self._magnitude_at(h) if h < numel else float(row["max_abs"]))
        return HistogramData(layer=layer, edges=self.edges.numpy(), pruned=self.counts(0, p),
                             low=self.counts(p, h), high=self.counts(h, numel), beta=float(row["beta"]),
                             theta=theta, max_abs=float(row["max_abs"]), quantized=quantized, numel=numel)
