"""The computation behind the explorer's live view (no Streamlit here): one :class:`ExploreSession` per user.

The session is a thin facade over a model that may be shared by every session of the server
(read-only). A slider move is :meth:`ExploreSession.update`: the engine's incremental step
(milliseconds), the selected layer's histogram, and whatever heavier figures are already known
for the setting, never queued. The heavy work is done by the services it holds, each a queued job
on :data:`core.services.compute_queue.COMPUTE` so that sessions take turns:

* ``session.accuracy`` (:class:`core.services.session_accuracy.SessionAccuracy`): the progressive
  paired estimate, the full test, the output deviation or fidelity where there are no labels;
* ``session.repairs`` (:class:`core.services.session_repairs.SessionRepairs`): the repair levels,
  BN-recalibrated and repaired models, the cancellable repair job (released by the next move);
* ``session.measurements`` (:class:`core.services.session_measurements.SessionMeasurements`):
  latency, realized savings, memory;
* ``session.channels`` (:class:`core.services.channel_session.ChannelSession`): channel
  granularity over the shared, traced pruner, with its own latency, repair and accuracy.

The data is CIFAR-10 (its test set; every repair on augmented training images) unless the user
gives images (:meth:`ExploreSession.use_data`): labelled ones replace the test set, unlabelled ones
replace the output deviation by fidelity to the dense model. What does not depend on the session
is shared by all of them: the engine's rank orders and chunks
(:func:`core.services.session_context.shared_snapshot`), the histogram bins, the dense and every
setting's predictions (:mod:`core.services.estimates`), measured figures and repaired models
(process-wide caches). A session holds its engine's working buffer, its current result (which *is*
that buffer: ``lend_buffers=True``) and up to two BN-recalibrated copies.
"""
from __future__ import annotations

import time
import weakref

from core.common.lru import LRUCache
from core.common.memory import trim_heap
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult
from core.services import channel_session, estimates, session_accuracy, session_measurements, session_repairs
from core.services.channel_session import ChannelSession
from core.services.choices import LoadedModel
from core.services.compute_queue import COMPUTE, QueueState
from core.services.histogram import HIST_BINS, HistogramData, LayerBins
from core.services.repairs import JOB_LEVELS, LABELS as REPAIR_LABELS
from core.services.session_accuracy import SessionAccuracy
from core.services.session_context import SessionContext
from core.services.session_measurements import SessionMeasurements
from core.services.session_repairs import SessionRepairs
from core.services.session_view import ExploreRequest, ExploreView, Move
from core.workloads.image_folder import ImageSet

__all__ = ["ExploreSession", "ExploreRequest", "ExploreView", "Move", "clear_caches", "SMALL_MODEL_PARAMS"]

#: the issue's update budgets (p95, server side): ResNet-20-sized models 0.3 s, ResNet-18-sized 1 s
SMALL_MODEL_PARAMS = 2_000_000
_BINS = LRUCache(64)  # (model key, layer, bins) -> LayerBins


def clear_caches() -> None:
    """Forget every process-wide cache of the explorer (tests)."""
    for cache in (session_accuracy.ACCURACY_CACHE, session_measurements.LATENCY_CACHE,
                  session_measurements.REALIZED_CACHE, _BINS):
        cache.clear()
    estimates.clear()
    session_repairs.clear_caches()
    channel_session.clear_caches()


def _theta_part(config: CompressionConfig | None):
    if config is None:
        return None
    return (config.theta, config.theta_mode, config.b_low, config.b_high)


