"""What a τ sweep evaluates: its configuration (:class:`SweepConfig`, :class:`QuantSetting`) and its rows.

:func:`plan` lists the rows of a sweep in the order :func:`core.measure.sweeps.run_sweep` reports
them: the dense model (and its BN-recalibrated twin), then per τ the boundary row, its repaired
rows (one per repair level, unless θ settings carry them), the magnitude baselines, and every θ
setting with its own repaired rows. A row's :meth:`Row.key` is its part of the disk-cache key; a row that is the dense model under
another name (:func:`is_dense`) is not run again.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.measure.baselines import BASELINES
from core.measure.repair import RepairConfig
from core.method.config import CompressionConfig
from core.method.pruning import check_tau

DEFAULT_TAUS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
#: the repair levels a sweep can add as rows (each includes BN recalibration; see core.measure.repair)
REPAIR_LEVELS: tuple[str, ...] = ("bias", "reconstruct")
#: a repaired row's cost in images run through the model, per calibration image, beside its evaluation:
#: the lock-step repair runs the dense and the repaired model (2 passes) plus, for reconstruction, the
#: least-squares solves; a rough weight for the time estimate, which the job revises from measured rows
REPAIR_COST_PER_IMAGE: dict[str, float] = {"bias": 3.0, "reconstruct": 10.0}


@dataclass(frozen=True)
class QuantSetting:
    """A θ/bit-width setting evaluated at each τ (see :class:`core.method.engine.CompressionConfig`)."""

    theta: float
    b_low: int = 4
    b_high: int = 8
    theta_mode: str = "relative"

    def __post_init__(self) -> None:
        checked = CompressionConfig(theta=self.theta, theta_mode=self.theta_mode, b_low=self.b_low, b_high=self.b_high)
        object.__setattr__(self, "theta", checked.theta)

    def label(self) -> str:
        return f"θ={self.theta:g} ({self.theta_mode}) {self.b_low}/{self.b_high} bit"


@dataclass(frozen=True)
class SweepConfig:
    """What one sweep evaluates.

    * ``taus``: τ values in [0, 1] (sorted, duplicates dropped).
    * ``quant``: θ/bit-width settings also evaluated at every τ (pruning only is always run).
    * ``bn_recalibration``: also evaluate every row after BN recalibration on
      ``calibration_size`` training images drawn with ``calibration_seed`` (skipped for a
      model without BatchNorm).
    * ``baselines``: any of :data:`BASELINES`, run at boundary pruning's retention per τ.
    * ``per_class``: evaluate on ``per_class`` images of every class (a fixed subset drawn
      with ``subset_seed``) instead of the whole test set; ``None`` = every image.
    * ``include_norm``: the paper's option of also pruning normalisation scales (the
      baselines then prune the same parameters).
    * ``repair_levels``: any of :data:`REPAIR_LEVELS`; the boundary rows are also evaluated
      after that repair: those of every θ setting when ``quant`` has any (the weights a user
      would ship), else the pruning-only ones. Fitted on ``repair_images`` training images drawn
      with ``repair_seed`` (:class:`core.measure.repair.RepairConfig` defaults otherwise; no
      held-out error table).
    """

    taus: tuple[float, ...] = DEFAULT_TAUS
    quant: tuple[QuantSetting, ...] = ()
    bn_recalibration: bool = True
    baselines: tuple[str, ...] = BASELINES
    per_class: int | None = None
    subset_seed: int = 0
    calibration_size: int = 2000
    calibration_seed: int = 42
    include_norm: bool = False
    repair_levels: tuple[str, ...] = ()
    repair_images: int = 512
    repair_seed: int = 0

    def __post_init__(self) -> None:
        taus = tuple(sorted({check_tau(t) for t in self.taus}))
        if not taus:
            raise ValueError("a sweep needs at least one tau")
        object.__setattr__(self, "taus", taus)
        quant = tuple(self.quant)
        if not all(isinstance(q, QuantSetting) for q in quant):
            raise TypeError("quant must hold QuantSetting values")
        object.__setattr__(self, "quant", tuple(dict.fromkeys(quant)))
        baselines = tuple(dict.fromkeys(self.baselines))
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline {unknown[0]!r}; choose from {BASELINES}")
        object.__setattr__(self, "baselines", baselines)
        if self.per_class is not None and (isinstance(self.per_class, bool) or int(self.per_class) < 1):
            raise ValueError(f"per_class must be a positive integer or None, got {self.per_class!r}")
        if self.calibration_size < 1:
            raise ValueError("calibration_size must be ≥ 1")
        levels = tuple(dict.fromkeys(self.repair_levels))
        unknown = [level for level in levels if level not in REPAIR_LEVELS]
        if unknown:
            raise ValueError(f"unknown repair level {unknown[0]!r}; a sweep adds {', '.join(REPAIR_LEVELS)}")
        object.__setattr__(self, "repair_levels", tuple(lv for lv in REPAIR_LEVELS if lv in levels))
        if self.repair_images < 1:
            raise ValueError("repair_images must be ≥ 1")

    def repair_config(self, level: str) -> RepairConfig:
        """The repair a sweep row at ``level`` runs (no held-out error table: it is not shown)."""
        return RepairConfig(level, n_images=self.repair_images, n_holdout=0, seed=self.repair_seed)


@dataclass(frozen=True)
class Row:
    """One row to evaluate: a method at a τ, optionally quantized, with or without BN recalibration,
    or after a repair level of :data:`REPAIR_LEVELS` (``repair``; then ``bn`` is False)."""

    method: str
    tau: float
    quant: QuantSetting | None
    bn: bool
    repair: str = "none"

    def key(self) -> dict:
        q = self.quant
        key = {"method": self.method, "tau": self.tau, "bn": self.bn,
               "quant": None if q is None else [q.theta, q.theta_mode, q.b_low, q.b_high]}
        if self.repair != "none":
            key["repair"] = self.repair
        return key

    def base(self) -> Row:
        return Row(self.method, self.tau, self.quant, False)

    @property
    def level(self) -> str:
        """The row's repair level: ``"none"``, ``"bn"``, or its repair."""
        return "bn" if self.bn else self.repair

    def label(self) -> str:
        text = "dense" if self.method == "dense" else f"{self.method} τ={self.tau:g}"
        if self.quant is not None:
            text += f", {self.quant.label()}"
        return text + {"none": "", "bn": " + BN recal", "bias": " + bias", "reconstruct": " + reconstruction"}[self.level]


def plan(config: SweepConfig, bn: bool) -> list[Row]:
    flags = (False, True) if bn else (False,)
    rows = [Row("dense", 0.0, None, b) for b in flags]
    for tau in config.taus:
        rows += [Row("boundary", tau, None, b) for b in flags]
        if not config.quant:  # with θ settings, the repaired rows are theirs (the weights a user would ship)
            rows += [Row("boundary", tau, None, False, level) for level in config.repair_levels]
        rows += [Row(method, tau, None, b) for method in config.baselines for b in flags]
        for q in config.quant:
            rows += [Row("boundary", tau, q, b) for b in flags]
            rows += [Row("boundary", tau, q, False, level) for level in config.repair_levels]
    return rows


def is_dense(row: Row) -> bool:
    """Whether the row is the dense model under another name: τ = 0 without θ keeps every weight.

    A repaired τ = 0 row is not: the repair of the dense model may still move its BatchNorm statistics."""
    return row.method != "dense" and row.tau == 0.0 and row.quant is None and row.repair == "none"
