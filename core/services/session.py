"""The computation behind the explorer's live view (no Streamlit here).

One :class:`ExploreSession` per user session wraps a :class:`core.method.engine.Engine` over a
model that may be shared by every session of the server (read-only). Its work comes in two
kinds:

* **fast**, every slider move, never queued: :meth:`ExploreSession.update` applies the
  setting (the engine's incremental step, milliseconds), splits the selected layer's
  histogram, and collects whatever heavier figures are already known for this setting;
* **heavy**, queued on the process-wide :data:`core.services.compute_queue.COMPUTE` so that
  sessions take turns: one batch of the progressive paired accuracy
  (:meth:`ExploreSession.refine_accuracy`), the latency of dense vs compressed
  (:meth:`ExploreSession.latency`, in a quiet moment or marked as disturbed), the full-test
  accuracy, the output deviation (models without labelled data), BN recalibration and the
  realized savings.

The data is CIFAR-10 (its test set; BN recalibration on augmented training images) unless the
user gives images (:meth:`ExploreSession.use_data`): labelled ones replace the test set (the
paired estimate, the full accuracy and BN recalibration all run on them), unlabelled ones
replace the output deviation by fidelity to the dense model (top-1 agreement, mean KL).

What does not depend on the session is shared by all of them: the engine's ranked weights
(:func:`shared_snapshot`), the histogram bins, the dense predictions and every setting's
predictions (:mod:`core.services.estimates`), and measured latencies, full-test accuracies
and realized savings (process-wide caches). A session holds its engine's working buffer,
its current result (which *is* that buffer: ``lend_buffers=True``) and up to two
BN-recalibrated copies.
"""
from __future__ import annotations

import copy
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace
from functools import lru_cache

import torch
from torch import nn

from core.common.lru import LRUCache
from core.common.memory import process_rss_bytes, trim_heap
from core.measure.accuracy import (
    AccuracyReport,
    bn_recalibrate,
    calibration_images,
    eval_data,
    evaluate,
    has_batchnorm,
)
from core.measure.accuracy import EvalData
from core.measure.fidelity import Fidelity, fidelity
from core.measure.latency import LatencyReport, measure_latency, output_deviation
from core.measure.paired import PairedEstimate
from core.measure.realized import RealizedSavings, measure_realized
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult, Engine
from core.method.snapshot import WeightSnapshot
from core.services import estimates
from core.services.choices import LoadedModel
from core.services.compute_queue import COMPUTE, QueueState
from core.services.histogram import HIST_BINS, HistogramData, LayerBins
from core.workloads.data import CLASSES
from core.workloads.image_folder import ImageSet, for_model

LATENCY_BATCHES: tuple[int, ...] = (1, 16, 64)
#: how far the accuracy refines on its own after a slider move: half-width of the paired 95 % interval
ACCURACY_TARGETS: tuple[float, ...] = (0.05, 0.02, 0.01, 0.005, 0.0)  # 0: every test image
DEFAULT_ACCURACY_TARGET = 0.01
#: the issue's update budgets (p95, server side): ResNet-20-sized models 0.3 s, ResNet-18-sized 1 s
SMALL_MODEL_PARAMS = 2_000_000
CALIBRATION_IMAGES = 512
OUTPUT_CHECK_BATCH = 256
FIDELITY_IMAGES = 256  # unlabelled images the fidelity to the dense model is measured on
LATENCY_QUIET_WAIT_S = 1.0  # how long a latency measurement waits for the other jobs to finish
REALIZED_BUDGET_S = 0.05  # timing effort per layer and kernel when measuring the execution paths

#: full-test accuracies and output deviations, keyed by (model key, kind, config or None for dense, BN, device)
ACCURACY_CACHE = LRUCache(4096)
#: latencies measured in a quiet moment, keyed by (model key, config, batch, device); disturbed ones are not kept
LATENCY_CACHE = LRUCache(1024)
#: realized savings, keyed by (model key, config, batch, device)
REALIZED_CACHE = LRUCache(64)
_BINS = LRUCache(64)  # (model key, layer, bins) -> LayerBins
_SNAPSHOTS: "weakref.WeakValueDictionary[str, WeightSnapshot]" = weakref.WeakValueDictionary()
_SNAPSHOTS_LOCK = threading.Lock()


