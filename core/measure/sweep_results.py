"""Reading a finished sweep: the largest τ within X points of dense, a printable table, and chart data.

Every function takes the frame :func:`core.measure.sweeps.run_sweep` returns and computes
nothing new: no model is run here.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.measure.sweeps import QuantSetting

@dataclass(frozen=True)
class TauChoice:
    """The answer of :func:`largest_tau_within`."""

    tau: float
    retention: float
    accuracy: float
    dense_accuracy: float
    size_ratio: float = float("nan")  # fp32 bytes / stored bytes of the chosen setting (NaN: not counted)
    level: str = "none"  # the repair level the answer was found among

    @property
    def drop_points(self) -> float:
        return 100 * (self.dense_accuracy - self.accuracy)


#: what the charts and answers call each repair level
LEVEL_LABELS: dict[str, str] = {"none": "", "bn": " + BN recal", "bias": " + bias", "reconstruct": " + reconstruction"}


def row_levels(frame: pd.DataFrame) -> pd.Series:
    """Each row's repair level: the ``repair`` column, else ``"bn"`` or ``"none"`` from ``bn_recalibrated``."""
    if "repair" in frame:
        return frame["repair"].fillna("none")
    return pd.Series(np.where(frame["bn_recalibrated"], "bn", "none"), index=frame.index)


def largest_tau_within(frame: pd.DataFrame, points: float, *, method: str = "boundary",
                       bn_recalibrated: bool = False, quant: QuantSetting | None = None,
                       contiguous: bool = False, level: str | None = None) -> TauChoice | None:
    """The largest swept τ whose accuracy is at most ``points`` percentage points below dense.

    The reference is the ``dense`` row without BN recalibration (the model as loaded), or
    the τ = 0 boundary row when the frame has no dense row. Rows are those of ``method``,
    repair ``level`` (``None``: ``"bn"`` if ``bn_recalibrated`` else ``"none"``; each level's own
    measured rows, see :func:`row_levels`) and ``quant`` (``None``: pruning only). ``contiguous=True`` also
    requires every smaller swept τ to pass (the first τ where the drop exceeds ``points``
    ends the search). ``None`` when no τ qualifies.
    """
    if points < 0:
        raise ValueError("points must be ≥ 0")
    dense = frame[(frame["method"] == "dense") & (~frame["bn_recalibrated"])]
    if dense.empty:
        dense = frame[(frame["method"] == "boundary") & (frame["tau"] == 0) & (~frame["bn_recalibrated"])
                      & frame["theta"].isna()]
    if dense.empty:
        raise ValueError("the frame has no dense row (nor a τ = 0 boundary row) to compare against")
    reference = float(dense["accuracy"].iloc[0])
    level = level if level is not None else ("bn" if bn_recalibrated else "none")
    rows = frame[(frame["method"] == method) & (row_levels(frame) == level)]
    if quant is None:
        rows = rows[rows["theta"].isna()]
    else:
        rows = rows[(rows["theta"] == quant.theta) & (rows["theta_mode"] == quant.theta_mode)
                    & (rows["b_low"] == quant.b_low) & (rows["b_high"] == quant.b_high)]
    rows = rows.sort_values("tau")
    passes = rows["accuracy"] >= reference - points / 100 - 1e-12
    if contiguous:
        passes = passes.cumprod().astype(bool)
    chosen = rows[passes]
    if chosen.empty:
        return None
    best = chosen.iloc[-1]
    return TauChoice(float(best["tau"]), float(best["retention"]), float(best["accuracy"]), reference,
                     float(best["size_ratio"]) if "size_ratio" in best else float("nan"), level)


def format_table(frame: pd.DataFrame) -> str:
    """A human-readable table: accuracy, CI and retention in percent."""
    out = frame.copy()
    for column in ("retention", "accuracy", "ci_low", "ci_high"):
        out[column] = (100 * out[column]).map(lambda v: f"{v:.2f}")
    out["theta"] = out["theta"].map(lambda v: "" if pd.isna(v) else f"{v:g}")
    out["theta_mode"] = out["theta_mode"].fillna("")
    out["size_ratio"] = out["size_ratio"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    out["seconds"] = out["seconds"].map(lambda v: f"{v:.2f}")
    out = out.rename(columns={"retention": "retention_%", "accuracy": "accuracy_%", "ci_low": "ci_low_%",
                              "ci_high": "ci_high_%"})
    return out.to_string(index=False)


METHOD_LABELS: dict[str, str] = {"boundary": "boundary pruning", "global_magnitude": "global magnitude (same retention)",
                                 "layer_l1": "per-layer L1 (same retention)", "dense": "dense"}


def series_labels(frame: pd.DataFrame) -> pd.Series:
    """One legend label per row: the method, its bit-widths if quantized (", 4/8 bit"), and its repair level
    (" + BN recal", " + reconstruction", …)."""
    quantized = frame["theta"].notna()
    bits = "" if not quantized.any() else (", " + frame["b_low"].astype(str) + "/" + frame["b_high"].astype(str)
                                           + " bit").where(quantized, "")
    return frame["method"].map(METHOD_LABELS) + bits + row_levels(frame).map(LEVEL_LABELS)


def pareto_points(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """The dense and boundary rows of sweep frames, as points of a size-vs-accuracy chart.

    Adds ``size_fraction`` (stored size as a share of fp32: 1 for dense, else 1 / ``size_ratio``;
    rows without a finite size are dropped), ``series`` (dense / pruned (fp32) / pruned +
    quantized, with the repair level) and ``setting`` (τ, and θ with its bit-widths, as text).
    """
    rows = pd.concat(list(frames), ignore_index=True)
    points = rows[rows["method"].isin(["dense", "boundary"])].copy()
    points["size_fraction"] = np.where(points["method"] == "dense", 1.0, 1.0 / points["size_ratio"])
    points = points[np.isfinite(points["size_fraction"])]
    quantized = points["theta"].notna()
    points["series"] = np.where(quantized, "pruned + quantized", "pruned (fp32)")
    points.loc[points["method"] == "dense", "series"] = "dense"
    points["series"] += row_levels(points).map(LEVEL_LABELS)
    points["setting"] = ("τ=" + points["tau"].map("{:g}".format)
                         + np.where(quantized, ", θ=" + points["theta"].map("{:g}".format) + " "
                                    + points["b_low"].astype(str) + "/" + points["b_high"].astype(str) + " bit", ""))
    return points
