"""Channel granularity behind the Explore page (no Streamlit): the shared pruner, the live view and its measurements.

Contract:

* :func:`shared_pruner` traces a loaded model's dependency graph once per process
  (:class:`core.method.channels.ChannelPruner`, seconds on ResNet-18) and shares it, read-only,
  with every session on that model while any of them holds it (the pattern of
  :func:`core.services.session_context.shared_snapshot`). A model that cannot be traced raises
  :class:`core.method.channel_config.ChannelError`; the message is kept, so a page rerun does not
  trace again.
* :meth:`ChannelSession.update` is a slider move: ``pruner.apply(config, share=True)`` (the
  smaller model's uncut tensors *are* the pruner's: only ever run, never changed), the chosen
  group's scores and β, counted MACs and parameters, and whatever was already measured for the
  setting (latency, repair, accuracy); no inference.
* Latency (:meth:`ChannelSession.latency`), accuracy refinement (:meth:`ChannelSession.refine`)
  and repair (:meth:`ChannelSession.start_repair`, a cancellable
  :class:`core.services.repairs.RepairJob` around :func:`core.measure.channel_repair.repair_channels`)
  are queued on the shared compute queue and cached process-wide, keyed by the
  :class:`ChannelConfig` (never equal to a weight-level :class:`CompressionConfig`).

Weight-level τ/θ inside the kept channels is not applied here: the engine would need a new
snapshot (rank orders, chunks) of every smaller model, seconds per move. The page says so.
"""
from __future__ import annotations

import copy
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace

import pandas as pd
import torch
from torch import nn

from core.common.lru import LRUCache
from core.measure.channel_repair import estimate_channel_repair_seconds, repair_channels
from core.measure.latency import LatencyReport, measure_latency
from core.measure.paired import PairedEstimate
from core.measure.repair import RepairResult
from core.method.channel_config import ChannelConfig, ChannelError, ChannelResult
from core.method.channels import ChannelPruner
from core.services import estimates, repairs
from core.services.choices import LoadedModel
from core.services.compute_queue import COMPUTE
from core.services.repairs import RepairJob
from core.services.session_accuracy import SessionAccuracy
from core.services.session_context import SessionContext
from core.services.session_measurements import LATENCY_CACHE, LATENCY_QUIET_WAIT_S
from core.services.session_repairs import SessionRepairs

#: the repair levels channel mode offers: none, BN recalibration, and the least-squares re-solve of the
#: layers that lost inputs plus BN recalibration (:func:`repair_channels`); each runs as a job
CHANNEL_LEVELS: tuple[str, ...] = ("none", "bn", "reconstruct")
CHANNEL_LABELS: dict[str, str] = {"none": "none", "bn": "BN recalibration",
                                  "reconstruct": "least-squares re-solve + BN recalibration"}


class SharedPruner:
    """A :class:`ChannelPruner` and the lock its :meth:`~ChannelPruner.apply` runs under (Torch-Pruning's
    slicing functions carry a pruning dimension between calls, so two threads must not slice at once)."""

    def __init__(self, pruner: ChannelPruner, seconds: float):
        self.pruner = pruner
        self.seconds = seconds  # how long the trace took (measured)
        self.lock = threading.Lock()

    def apply(self, config: ChannelConfig) -> ChannelResult:
        with self.lock:
            return self.pruner.apply(config, share=True)


_PRUNERS: weakref.WeakValueDictionary[str, SharedPruner] = weakref.WeakValueDictionary()
_PRUNERS_LOCK = threading.Lock()
_FAILED = LRUCache(32)  # model key -> why it cannot be traced (a sentence)


def shared_pruner(loaded: LoadedModel) -> SharedPruner:
    """The traced pruner of ``loaded``'s model, built once per process while any session holds it.

    Raises :class:`ChannelError` (remembered per model) when the model cannot be channel-pruned.
    """
    with _PRUNERS_LOCK:
        found = _PRUNERS.get(loaded.key)
        if found is not None:
            return found
        failed = _FAILED.get(loaded.key)
        if failed is not None:
            raise ChannelError(failed)
        start = time.perf_counter()
        try:
            pruner = ChannelPruner(loaded.model, example_input=loaded.example_input(1))
        except ChannelError as err:
            _FAILED.put(loaded.key, str(err))
            raise
        found = SharedPruner(pruner, time.perf_counter() - start)
        _PRUNERS[loaded.key] = found
        return found


def clear_caches() -> None:
    """Forget the traced pruners' failures (tests); pruners go with the sessions holding them."""
    _FAILED.clear()


