"""The computation behind the explorer's live view (no Streamlit here).

One :class:`ExploreSession` per user session wraps a :class:`core.engine.Engine` over a
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
:mod:`core.runtime`) are :meth:`ExploreSession.realized`: both on request, cached, and in
the view once measured for its setting. Timings of every step are in ``view.timings``.
"""
from __future__ import annotations

import copy
import math
import statistics
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.catalog import LoadedModel
from core.engine import CompressionConfig, CompressionResult, Engine
from core.realized import RealizedSavings, measure_realized
from core.metrics import (
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

THREADS_ENV = "BOUNDARY_TORCH_THREADS"
HIST_BINS = 81
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


def configure_threads(default: int = 1) -> int:
    """Set PyTorch's intra-op threads for the interactive app: ``$BOUNDARY_TORCH_THREADS`` or ``default``.

    One thread by default: on a small shared CPU (and with several sessions computing at
    once) two OpenMP threads fighting for two busy cores made a ResNet-20 update 20× slower
    here, while one thread stays within the latency budget. Returns the thread count set.
    """
    import os

    try:
        threads = int(os.environ.get(THREADS_ENV, default))
    except ValueError:
        threads = default
    threads = max(1, threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


# ---------------------------------------------------------------- small process-wide caches

class _LRU:
    """A thread-safe LRU dict."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


#: accuracy results (QuickEstimate / AccuracyReport / output deviation), keyed by
#: (model key, kind, config or None for dense, BN flag, subset size, device)
ACCURACY_CACHE = _LRU(4096)


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


# ---------------------------------------------------------------- histogram

@dataclass(frozen=True)
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


class _LayerBins:
    """A layer's weights in the engine's rank order (ascending |W|, stable) and the bin of each rank."""

    def __init__(self, weight: torch.Tensor, bins: int):
        flat = weight.reshape(-1).float()
        magnitude = flat.abs()
        self.sorted_abs, order = torch.sort(magnitude, stable=True)
        ranked = flat[order]
        top = float(self.sorted_abs[-1]) if flat.numel() else 0.0
        span = top if top > 0 else 1.0
        self.edges = torch.linspace(-span, span, bins + 1, dtype=torch.float64)
        index = torch.bucketize(ranked.double(), self.edges[1:-1], right=True)
        self.bin_of_rank = index.clamp_(0, bins - 1)
        self.bins = bins
        self.numel = flat.numel()

    def counts(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros(self.bins, dtype=np.int64)
        return torch.bincount(self.bin_of_rank[start:stop], minlength=self.bins).numpy()


# ---------------------------------------------------------------- latency and memory

@dataclass(frozen=True)
class LatencyReport:
    """Median wall time of one forward pass (ms), dense vs compressed, measured alternately.

    ``peak_*_mib``: on CPU the process's peak resident memory sampled every ``sample_ms``
    during that model's runs (the whole server process, not the model alone); on CUDA the
    exact peak of memory allocated by PyTorch on the GPU during those runs.
    """

    batch: int
    device: str
    runs: int
    dense_ms: float
    compressed_ms: float
    dense_runs_ms: tuple[float, ...]
    compressed_runs_ms: tuple[float, ...]
    peak_dense_mib: float | None
    peak_compressed_mib: float | None
    memory_method: str
    seconds: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.compressed_ms if self.compressed_ms > 0 else float("nan")


class _RssSampler:
    """Samples this process's RSS in a thread; ``label`` says which model the current peak belongs to."""

    def __init__(self, interval_s: float = 0.001):
        import psutil

        self._process = psutil.Process()
        self.interval_s = interval_s
        self.label: str | None = None
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            label = self.label
            if label is not None:
                rss = self._process.memory_info().rss
                if rss > self.peaks.get(label, 0):
                    self.peaks[label] = rss
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, label: str | None) -> None:
        if label is not None:  # one reading at the start of every run, so short runs are seen too
            rss = self._process.memory_info().rss
            self.peaks[label] = max(self.peaks.get(label, 0), rss)
        self.label = label


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(dense: nn.Module, compressed: nn.Module, example: torch.Tensor, *, warmup: int = 1,
                    min_runs: int = 3, max_runs: int = 25, budget_s: float = 0.08,
                    device: str = "cpu") -> LatencyReport:
    """Time ``dense`` and ``compressed`` on ``example`` in alternation until ``budget_s`` is spent.

    At least ``min_runs`` and at most ``max_runs`` timed passes of each after ``warmup``
    untimed ones; the medians are reported. The models must already be on ``device``.
    """
    dev = torch.device(device)
    start = time.perf_counter()
    x = example.to(dev)
    for _ in range(warmup):
        dense(x)
        compressed(x)
    _sync(dev)
    times: dict[str, list[float]] = {"dense": [], "compressed": []}
    cuda_peaks: dict[str, float] = {}
    sampler = _RssSampler() if dev.type == "cpu" else None
    models = (("dense", dense), ("compressed", compressed))
    try:
        if sampler is not None:
            sampler.__enter__()
        runs = 0
        while runs < max_runs and (runs < min_runs or time.perf_counter() - start < budget_s):
            for label, model in models:
                if sampler is not None:
                    sampler.mark(label)
                elif dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
                model(x)
                _sync(dev)
                times[label].append((time.perf_counter() - t0) * 1e3)
                if sampler is not None:
                    sampler.mark(None)
                elif dev.type == "cuda":
                    cuda_peaks[label] = max(cuda_peaks.get(label, 0.0), torch.cuda.max_memory_allocated(dev) / 2 ** 20)
            runs += 1
    finally:
        if sampler is not None:
            sampler.__exit__(None, None, None)
    if sampler is not None:
        peaks = {k: v / 2 ** 20 for k, v in sampler.peaks.items()}
        method = "process peak RSS during the timed runs (psutil, sampled every 1 ms; whole server process)"
    else:
        peaks = cuda_peaks
        method = "peak GPU memory allocated by PyTorch during the timed runs (torch.cuda.max_memory_allocated)"
    return LatencyReport(
        batch=int(x.shape[0]), device=dev.type, runs=runs,
        dense_ms=statistics.median(times["dense"]), compressed_ms=statistics.median(times["compressed"]),
        dense_runs_ms=tuple(times["dense"]), compressed_runs_ms=tuple(times["compressed"]),
        peak_dense_mib=peaks.get("dense"), peak_compressed_mib=peaks.get("compressed"),
        memory_method=method, seconds=time.perf_counter() - start)


@torch.inference_mode()
def output_deviation(dense: nn.Module, compressed: nn.Module, inputs: torch.Tensor) -> float:
    """‖f_c(x) − f(x)‖ / ‖f(x)‖ over a batch (for models without a labelled data set)."""
    reference = dense(inputs)
    return float(torch.linalg.vector_norm(compressed(inputs) - reference) /
                 torch.linalg.vector_norm(reference).clamp_min(1e-12))


# ---------------------------------------------------------------- the session

@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Move:
    """The last change of setting: chunk switches M, T_switch, weights rewritten."""

    switches: int
    t_switch_s: float
    changed: int
    update_s: float
    theta_changed: bool
    before: CompressionConfig | None
    after: CompressionConfig


@dataclass
class ExploreView:
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
        self._bins: dict[tuple[str, int], _LayerBins] = {}
        self._dense_on: dict[str, nn.Module] = {}
        self._bn_models = _LRU(2)
        self._latency = _LRU(256)
        self._realized = _LRU(32)
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
            times = []
            with torch.inference_mode():
                model(x[:2])  # warm-up
                for _ in range(3):  # the fastest of three: robust to a momentarily busy CPU
                    start = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - start)
            per_image = min(times) / len(x)
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
        rows = result.stats.set_index("name")
        if layer not in rows.index:
            raise KeyError(f"layer '{layer}' is not compressed by this setting")
        key = (layer, bins)
        if key not in self._bins:
            self._bins[key] = _LayerBins(self.engine.original_weight(layer), bins)
        data = self._bins[key]
        row = rows.loc[layer]
        numel, kept, n_high = int(row["numel"]), int(row["kept"]), int(row["n_high"])
        p, h = numel - kept, numel - n_high
        quantized = result.config.quantized
        theta = None
        if quantized:
            theta = float(row["theta"]) if math.isfinite(row["theta"]) else (
                float(data.sorted_abs[h]) if h < numel else float(row["max_abs"]))
        return HistogramData(layer, data.edges.numpy(), data.counts(0, p), data.counts(p, h), data.counts(h, numel),
                             float(row["beta"]), theta, float(row["max_abs"]), quantized, numel)

    def _record_move(self, result: CompressionResult) -> None:
        config = result.config
        if config == self._last_config:
            return
        move = Move(result.switches, result.t_switch_s, result.changed, result.update_s,
                    _theta_part(config) != _theta_part(self._last_config), self._last_config, config)
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
        return ExploreView(result, histogram, latency, quick, quick_dense, full, full_dense, full_dense_source,
                           deviation, self.last_move, self.last_theta_move, timings, notes, available, realized)


