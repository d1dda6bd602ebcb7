"""τ sweeps: accuracy and retention of boundary pruning across τ, against magnitude baselines.

:func:`run_sweep` evaluates, for every τ of a :class:`SweepConfig` (and optionally every
θ/bit-width setting of it at that τ):

* ``boundary``          boundary pruning from :class:`core.method.engine.Engine` (optionally
                        quantized: the ``theta``/``b_low``/``b_high`` columns are set);
* ``global_magnitude``  ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``
                        over the same layers, pruning exactly as many weights as boundary
                        pruning prunes at that τ (same retention, to the weight);
* ``layer_l1``          ``torch.nn.utils.prune.l1_unstructured`` on every layer with the same
                        global amount 1 − ρ, the per-layer counts apportioned by largest
                        remainder so the total again equals boundary pruning's, to the weight;
* ``dense``             the unpruned model (τ = 0, retention 1), the reference for
                        :func:`largest_tau_within`.

τ = 0 keeps every weight, so boundary pruning and the baselines at τ = 0 *are* the dense model:
their rows (without θ) take the dense row's measured accuracy instead of running it again.

Each of these is evaluated as it is and, when the config asks for it and the model has
BatchNorm, after :func:`core.measure.accuracy.bn_recalibrate` on :func:`core.measure.accuracy.calibration_images`
(``bn_recalibrated`` column). With ``repair_levels``, the boundary rows (those of every θ
setting when there are any, else the pruning-only ones) are also evaluated after :func:`core.measure.repair.repair_setting` at each of those
levels (``"bias"``, ``"reconstruct"``): fitted on ``repair_images`` CIFAR-10 *training* images
(:func:`core.measure.calibration.calibration_split`, never the evaluation images), with the
quantized rows' bit-widths respected. The ``repair`` column names every row's level: ``"none"``,
``"bn"`` (the BN-recalibrated rows), ``"bias"`` or ``"reconstruct"``. Accuracy is :func:`core.measure.accuracy.evaluate` on the full test set,
or on a fixed class-balanced subset (``per_class``); ``ci_low``/``ci_high`` are the Wilson 95%
interval of that figure. Baselines are run for pruning-only settings (not for θ/bit-width rows).

Contract:

* the input model is never modified (the engine works on its own snapshot; baselines and the
  dense reference run on deep copies);
* every row is cached on disk under ``core.common.paths.cache_dir()/"sweeps"``, keyed by the model
  (checkpoint SHA256 when given, else a SHA256 of the state_dict), the evaluation data and
  subset (archive checksum or a hash of the tensors, ``per_class``, seed), the calibration
  data, the device, the torch version and the row's own setting; a later call with the same
  keys returns the stored numbers without running the model (``cached`` column). ``seconds``
  is always the time the row took when it was computed;
* ``on_progress(done, total, label)`` is called once before the first row (``done = 0``) and
  after every row, cached or computed; ``on_rows(frame)`` after every row with the rows so far;
* every computed row is one :func:`core.common.steps.turn` (in a job: a turn on the compute
  queue, and a cancel stops it within a layer); :func:`sweep_plan` says beforehand which rows
  will run and what each costs, for a time estimate.

CLI:  ``python -m core.measure.sweeps resnet20 --taus 0 0.05 0.1 0.2 --per-class 100``.
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from core.common import paths
from core.common.steps import cancel_requested, checkpoint, turn
from core.measure.accuracy import (
    CALIBRATION_RECIPE,
    EvalData,
    balanced_subset,
    bn_recalibrate,
    calibration_images,
    eval_data,
    evaluate,
    has_batchnorm,
    wilson_interval,
)
from core.measure.baselines import BASELINES, magnitude_baseline
from core.measure.calibration import calibration_split
from core.measure.disk_cache import JsonCache, base_context, images_key, tensor_digest
from core.measure.repair import SOLVER, RepairCancelled, repair_setting
from core.measure.sweep_config import (  # noqa: F401 (QuantSetting, SweepConfig, DEFAULT_TAUS: imported from here)
    DEFAULT_TAUS,
    REPAIR_COST_PER_IMAGE,
    REPAIR_LEVELS,
    QuantSetting,
    Row,
    SweepConfig,
    is_dense,
    plan,
)
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult, Engine
from core.method.quantization import DEFAULT_PALETTE
from core.workloads.data import CIFAR_MEAN, CIFAR_STD

SWEEP_CACHE_VERSION = 1
METHODS: tuple[str, ...] = ("dense", "boundary") + BASELINES
COLUMNS: tuple[str, ...] = (
    "method", "tau", "theta", "theta_mode", "b_low", "b_high", "bn_recalibrated", "repair",
    "retention", "accuracy", "n", "ci_low", "ci_high", "size_ratio", "seconds", "cached",
)

ProgressCallback = Callable[[int, int, str], None]


def _eval_size(config: SweepConfig, data: EvalData | None) -> int:
    """How many images a row evaluates (without decoding them)."""
    if data is None:
        return 10_000 if config.per_class is None else 10 * int(config.per_class)
    if config.per_class is None:
        return len(data)
    counts = torch.bincount(data.labels)
    return int(counts.clamp(max=int(config.per_class)).sum())


# ---------------------------------------------------------------- fingerprints and the cache

def sweep_cache_dir() -> Path:
    """Default location of cached sweep rows: ``core.common.paths.cache_dir()/"sweeps"``."""
    return paths.cache_dir() / "sweeps"


# ---------------------------------------------------------------- baselines

def _target_kept(result: CompressionResult) -> tuple[int, int]:
    return int(result.stats["kept"].sum()), int(result.stats["numel"].sum())


# ---------------------------------------------------------------- running a sweep

def sweep_engine(model: nn.Module, config: SweepConfig) -> Engine:
    """The engine a sweep of ``config`` uses: the default palette and every bit-width of its θ settings."""
    bits = {b for q in config.quant for b in (q.b_low, q.b_high)}
    return Engine(model, palette=set(DEFAULT_PALETTE) | bits)


class _Runner:
    """Builds what the rows need only when a row is not in the cache."""

    def __init__(self, model: nn.Module, config: SweepConfig, data: EvalData | None,
                 calibration: torch.Tensor | None, mean: tuple[float, ...], std: tuple[float, ...],
                 device: str | torch.device, engine: Engine | None = None,
                 repair_images: torch.Tensor | None = None):
        self.model, self.config, self.device = model, config, device
        self._data, self._calibration, self._repair_images = data, calibration, repair_images
        self.mean, self.std = mean, std
        self._engine: Engine | None = engine
        self._eval: EvalData | None = None
        self._models: dict[Row, tuple[nn.Module, float, float]] = {}

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = sweep_engine(self.model, self.config)
        return self._engine

    @property
    def eval_set(self) -> EvalData:
        if self._eval is None:
            data = self._data if self._data is not None else eval_data("test", self.mean, self.std)
            if self.config.per_class is not None:
                data = balanced_subset(data, int(self.config.per_class), self.config.subset_seed)
            self._eval = data
        return self._eval

    @property
    def calibration(self) -> torch.Tensor:
        if self._calibration is None:
            self._calibration = calibration_images(self.config.calibration_size, self.config.calibration_seed,
                                                   self.mean, self.std)
        return self._calibration

    @property
    def repair_images(self) -> torch.Tensor:
        """The repairs' fitting images: CIFAR-10 training images unless the caller gave its own."""
        if self._repair_images is None:
            self._repair_images, _ = calibration_split(self.config.repair_images, 0, seed=self.config.repair_seed,
                                                       mean=self.mean, std=self.std)
        return self._repair_images

    def _repaired(self, row: Row) -> tuple[nn.Module, float, float]:
        """(repaired model, retention, size_ratio) of a boundary row at its repair level."""
        q = row.quant
        config = CompressionConfig(tau=row.tau, include_norm=self.config.include_norm) if q is None else \
            CompressionConfig(tau=row.tau, theta=q.theta, theta_mode=q.theta_mode, b_low=q.b_low,
                              b_high=q.b_high, include_norm=self.config.include_norm)
        result = self.engine.apply(config)
        try:
            fixed = repair_setting(self.model, self.engine, result, self.repair_images,
                                   self.config.repair_config(row.repair), cancel=cancel_requested)
        except RepairCancelled:
            checkpoint()  # the job's own cancellation (core.common.steps.Cancelled), as every other step's
            raise
        return fixed.model, result.retention, result.size_ratio

    def _pruned(self, row: Row) -> tuple[nn.Module, float, float]:
        """(model, retention, size_ratio) for a row without BN recalibration; memoised per τ."""
        if row in self._models:
            return self._models[row]
        if self._models and next(iter(self._models)).tau != row.tau:
            self._models.clear()  # rows come in τ order: keep only the current τ's models
        if row.method == "dense":
            with torch.no_grad():
                out = (copy.deepcopy(self.model).eval(), 1.0, float("nan"))
        elif row.method == "boundary":
            q = row.quant
            config = CompressionConfig(tau=row.tau, include_norm=self.config.include_norm) if q is None else \
                CompressionConfig(tau=row.tau, theta=q.theta, theta_mode=q.theta_mode, b_low=q.b_low,
                                  b_high=q.b_high, include_norm=self.config.include_norm)
            result = self.engine.apply(config)
            out = (result.model, result.retention, result.size_ratio)
        else:
            result = self.engine.apply(CompressionConfig(tau=row.tau, include_norm=self.config.include_norm))
            kept, total = _target_kept(result)
            model, retention = magnitude_baseline(self.model, row.method, total - kept, self.config.include_norm)
            out = (model, retention, float("nan"))
        self._models[row] = out
        return out

    def compute(self, row: Row) -> dict:
        """Evaluate ``row`` (one step: in a job, one turn on the compute queue)."""
        with turn():
            start = time.perf_counter()
            if row.repair != "none":
                model, retention, size_ratio = self._repaired(row)
            else:
                model, retention, size_ratio = self._pruned(row.base())
            if row.bn:
                model = bn_recalibrate(model, self.calibration)
            report = evaluate(model, self.eval_set, device=self.device)
            correct = round(report.accuracy * report.n)
            low, high = wilson_interval(correct, report.n)
            return {"retention": retention, "accuracy": report.accuracy, "n": report.n, "ci_low": low,
                    "ci_high": high, "size_ratio": size_ratio, "seconds": time.perf_counter() - start}

    def alias(self, row: Row, dense: dict) -> dict:
        """The values of a row that is the dense model (:func:`_is_dense`): the dense row's measured figures."""
        size_ratio = float("nan")
        if row.method == "boundary":
            with turn():
                size_ratio = self.engine.apply(CompressionConfig(tau=0.0, include_norm=self.config.include_norm)).size_ratio
        return {**dense, "retention": 1.0, "size_ratio": size_ratio, "seconds": 0.0}


