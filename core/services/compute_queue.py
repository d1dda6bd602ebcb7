"""Fair sharing of a small CPU between sessions: the CPU-heavy jobs of every session queue here.

What queues: model inference for accuracy estimates (one batch per job), latency
measurements, realized savings, BN recalibration, the full-test evaluation. What does not:
the engine's slider step and the histogram (milliseconds), so every session's engine figures
appear at once however busy the server is.

* At most ``slots`` jobs run at once (one per core); the rest wait first come, first served.
  Jobs are short (a batch), so sessions take turns batch by batch.
* Threads per job: PyTorch's intra-op thread count is a per-thread setting (OpenMP), so a
  job alone on the server may use every core, and a job among others uses one.
* :meth:`ComputeQueue.exclusive` waits for a quiet moment (no other job running) and holds
  every slot, for measurements that other work would disturb (latency); it says whether it
  got one.
"""
from __future__ import annotations

import itertools
import os
from collections import deque
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

POLL_S = 0.1  # how often a waiting job calls its poll (the page's chance to be interrupted)


@dataclass(frozen=True, kw_only=True)
class QueueState:
    """How busy the queue is right now."""

    running: int
    waiting: int

    @property
    def busy(self) -> bool:
        return self.running + self.waiting > 0


@dataclass(frozen=True, kw_only=True)
class JobTicket:
    """How a job ran: seconds it waited for its turn, the torch threads it used, whether it ran alone."""

    waited_s: float
    threads: int
    exclusive: bool


class ComputeQueue:
    """A first-come-first-served semaphore over ``slots`` CPU slots, with per-job thread counts."""

    def __init__(self, slots: int | None = None):
        self.slots = max(1, slots or os.cpu_count() or 1)
        self._condition = threading.Condition()
        self._tickets = itertools.count()
        self._line: deque[int] = deque()  # tickets waiting, first come first
        self._running = 0

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._line)

    def busy(self) -> bool:
        """Whether any job runs or waits (a measurement taken now would be disturbed)."""
        return self._running + len(self._line) > 0

    def state(self) -> QueueState:
        return QueueState(running=self._running, waiting=len(self._line))

    def _acquire(self, need: int, timeout_s: float | None, poll: Callable[[], object] | None) -> tuple[bool, float]:
        """Wait in line for ``need`` slots; (got them, seconds waited).

        ``poll`` is called every :data:`POLL_S` while waiting (outside the lock): the page
        passes a placeholder update, which is also where Streamlit stops a superseded run;
        whatever it raises leaves the line cleanly and propagates.
        """
        start = time.perf_counter()
        ticket = next(self._tickets)
        with self._condition:
            self._line.append(ticket)
        try:
            while True:
                with self._condition:
                    if self._line[0] == ticket and self._running + need <= self.slots:
                        self._line.popleft()
                        self._running += need
                        self._condition.notify_all()
                        return True, time.perf_counter() - start
                    waited = time.perf_counter() - start
                    if timeout_s is not None and waited >= timeout_s:
                        self._line.remove(ticket)
                        self._condition.notify_all()
                        return False, waited
                    wait = POLL_S if poll is not None else None
                    if timeout_s is not None:
                        wait = min(wait or timeout_s, timeout_s - waited)
                    self._condition.wait(wait)
                if poll is not None:
                    poll()
        except BaseException:
            with self._condition:
                if ticket in self._line:
                    self._line.remove(ticket)
                    self._condition.notify_all()
            raise

    def _release(self, need: int) -> None:
        with self._condition:
            self._running -= need
            self._condition.notify_all()

    @contextmanager
    def job(self, poll: Callable[[], object] | None = None) -> Iterator[JobTicket]:
        """Run the body as one queued job; its torch thread count is chosen from the load."""
        _, waited = self._acquire(1, None, poll)
        threads = self.slots if self._running == 1 and not self._line else 1
        with _torch_threads(threads):
            try:
                yield JobTicket(waited_s=waited, threads=threads, exclusive=False)
            finally:
                self._release(1)

    @contextmanager
    def exclusive(self, timeout_s: float = 2.0, threads: int = 1,
                  poll: Callable[[], object] | None = None) -> Iterator[JobTicket]:
        """Hold every slot (wait up to ``timeout_s`` for the others to finish); ``exclusive`` says if it did.

        Without a quiet moment in time the body still runs, as an ordinary job, so the caller
        can mark its measurement as taken under load.
        """
        got, waited = self._acquire(self.slots, timeout_s, poll)
        if not got:
            with self.job(poll) as ticket:
                with _torch_threads(threads):
                    yield JobTicket(waited_s=waited + ticket.waited_s, threads=threads, exclusive=False)
            return
        with _torch_threads(threads):
            try:
                yield JobTicket(waited_s=waited, threads=threads, exclusive=True)
            finally:
                self._release(self.slots)


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Set this thread's PyTorch intra-op thread count for the body (a per-thread OpenMP setting)."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


#: the process-wide queue every session shares
COMPUTE = ComputeQueue()