@dataclass(frozen=True)
class ChannelView:
    """What one channel-mode slider move shows at once.

    * ``result``: the smaller model (shares the pruner's uncut tensors: run it, never change it).
    * ``group``, ``scores``, ``beta``, ``tau``: the chosen group's s_c, β_g and τ_ch.
    * ``layers``: one row per Conv/Linear: ``name``, ``kept_out``, ``out_channels``, ``share`` (kept share).
    * ``latency``, ``repair``: what any session measured or made already for this setting, else None.
    """

    result: ChannelResult
    group: str
    scores: torch.Tensor
    beta: float
    tau: float
    layers: pd.DataFrame
    timings: dict[str, float]
    latency: LatencyReport | None = None
    repair: RepairResult | None = None
    notes: list[str] = field(default_factory=list)


def kept_shares(result: ChannelResult) -> pd.DataFrame:
    """Per Conv/Linear of ``result``: output channels kept, of how many, and the share kept (counted)."""
    layers = result.layers
    frame = layers[["name", "group", "kept_out", "out_channels", "macs", "macs_dense"]].copy()
    frame["share"] = frame["kept_out"] / frame["out_channels"]
    return frame


class ChannelSession:
    """One session's channel-granularity view over the shared pruner, and its queued measurements."""

    def __init__(self, context: SessionContext, repairs_: SessionRepairs, accuracy: SessionAccuracy):
        self._context = context
        self._repairs = repairs_
        self._accuracy = accuracy
        self._shared: SharedPruner | None = None  # held: keeps the shared pruner alive while this session lives
        self._job = repairs.WatchedRepair(self._context.lock, id(self))  # the repair this session waits for

    # -------------------------------------------------------- the pruner

    def pruner(self) -> SharedPruner:
        """The shared pruner (traced on first use; :class:`ChannelError` if the model cannot be traced)."""
        if self._shared is None:
            self._shared = shared_pruner(self._context.loaded)
        return self._shared

    def group_names(self) -> list[str]:
        """Every coupled group, in the pruner's order, prunable ones first."""
        groups = self.pruner().pruner.groups
        return [g.name for g in groups if g.prunable] + [g.name for g in groups if not g.prunable]

    def largest_group(self) -> str:
        """The prunable group with the most channels (the histogram's default)."""
        groups = [g for g in self.pruner().pruner.groups if g.prunable] or self.pruner().pruner.groups
        return max(groups, key=lambda g: g.channels).name

    # -------------------------------------------------------- fast: every slider move

    def update(self, config: ChannelConfig, group: str, level: str, batch: int, device: str) -> ChannelView:
        """The smaller model under ``config``, the scores of ``group`` and the figures already known."""
        timings: dict[str, float] = {}
        t = time.perf_counter()
        shared = self.pruner()
        result = shared.apply(config)
        timings["channels"] = time.perf_counter() - t
        t = time.perf_counter()
        rows = {row["name"]: row for row in result.group_rows}
        if group not in rows:
            group = self.largest_group()
        scores = shared.pruner.scores(config.norm, config.fold_bn)[group]
        layers = kept_shares(result)
        timings["tables"] = time.perf_counter() - t
        notes = [f"{row['name']}: {row['note']}" for row in result.group_rows if row["note"] and row["prunable"]]
        level = self.applied_level(level)
        self._release(keep=self.repair_key(config, level) if level != "none" else None)
        repaired = self.cached_repair(config, level)
        timings["total"] = sum(timings.values())
        return ChannelView(result=result, group=group, scores=scores, beta=float(rows[group]["beta"]),
                           tau=float(rows[group]["tau"]), layers=layers, timings=timings,
                           latency=self.cached_latency(config, batch, device), repair=repaired,
                           notes=notes)

    # -------------------------------------------------------- latency (torch eager, measured)

    def _latency_key(self, config: ChannelConfig, batch: int, device: str) -> tuple:
        return (self._context.key, config, batch, device)

    def cached_latency(self, config: ChannelConfig, batch: int, device: str) -> LatencyReport | None:
        return LATENCY_CACHE.get(self._latency_key(config, batch, device))

    def latency(self, result: ChannelResult, batch: int, device: str, budget_s: float = 0.2,
                poll: Callable[[], object] | None = None) -> LatencyReport:
        """Dense vs smaller model, interleaved, one thread, torch eager (see
        :meth:`core.services.session_measurements.SessionMeasurements.latency`: kept only when quiet)."""
        key = self._latency_key(result.config, batch, device)
        cached = LATENCY_CACHE.get(key)
        if cached is not None:
            return cached
        model = result.model if device == "cpu" else copy.deepcopy(result.model).to(device)  # never move shared tensors
        example = self._context.loaded.example_input(batch)
        with COMPUTE.exclusive(timeout_s=LATENCY_QUIET_WAIT_S, threads=1, poll=poll) as ticket:
            report = measure_latency(self._context.dense_model(device), model, example, budget_s=budget_s,
                                     device=device)
        report = dataclasses_replace(report, quiet=ticket.exclusive and not report.disturbed)
        if report.quiet:
            LATENCY_CACHE.put(key, report)
        return report

    # -------------------------------------------------------- repair

    def levels(self) -> list[str]:
        """The channel repair levels that apply here (``"none"`` first): those the weight-level repair offers."""
        offered = self._repairs.levels()
        return [level for level in CHANNEL_LEVELS if level == "none" or level in offered]

    def unavailable(self) -> dict[str, str]:
        """Why each channel repair level that does not apply here does not (a sentence)."""
        reasons = self._repairs.unavailable()
        return {level: reasons[level] for level in CHANNEL_LEVELS if level in reasons}

    def applied_level(self, level: str) -> str:
        return level if level in self.levels() else "none"

    def repair_key(self, config: ChannelConfig, level: str) -> tuple:
        """The process-wide key of a channel repair: (model, "channel", setting, :class:`RepairConfig`)."""
        return (self._context.key, "channel", config, repairs.repair_config(level))

    def cached_repair(self, config: ChannelConfig, level: str) -> RepairResult | None:
        if level == "none":
            return None
        return repairs.REPAIR_CACHE.get(self.repair_key(config, level))

    def running(self, config: ChannelConfig, level: str) -> bool:
        return level != "none" and repairs.running(self.repair_key(config, level)) is not None

    def estimate_repair_s(self, result: ChannelResult, level: str) -> float:
        """Estimated seconds of the repair (before it starts; cached like the weight-level estimates)."""
        key = self.repair_key(result.config, level)
        cached = repairs.ESTIMATE_CACHE.get(key)
        if cached is None:
            with COMPUTE.job():
                cached = estimate_channel_repair_seconds(result, repairs.repair_config(level),
                                                         input_shape=result.input_shape)
            repairs.ESTIMATE_CACHE.put(key, cached)
        return cached

    def start_repair(self, result: ChannelResult, level: str) -> RepairJob:
        """Start (or join) the repair of ``result`` at ``level`` as a cancellable job on the compute queue.

        The calibration images are CIFAR-10 *training* images (:func:`core.services.repairs.calibration`),
        never the evaluation images; the repair works on private copies (``repair_channels`` copies the
        smaller model; the dense model is only run). A slider move (:meth:`update`) releases it.
        """
        if level not in self.levels() or level == "none":
            raise ValueError(f"repair level {level!r} does not apply here: "
                             f"{self.unavailable().get(level, 'not a channel repair level')}")
        config = repairs.repair_config(level)
        loaded, dense = self._context.loaded, self._context.loaded.model
        key = self.repair_key(result.config, level)

        def work(job: RepairJob) -> RepairResult:
            fit, held = repairs.calibration(config.n_images, config.n_holdout, config.seed,
                                            tuple(loaded.mean), tuple(loaded.std))
            with COMPUTE.job(job.check):
                return repair_channels(dense, result, fit, config, holdout=held, on_progress=job.progress,
                                       cancel=lambda: job.cancelled)

        return self._job.watch(repairs.submit(key, work, id(self), repairs.ESTIMATE_CACHE.get(key)))

    def _release(self, keep: tuple | None = None) -> None:
        self._job.release(keep)

    def stop_repair(self) -> None:
        """The user's Stop: cancelled unless another session waits for the same repair."""
        self._release()

    def leave(self, job: RepairJob) -> None:
        """The page stopped waiting (interrupted): the job keeps running for its grace period."""
        job.unwatch(id(self))

    # -------------------------------------------------------- accuracy (the shared paired estimate)

    def model(self, result: ChannelResult, level: str) -> nn.Module:
        """The model the accuracy is for: the smaller model, or its finished repair (ValueError if not made)."""
        if level == "none":
            return result.model
        repaired = self.cached_repair(result.config, level)
        if repaired is None:
            raise ValueError(f"the {CHANNEL_LABELS[level]} of this setting has not run yet")
        return repaired.model

    @staticmethod
    def variant(level: str) -> tuple:
        return ("channel", level)

    def estimate(self, result: ChannelResult, level: str, device: str) -> PairedEstimate | None:
        """The paired estimate known for this setting and level (from any session), without computing."""
        return estimates.current(self._context.key, self._accuracy.evaluation_set(), result.config,
                                 self.variant(level), device)

    def refine(self, result: ChannelResult, level: str, device: str,
               poll: Callable[[], object] | None = None) -> PairedEstimate:
        """One queued refinement step of the paired estimate (the same stores as the weight-level one)."""
        data = self._accuracy.evaluation_set()
        context = self._context

        def model() -> nn.Module:
            chosen = self.model(result, level)
            return chosen if device == "cpu" else copy.deepcopy(chosen).to(device)

        with COMPUTE.job(poll):
            return estimates.refine(context.key, data, result.config, self.variant(level), device,
                                    context.dense_model(device), model)
