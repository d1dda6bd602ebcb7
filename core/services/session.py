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
  realized savings;
* **repairs** above BN recalibration (bias correction, reconstruction: :mod:`core.services.repairs`),
  tens of seconds on ResNet-18: a cancellable :class:`core.services.repairs.RepairJob` in a worker
  thread, itself a queued job, started by :meth:`ExploreSession.start_repair` and released by the
  next slider move (:meth:`ExploreSession.update`) or :meth:`ExploreSession.stop_repair`.

The data is CIFAR-10 (its test set; every repair, BN recalibration included, on augmented
training images) unless the user gives images (:meth:`ExploreSession.use_data`): labelled ones
replace the test set (the paired estimate and the full accuracy run on them), unlabelled ones
replace the output deviation by fidelity to the dense model (top-1 agreement, mean KL). The
user's images are never calibration images: they are what the repair is measured on, so a
model without a training split here (not a CIFAR-10 model) offers no repair
(:meth:`ExploreSession.repair_unavailable` says why).

What does not depend on the session is shared by all of them: the engine's rank orders and chunks
(:func:`shared_snapshot`, which reads the model's own weights), the histogram bins, the dense predictions and every setting's
predictions (:mod:`core.services.estimates`), and measured latencies, full-test accuracies
and realized savings (process-wide caches), and repaired models (:data:`core.services.repairs.REPAIR_CACHE`).
A session holds its engine's working buffer, its current result (which *is* that buffer:
``lend_buffers=True``) and up to two BN-recalibrated copies.

Every accuracy figure is kept per *repair level* (``"none"``, ``"bn"``, ``"bias"``,
``"reconstruct"``; the old boolean BN flag is accepted wherever a level is: True is ``"bn"``),
so turning a repair off shows the unrepaired figures again, unchanged. Repairs never change
the shared model, the engine's snapshot or a result: they run on private copies.
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
from core.measure.repair import RepairResult, bit_widths, estimate_seconds
from core.measure.repair import repair as run_repair
from core.measure.realized import RealizedSavings, measure_realized
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult, Engine
from core.method.snapshot import WeightSnapshot
from core.services import estimates, repairs
from core.services.choices import LoadedModel
from core.services.compute_queue import COMPUTE, QueueState
from core.services.histogram import HIST_BINS, HistogramData, LayerBins
from core.services.repairs import JOB_LEVELS, LABELS as REPAIR_LABELS, REPAIR_CACHE, RepairJob, check_level, level_of
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
    repairs.clear()
    _calibration.cache_clear()


