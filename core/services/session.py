"""The computation behind the explorer's live view (no Streamlit here).

One :class:`ExploreSession` per user session wraps a :class:`core.method.engine.Engine` over a
(possibly shared, read-only) model. :meth:`ExploreSession.update` takes one
:class:`ExploreRequest` — the sliders' state — and returns an :class:`ExploreView` with
everything the page draws:

* the compression result (``engine.apply``: incremental, milliseconds);
* the selected layer's weight histogram split into pruned / kept-low / kept-high counts
  per bin, computed from the engine's original weights and the result's ranks (exactly
  the engine's split, ties included);
* measured inference latency, dense vs compressed, alternating runs after a warm-up,
  median of as many runs as fit a time budget; process peak RSS sampled during the same
  runs (``psutil``, the reading memory_profiler takes) or, on CUDA, the exact
  ``torch.cuda.max_memory_allocated``;
* a quick CIFAR-10 accuracy estimate on a fixed class-balanced subset with its Wilson 95%
  interval, for the compressed and the dense model (cached per model, setting, BN
  recalibration, subset and device; process-wide, so repeated settings are free);
* the last setting change's chunk switches M and T_switch.

The full 10,000-image accuracy is :meth:`ExploreSession.full_accuracy` and the realized
savings (packed file measured on disk, latency of each execution path of
:mod:`core.deploy.runtime`) are :meth:`ExploreSession.realized`: both on request, cached, and in
the view once measured for its setting. Timings of every step are in ``view.timings``.
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from core.common.lru import LRUCache
from core.common.timing import time_interleaved
from core.measure.accuracy import (
    AccuracyReport,
    QuickEstimate,
    balanced_subset,
    bn_recalibrate,
    calibration_images,
    eval_data,
    evaluate,
    has_batchnorm,
    quick_accuracy,
)
from core.measure.latency import LatencyReport, measure_latency, output_deviation
from core.measure.realized import RealizedSavings, measure_realized
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult, Engine
from core.services.choices import LoadedModel
from core.services.histogram import HIST_BINS, HistogramData, LayerBins

LATENCY_BATCHES: tuple[int, ...] = (1, 16, 64)
QUICK_SIZES: tuple[int, ...] = (2, 5, 10, 20, 50, 100)  # images per class of the quick estimate
DEFAULT_QUICK_PER_CLASS = 10
#: the issue's update budgets (p95, server side): ResNet-20-sized models 0.3 s, ResNet-18-sized 1 s
SMALL_MODEL_PARAMS = 2_000_000
QUICK_SHARE = 0.45  # share of the update budget the default quick estimate may take
CALIBRATION_IMAGES = 512
SUBSET_SEED = 0
OUTPUT_CHECK_BATCH = 256
REALIZED_BUDGET_S = 0.05  # timing effort per layer and kernel when measuring the execution paths

#: accuracy results (QuickEstimate / AccuracyReport / output deviation), keyed by
#: (model key, kind, config or None for dense, BN flag, subset size, device)
ACCURACY_CACHE = LRUCache(4096)


def clear_caches() -> None:
    ACCURACY_CACHE.clear()
    _subset.cache_clear()
    _calibration.cache_clear()


@lru_cache(maxsize=8)
def _subset(per_class: int, mean: tuple[float, ...], std: tuple[float, ...]):
    return balanced_subset(eval_data("test", mean, std), per_class, seed=SUBSET_SEED)


@lru_cache(maxsize=2)
def _calibration(n: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return calibration_images(n, mean=mean, std=std)


# ---------------------------------------------------------------- the session

@dataclass(frozen=True, kw_only=True)
class ExploreRequest:
    """What the explorer shows for one state of the controls."""

    config: CompressionConfig
    layer: str | None = None
    bins: int = HIST_BINS
    latency_batch: int = 1
    measure_latency: bool = True
    latency_budget_s: float = 0.03
    quick_per_class: int = DEFAULT_QUICK_PER_CLASS  # 0: no quick accuracy
    bn_recalibrate: bool = False
    device: str = "cpu"


@dataclass(frozen=True, kw_only=True)
class Move:
    """The last change of setting: chunk switches M, T_switch, weights rewritten."""

    switches: int
    t_switch_s: float
    changed: int
    update_s: float
    theta_changed: bool
    before: CompressionConfig | None
    after: CompressionConfig


@dataclass(kw_only=True)
class ExploreView:
    """Everything the Explore page draws for one request (``None`` where not measured or not applicable)."""

    result: CompressionResult
    histogram: HistogramData | None
    latency: LatencyReport | None
    quick: QuickEstimate | None
    quick_dense: QuickEstimate | None
    full: AccuracyReport | None
    full_dense: AccuracyReport | None
    full_dense_source: str
    deviation: float | None
    last_move: Move | None
    last_theta_move: Move | None
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    accuracy_available: bool = False
    realized: RealizedSavings | None = None  # measured on request (ExploreSession.realized), else None


def _theta_part(config: CompressionConfig | None):
    if config is None:
        return None
    return (config.theta, config.theta_mode, config.b_low, config.b_high)


class ExploreSession:
    """Per-user explorer state: the engine, histogram bins, the last moves and a BN-recalibrated copy."""

    def __init__(self, loaded: LoadedModel, device: str = "cpu"):
        self.loaded = loaded
        self.device = device
        self.engine = Engine(loaded.model, example_input=loaded.example_input(1))
        self._bins: dict[tuple[str, int], LayerBins] = {}
        self._dense_on: dict[str, nn.Module] = {}
        self._bn_models = LRUCache(2)
        self._latency = LRUCache(256)
        self._realized = LRUCache(32)
        self._last_config: CompressionConfig | None = None
        self.last_move: Move | None = None
        self.last_theta_move: Move | None = None
        self._lock = threading.RLock()
        self._has_bn = has_batchnorm(loaded.model)
        self.params = sum(p.numel() for p in loaded.model.parameters())
        self._quick_default: int | None = None

    # -------------------------------------------------------- facts

    @property
    def key(self) -> str:
        return self.loaded.key

    @property
    def has_batchnorm(self) -> bool:
        return self._has_bn

    @property
    def evaluates_cifar(self) -> bool:
        return self.loaded.input_kind == "cifar10"

    def layer_names(self, include_norm: bool = False) -> list[str]:
        return self.engine.layer_names + (self.engine.norm_layer_names if include_norm else [])

    def global_max_abs(self) -> float:
        return max(self.engine.max_abs(name) for name in self.engine.layer_names)

    @property
    def last_config(self) -> CompressionConfig | None:
        """The setting applied last (what the engine's buffer holds)."""
        return self._last_config

    @property
    def update_budget_s(self) -> float:
        """The latency budget of one slider move for a model of this size (0.3 s small, 1 s large)."""
        return 0.3 if self.params <= SMALL_MODEL_PARAMS else 1.0

    def default_quick_per_class(self) -> int:
        """The largest quick-estimate size whose inference, timed here (fastest of 3 runs), fits
        :data:`QUICK_SHARE` of :attr:`update_budget_s` (at least the smallest size)."""
        if self._quick_default is None:
            x = self.loaded.example_input(20)
            model = self.loaded.model
            with torch.inference_mode():  # the fastest of three: robust to a momentarily busy CPU
                timing = time_interleaved({"batch": lambda: model(x)}, warmup=1, min_rounds=3, max_rounds=3)["batch"]
            per_image = timing.min_s / len(x)
            allowed = [n for n in QUICK_SIZES if 10 * n * per_image <= QUICK_SHARE * self.update_budget_s]
            self._quick_default = max(allowed) if allowed else QUICK_SIZES[0]
        return self._quick_default

    def largest_layer(self) -> str:
        return max(self.engine.layer_names, key=lambda n: self.engine.original_weight(n).numel())

    # -------------------------------------------------------- pieces

    def dense_model(self, device: str) -> nn.Module:
        """The dense model on ``device``: the shared model itself on CPU (only run, never changed), a private copy elsewhere."""
        if device == "cpu":
            return self.loaded.model
        if device not in self._dense_on:
            with torch.no_grad():
                self._dense_on[device] = copy.deepcopy(self.loaded.model).to(device).eval()
        return self._dense_on[device]

    def histogram(self, result: CompressionResult, layer: str, bins: int = HIST_BINS) -> HistogramData:
        """The layer's histogram under ``result`` (bins fixed per layer: ±max|W|)."""
        key = (layer, bins)
        if key not in self._bins:
            self._bins[key] = LayerBins(self.engine.original_weight(layer), bins)
        return self._bins[key].split(result, layer)

    def _record_move(self, result: CompressionResult) -> None:
        config = result.config
        if config == self._last_config:
            return
        move = Move(switches=result.switches, t_switch_s=result.t_switch_s, changed=result.changed,
                    update_s=result.update_s, theta_changed=_theta_part(config) != _theta_part(self._last_config),
                    before=self._last_config, after=config)
        self.last_move = move
        if move.theta_changed and move.before is not None:
            self.last_theta_move = move
        self._last_config = config

    def apply(self, config: CompressionConfig) -> CompressionResult:
        with self._lock:
            result = self.engine.apply(config)
            self._record_move(result)
            return result

    def inference_model(self, result: CompressionResult, bn: bool) -> nn.Module:
        """The compressed model for accuracy: ``result.model``, BN-recalibrated when asked (cached per setting)."""
        if not (bn and self._has_bn and self.evaluates_cifar):
            return result.model
        cached = self._bn_models.get(result.config)
        if cached is None:
            cached = bn_recalibrate(result.model, _calibration(CALIBRATION_IMAGES, self.loaded.mean, self.loaded.std))
            self._bn_models.put(result.config, cached)
        return cached

    def _accuracy_key(self, kind: str, config: CompressionConfig | None, bn: bool, size, device: str):
        return (self.key, kind, config, bool(bn and self._has_bn and config is not None), size, device)

    def quick(self, result: CompressionResult | None, per_class: int, bn: bool, device: str) -> QuickEstimate:
        """Quick accuracy of the compressed model (or the dense one when ``result`` is None), cached."""
        config = None if result is None else result.config
        key = self._accuracy_key("quick", config, bn, per_class, device)
        cached = ACCURACY_CACHE.get(key)
        if cached is not None:
            return cached
        subset = _subset(per_class, self.loaded.mean, self.loaded.std)
        model = self.dense_model(device) if result is None else self.inference_model(result, bn).to(device)
        estimate = quick_accuracy(model, subset, device=device)
        ACCURACY_CACHE.put(key, estimate)
        return estimate

    def cached_full(self, config: CompressionConfig | None, bn: bool, device: str) -> AccuracyReport | None:
        return ACCURACY_CACHE.get(self._accuracy_key("full", config, bn, 10_000, device))

    def full_accuracy(self, result: CompressionResult | None, bn: bool, device: str) -> AccuracyReport:
        """Accuracy on all 10,000 test images (seconds to tens of seconds; cached)."""
        config = None if result is None else result.config
        key = self._accuracy_key("full", config, bn, 10_000, device)
        cached = ACCURACY_CACHE.get(key)
        if cached is not None:
            return cached
        data = eval_data("test", self.loaded.mean, self.loaded.std)
        model = self.dense_model(device) if result is None else self.inference_model(result, bn).to(device)
        report = evaluate(model, data, device=device)
        ACCURACY_CACHE.put(key, report)
        return report

    def dense_full_reference(self, device: str) -> tuple[AccuracyReport | None, str]:
        """The dense full-test accuracy if known: measured here (cached) or from the checkpoint's card."""
        measured = self.cached_full(None, False, device)
        if measured is not None:
            return measured, "measured here on all 10,000 test images"
        card = self.loaded.card or {}
        accuracy = card.get("test_accuracy")
        if isinstance(accuracy, (int, float)):
            return AccuracyReport(float(accuracy), (), 10_000, 0.0), "from the checkpoint's card (measured when it was trained)"
        return None, ""

    def deviation(self, result: CompressionResult, device: str) -> float:
        key = self._accuracy_key("deviation", result.config, False, OUTPUT_CHECK_BATCH, device)
        cached = ACCURACY_CACHE.get(key)
        if cached is None:
            inputs = self.loaded.example_input(OUTPUT_CHECK_BATCH, seed=1).to(device)
            cached = output_deviation(self.dense_model(device), result.model.to(device), inputs)
            ACCURACY_CACHE.put(key, cached)
        return cached

    def latency(self, result: CompressionResult, batch: int, device: str, budget_s: float) -> LatencyReport:
        key = (result.config, batch, device)
        cached = self._latency.get(key)
        if cached is None:
            example = self.loaded.example_input(batch)
            cached = measure_latency(self.dense_model(device), result.model.to(device), example,
                                     budget_s=budget_s, device=device)
            self._latency.put(key, cached)
        return cached

    def cached_realized(self, config: CompressionConfig, batch: int, device: str) -> RealizedSavings | None:
        return self._realized.get((config, batch, device))

    def realized(self, result: CompressionResult, batch: int, device: str) -> RealizedSavings:
        """Measured packed-file size and per-path latency of ``result`` at ``batch`` (seconds; cached).

        BN recalibration changes neither: it re-estimates statistics, not weights or shapes.
        """
        key = (result.config, batch, device)
        cached = self._realized.get(key)
        if cached is None:
            with self._lock:
                cached = measure_realized(result, self.loaded.example_input(1).to(device), arch=self.loaded.arch,
                                          arch_kwargs=self.loaded.arch_kwargs, batch_size=batch,
                                          budget_s=REALIZED_BUDGET_S)
            self._realized.put(key, cached)
        return cached

    # -------------------------------------------------------- one update

    def update(self, request: ExploreRequest) -> ExploreView:
        """Everything the Explore page shows for ``request`` (full-test accuracy only if cached)."""
        timings: dict[str, float] = {}
        notes: list[str] = []
        t = time.perf_counter()
        with self._lock:
            result = self.apply(request.config)
            timings["engine"] = time.perf_counter() - t

            t = time.perf_counter()
            layer = request.layer if request.layer in set(result.stats["name"]) else result.stats["name"].iloc[0]
            histogram = self.histogram(result, layer, request.bins)
            timings["histogram"] = time.perf_counter() - t

            t = time.perf_counter()
            _ = result.model  # materialize once (a copy of the engine's buffer)
            timings["materialize"] = time.perf_counter() - t

            latency = None
            if request.measure_latency:
                t = time.perf_counter()
                latency = self.latency(result, request.latency_batch, request.device, request.latency_budget_s)
                timings["latency"] = time.perf_counter() - t

            quick = quick_dense = full = full_dense = None
            full_dense_source = ""
            deviation = None
            available = False
            bn = request.bn_recalibrate and self._has_bn
            if request.bn_recalibrate and not self._has_bn:
                notes.append("This model has no BatchNorm layer: BN recalibration does not apply.")
            if self.evaluates_cifar:
                if request.quick_per_class > 0:
                    t = time.perf_counter()
                    try:
                        quick_dense = self.quick(None, request.quick_per_class, False, request.device)
                        quick = self.quick(result, request.quick_per_class, bn, request.device)
                        available = True
                    except (OSError, RuntimeError) as err:  # DataError is a RuntimeError
                        notes.append(f"CIFAR-10 accuracy unavailable: {err}")
                    timings["quick_accuracy"] = time.perf_counter() - t
                full = self.cached_full(request.config, bn, request.device)
                full_dense, full_dense_source = self.dense_full_reference(request.device)
            else:
                t = time.perf_counter()
                deviation = self.deviation(result, request.device)
                timings["output_deviation"] = time.perf_counter() - t
            realized = self.cached_realized(request.config, request.latency_batch, request.device)
        timings["total"] = sum(timings.values())
        return ExploreView(result=result, histogram=histogram, latency=latency, quick=quick, quick_dense=quick_dense,
                           full=full, full_dense=full_dense, full_dense_source=full_dense_source, deviation=deviation,
                           last_move=self.last_move, last_theta_move=self.last_theta_move, timings=timings,
                           notes=notes, accuracy_available=available, realized=realized)