def _context(model: nn.Module, config: SweepConfig, model_id: str | None, data: EvalData | None,
             calibration: torch.Tensor | None, mean: tuple[float, ...], std: tuple[float, ...],
             device: str | torch.device, bn: bool) -> dict:
    if data is None:
        from core.workloads.data import verify_archive

        data_key = {"source": "cifar10-jpeg", "split": "test", "sha256": verify_archive("test")[1],
                    "mean": list(mean), "std": list(std)}
    else:
        data_key = images_key(data)
    calibration_key = None
    if bn:
        if calibration is None:
            from core.workloads.data import verify_archive

            calibration_key = {"source": "cifar10-jpeg", "split": "train", "sha256": verify_archive("train")[1],
                               "n": config.calibration_size, "seed": config.calibration_seed,
                               "recipe": CALIBRATION_RECIPE,
                               "mean": list(mean), "std": list(std)}
        else:
            calibration_key = {"images": tensor_digest(calibration)}
    return {
        **base_context(SWEEP_CACHE_VERSION, model, model_id, device),
        "data": data_key,
        "per_class": config.per_class,
        "subset_seed": config.subset_seed if config.per_class is not None else None,
        "calibration": calibration_key,
        "include_norm": config.include_norm,
    }


def _repair_key(config: SweepConfig, repair_images: torch.Tensor | None, mean: tuple[float, ...],
                std: tuple[float, ...]) -> dict:
    """What a repaired row depends on beyond its setting: the repair's options and its fitting images."""
    if not config.repair_levels:
        return {}
    if repair_images is None:
        from core.workloads.data import verify_archive

        images = {"source": "cifar10-jpeg", "split": "train", "sha256": verify_archive("train")[1],
                  "recipe": CALIBRATION_RECIPE, "mean": list(mean), "std": list(std)}
    else:
        images = {"images": tensor_digest(repair_images)}
    options = config.repair_config(config.repair_levels[0])
    return {"repair_options": {"n_images": options.n_images, "ridge": options.ridge, "positions": options.positions,
                               "seed": options.seed, "batch_size": options.batch_size, "images": images,
                               "solver": SOLVER}}