def clear_caches() -> None:
    for cache in (ACCURACY_CACHE, LATENCY_CACHE, REALIZED_CACHE, _BINS):
        cache.clear()
    estimates.clear()
    _calibration.cache_clear()


def shared_snapshot(loaded: LoadedModel) -> WeightSnapshot:
    """The ranked weights of ``loaded``'s model, built once per process while any session uses them."""
    with _SNAPSHOTS_LOCK:
        snapshot = _SNAPSHOTS.get(loaded.key)
        if snapshot is None:
            snapshot = WeightSnapshot(loaded.model, example_input=loaded.example_input(1))
            _SNAPSHOTS[loaded.key] = snapshot
        return snapshot


@lru_cache(maxsize=2)
def _calibration(n: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return calibration_images(n, mean=mean, std=std)


# ---------------------------------------------------------------- requests and views

@dataclass(frozen=True, kw_only=True)
class ExploreRequest:
    """What the explorer shows for one state of the controls."""

    config: CompressionConfig
    layer: str | None = None
    bins: int = HIST_BINS
    latency_batch: int = 1
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
    """What the Explore page draws at once for one request: the engine's figures, and heavier ones already known.

    ``latency``, ``estimate``, ``full``, ``deviation`` and ``realized`` are ``None`` until
    measured for this setting (by this session or any other).
    """

    result: CompressionResult
    histogram: HistogramData
    latency: LatencyReport | None
    estimate: PairedEstimate | None
    full: AccuracyReport | None
    full_dense: AccuracyReport | None
    full_dense_source: str
    deviation: float | None
    last_move: Move | None
    last_theta_move: Move | None
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    accuracy_available: bool = False  # the model has labelled data here (CIFAR-10 found and readable, or the user's)
    realized: RealizedSavings | None = None
    fidelity: Fidelity | None = None  # unlabelled user images: agreement and KL to the dense model, when measured


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """Bytes, by whom they are held. ``process_rss`` is the whole server process (every session, PyTorch itself)."""

    model: int  # the model's own parameters and buffers (fp32), the dense one as loaded
    session: int  # this session alone: the engine's working buffer (= the current result's weights), BN copies
    shared: int  # held once for every session on this model: ranked weights, rank orders, chunks
    process_rss: int


def _theta_part(config: CompressionConfig | None):
    if config is None:
        return None
    return (config.theta, config.theta_mode, config.b_low, config.b_high)


def _module_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


class ExploreSession:
    """Per-user explorer state: an engine over the shared snapshot, the last moves and BN-recalibrated copies."""

    def __init__(self, loaded: LoadedModel, device: str = "cpu"):
        self.loaded = loaded
        self.device = device
        self.engine = Engine.sharing(shared_snapshot(loaded), lend_buffers=True)
        self._dense_on: dict[str, nn.Module] = {}
        self._bn_models = LRUCache(2)
        self._last_config: CompressionConfig | None = None
        self.last_move: Move | None = None
        self.last_theta_move: Move | None = None
        self._lock = threading.RLock()
        self._has_bn = has_batchnorm(loaded.model)
        self.params = sum(p.numel() for p in loaded.model.parameters())
        self.data: ImageSet | None = None  # the user's images, labels mapped to the model's outputs
        self.data_warnings: list[str] = []
        self._data_given: str | None = None  # the key of the set last given to use_data
        weakref.finalize(self, trim_heap)  # a closed tab's buffers go back to the OS, not only to the allocator

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

    @property
    def has_labels(self) -> bool:
        """Accuracy can be measured: labelled user images, or (without user images) a CIFAR-10 model."""
        return self.data.labelled if self.data is not None else self.evaluates_cifar

    @property
    def data_key(self) -> str:
        return self.data.key if self.data is not None else "default"

    def data_label(self) -> str:
        """What the accuracy is measured on, in words."""
        if self.data is not None:
            return f"your images ({len(self.data):,}, {self.data.source})"
        return "the CIFAR-10 test set (JPEG copy)"

    def num_outputs(self) -> int:
        """The model's number of outputs (classes), from one forward pass of the example input."""
        with torch.inference_mode():
            return int(self.loaded.model(self.loaded.example_input(1)).shape[-1])

    def use_data(self, images: ImageSet | None) -> list[str]:
        """Measure on ``images`` from now on (None: back to the default data); returns warnings (sentences).

        Class folders are mapped to the model's outputs (:func:`core.workloads.image_folder.for_model`);
        BN-recalibrated copies made on other data are dropped. The set last given is kept as is.
        """
        with self._lock:
            given = None if images is None else images.key
            if given == self._data_given:
                return self.data_warnings
            if images is None:
                self.data, self.data_warnings = None, []
            else:
                categories = self.loaded.categories or (CLASSES if self.evaluates_cifar else ())
                self.data, self.data_warnings = for_model(images, categories, self.num_outputs())
            self._data_given = given
            self._bn_models = LRUCache(2)
            return self.data_warnings

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

    def largest_layer(self) -> str:
        return max(self.engine.layer_names, key=lambda n: self.engine.snapshot.layer(n).numel)

    def queue_state(self) -> QueueState:
        """How busy the shared compute queue is (the page says when it waits for it)."""
        return COMPUTE.state()

    def memory(self) -> MemoryReport:
        bn_bytes = sum(_module_bytes(m) for m in self._bn_models.values())
        return MemoryReport(model=_module_bytes(self.loaded.model), session=self.engine.working_bytes() + bn_bytes,
                            shared=self.engine.snapshot.nbytes, process_rss=process_rss_bytes())

    # -------------------------------------------------------- fast: every slider move

    def dense_model(self, device: str) -> nn.Module:
        """The dense model on ``device``: the shared model itself on CPU (only run, never changed), a private copy elsewhere."""
        if device == "cpu":
            return self.loaded.model
        if device not in self._dense_on:
            with torch.no_grad():
                self._dense_on[device] = copy.deepcopy(self.loaded.model).to(device).eval()
        return self._dense_on[device]

    def histogram(self, result: CompressionResult, layer: str, bins: int = HIST_BINS) -> HistogramData:
        """The layer's histogram under ``result`` (bins fixed per layer: ±max|W|; shared by every session)."""
        ranked = self.engine.snapshot.layer(layer).ranked
        layer_bins = _BINS.get_or_create((self.key, layer, bins), lambda: LayerBins.from_ranked(ranked, bins))
        return layer_bins.split(result, layer)

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

    def update(self, request: ExploreRequest) -> ExploreView:
        """The fast part of a slider move, and the heavier figures already known for the setting (no inference)."""
        timings: dict[str, float] = {}
        notes: list[str] = []
        t = time.perf_counter()
        result = self.apply(request.config)
        timings["engine"] = time.perf_counter() - t
        t = time.perf_counter()
        names = set(result.stats["name"])
        layer = request.layer if request.layer in names else result.stats["name"].iloc[0]
        histogram = self.histogram(result, layer, request.bins)
        timings["histogram"] = time.perf_counter() - t
        bn = self._bn_applies(request.bn_recalibrate)
        if request.bn_recalibrate and not self._has_bn:
            notes.append("This model has no BatchNorm layer: BN recalibration does not apply.")
        full = full_dense = None
        full_dense_source = ""
        estimate = deviation = None
        available = False
        found_fidelity = None
        if self.has_labels:
            try:
                estimate = self.accuracy_estimate(result, bn, request.device)
                available = True
            except (OSError, RuntimeError) as err:  # DataError is a RuntimeError: the data is missing or damaged
                notes.append(f"{'CIFAR-10 a' if self.data is None else 'A'}ccuracy unavailable: {err}")
            full = self.cached_full(request.config, bn, request.device)
            full_dense, full_dense_source = self.dense_full_reference(request.device)
        elif self.data is not None:
            found_fidelity = ACCURACY_CACHE.get(self._accuracy_key("fidelity", request.config, False, request.device))
        else:
            deviation = ACCURACY_CACHE.get(self._accuracy_key("deviation", request.config, False, request.device))
        timings["total"] = sum(timings.values())
        return ExploreView(
            result=result, histogram=histogram,
            latency=LATENCY_CACHE.get((self.key, request.config, request.latency_batch, request.device)),
            estimate=estimate, full=full, full_dense=full_dense, full_dense_source=full_dense_source,
            deviation=deviation, last_move=self.last_move, last_theta_move=self.last_theta_move, timings=timings,
            notes=notes, accuracy_available=available, fidelity=found_fidelity,
            realized=REALIZED_CACHE.get((self.key, request.config, request.latency_batch, request.device)))

    # -------------------------------------------------------- heavy: queued, shared, cached

    def _bn_applies(self, bn: bool) -> bool:
        return bool(bn and self._has_bn and (self.evaluates_cifar or self.data is not None))

    def _calibration_images(self) -> torch.Tensor:
        if self.data is not None:
            return self.data.images[:CALIBRATION_IMAGES]
        return _calibration(CALIBRATION_IMAGES, self.loaded.mean, self.loaded.std)

    def inference_model(self, result: CompressionResult, bn: bool) -> nn.Module:
        """The compressed model for accuracy: ``result.model``, BN-recalibrated when asked (cached per setting).

        Recalibrating runs the model on training images: call it inside a queued job.
        """
        if not self._bn_applies(bn):
            return result.model
        cached = self._bn_models.get(result.config)
        if cached is None:
            cached = bn_recalibrate(result.model, self._calibration_images())
            self._bn_models.put(result.config, cached)
        return cached

    def _accuracy_key(self, kind: str, config: CompressionConfig | None, bn: bool, device: str) -> tuple:
        return (self.key, self.data_key, kind, config, bool(self._bn_applies(bn) and config is not None), device)

    def evaluation_set(self) -> estimates.EvaluationSet:
        """The labelled images of the paired estimate: the user's (key from their digest), else CIFAR-10's test set."""
        if self.data is not None and self.data.labelled:
            return estimates.image_set(self.data)
        return estimates.cifar_test_set(tuple(self.loaded.mean), tuple(self.loaded.std))

    def accuracy_estimate(self, result: CompressionResult, bn: bool, device: str) -> PairedEstimate | None:
        """The paired estimate known for this setting (from any session), without computing."""
        return estimates.current(self.key, self.evaluation_set(), result.config, self._bn_applies(bn), device)

    def refine_accuracy(self, result: CompressionResult, bn: bool, device: str,
                        poll: Callable[[], object] | None = None) -> PairedEstimate:
        """One queued refinement step of the paired estimate (about ``estimates.BATCH_TARGET_S`` of inference).

        ``poll`` is called while the job waits for its turn (see :meth:`ComputeQueue.job`).
        """
        data = self.evaluation_set()
        bn = self._bn_applies(bn)
        with COMPUTE.job(poll):
            return estimates.refine(self.key, data, result.config, bn, device, self.dense_model(device),
                                    lambda: self.inference_model(result, bn).to(device))

    def cached_full(self, config: CompressionConfig | None, bn: bool, device: str) -> AccuracyReport | None:
        return ACCURACY_CACHE.get(self._accuracy_key("full", config, bn, device))

    def full_accuracy(self, result: CompressionResult | None, bn: bool, device: str) -> AccuracyReport:
        """Accuracy on all 10,000 test images in fp32 (seconds to tens of seconds; queued; cached)."""
        config = None if result is None else result.config
        key = self._accuracy_key("full", config, bn, device)
        cached = ACCURACY_CACHE.get(key)
        if cached is not None:
            return cached
        if self.data is not None and self.data.labelled:
            data = EvalData(self.data.images, self.data.labels, "user")
        else:
            data = eval_data("test", self.loaded.mean, self.loaded.std)
        with COMPUTE.job():
            model = self.dense_model(device) if result is None else self.inference_model(result, bn).to(device)
            report = evaluate(model, data, device=device)
        ACCURACY_CACHE.put(key, report)
        return report

    def dense_full_reference(self, device: str) -> tuple[AccuracyReport | None, str]:
        """The dense full-test accuracy if known: measured here (cached) or from the checkpoint's card."""
        measured = self.cached_full(None, False, device)
        if measured is not None:
            return measured, f"measured here on all {measured.n:,} {'test ' if self.data is None else ''}images"
        card = self.loaded.card if self.data is None else None
        accuracy = (card or {}).get("test_accuracy")
        if isinstance(accuracy, (int, float)):
            return AccuracyReport(float(accuracy), (), 10_000, 0.0), "from the checkpoint's card (measured when it was trained)"
        return None, ""

    def deviation(self, result: CompressionResult, device: str) -> float:
        """‖f_c(x) − f(x)‖ / ‖f(x)‖ on fixed Gaussian inputs, for models without labelled data (queued; cached)."""
        key = self._accuracy_key("deviation", result.config, False, device)
        cached = ACCURACY_CACHE.get(key)
        if cached is None:  # 256 inputs at 32 px; as many pixels in all at larger sizes (at least 8 inputs)
            batch = OUTPUT_CHECK_BATCH if self.loaded.input_kind == "vector" else max(
                8, OUTPUT_CHECK_BATCH * 32 * 32 // self.loaded.image_size ** 2)
            inputs = self.loaded.example_input(min(OUTPUT_CHECK_BATCH, batch), seed=1).to(device)
            with COMPUTE.job():
                cached = output_deviation(self.dense_model(device), result.model.to(device), inputs)
            ACCURACY_CACHE.put(key, cached)
        return cached

    def fidelity(self, result: CompressionResult, device: str) -> Fidelity:
        """Top-1 agreement and mean KL to the dense model on up to 256 of the user's unlabelled images.

        Queued; cached per model, images, setting and device.
        """
        if self.data is None:
            raise ValueError("fidelity is measured on your images: give a folder of images first")
        key = self._accuracy_key("fidelity", result.config, False, device)
        cached = ACCURACY_CACHE.get(key)
        if cached is None:
            with COMPUTE.job():
                cached = fidelity(self.dense_model(device), result.model.to(device),
                                  self.data.images[:FIDELITY_IMAGES], device=device)
            ACCURACY_CACHE.put(key, cached)
        return cached

    def latency(self, result: CompressionResult, batch: int, device: str, budget_s: float = 0.03,
                poll: Callable[[], object] | None = None) -> LatencyReport:
        """Dense vs compressed latency, interleaved in one go, one thread, in a quiet moment if one comes.

        Kept for every session only when undisturbed: the queue was ours alone and this thread got
        the CPU for the timed calls (:attr:`LatencyReport.disturbed`). A disturbed reading is
        returned (the page marks it) but not cached, so the next view measures again.
        """
        key = (self.key, result.config, batch, device)
        cached = LATENCY_CACHE.get(key)
        if cached is not None:
            return cached
        example = self.loaded.example_input(batch)
        with COMPUTE.exclusive(timeout_s=LATENCY_QUIET_WAIT_S, threads=1, poll=poll) as ticket:
            report = measure_latency(self.dense_model(device), result.model.to(device), example,
                                     budget_s=budget_s, device=device)
        report = dataclasses_replace(report, quiet=ticket.exclusive and not report.disturbed)
        if report.quiet:
            LATENCY_CACHE.put(key, report)
        return report

    def cached_realized(self, config: CompressionConfig, batch: int, device: str) -> RealizedSavings | None:
        return REALIZED_CACHE.get((self.key, config, batch, device))

    def realized(self, result: CompressionResult, batch: int, device: str) -> RealizedSavings:
        """Measured packed-file size and per-path latency of ``result`` at ``batch`` (seconds; queued; cached).

        BN recalibration changes neither: it re-estimates statistics, not weights or shapes.
        """
        key = (self.key, result.config, batch, device)
        cached = REALIZED_CACHE.get(key)
        if cached is None:
            with COMPUTE.exclusive(timeout_s=LATENCY_QUIET_WAIT_S, threads=1):
                cached = measure_realized(result, self.loaded.example_input(1).to(device), arch=self.loaded.arch,
                                          arch_kwargs=self.loaded.arch_kwargs, batch_size=batch,
                                          budget_s=REALIZED_BUDGET_S)
            REALIZED_CACHE.put(key, cached)
        return cached