def shared_snapshot(loaded: LoadedModel) -> WeightSnapshot:
    """The rank orders and chunks of ``loaded``'s model, built once per process while any session uses them."""
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
    bn_recalibrate: bool = False  # the explorer's old flag: True asks for the "bn" level when ``repair`` is "none"
    repair: str = "none"  # a level of core.services.repairs.LEVELS
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_level(self.repair)

    @property
    def level(self) -> str:
        """The repair level asked for: ``repair``, or ``"bn"`` from the old flag."""
        return self.repair if self.repair != "none" else level_of(bool(self.bn_recalibrate))


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
    repair_level: str = "none"  # the repair level the accuracy figures are for (what was asked, if it applies)
    repair: RepairResult | None = None  # the finished repair of this setting at a job level, when known
    repair_estimate_s: float | None = None  # its time estimate, when made


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """Bytes, by whom they are held. ``process_rss`` is the whole server process (every session, PyTorch itself)."""

    model: int  # the model's own parameters and buffers (fp32), the dense one as loaded
    session: int  # this session alone: the engine's working buffer (= the current result's weights), BN copies
    shared: int  # held once for every session on this model: rank orders, chunks, repaired models
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
        self._repaired_on = LRUCache(1)  # (repair key, device) -> a private copy of a shared repaired model
        self._repair_job: RepairJob | None = None  # the repair this session waits for
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
        """Counted bytes; repaired models of this model (shared by every session) count as shared."""
        own = sum(_module_bytes(m) for m in self._bn_models.values() + self._repaired_on.values())
        repaired = sum(_module_bytes(r.model) for key, r in REPAIR_CACHE.items() if key[0] == self.key)
        return MemoryReport(model=_module_bytes(self.loaded.model), session=self.engine.working_bytes() + own,
                            shared=self.engine.snapshot.nbytes + repaired, process_rss=process_rss_bytes())

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
        ranked = self.engine.snapshot.layer(layer)
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
        asked = request.level
        level = self.applied_level(asked)
        if level != asked:
            notes.append(f"Repair '{REPAIR_LABELS[asked]}' does not apply here: "
                         f"{self.repair_unavailable().get(asked, '')} The figures are without it.")
        repair_key = self.repair_key(request.config, level) if level in JOB_LEVELS else None
        self.release_repair(keep=repair_key)  # a slider move cancels the repair of the setting before
        repaired = REPAIR_CACHE.get(repair_key) if repair_key is not None else None
        full = full_dense = None
        full_dense_source = ""
        estimate = deviation = None
        available = False
        found_fidelity = None
        if self.has_labels:
            try:
                estimate = self.accuracy_estimate(result, level, request.device)
                available = True
            except (OSError, RuntimeError) as err:  # DataError is a RuntimeError: the data is missing or damaged
                notes.append(f"{'CIFAR-10 a' if self.data is None else 'A'}ccuracy unavailable: {err}")
            full = self.cached_full(request.config, level, request.device)
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
            realized=REALIZED_CACHE.get((self.key, request.config, request.latency_batch, request.device)),
            repair_level=level, repair=repaired,
            repair_estimate_s=repairs.ESTIMATE_CACHE.get(repair_key) if repair_key is not None else None)

    # -------------------------------------------------------- heavy: queued, shared, cached

    def _calibration_images(self) -> torch.Tensor:
        """BN recalibration's images: augmented CIFAR-10 *training* images (never the evaluation images)."""
        if not self.evaluates_cifar:
            raise ValueError(self.repair_unavailable().get("bn") or "this model has no calibration images here")
        return _calibration(CALIBRATION_IMAGES, self.loaded.mean, self.loaded.std)

    # -------------------------------------------------------- repair levels

    def repair_unavailable(self) -> dict[str, str]:
        """Why each repair level that does not apply here does not (a sentence per level); others apply.

        * every level above ``"none"`` needs labelled images to show its effect on;
        * every one needs unlabelled calibration images that are not the images the accuracy is
          measured on: the CIFAR-10 training split, so only CIFAR-10 models (also when the user's
          images replace the test set); the user's images are never used to repair;
        * ``"bn"`` needs a BatchNorm layer.
        """
        if not self.has_labels:
            why = ("repair changes the accuracy figures, and there are no labelled images to measure them on here"
                   + (" (your images have no class folders)." if self.data is not None else "."))
            return {level: why for level in repairs.LEVELS[1:]}
        if not self.evaluates_cifar:
            why = ("repair fits the model on unlabelled calibration images, which must not be the images its "
                   "accuracy is measured on. For CIFAR-10 models they come from the CIFAR-10 training split; this "
                   "model has no training images here (your images are its evaluation set).")
            return {level: why for level in repairs.LEVELS[1:]}
        reasons = {}
        if not self._has_bn:
            reasons["bn"] = "this model has no BatchNorm layer, so there are no statistics to recalibrate."
        return reasons

    def repair_levels(self) -> list[str]:
        """The repair levels that apply to this model and data, ``"none"`` first."""
        unavailable = self.repair_unavailable()
        return [level for level in repairs.LEVELS if level not in unavailable]

    def applied_level(self, repair: bool | str | None) -> str:
        """The level the figures are for when ``repair`` is asked: it, or ``"none"`` where it does not apply."""
        level = level_of(repair)
        return level if level in self.repair_levels() else "none"

    def _variant(self, level: str) -> object:
        """How a level keys the shared prediction stores and accuracies (False / True: as before the levels)."""
        if level in JOB_LEVELS:
            return ("repair", repairs.repair_config(level))
        return level == "bn"

    def repair_key(self, config: CompressionConfig, level: str) -> tuple:
        """The process-wide key of a repair: (model, setting, :class:`RepairConfig`)."""
        return (self.key, config, repairs.repair_config(level))

    def cached_repair(self, config: CompressionConfig, level: str) -> RepairResult | None:
        """The finished repair of ``config`` at ``level`` if any session made it (and it is still cached)."""
        return REPAIR_CACHE.get(self.repair_key(config, level)) if level in JOB_LEVELS else None

    def _check_job_level(self, level: str) -> str:
        level = check_level(level)
        if level not in JOB_LEVELS:
            raise ValueError(f"repair level {level!r} runs no repair job "
                             f"(the levels with one: {', '.join(JOB_LEVELS)})")
        reason = self.repair_unavailable().get(level)
        if reason is not None:
            raise ValueError(f"{REPAIR_LABELS[level]} does not apply here: {reason}")
        return level

    def _repair(self, result: CompressionResult, level: str, *, queued: bool,
                on_progress: Callable[[int, int, str], None] | None = None,
                cancel: Callable[[], bool] | None = None,
                poll: Callable[[], object] | None = None) -> RepairResult:
        """Repair ``result`` at ``level`` on private copies of the dense and the compressed model.

        ``queued``: take a turn on the compute queue (``poll`` while waiting); False inside a job already.
        """
        config = repairs.repair_config(level)

        def work() -> RepairResult:
            fit, held = repairs.calibration(config.n_images, config.n_holdout, config.seed,
                                            tuple(self.loaded.mean), tuple(self.loaded.std))
            with torch.no_grad():  # private copies: the repair runs and hooks both models' modules
                dense = copy.deepcopy(self.loaded.model).cpu().eval()
                pruned = copy.deepcopy(result.model).cpu().eval()
            quant = bit_widths(self.engine, result) if result.config.quantized else None
            return run_repair(dense, pruned, fit, config, holdout=held, quant=quant,
                              on_progress=on_progress, cancel=cancel)

        if not queued:
            return work()
        with COMPUTE.job(poll):
            return work()

    def repair(self, result: CompressionResult, level: str, *,
               on_progress: Callable[[int, int, str], None] | None = None,
               cancel: threading.Event | Callable[[], bool] | None = None,
               poll: Callable[[], object] | None = None) -> RepairResult:
        """The repair of ``result`` at ``level`` (``"bias"`` or ``"reconstruct"``), in the calling thread.

        From :data:`REPAIR_CACHE` if made before, else made now as one queued job and cached.
        ``cancel`` (an Event or a callable) stops it before the next layer
        (:class:`core.measure.repair.RepairCancelled`; nothing is cached).
        """
        level = self._check_job_level(level)
        key = self.repair_key(result.config, level)
        cached = REPAIR_CACHE.get(key)
        if cached is None:
            stop = cancel.is_set if isinstance(cancel, threading.Event) else cancel
            cached = self._repair(result, level, queued=True, on_progress=on_progress, cancel=stop, poll=poll)
            REPAIR_CACHE.put(key, cached)
        return cached

    def repair_estimate(self, result: CompressionResult, level: str,
                        poll: Callable[[], object] | None = None) -> float:
        """Estimated seconds of the repair, before it starts (:func:`core.measure.repair.estimate_seconds`).

        A queued job (it times a few forward passes on a private copy); cached per repair key.
        """
        level = self._check_job_level(level)
        key = self.repair_key(result.config, level)
        cached = repairs.ESTIMATE_CACHE.get(key)
        if cached is None:
            with COMPUTE.job(poll):
                with torch.no_grad():
                    model = copy.deepcopy(result.model).cpu()
                cached = estimate_seconds(model, repairs.repair_config(level),
                                          quantized=result.config.quantized and level == "reconstruct",
                                          input_shape=tuple(self.loaded.example_input(1).shape[1:]))
            repairs.ESTIMATE_CACHE.put(key, cached)
        return cached

    def start_repair(self, result: CompressionResult, level: str) -> RepairJob:
        """Start the repair of ``result`` at ``level`` in a worker thread, or join the one running.

        The job takes its turn on the compute queue, reports per layer (``job.done`` of
        ``job.total``) and is cancelled by the next slider move (:meth:`update` with another
        setting or level), by :meth:`stop_repair`, or after nobody watched it for a while
        (:data:`core.services.repairs.UNWATCHED_GRACE_S`). When it ends, ``job.result`` is cached
        for every session. Check :meth:`cached_repair` first: a finished repair is not re-run.
        """
        level = self._check_job_level(level)
        key = self.repair_key(result.config, level)

        def work(job: RepairJob) -> RepairResult:
            return self._repair(result, level, queued=True, on_progress=job.progress,
                                cancel=lambda: job.cancelled, poll=job.check)

        job = repairs.submit(key, work, id(self), repairs.ESTIMATE_CACHE.get(key))
        with self._lock:
            previous, self._repair_job = self._repair_job, job
        if previous is not None and previous is not job:
            previous.unwatch(id(self), now=True)
        return job

    def release_repair(self, keep: tuple | None = None) -> None:
        """Stop waiting for this session's repair unless it is ``keep``'s; nobody else waiting: it is cancelled."""
        with self._lock:
            job = self._repair_job
            if job is None or (keep is not None and job.key == keep and not job.finished):
                return
            self._repair_job = None  # a finished job is dropped too: its result lives in the cache
        if not job.finished:
            job.unwatch(id(self), now=True)

    def stop_repair(self) -> None:
        """The user's Stop: this session no longer waits for its repair (cancelled unless another session waits)."""
        self.release_repair()

    def leave_repair(self, job: RepairJob) -> None:
        """The page stopped waiting for ``job`` (interrupted): it keeps running for a short grace period."""
        job.unwatch(id(self))

    # -------------------------------------------------------- models for inference

    def _shared_on(self, key: tuple, model: nn.Module, device: str) -> nn.Module:
        """A shared (read-only) model on ``device``: itself on CPU, a private copy elsewhere (never moved)."""
        if device == "cpu":
            return model
        found = self._repaired_on.get((key, device))
        if found is None:
            with torch.no_grad():
                found = copy.deepcopy(model).to(device).eval()
            self._repaired_on.put((key, device), found)
        return found

    def inference_model(self, result: CompressionResult, bn: bool | str) -> nn.Module:
        """The compressed model for accuracy at repair level ``bn`` (a level, or the old BN flag).

        ``"none"``: ``result.model``. ``"bn"``: BN-recalibrated (a per-session copy, cached per
        setting). ``"bias"``/``"reconstruct"``: the shared repaired model (run it, never change it),
        repaired now inside the caller's queued job if no session has it cached.
        Recalibrating or repairing runs the model on training images: call it inside a queued job.
        """
        level = self.applied_level(bn)
        if level == "none":
            return result.model
        if level in JOB_LEVELS:
            key = self.repair_key(result.config, level)
            cached = REPAIR_CACHE.get(key)
            if cached is None:
                cached = self._repair(result, level, queued=False)
                REPAIR_CACHE.put(key, cached)
            return cached.model
        cached = self._bn_models.get(result.config)
        if cached is None:
            cached = bn_recalibrate(result.model, self._calibration_images())
            self._bn_models.put(result.config, cached)
        return cached

    def _inference_on(self, result: CompressionResult, level: str, device: str) -> nn.Module:
        model = self.inference_model(result, level)
        if level in JOB_LEVELS:
            return self._shared_on(self.repair_key(result.config, level), model, device)
        return model.to(device)

    def _accuracy_key(self, kind: str, config: CompressionConfig | None, bn: bool | str, device: str) -> tuple:
        variant = self._variant(self.applied_level(bn)) if config is not None else False
        return (self.key, self.data_key, kind, config, variant, device)

    def evaluation_set(self) -> estimates.EvaluationSet:
        """The labelled images of the paired estimate: the user's (key from their digest), else CIFAR-10's test set."""
        if self.data is not None and self.data.labelled:
            return estimates.image_set(self.data)
        return estimates.cifar_test_set(tuple(self.loaded.mean), tuple(self.loaded.std))

    def accuracy_estimate(self, result: CompressionResult, bn: bool | str, device: str) -> PairedEstimate | None:
        """The paired estimate known for this setting and repair level (from any session), without computing."""
        level = self.applied_level(bn)
        return estimates.current(self.key, self.evaluation_set(), result.config, self._variant(level), device)

    def refine_accuracy(self, result: CompressionResult, bn: bool | str, device: str,
                        poll: Callable[[], object] | None = None) -> PairedEstimate:
        """One queued refinement step of the paired estimate (about ``estimates.BATCH_TARGET_S`` of inference).

        ``bn``: the repair level (or the old BN flag); a job level's repair is made first if no
        session has it (better: :meth:`start_repair`, which shows progress and can be cancelled).
        ``poll`` is called while the job waits for its turn (see :meth:`ComputeQueue.job`).
        """
        data = self.evaluation_set()
        level = self.applied_level(bn)
        with COMPUTE.job(poll):
            return estimates.refine(self.key, data, result.config, self._variant(level), device,
                                    self.dense_model(device), lambda: self._inference_on(result, level, device))

    def cached_full(self, config: CompressionConfig | None, bn: bool | str, device: str) -> AccuracyReport | None:
        return ACCURACY_CACHE.get(self._accuracy_key("full", config, bn, device))

    def full_accuracy(self, result: CompressionResult | None, bn: bool | str, device: str) -> AccuracyReport:
        """Accuracy on all 10,000 test images in fp32 at repair level ``bn`` (seconds to a minute; queued; cached)."""
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
            model = (self.dense_model(device) if result is None
                     else self._inference_on(result, self.applied_level(bn), device))
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
