"""Per-layer sensitivity: the paired accuracy drop when one layer alone is pruned, across a τ grid.

For every Conv/Linear layer ℓ and every τ of the grid, :func:`measure_sensitivity` prunes ℓ
alone (``CompressionConfig(layer_tau={ℓ: τ})``, every other layer dense) with one reused
:class:`core.method.engine.Engine`, runs the pruned model on a fixed class-balanced set of
images and compares its predictions, image by image, with the dense model's on the same
images (:mod:`core.measure.paired`): the drop is (newly wrong − newly right) / n, with its
paired 95 % interval.

Which images. By default (``source="train"``) the first ``n_images`` of a class-balanced order
(:func:`core.measure.paired.balanced_order`) of the *training* split, without augmentation:
the per-layer τ chosen from these figures is then verified on the test set without having
been chosen on it. The shipped checkpoints were trained on the whole training split, so these
images are not unseen by the model, only unseen by the selection; ``source="test"`` measures on
test images instead (the selection then sees the images it is verified on; the figures say so).

Recipe. Inference runs in bf16 where the machine has native bf16 (``precision="auto"``; an
estimate, dense and pruned at the same precision), else fp32. With ``bn_recalibration=True``
every pruned model (and the dense reference) first gets its BatchNorm statistics re-estimated
on ``calibration_size`` augmented training images, as :func:`core.measure.accuracy.bn_recalibrate`
does (under bf16 autocast when the precision is bf16). 2,000 images by default: measured on the
shipped ResNet-20 (1,000 training images), recalibrating the dense model on 512 images costs
2.5 points (94.8 → 92.3 %), on 2,000 it keeps its accuracy (95.2 %), in fp32 and bf16 alike.

Cache. Every (layer, τ) cell is stored on disk under ``core.common.paths.cache_dir()/"sensitivity"``,
keyed by the model (checkpoint SHA256 or a state_dict digest), the images (a digest of the
tensors), the recipe (precision, BN recalibration and its images), the device and the torch
version, and the cell's layer and τ; a second run reads it without running the model, an
interrupted run resumes where it stopped and a grid with more τ values measures only those.
``on_progress(done, total, label)`` is called before the first cell (``done = 0``) and after
every (layer, τ) cell, cached or computed; ``on_cells(frame)`` after every cell with the rows of
:data:`COLUMNS` so far (the heatmap fills in). Every computed cell is one
:func:`core.common.steps.turn` (in a job: a turn on the compute queue, and a cancel stops it within
a layer); :func:`sensitivity_plan` says beforehand which cells will run, for a time estimate.

Speed. One cell is one ``engine.apply`` (milliseconds) and one inference over the images; on
this 2-core CPU in bf16 that is about 0.2 s for ResNet-20 and 2.1 s for ResNet-18 per 1,000
images when the machine is otherwise idle. Caching the dense activations in front of each
layer (pruning ℓ changes nothing before it) would save about half of that; it is not done.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.common import paths
from core.common.hardware import native_bf16
from core.common.steps import interruptible, turn
from core.measure.accuracy import (
    PRECISIONS,
    EvalData,
    bn_recalibrate,
    calibration_images,
    has_batchnorm,
)
from core.measure.disk_cache import (
    JsonCache,
    base_context,
    calibration_key,
    images_key,
    key_hash,
)
from core.measure.paired import balanced_order, paired_interval
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.method.pruning import check_tau, prunable_layers
from core.workloads.data import CIFAR_MEAN, CIFAR_STD, load_cifar10, normalize

SENSITIVITY_CACHE_VERSION = 2
BATCH = 500
DEFAULT_TAUS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
DEFAULT_IMAGES = 1000
SOURCES: tuple[str, ...] = ("train", "test")
COLUMNS: tuple[str, ...] = ("layer", "tau", "numel", "share", "kept", "retention", "n", "newly_wrong",
                            "newly_right", "drop", "drop_low", "drop_high", "loss_increase", "kl")

ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class SensitivityConfig:
    """What one sensitivity measurement runs.

    * ``taus``: the τ grid (each in (0, 1]; sorted, duplicates dropped; τ = 0 is the dense model).
    * ``n_images``: how many images, a class-balanced prefix of ``source`` drawn with ``seed``.
    * ``source``: ``"train"`` (un-augmented training images, not the test images the result is
      verified on) or ``"test"``; ignored when the caller passes its own ``data``.
    * ``precision``: ``"auto"`` (bf16 where native, else fp32), ``"bf16"`` or ``"fp32"``.
    * ``bn_recalibration``: re-estimate BatchNorm statistics after pruning each layer (and for
      the dense reference) on ``calibration_size`` augmented training images (``calibration_seed``).
    * ``layers``: restrict to these layer names (``None``: every Conv/Linear layer).
    """

    taus: tuple[float, ...] = DEFAULT_TAUS
    n_images: int = DEFAULT_IMAGES
    source: str = "train"
    seed: int = 0
    precision: str = "auto"
    bn_recalibration: bool = False
    calibration_size: int = 2000
    calibration_seed: int = 42
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        taus = tuple(sorted({check_tau(t) for t in self.taus}))
        if not taus or taus[0] <= 0:
            raise ValueError("the τ grid needs at least one τ, each in (0, 1]")
        object.__setattr__(self, "taus", taus)
        if isinstance(self.n_images, bool) or not isinstance(self.n_images, int) or self.n_images < 1:
            raise ValueError(f"n_images must be a positive whole number, got {self.n_images!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.precision not in ("auto",) + PRECISIONS:
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.calibration_size < 1:
            raise ValueError("calibration_size must be ≥ 1")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(dict.fromkeys(str(name) for name in self.layers)))


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``"auto"`` → ``"bf16"`` where the device has native bf16, else ``"fp32"``."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(torch.device(device).type) else "fp32"


@dataclass(frozen=True)
class Sensitivity:
    """The measurement: ``frame`` has one row per (layer, τ) with the columns :data:`COLUMNS`.

    ``drop`` is the dense accuracy minus the accuracy with that layer pruned (a fraction;
    positive = worse), ``drop_low``/``drop_high`` its paired 95 % interval; ``loss_increase``
    (mean cross-entropy, pruned − dense) and ``kl`` (mean KL(dense ‖ pruned)) are smoother
    figures on the same images; ``share`` is the layer's share of the pruned layers' weights.
    ``seconds`` is the time this call took, ``computed``/``cached`` how many layers were
    measured now (at least one τ) / read whole from the disk cache.
    """

    frame: pd.DataFrame
    taus: tuple[float, ...]
    layers: tuple[str, ...]
    dense_accuracy: float
    n: int
    images: str
    precision: str
    bn_recalibration: bool
    seconds: float
    computed: int
    cached: int
    key: str = ""
    config: SensitivityConfig | None = None

    def drops(self, metric: str = "drop") -> pd.DataFrame:
        """Layers × τ table of ``metric`` (default the accuracy drop, a fraction), layers in module order."""
        table = self.frame.pivot(index="layer", columns="tau", values=metric)
        return table.loc[list(self.layers), list(self.taus)]

    def shares(self) -> pd.Series:
        """Each layer's share of the pruned layers' weights, in module order."""
        return self.frame.drop_duplicates("layer").set_index("layer")["share"].loc[list(self.layers)]

    def numels(self) -> pd.Series:
        return self.frame.drop_duplicates("layer").set_index("layer")["numel"].loc[list(self.layers)]


# ---------------------------------------------------------------- images and the cache

@lru_cache(maxsize=8)
def _cifar_subset(source: str, n_images: int, seed: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[EvalData, int]:
    raw = load_cifar10(source)
    if n_images > len(raw):
        raise ValueError(f"asked for {n_images} images, the {source} split has {len(raw)}")
    index = balanced_order(raw.labels, seed)[:n_images].sort().values
    images = normalize(raw.images[index], mean, std).contiguous()
    return EvalData(images, raw.labels[index].clone(), f"{source}[{n_images}]"), len(raw)


def sensitivity_images(config: SensitivityConfig, data: EvalData | None = None,
                       mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> tuple[EvalData, int, str]:
    """(images, size of the set they come from, description) for ``config``.

    The first ``n_images`` of :func:`balanced_order` of ``data`` (default: ``config.source``
    of CIFAR-10, normalised with ``mean``/``std``; training images without augmentation),
    in their original order. Treat the tensors as read-only (they are memoised per process).
    """
    if data is None:
        subset, population = _cifar_subset(config.source, config.n_images, config.seed,
                                           tuple(float(m) for m in mean), tuple(float(s) for s in std))
        what = {"train": "training images (no augmentation; not the test images)",
                "test": "test images (the set the result is verified on)"}[config.source]
        return subset, population, f"{config.n_images:,} class-balanced {what}"
    if config.n_images > len(data):
        raise ValueError(f"asked for {config.n_images} images, the data has {len(data)}")
    index = balanced_order(data.labels, config.seed)[:config.n_images].sort().values
    subset = EvalData(data.images[index].contiguous(), data.labels[index], f"{data.split}[{config.n_images}]")
    return subset, len(data), f"{config.n_images:,} class-balanced images of '{data.split}'"


def sensitivity_cache_dir() -> Path:
    """Default location of cached sensitivity cells: ``core.common.paths.cache_dir()/"sensitivity"``."""
    return paths.cache_dir() / "sensitivity"


# ---------------------------------------------------------------- measuring

def recipe_outputs(model: nn.Module, images: torch.Tensor, precision: str, calibration: torch.Tensor | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, fp32 log-probabilities) of ``model`` on ``images`` at ``precision``.

    With ``calibration``, a copy of ``model`` first gets its BatchNorm statistics re-estimated on
    those images (under bf16 autocast when ``precision`` is bf16). ``model`` may be moved to
    ``device`` and to channels_last: pass a model of your own (an engine result's, for example).
    """
    device_type = torch.device(device).type
    bf16 = precision == "bf16"
    if calibration is not None and has_batchnorm(model):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            model = bn_recalibrate(model.to(device), calibration)
    run = model.to(device).eval()
    channels_last = any(isinstance(m, nn.Conv2d) for m in run.modules()) and device_type == "cpu"
    if channels_last:
        run = run.to(memory_format=torch.channels_last)
    parts = []
    with interruptible(run), torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(images), BATCH):
            x = images[start:start + BATCH].to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            parts.append(torch.log_softmax(run(x).float(), dim=1).cpu())
    log_probs = torch.cat(parts) if parts else torch.empty(0, 0)
    return log_probs.argmax(1), log_probs