def fmt_bytes(n: float) -> str:
    """Bytes as KiB/MiB text."""
    if n >= 2 ** 20:
        return f"{n / 2 ** 20:.2f} MiB"
    return f"{n / 1024:.1f} KiB"


# ---------------------------------------------------------------- CLI: the slider-update latency

def measure_updates(key: str, moves: int = 40, *, quick_per_class: int | None = None,
                    batch: int = 1, theta_every: int = 4, seed: int = 0) -> tuple[pd.DataFrame, int]:
    """Replay ``moves`` slider moves (τ steps of ±0.01, every ``theta_every``-th a θ step) through
    :meth:`ExploreSession.update` as the Explore page does; one row of timings (ms) per move.

    ``quick_per_class`` None: the page's default for this model on this machine. Returns the
    timings and the quick-estimate size used."""
    import random

    from core.catalog import load_choice

    session = ExploreSession(load_choice(key))
    if quick_per_class is None:
        quick_per_class = session.default_quick_per_class() if session.evaluates_cifar else 0
    rng = random.Random(seed)
    tau, theta = 0.2, 0.3
    request = ExploreRequest(CompressionConfig(tau=tau, theta=theta), layer=session.largest_layer(),
                             latency_batch=batch, quick_per_class=quick_per_class)
    session.update(request)  # the page's first load (engine, data, dense references): not a slider move
    rows = []
    for i in range(moves):
        if theta_every and i % theta_every == theta_every - 1:
            theta = round(min(0.9, max(0.05, theta + rng.choice((-0.01, 0.01)))), 2)
        else:
            tau = round(min(0.6, max(0.0, tau + rng.choice((-0.01, 0.01, 0.02)))), 2)
        request = ExploreRequest(CompressionConfig(tau=tau, theta=theta), layer=request.layer,
                                 latency_batch=batch, quick_per_class=quick_per_class)
        view = session.update(request)
        rows.append({"move": i + 1, "tau": tau, "theta": theta, **{k: 1e3 * v for k, v in view.timings.items()}})
    return pd.DataFrame(rows), quick_per_class


