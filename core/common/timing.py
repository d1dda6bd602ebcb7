"""The one timer: every latency the project reports is measured here.

Rules, and why:

* **Synchronise around every timed call** (:func:`synchronize`): CUDA kernels are queued,
  so without a sync the clock stops before the work does. On the CPU it is a no-op.
* **Warm up first.** The first calls pay for allocator growth, oneDNN primitive creation
  and lazy initialisation; they are run untimed.
* **Interleave rounds.** Functions compared with each other (dense vs compressed, one
  kernel vs another) are timed in turn, round after round, so that a burst of load from
  another process slows all of them alike instead of whichever was running at the time.
* **Report the median** (robust to the odd preempted call) and the **p95** (what a person
  waiting for the next update sees), both from the same samples.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for all work queued on ``device`` (CUDA); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds of one call of ``fn``, with ``device`` synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def percentile(samples: list[float] | tuple[float, ...], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q ≤ 100) of ``samples``: a value that was measured."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, kw_only=True)
class Timing:
    """The timed calls of one function, in seconds (``samples_s`` in the order they ran)."""

    samples_s: tuple[float, ...]

    @property
    def rounds(self) -> int:
        return len(self.samples_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def p95_s(self) -> float:
        return percentile(self.samples_s, 95)

    @property
    def min_s(self) -> float:
        return min(self.samples_s)

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3


def time_interleaved(functions: Mapping[str, Callable[[], object]], device: torch.device | str = "cpu", *,
                     warmup: int = 1, min_rounds: int = 3, max_rounds: int = 50, budget_s: float | None = None,
                     max_s: float | None = None, drop_slower_than: float | None = None,
                     before_call: Callable[[str], object] | None = None,
                     after_call: Callable[[str], object] | None = None) -> dict[str, Timing]:
    """Time each function in interleaved rounds; ``{name: Timing}`` in the order given.

    * ``warmup`` untimed calls of each function first, interleaved like the timed rounds.
    * Then rounds, each calling every function once: at least ``min_rounds``, at most
      ``max_rounds``, stopping after ``min_rounds`` once ``budget_s`` seconds of rounds have
      passed (``budget_s=None``: exactly ``max_rounds``). ``max_s``: stop after 3 rounds even
      below ``min_rounds`` once this many seconds have passed (a hard cap for slow calls).
    * ``drop_slower_than`` = k: a function whose last warm-up call took more than k times
      the fastest function's is not timed further; its one warm-up call is its sample (it
      was measured slower, once). Needs ``warmup`` ≥ 1.
    * ``before_call(name)`` / ``after_call(name)`` run outside the timed window around every
      timed call (for example to attribute a memory sampler's readings to a function).
    """
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"need 1 ≤ min_rounds ≤ max_rounds, got {min_rounds} and {max_rounds}")
    last_warm: dict[str, float] = {}
    for _ in range(warmup):
        for name, fn in functions.items():
            last_warm[name] = time_call(fn, device)
    active = list(functions)
    if drop_slower_than is not None and last_warm:
        fastest = min(last_warm.values())
        active = [name for name in functions if last_warm[name] <= drop_slower_than * fastest]
    samples: dict[str, list[float]] = {name: [] for name in active}
    start = time.perf_counter()
    for round_ in range(max_rounds):
        for name in active:
            if before_call is not None:
                before_call(name)
            samples[name].append(time_call(functions[name], device))
            if after_call is not None:
                after_call(name)
        elapsed = time.perf_counter() - start
        done = round_ + 1
        if budget_s is not None and done >= min_rounds and elapsed > budget_s:
            break
        if max_s is not None and done >= 3 and elapsed > max_s:
            break
    return {name: Timing(samples_s=tuple(samples[name]) if name in samples else (last_warm[name],))
            for name in functions}