def _row_key(row: Row, repair_key: dict) -> dict:
    return {**row.key(), **repair_key} if row.repair != "none" else row.key()


def run_sweep(
    model: nn.Module,
    config: SweepConfig = SweepConfig(),
    *,
    data: EvalData | None = None,
    calibration: torch.Tensor | None = None,
    model_id: str | None = None,
    mean: Iterable[float] = CIFAR_MEAN,
    std: Iterable[float] = CIFAR_STD,
    device: str | torch.device = "cpu",
    use_cache: bool = True,
    cache_root: str | os.PathLike | None = None,
    on_progress: ProgressCallback | None = None,
    on_rows: Callable[[pd.DataFrame], None] | None = None,
    engine: Engine | None = None,
    repair_images: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Accuracy and retention of boundary pruning and the baselines across ``config.taus``.

    ``data``: the evaluation set (default: the CIFAR-10 JPEG test set normalised with
    ``mean``/``std``); ``calibration``: normalised images for BN recalibration (default:
    ``calibration_images(config.calibration_size, config.calibration_seed, mean, std)``).
    ``model_id``: a stable identifier of the weights (e.g. ``"sha256:<checkpoint sha>"``)
    for the cache key; by default the state_dict is hashed. ``cache_root`` defaults to
    :func:`sweep_cache_dir`. ``engine``: :func:`sweep_engine` of ``model`` and ``config``, to reuse
    (built on the first row that needs it otherwise). ``repair_images``: the repairs' fitting
    images (default: ``config.repair_images`` CIFAR-10 training images, ``config.repair_seed``).

    Returns one row per evaluated setting with the columns :data:`COLUMNS`, in plan order
    (dense first, then per τ: boundary, baselines, θ/bit-width settings). ``model`` is not
    modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"run_sweep needs a torch.nn.Module, got {type(model).__name__}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    bn = config.bn_recalibration and has_batchnorm(model)
    rows = plan(config, bn)
    cache = _cache(model, config, model_id, data, calibration, mean, std, device, bn, use_cache, cache_root)
    runner = _Runner(model, config, data, calibration, mean, std, device, engine, repair_images)
    repair_key = _repair_key(config, repair_images, mean, std)
    if on_progress is not None:
        on_progress(0, len(rows), "starting")
    records, dense = [], {}
    for done, row in enumerate(rows, start=1):
        values = cache.get(_row_key(row, repair_key))
        cached = values is not None
        if values is None:
            values = runner.alias(row, dense[row.bn]) if is_dense(row) else runner.compute(row)
            cache.put(_row_key(row, repair_key), values)
        if row.method == "dense":
            dense[row.bn] = {k: values[k] for k in ("accuracy", "n", "ci_low", "ci_high")}
        q = row.quant
        records.append({
            "method": row.method, "tau": row.tau,
            "theta": float("nan") if q is None else q.theta,
            "theta_mode": None if q is None else q.theta_mode,
            "b_low": pd.NA if q is None else q.b_low,
            "b_high": pd.NA if q is None else q.b_high,
            "bn_recalibrated": row.bn, "repair": row.level, **values, "cached": cached,
        })
        if on_progress is not None:
            on_progress(done, len(rows), row.label())
        if on_rows is not None:
            on_rows(_frame(records))
    return _frame(records)


def _frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    frame["b_low"] = frame["b_low"].astype("Int64")
    frame["b_high"] = frame["b_high"].astype("Int64")
    frame["n"] = frame["n"].astype(int)
    return frame


def _cache(model: nn.Module, config: SweepConfig, model_id: str | None, data: EvalData | None,
           calibration: torch.Tensor | None, mean: tuple[float, ...], std: tuple[float, ...],
           device: str | torch.device, bn: bool, use_cache: bool,
           cache_root: str | os.PathLike | None) -> JsonCache:
    return JsonCache(sweep_cache_dir() if cache_root is None else Path(cache_root),
                     _context(model, config, model_id, data, calibration, mean, std, device, bn), use_cache)


def sweep_plan(
    model: nn.Module,
    config: SweepConfig = SweepConfig(),
    *,
    data: EvalData | None = None,
    calibration: torch.Tensor | None = None,
    model_id: str | None = None,
    mean: Iterable[float] = CIFAR_MEAN,
    std: Iterable[float] = CIFAR_STD,
    device: str | torch.device = "cpu",
    use_cache: bool = True,
    cache_root: str | os.PathLike | None = None,
    repair_images: torch.Tensor | None = None,
) -> tuple[float, ...]:
    """The relative cost of every row :func:`run_sweep` will report, in its order, without running anything.

    A row's cost is the images it runs through the model (the evaluated images, plus the
    calibration images when it is BN-recalibrated); 0 for a row read from the disk cache and for
    a row that is the dense model (τ = 0 without θ); a repaired row adds
    :data:`REPAIR_COST_PER_IMAGE` per fitting image. Same arguments as :func:`run_sweep`.
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    bn = config.bn_recalibration and has_batchnorm(model)
    cache = _cache(model, config, model_id, data, calibration, mean, std, device, bn, use_cache, cache_root)
    images = _eval_size(config, data)
    calibration_size = len(calibration) if calibration is not None else config.calibration_size
    fitting = len(repair_images) if repair_images is not None else config.repair_images
    repair_key = _repair_key(config, repair_images, mean, std)

    def cost(row: Row) -> float:
        if is_dense(row) or cache.get(_row_key(row, repair_key)) is not None:
            return 0.0
        if row.repair != "none":
            return float(images + REPAIR_COST_PER_IMAGE[row.repair] * fitting)
        return float(images + (calibration_size if row.bn else 0))

    return tuple(cost(row) for row in plan(config, bn))


def sweep_pretrained(name: str, config: SweepConfig = SweepConfig(), **kwargs) -> pd.DataFrame:
    """:func:`run_sweep` on a shipped checkpoint, with its card's normalisation and SHA256 as the cache key."""
    from core.workloads.models import load_card, load_pretrained

    card = load_card(name)
    model = load_pretrained(name)
    return run_sweep(model, config, model_id=f"sha256:{card['sha256']}", mean=card["mean"], std=card["std"], **kwargs)