def main(argv: list[str] | None = None) -> int:
    import argparse

    from core.catalog import model_choices

    parser = argparse.ArgumentParser(prog="python -m core.explore",
                                     description="Time the Explore page's update path for a series of slider moves.")
    parser.add_argument("model", nargs="?", default=None,
                        help="picker key, e.g. pretrained:resnet20 (default: the app's default model)")
    parser.add_argument("--moves", type=int, default=40)
    parser.add_argument("--per-class", type=int, default=None,
                        help="quick-estimate images per class (default: the page's default for the model)")
    parser.add_argument("--batch", type=int, default=1, help="latency batch size")
    args = parser.parse_args(argv)
    threads = configure_threads()
    key = args.model or model_choices()[0].key
    frame, per_class = measure_updates(key, args.moves, quick_per_class=args.per_class, batch=args.batch)
    total = frame["total"].sort_values().to_numpy()
    p95 = total[min(len(total) - 1, int(round(0.95 * (len(total) - 1))))]
    print(f"{key}: {len(frame)} slider moves, torch threads {threads}, quick estimate {10 * per_class} images, "
          f"latency batch {args.batch}")
    print(frame.drop(columns=["move", "tau", "theta"]).describe(percentiles=[0.5, 0.95]).round(1).to_string())
    print(f"update (server-side compute) p50 {np.median(total):.0f} ms, p95 {p95:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
