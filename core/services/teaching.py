"""What the Learn page teaches: a worked 8×8 example under τ and θ, and the measured story of repair.

* :func:`worked_example`: one 8×8 weight matrix, computed straight from the formulas
  (:func:`core.method.pruning.boundary_mask` and :func:`core.method.quantization.dequantize`), so
  it doubles as a readable reference for what the engine does to every layer.
* :func:`repair_story`: the accuracy of a shipped checkpoint after boundary pruning and after each
  repair (:mod:`core.measure.repair`), read from the CSV that ``benchmarks/repair.py`` writes
  (:data:`REPAIR_CSVS`, :data:`REPAIR_COMMANDS`). The page shows only figures from that file:
  nothing is typed in, and without the file it says which command makes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.common.paths import REPO_ROOT

from core.method.pruning import boundary_mask, check_tau
from core.method.quantization import check_bits, dequantize

PAPER_PSEUDOCODE = '''# the paper's pseudocode (section 3.3): prunes in place, any layer with a weight
def dynamic_prune_and_quantize(model, tau, theta, bits=[b_low, b_high]):
    for layer in model.modules():
        if hasattr(layer, 'weight'):
            W = layer.weight.data
            beta = tau * W.abs().max()
            mask = (W.abs() >= beta).float()
            W.mul_(mask)
            # Bit-Weite Zuweisung
            bw = torch.where(W.abs() >= theta, bits[1], bits[0])
            layer.quantize(bw)'''

OUR_CODE = '''# this project (core.method.engine): the model is never modified
from core import CompressionConfig, Engine

engine = Engine(model)               # snapshot + rank each Conv/Linear weight once
result = engine.apply(CompressionConfig(
    tau=0.2,                         # β = τ · max|W| per layer; keep |W| ≥ β
    theta=0.3, theta_mode="relative",  # θ = 0.3 · max|W|: |W| ≥ θ → b_high chunk
    b_low=4, b_high=8,               # chunks quantized once, per output channel
    include_norm=False,              # True = the paper's hasattr(layer, 'weight')
))
result.model        # a new nn.Module; `model` keeps its weights
result.stats        # per layer: beta, kept, n_high, n_low, switches, bytes
engine.apply(CompressionConfig(tau=0.2, theta=0.5, b_low=4, b_high=8)).switches
                    # θ move: chunks re-selected, never re-quantized'''


@dataclass(frozen=True)
class WorkedExample:
    """The matrix, β, θ (absolute), the keep-mask, the chunk per cell and the resulting weights.

    ``chunk``: 0 where pruned, else the bit-width the cell's value comes from (32 = kept
    in full precision when θ is off).
    """

    weights: np.ndarray
    tau: float
    beta: float
    theta: float | None
    keep: np.ndarray
    high: np.ndarray
    chunk: np.ndarray
    compressed: np.ndarray
    b_low: int
    b_high: int

    @property
    def retention(self) -> float:
        return float(self.keep.mean())

    @property
    def n_high(self) -> int:
        return int((self.keep & self.high).sum())


def example_matrix(seed: int = 7, size: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, size, generator=generator) * 0.5).round(decimals=2)


def worked_example(tau: float, theta: float | None, b_low: int = 4, b_high: int = 8,
                   seed: int = 7, size: int = 8) -> WorkedExample:
    """The example under τ and a relative θ (θ · max|W|; None = no quantization)."""
    tau = check_tau(tau)
    check_bits(b_low)
    check_bits(b_high)
    if b_low > b_high:
        raise ValueError(f"b_low ({b_low}) must not exceed b_high ({b_high})")
    w = example_matrix(seed, size)
    magnitude = w.abs()
    top = magnitude.max()
    keep = boundary_mask(w, tau)
    if theta is None:
        high = torch.ones_like(keep)
        value = w
        chunk = torch.where(keep, 32, 0)
        theta_abs = None
    else:
        theta_abs = top * float(theta)
        high = magnitude >= theta_abs
        value = torch.where(high, dequantize(w, b_high), dequantize(w, b_low))
        chunk = torch.where(keep, torch.where(high, b_high, b_low), 0)
    compressed = torch.where(keep, value, torch.zeros(()))
    return WorkedExample(w.numpy(), tau, float(top * tau), None if theta_abs is None else float(theta_abs),
                         keep.numpy(), high.numpy(), chunk.numpy(), compressed.numpy(), b_low, b_high)


# ---------------------------------------------------------------- the repair story (measured, from a CSV)

#: where the Learn page reads each model's repair benchmark (the lead commits them under docs/data)
REPAIR_CSVS: dict[str, Path] = {
    "resnet18": REPO_ROOT / "docs" / "data" / "repair_resnet18.csv",
    "resnet20": REPO_ROOT / "docs" / "data" / "repair_resnet20.csv",
}
#: the command that writes each file (benchmarks/repair.py; an hour or more on 2 cores for ResNet-18)
REPAIR_COMMANDS: dict[str, str] = {
    model: f"python benchmarks/repair.py --models {model} --csv docs/data/repair_{model}.csv"
    for model in REPAIR_CSVS
}
#: the columns the story needs (benchmarks/repair.py writes these and more)
REPAIR_COLUMNS: tuple[str, ...] = ("model", "pruning", "tau", "retention", "method", "accuracy")
REPAIR_METHOD_LABELS: dict[str, str] = {"none": "pruned, no repair", "bn": "+ BN recalibration",
                                        "bias": "+ bias correction", "reconstruct": "+ reconstruction"}
STORY_TAU = 0.2  # the paper's τ


@dataclass(frozen=True)
class RepairStory:
    """One model's measured repair figures (accuracies and retentions are fractions).

    ``frame``: the CSV as read. ``tau``: the τ the story is told at (:data:`STORY_TAU` when
    measured, else the largest τ in the file). ``accuracy``: method → boundary-pruned accuracy
    at ``tau`` (only the methods measured). ``seconds``: method → repair wall time there.
    """

    model: str
    path: Path
    frame: pd.DataFrame
    dense: float | None
    tau: float
    retention: float
    accuracy: dict[str, float]
    seconds: dict[str, float]

    def figure(self, method: str) -> str:
        """``"10.00 %"`` for a measured method, else ``"not in the file"``."""
        value = self.accuracy.get(method)
        return "not in the file" if value is None else f"{100 * value:.2f} %"


def read_repair_csv(path: str | Path) -> pd.DataFrame:
    """The CSV ``benchmarks/repair.py --csv`` wrote; ``ValueError`` naming what is missing if it is not one."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path.name} is not a CSV file benchmarks/repair.py wrote ({err})") from err
    missing = [c for c in REPAIR_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path.name} lacks the column(s) {', '.join(missing)}: it is not a CSV file "
                         "benchmarks/repair.py wrote")
    frame["tau"] = pd.to_numeric(frame["tau"], errors="coerce")
    for column in ("retention", "accuracy"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def repair_story(model: str, path: str | Path | None = None, tau: float = STORY_TAU) -> RepairStory | None:
    """The measured story for ``model`` from its CSV (default :data:`REPAIR_CSVS`); None when there is no file.

    A file without boundary-pruned rows of ``model`` is a ``ValueError`` (so is a file that is not
    the benchmark's CSV).
    """
    path = Path(REPAIR_CSVS[model] if path is None else path)
    if not path.is_file():
        return None
    frame = read_repair_csv(path)
    rows = frame[frame["model"] == model]
    boundary = rows[rows["pruning"] == "boundary"]
    if boundary.empty:
        raise ValueError(f"{path.name} has no boundary-pruning rows for {model}")
    taus = sorted(boundary["tau"].dropna().unique())
    chosen = min(taus, key=lambda t: abs(t - tau)) if any(math.isclose(t, tau) for t in taus) else max(taus)
    at = boundary[np.isclose(boundary["tau"], chosen)]
    dense_rows = rows[rows["pruning"] == "dense"]["accuracy"].dropna()
    dense = float(dense_rows.iloc[0]) if not dense_rows.empty else None
    if dense is None and "dense" in at.columns and at["dense"].notna().any():
        dense = float(at["dense"].dropna().iloc[0])
    def by_method(column: str) -> dict[str, float]:
        if column not in at.columns:
            return {}
        return {m: float(v) for m, v in zip(at["method"], at[column]) if m in REPAIR_METHOD_LABELS and not pd.isna(v)}

    accuracy, seconds = by_method("accuracy"), by_method("seconds")
    return RepairStory(model=model, path=path, frame=frame, dense=dense, tau=float(chosen),
                       retention=float(at["retention"].iloc[0]), accuracy=accuracy, seconds=seconds)


def repair_curves(story: RepairStory, pruning: str = "boundary") -> pd.DataFrame:
    """Accuracy against retention per repair method (``retention``, ``accuracy``, ``label``), for a chart."""
    rows = story.frame[(story.frame["model"] == story.model) & (story.frame["pruning"] == pruning)]
    rows = rows[rows["method"].isin(REPAIR_METHOD_LABELS)].copy()
    rows["order"] = rows["method"].map(list(REPAIR_METHOD_LABELS).index)
    rows = rows.sort_values(["order", "retention"])
    rows["label"] = rows["method"].map(REPAIR_METHOD_LABELS)
    return rows[["tau", "retention", "accuracy", "method", "label"]].reset_index(drop=True)


def repair_table(story: RepairStory) -> pd.DataFrame:
    """One row per pruning and τ: retention and the accuracy (%) after each repair method measured."""
    rows = story.frame[(story.frame["model"] == story.model) & (story.frame["pruning"] != "dense")
                       & story.frame["method"].isin(REPAIR_METHOD_LABELS)]
    table = rows.pivot_table(index=["pruning", "tau", "retention"], columns="method", values="accuracy",
                             aggfunc="first", sort=False)
    table = table[[m for m in REPAIR_METHOD_LABELS if m in table.columns]] * 100
    table.columns = [f"{REPAIR_METHOD_LABELS[m]} (%)" for m in table.columns]
    table = table.reset_index()
    table["retention"] = 100 * table["retention"]
    return table.rename(columns={"retention": "retention (%)", "tau": "τ"}).round(2)