class _Runner:
    """Everything a computed cell needs, built on first use (a fully cached run builds nothing)."""

    def __init__(self, model: nn.Module, config: SensitivityConfig, images: EvalData, precision: str,
                 calibration: torch.Tensor | None, mean, std, device, engine: Engine | None):
        self.model, self.config, self.images, self.precision = model, config, images, precision
        self.mean, self.std, self.device = mean, std, device
        self._calibration = calibration
        self._engine = engine
        self._dense: torch.Tensor | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.model)
        return self._engine

    @property
    def calibration(self) -> torch.Tensor:
        if self._calibration is None:
            self._calibration = calibration_images(self.config.calibration_size, self.config.calibration_seed,
                                                   self.mean, self.std)
        return self._calibration

    def outputs(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted classes, log-probabilities in fp32) of ``model`` on the images, after the recipe."""
        calibration = self.calibration if self.config.bn_recalibration and has_batchnorm(model) else None
        return recipe_outputs(model, self.images.images, self.precision, calibration, self.device)

    @property
    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._dense is None:
            self._dense = self.outputs(self.engine.apply(CompressionConfig()).model)
        return self._dense

    def cell(self, layer: str, tau: float) -> dict:
        """Measure one (layer, τ) cell (one step: in a job, one turn on the compute queue)."""
        with turn():
            return self._cell(layer, tau)

    def _cell(self, layer: str, tau: float) -> dict:
        result = self.engine.apply(CompressionConfig(layer_tau={layer: tau}))
        kept = int(result.stats.loc[result.stats["name"] == layer, "kept"].iloc[0])
        predicted, log_probs = self.outputs(result.model)
        dense_predicted, dense_log_probs = self.dense
        truth = self.images.labels
        dense_right = dense_predicted == truth
        right = predicted == truth
        picked = torch.arange(len(truth))
        loss = float(-log_probs[picked, truth].mean())
        dense_loss = float(-dense_log_probs[picked, truth].mean())
        kl = float((dense_log_probs.exp() * (dense_log_probs - log_probs)).sum(1).mean())
        return {"tau": tau, "kept": kept, "correct": int(right.sum()), "dense_correct": int(dense_right.sum()),
                "newly_wrong": int((dense_right & ~right).sum()), "newly_right": int((~dense_right & right).sum()),
                "loss_increase": loss - dense_loss, "kl": kl}


def _context(model, config: SensitivityConfig, model_id, images: EvalData, precision: str,
             calibration: torch.Tensor | None, mean, std, device) -> dict:
    bn = config.bn_recalibration and has_batchnorm(model)
    calibration = (calibration_key(calibration, config.calibration_size, config.calibration_seed, mean, std)
                   if bn else None)
    return {
        **base_context(SENSITIVITY_CACHE_VERSION, model, model_id, device),
        "images": images_key(images),
        "recipe": {"precision": precision, "bn_recalibration": bn, "calibration": calibration,
                   "metric": "paired top-1 vs dense, one layer pruned at a time"},
    }


class _Plan:
    """What a measurement will visit: its images, its layers in module order, and its disk cache."""

    def __init__(self, model: nn.Module, config: SensitivityConfig, data: EvalData | None,
                 calibration: torch.Tensor | None, model_id: str | None, mean: tuple[float, ...],
                 std: tuple[float, ...], device: str | torch.device, engine: Engine | None, use_cache: bool,
                 cache_root: str | os.PathLike | None):
        self.precision = resolve_precision(config.precision, device)
        self.images, self.population, self.description = sensitivity_images(config, data, mean, std)
        if engine is not None:
            numels = {name: int(engine.sorted_magnitudes(name).numel()) for name in engine.layer_names}
        else:  # the engine's layers, in its order, without building it (a fully cached run never does)
            numels = {layer.name: int(layer.weight.numel()) for layer in prunable_layers(model)}
        layers = list(numels)
        if config.layers is not None:
            unknown = [name for name in config.layers if name not in numels]
            if unknown:
                raise ValueError(f"no prunable layer named '{unknown[0]}'")
            layers = [name for name in layers if name in config.layers]
        if not layers:
            raise ValueError("the model has no Conv/Linear layer to measure")
        self.numels, self.layers = numels, layers
        self.total = sum(numels[name] for name in layers)
        self.context = _context(model, config, model_id, self.images, self.precision, calibration, mean, std, device)
        root = Path(cache_root) if cache_root is not None else sensitivity_cache_dir()
        self.cache = JsonCache(root, self.context, use_cache)

    def keys(self, taus: Sequence[float]) -> list[dict]:
        """The cache key of every cell, in the order they are measured (layer by layer, τ ascending)."""
        return [{"layer": name, "numel": self.numels[name], "tau": tau} for name in self.layers for tau in taus]


def sensitivity_plan(
    model: nn.Module,
    config: SensitivityConfig = SensitivityConfig(),
    *,
    data: EvalData | None = None,
    calibration: torch.Tensor | None = None,
    model_id: str | None = None,
    mean: Iterable[float] = CIFAR_MEAN,
    std: Iterable[float] = CIFAR_STD,
    device: str | torch.device = "cpu",
    use_cache: bool = True,
    cache_root: str | os.PathLike | None = None,
) -> tuple[float, ...]:
    """The relative cost of every cell :func:`measure_sensitivity` will report, in its order, without running one.

    A cell's cost is the model runs it makes, counted in images (its images, plus the
    calibration images with BN recalibration); the first computed cell also runs the dense
    reference; a cell read from the disk cache costs 0. Same arguments as :func:`measure_sensitivity`.
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    plan = _Plan(model, config, data, calibration, model_id, mean, std, device, None, use_cache, cache_root)
    bn = plan.context["recipe"]["bn_recalibration"]
    calibration_size = len(calibration) if calibration is not None else config.calibration_size
    one = float(len(plan.images) + (calibration_size if bn else 0))
    units, dense = [], False
    for key in plan.keys(config.taus):
        if plan.cache.get(key) is not None:
            units.append(0.0)
        else:
            units.append(one if dense else 2 * one)  # the first computed cell also runs the dense model
            dense = True
    return tuple(units)


