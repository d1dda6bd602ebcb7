"""What one explorer session measures on this machine: dense vs compressed latency, the realized savings, and memory.

Latency and realized savings are timed runs, kept process-wide per (model, setting, batch,
device) so that every session shows them. Runtime rows for other engines (ONNX Runtime,
OpenVINO) belong here too: one method and one cache per table, keyed the same way.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace

import torch
from torch import nn

from core.common.lru import LRUCache
from core.common.memory import process_rss_bytes
from core.measure.deploy_table import DeployConfig, DeployTable
from core.measure.latency import LatencyReport, measure_latency
from core.measure.realized import RealizedSavings, measure_realized
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult, Engine
from core.services import deploy_jobs
from core.services.compute_queue import COMPUTE
from core.services.jobs import Job
from core.services.repairs import JOB_LEVELS
from core.services.session_context import SessionContext, shared_snapshot
from core.services.session_repairs import SessionRepairs, module_bytes
from core.workloads.data import jpeg_dir

LATENCY_BATCHES: tuple[int, ...] = (1, 16, 64)
LATENCY_QUIET_WAIT_S = 1.0  # how long a latency measurement waits for the other jobs to finish
REALIZED_BUDGET_S = 0.05  # timing effort per layer and kernel when measuring the execution paths

#: latencies measured in a quiet moment, keyed by (model key, config, batch, device); disturbed ones are not kept
LATENCY_CACHE = LRUCache(1024)
#: realized savings, keyed by (model key, config, batch, device)
REALIZED_CACHE = LRUCache(64)
#: the deployment table the Explore page measures: batch 1 and 64, one thread, 1,000 evaluation images
DEPLOY_CONFIG = DeployConfig()
DEPLOY_CALIBRATION_IMAGES = 256  # of the user's images, for a model that is not a CIFAR-10 one


@dataclass(frozen=True)
class _Recalibrated:
    """A BN-recalibrated model in the form the export takes a repair: its ``model``, and no re-solved codes."""

    model: nn.Module
    quantized: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """Bytes, by whom they are held. ``process_rss`` is the whole server process (every session, PyTorch itself)."""

    model: int  # the model's own parameters and buffers (fp32), the dense one as loaded
    session: int  # this session alone: the engine's working buffer (= the current result's weights), BN copies
    shared: int  # held once for every session on this model: rank orders, chunks, repaired models
    process_rss: int


class SessionMeasurements:
    """Timed runs of one session's settings (shared by every session once quiet) and its counted memory."""

    def __init__(self, context: SessionContext, repairs: SessionRepairs):
        self._context = context
        self._repairs = repairs

    def _key(self, config: CompressionConfig, batch: int, device: str) -> tuple:
        return (self._context.key, config, batch, device)

    # -------------------------------------------------------- latency

    def cached_latency(self, config: CompressionConfig, batch: int, device: str) -> LatencyReport | None:
        """The quiet latency reading of ``config`` at ``batch`` if any session made one, without measuring."""
        return LATENCY_CACHE.get(self._key(config, batch, device))

    def latency(self, result: CompressionResult, batch: int, device: str, budget_s: float = 0.03,
                poll: Callable[[], object] | None = None) -> LatencyReport:
        """Dense vs compressed latency, interleaved in one go, one thread, in a quiet moment if one comes.

        Kept for every session only when undisturbed: the queue was ours alone and this thread got
        the CPU for the timed calls (:attr:`LatencyReport.disturbed`). A disturbed reading is
        returned (the page marks it) but not cached, so the next view measures again.
        """
        key = self._key(result.config, batch, device)
        cached = LATENCY_CACHE.get(key)
        if cached is not None:
            return cached
        example = self._context.loaded.example_input(batch)
        with COMPUTE.exclusive(timeout_s=LATENCY_QUIET_WAIT_S, threads=1, poll=poll) as ticket:
            report = measure_latency(self._context.dense_model(device), result.model.to(device), example,
                                     budget_s=budget_s, device=device)
        report = dataclasses_replace(report, quiet=ticket.exclusive and not report.disturbed)
        if report.quiet:
            LATENCY_CACHE.put(key, report)
        return report

    # -------------------------------------------------------- realized savings

    def cached_realized(self, config: CompressionConfig, batch: int, device: str) -> RealizedSavings | None:
        """The realized savings of ``config`` at ``batch`` if any session measured them, without measuring."""
        return REALIZED_CACHE.get(self._key(config, batch, device))

    def realized(self, result: CompressionResult, batch: int, device: str) -> RealizedSavings:
        """Measured packed-file size and per-path latency of ``result`` at ``batch`` (seconds; queued; cached).

        BN recalibration changes neither: it re-estimates statistics, not weights or shapes.
        """
        key = self._key(result.config, batch, device)
        cached = REALIZED_CACHE.get(key)
        if cached is None:
            loaded = self._context.loaded
            with COMPUTE.exclusive(timeout_s=LATENCY_QUIET_WAIT_S, threads=1):
                cached = measure_realized(result, loaded.example_input(1).to(device), arch=loaded.arch,
                                          arch_kwargs=loaded.arch_kwargs, batch_size=batch,
                                          budget_s=REALIZED_BUDGET_S)
            REALIZED_CACHE.put(key, cached)
        return cached

    # -------------------------------------------------------- deployment: ONNX Runtime and OpenVINO

    def deploy_key(self, config: CompressionConfig, level: str) -> tuple:
        """What a deployment table is measured for: model, setting, repair level, images and table options."""
        return (self._context.key, self._context.data_key, config, self._repairs.applied_level(level), DEPLOY_CONFIG)

    def cached_deploy(self, config: CompressionConfig, level: str) -> DeployTable | None:
        """The deployment table of ``config`` at ``level`` if any session measured it."""
        return deploy_jobs.cached(self.deploy_key(config, level))

    def deploy_unavailable(self, config: CompressionConfig, level: str) -> str | None:
        """Why the deployment table cannot be measured now (a sentence), or None.

        Cheap enough for every rerun: it checks that calibration images exist, never decodes them
        (the first decode of CIFAR-10's training split takes tens of seconds; the job does it).
        """
        level = self._repairs.applied_level(level)
        if level in JOB_LEVELS and self._repairs.cached(config, level) is None:
            return "Run the repair first: the exported files carry the repaired weights."
        context = self._context
        if context.evaluates_cifar:
            archive = jpeg_dir() / "cifar10-train.tar.gz"
            return None if archive.is_file() else (
                f"The int8 file needs calibration images, and none could be read: {archive} is missing.")
        if context.data is None:
            return ("The int8 file needs unlabelled calibration images: CIFAR-10 training images for a CIFAR-10 "
                    "model, or your own images (Evaluation data → my images).")
        return None

    def _calibration(self) -> Callable[[], torch.Tensor]:
        """How to get the unlabelled images the int8 activations are calibrated on (call it inside the job):
        CIFAR-10 training images for a CIFAR-10 model, else the user's own images."""
        context = self._context
        if context.evaluates_cifar:
            return self._repairs.calibration_images
        images = context.data.images[:DEPLOY_CALIBRATION_IMAGES]
        return lambda: images

    def deploy(self, result: CompressionResult, level: str, watcher: Hashable) -> Job:
        """Start (or join) the export and measurement of ``result`` at ``level`` as a queued job (see
        :mod:`core.services.deploy_jobs`); check :meth:`deploy_unavailable` first.

        The job compresses the setting again on a private engine over the shared snapshot (the
        session's own buffer moves with its sliders while the job runs) and exports the repair of
        ``level``: a job level's cached repair, or the BN-recalibrated model for ``"bn"``.
        """
        context, config = self._context, result.config
        level = self._repairs.applied_level(level)
        repaired = None
        if level in JOB_LEVELS:
            repaired = self._repairs.cached(config, level)
        elif level == "bn":
            with COMPUTE.job():
                repaired = _Recalibrated(self._repairs.model(result, "bn"))
        calibration, data = self._calibration(), context.labelled_data()
        dense, snapshot = context.loaded.model, shared_snapshot(context.loaded)

        def work(job: Job) -> DeployTable:
            engine = Engine.sharing(snapshot)
            own = engine.apply(config)
            return deploy_jobs.deploy_work(dense, engine, own, calibration(), data, repaired=repaired,
                                           config=DEPLOY_CONFIG)(job)

        return deploy_jobs.submit(self.deploy_key(config, level), work, watcher)

    # -------------------------------------------------------- memory

    def memory(self) -> MemoryReport:
        """Counted bytes; repaired models of this model (shared by every session) count as shared."""
        engine = self._context.engine
        return MemoryReport(model=module_bytes(self._context.loaded.model),
                            session=engine.working_bytes() + self._repairs.session_bytes(),
                            shared=engine.snapshot.nbytes + self._repairs.shared_bytes(),
                            process_rss=process_rss_bytes())
