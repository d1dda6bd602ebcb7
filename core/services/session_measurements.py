"""What one explorer session measures on this machine: dense vs compressed latency, the realized savings, and memory.

Latency and realized savings are timed runs, kept process-wide per (model, setting, batch,
device) so that every session shows them. Runtime rows for other engines (ONNX Runtime,
OpenVINO) belong here too: one method and one cache per table, keyed the same way.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace

from core.common.lru import LRUCache
from core.common.memory import process_rss_bytes
from core.measure.latency import LatencyReport, measure_latency
from core.measure.realized import RealizedSavings, measure_realized
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult
from core.services.compute_queue import COMPUTE
from core.services.session_context import SessionContext
from core.services.session_repairs import SessionRepairs, module_bytes

LATENCY_BATCHES: tuple[int, ...] = (1, 16, 64)
LATENCY_QUIET_WAIT_S = 1.0  # how long a latency measurement waits for the other jobs to finish
REALIZED_BUDGET_S = 0.05  # timing effort per layer and kernel when measuring the execution paths

#: latencies measured in a quiet moment, keyed by (model key, config, batch, device); disturbed ones are not kept
LATENCY_CACHE = LRUCache(1024)
#: realized savings, keyed by (model key, config, batch, device)
REALIZED_CACHE = LRUCache(64)


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

    # -------------------------------------------------------- memory

    def memory(self) -> MemoryReport:
        """Counted bytes; repaired models of this model (shared by every session) count as shared."""
        engine = self._context.engine
        return MemoryReport(model=module_bytes(self._context.loaded.model),
                            session=engine.working_bytes() + self._repairs.session_bytes(),
                            shared=engine.snapshot.nbytes + self._repairs.shared_bytes(),
                            process_rss=process_rss_bytes())