def measure_sensitivity(
    model: nn.Module,
    config: SensitivityConfig = SensitivityConfig(),
    *,
    data: EvalData | None = None,
    calibration: torch.Tensor | None = None,
    model_id: str | None = None,
    mean: Iterable[float] = CIFAR_MEAN,
    std: Iterable[float] = CIFAR_STD,
    device: str | torch.device = "cpu",
    engine: Engine | None = None,
    use_cache: bool = True,
    cache_root: str | os.PathLike | None = None,
    on_progress: ProgressCallback | None = None,
    on_cells: Callable[[pd.DataFrame], None] | None = None,
) -> Sensitivity:
    """The paired accuracy drop of every layer pruned alone at every τ of ``config.taus``.

    ``data``: the set the images are drawn from (default: ``config.source`` of CIFAR-10);
    ``calibration``: normalised images for BN recalibration (default: augmented training
    images); ``model_id``: a stable identifier of the weights for the cache key (default: a
    state_dict digest); ``engine``: an :class:`Engine` over ``model`` to reuse. ``model`` is
    never modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"measure_sensitivity needs a torch.nn.Module, got {type(model).__name__}")
    start = time.perf_counter()
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    plan = _Plan(model, config, data, calibration, model_id, mean, std, device, engine, use_cache, cache_root)
    images, population, description, precision = plan.images, plan.population, plan.description, plan.precision
    numels, layers, total, context, cache = plan.numels, plan.layers, plan.total, plan.context, plan.cache
    runner = _Runner(model, config, images, precision, calibration, mean, std, device, engine)
    cells = len(layers) * len(config.taus)
    if on_progress is not None:
        on_progress(0, cells, "starting")
    records, computed, cached, done = [], 0, 0, 0
    dense_correct = None
    n = len(images)
    for name in layers:
        fresh = False
        for tau in config.taus:
            key = {"layer": name, "numel": numels[name], "tau": tau}
            row = cache.get(key)
            hit = row is not None
            if not hit:
                row = runner.cell(name, tau)
                cache.put(key, row)
                fresh = True
            done += 1
            low, high = paired_interval(row["newly_right"], row["newly_wrong"], n, population)
            dense_correct = row["dense_correct"]
            records.append({
                "layer": name, "tau": row["tau"], "numel": numels[name], "share": numels[name] / total,
                "kept": row["kept"], "retention": row["kept"] / numels[name] if numels[name] else 1.0, "n": n,
                "newly_wrong": row["newly_wrong"], "newly_right": row["newly_right"],
                "drop": (row["newly_wrong"] - row["newly_right"]) / n, "drop_low": -high, "drop_high": -low,
                "loss_increase": row["loss_increase"], "kl": row["kl"],
            })
            if on_progress is not None:
                on_progress(done, cells, f"{name} τ={tau:g}" + (" (cached)" if hit else ""))
            if on_cells is not None:
                on_cells(pd.DataFrame.from_records(records, columns=list(COLUMNS)))
        computed += fresh
        cached += not fresh
    frame = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    return Sensitivity(
        frame=frame, taus=config.taus, layers=tuple(layers), dense_accuracy=dense_correct / len(images),
        n=len(images), images=description, precision=precision,
        bn_recalibration=bool(context["recipe"]["bn_recalibration"]), seconds=time.perf_counter() - start,
        computed=computed, cached=cached, key=key_hash(context), config=config)


def monotone_drops(drops: Sequence[float]) -> np.ndarray:
    """Drops along an ascending τ grid made non-negative and non-decreasing (a running maximum from 0).

    Pruning more of a layer does not help on average; a measured dip below an earlier figure is
    noise of the finite sample, so the allocation uses this envelope.
    """
    return np.maximum.accumulate(np.maximum(np.asarray(drops, dtype=float), 0.0))
