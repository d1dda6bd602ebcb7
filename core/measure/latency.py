"""Latency and memory of a forward pass, dense vs compressed, as the Explore page reports them.

Both models are timed by :func:`core.common.timing.time_interleaved` (warm-up, interleaved
rounds, median), so load from elsewhere slows both alike. Memory on the CPU is the process's
peak resident set sampled every millisecond during each model's own timed calls (psutil, the
reading memory_profiler takes: the whole server process, not the model alone); on CUDA it
is PyTorch's exact ``max_memory_allocated`` during those calls.
"""
from __future__ import annotations

import math

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from core.common.timing import time_interleaved

DISTURBED_BELOW = 0.85


@dataclass(frozen=True, kw_only=True)
class LatencyReport:
    """Median wall time of one forward pass (ms), dense vs compressed, measured alternately.

    ``peak_*_mib``: on CPU the process's peak resident memory sampled every millisecond
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
    cpu_share: float = 1.0  # this thread's CPU time / wall time during the timed calls
    threads: int = 1
    quiet: bool = True  # set by the caller: measured with nothing else running, and not disturbed

    @property
    def verdict(self) -> str:
        """``"faster"``, ``"slower"`` or ``"no clear difference"``: the compressed model against the dense one.

        A two-sided sign test on the alternating rounds (round i: compressed run i against dense
        run i, under the same conditions), at the 5 % level: clear only when the compressed run
        won (or lost) in significantly more rounds than chance gives, whatever the medians say.
        """
        pairs = [(c, d) for c, d in zip(self.compressed_runs_ms, self.dense_runs_ms) if c != d]
        n, wins = len(pairs), sum(c < d for c, d in pairs)
        if n == 0:
            return "no clear difference"
        tail = sum(math.comb(n, k) for k in range(min(wins, n - wins) + 1)) / 2 ** n
        if min(1.0, 2 * tail) >= 0.05:
            return "no clear difference"
        return "faster" if wins > n - wins else "slower"

    @property
    def disturbed(self) -> bool:
        """Whether something else took the CPU during the timed calls (this thread got < 85 % of the wall time).

        Meaningful with one intra-op thread, where all of the model's work runs in this thread.
        """
        return self.threads == 1 and self.cpu_share < DISTURBED_BELOW

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.compressed_ms if self.compressed_ms > 0 else float("nan")


class RssSampler:
    """Samples this process's RSS in a thread; ``mark(label)`` says which model the current peak belongs to."""

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

    def __enter__(self) -> "RssSampler":
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
    sampler = RssSampler() if dev.type == "cpu" else None
    cuda_peaks: dict[str, float] = {}

    def before(label: str) -> None:
        if sampler is not None:
            sampler.mark(label)
        else:
            torch.cuda.reset_peak_memory_stats(dev)

    def after(label: str) -> None:
        if sampler is not None:
            sampler.mark(None)
        else:
            cuda_peaks[label] = max(cuda_peaks.get(label, 0.0), torch.cuda.max_memory_allocated(dev) / 2 ** 20)

    cpu_start, wall_start = time.thread_time(), time.perf_counter()
    with sampler if sampler is not None else nullcontext():
        timings = time_interleaved({"dense": lambda: dense(x), "compressed": lambda: compressed(x)}, dev,
                                   warmup=warmup, min_rounds=min_runs, max_rounds=max_runs, budget_s=budget_s,
                                   before_call=before, after_call=after)
    cpu_share = (time.thread_time() - cpu_start) / max(time.perf_counter() - wall_start, 1e-9)
    if sampler is not None:
        peaks = {k: v / 2 ** 20 for k, v in sampler.peaks.items()}
        method = "process peak RSS during the timed runs (psutil, sampled every 1 ms; whole server process)"
    else:
        peaks = cuda_peaks
        method = "peak GPU memory allocated by PyTorch during the timed runs (torch.cuda.max_memory_allocated)"
    dense_t, compressed_t = timings["dense"], timings["compressed"]
    return LatencyReport(
        batch=int(x.shape[0]), device=dev.type, runs=dense_t.rounds,
        dense_ms=dense_t.median_ms, compressed_ms=compressed_t.median_ms,
        dense_runs_ms=tuple(1e3 * s for s in dense_t.samples_s),
        compressed_runs_ms=tuple(1e3 * s for s in compressed_t.samples_s),
        peak_dense_mib=peaks.get("dense"), peak_compressed_mib=peaks.get("compressed"),
        memory_method=method, seconds=time.perf_counter() - start, cpu_share=min(cpu_share, 1.0),
        threads=torch.get_num_threads())


@torch.inference_mode()
def output_deviation(dense: nn.Module, compressed: nn.Module, inputs: torch.Tensor) -> float:
    """‖f_c(x) − f(x)‖ / ‖f(x)‖ over a batch (for models without a labelled data set)."""
    reference = dense(inputs)
    return float(torch.linalg.vector_norm(compressed(inputs) - reference) /
                 torch.linalg.vector_norm(reference).clamp_min(1e-12))