class ExploreSession:
    """Per-user explorer state: an engine over the shared snapshot, the last moves, and the services by job."""

    def __init__(self, loaded: LoadedModel, device: str = "cpu"):
        self.context = SessionContext(loaded, device)
        self.loaded, self.device, self.engine = loaded, device, self.context.engine
        self.repairs = SessionRepairs(self.context)
        self.accuracy = SessionAccuracy(self.context, self.repairs)
        self.measurements = SessionMeasurements(self.context, self.repairs)
        self.channels = ChannelSession(self.context, self.repairs, self.accuracy)  # channel granularity (traced on use)
        self._last_config: CompressionConfig | None = None
        self.last_move: Move | None = None
        self.last_theta_move: Move | None = None
        weakref.finalize(self, trim_heap)  # a closed tab's buffers go back to the OS, not only to the allocator

    # -------------------------------------------------------- facts (the context's, by their old names)

    @property
    def key(self) -> str:
        return self.context.key

    @property
    def data(self) -> ImageSet | None:
        """The user's images (labels mapped to the model's outputs), or None: the default data."""
        return self.context.data

    @property
    def data_warnings(self) -> list[str]:
        return self.context.data_warnings

    @property
    def has_batchnorm(self) -> bool:
        return self.context.has_batchnorm

    @property
    def evaluates_cifar(self) -> bool:
        return self.context.evaluates_cifar

    @property
    def has_labels(self) -> bool:
        """Accuracy can be measured: labelled user images, or (without user images) a CIFAR-10 model."""
        return self.context.has_labels

    def data_label(self) -> str:
        """What the accuracy is measured on, in words."""
        return self.context.data_label()

    def use_data(self, images: ImageSet | None) -> list[str]:
        """Measure on ``images`` from now on (None: back to the default data); returns warnings (sentences).

        Class folders are mapped to the model's outputs (:func:`core.workloads.image_folder.for_model`);
        BN-recalibrated copies made on other data are dropped. The set last given is kept as is.
        """
        with self.context.lock:
            if self.context.set_data(images):
                self.repairs.drop_recalibrated()
            return self.context.data_warnings

    def layer_names(self, include_norm: bool = False) -> list[str]:
        return self.engine.layer_names + (self.engine.norm_layer_names if include_norm else [])

    def global_max_abs(self) -> float:
        return max(self.engine.max_abs(name) for name in self.engine.layer_names)

    def typical_max_abs(self) -> float:
        """max|W| of the layer that holds the median weight, layers ordered by max|W| (a weighted median).

        A scale for absolute thresholds that fits most of the weights: the global max|W| is often
        one small layer's (a stem, a classifier), and 0.3 of it lies above every weight of the
        large layers.
        """
        names = sorted(self.engine.layer_names, key=self.engine.max_abs)
        sizes = [self.engine.snapshot.layer(n).numel for n in names]
        half, running = sum(sizes) / 2, 0
        for name, size in zip(names, sizes):
            running += size
            if running >= half:
                return self.engine.max_abs(name)
        return 0.0

    def largest_layer(self) -> str:
        return max(self.engine.layer_names, key=lambda n: self.engine.snapshot.layer(n).numel)

    @property
    def last_config(self) -> CompressionConfig | None:
        """The setting applied last (what the engine's buffer holds)."""
        return self._last_config

    @property
    def update_budget_s(self) -> float:
        """The latency budget of one slider move for a model of this size (0.3 s small, 1 s large)."""
        return 0.3 if self.context.params <= SMALL_MODEL_PARAMS else 1.0

    def queue_state(self) -> QueueState:
        """How busy the shared compute queue is (the page says when it waits for it)."""
        return COMPUTE.state()

    # -------------------------------------------------------- fast: every slider move

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
        """Apply ``config`` with the engine (its incremental step) and record the move; the result *is* the buffer."""
        with self.context.lock:
            result = self.engine.apply(config)
            self._record_move(result)
            return result

    def update(self, request: ExploreRequest) -> ExploreView:
        """The fast part of a slider move, and the heavier figures already known for the setting (no inference).

        The one entry for a slider move: it also releases the repair job of the setting before.
        """
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
        config, device, batch = request.config, request.device, request.latency_batch
        asked = request.level
        level = self.repairs.applied_level(asked)
        if level != asked:
            notes.append(f"Repair '{REPAIR_LABELS[asked]}' does not apply here: "
                         f"{self.repairs.unavailable().get(asked, '')} The figures are without it.")
        # a slider move cancels the repair of the setting before
        self.repairs.release(keep=self.repairs.key(config, level) if level in JOB_LEVELS else None)
        pending = None
        if level in JOB_LEVELS and not request.run_repair and self.repairs.cached(config, level) is None:
            pending, level = level, ("bn" if "bn" in self.repairs.levels() else "none")
        estimate_s = self.repairs.cached_estimate(config, pending or level)
        full = full_dense = estimate = deviation = found_fidelity = None
        full_dense_source = ""
        available = False
        if self.has_labels:
            try:
                estimate = self.accuracy.estimate(result, level, device)
                available = True
            except (OSError, RuntimeError) as err:  # DataError is a RuntimeError: the data is missing or damaged
                notes.append(f"{'CIFAR-10 a' if self.data is None else 'A'}ccuracy unavailable: {err}")
            full = self.accuracy.cached_full(config, level, device)
            full_dense, full_dense_source = self.accuracy.dense_reference(device)
        elif self.data is not None:
            found_fidelity = self.accuracy.cached_fidelity(config, device)
        else:
            deviation = self.accuracy.cached_deviation(config, device)
        timings["total"] = sum(timings.values())
        return ExploreView(
            result=result, histogram=histogram, latency=self.measurements.cached_latency(config, batch, device),
            estimate=estimate, full=full, full_dense=full_dense, full_dense_source=full_dense_source,
            deviation=deviation, last_move=self.last_move, last_theta_move=self.last_theta_move, timings=timings,
            notes=notes, accuracy_available=available, fidelity=found_fidelity,
            realized=self.measurements.cached_realized(config, batch, device),
            repair_level=level, repair=self.repairs.cached(config, level),
            repair_estimate_s=estimate_s, repair_pending=pending)
