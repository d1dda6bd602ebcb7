"""Fair sharing of a small CPU between sessions: the CPU-heavy jobs of every session queue here.

What queues: model inference for accuracy estimates (one batch per job), latency
measurements, realized savings, BN recalibration, the full-test evaluation. What does not:
the engine's slider step and the histogram (milliseconds), so every session's engine figures
appear at once however busy the server is.

* At most ``slots`` jobs run at once (:func:`default_slots`: one per core where jobs run at
  background priority, else one core fewer, so the sliders' fast work always finds a core);
  the rest wait first come, first served. Jobs are short (a batch), so sessions take turns
  batch by batch.
* Threads per job: PyTorch's intra-op thread count is a per-thread setting (OpenMP), so a
  job alone on the server may use every core, and a job among others uses one.
* :meth:`ComputeQueue.exclusive` waits for a quiet moment (no other job running) and holds
  every slot, for measurements that other work would disturb (latency); it says whether it
  got one.
* Background priority: while a job's body runs, its thread's scheduling priority is lowered
  (Linux nice +:data:`JOB_NICENESS`, a per-thread setting), so the sliders' fast work (the
  engine step, the histogram, Streamlit's own messages) of every session takes the CPU from
  queued inference the moment it needs it, instead of sharing two cores with it. Only where
  the process may raise it back afterwards (root or ``CAP_SYS_NICE``, or an ``RLIMIT_NICE``
  that allows it): a thread Streamlit reuses for the next run must not stay slow. Elsewhere
  jobs run at normal priority (:func:`background_priority_available` says which).
"""
from __future__ import annotations

import functools
import itertools
import os
import resource
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

POLL_S = 0.1  # how often a waiting job calls its poll (the page's chance to be interrupted)
NICENESS_ENV = "BOUNDARY_JOB_NICENESS"
SLOTS_ENV = "BOUNDARY_COMPUTE_SLOTS"


def _job_niceness(default: int = 10) -> int:
    """How much lower a queued job's thread runs than the interactive work (Linux nice units, 0–19).

    ``$BOUNDARY_JOB_NICENESS`` overrides the default; 0 turns background priority off.
    """
    try:
        return min(19, max(0, int(os.environ.get(NICENESS_ENV, default))))
    except ValueError:
        return default


JOB_NICENESS = _job_niceness()


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
        self.slots = max(1, slots or default_slots())
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
        with _torch_threads(threads), _background_priority():
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


def _thread_niceness() -> int | None:
    """This thread's nice value (Linux: per thread), or None where there is no such thing."""
    if not hasattr(os, "getpriority") or not hasattr(threading, "get_native_id"):
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:
        return None


@functools.cache
def background_priority_available() -> bool:
    """Whether a job's thread may be lowered by :data:`JOB_NICENESS` and raised back afterwards.

    Raising a thread's priority back needs root, ``CAP_SYS_NICE`` or an ``RLIMIT_NICE`` soft
    limit of at least ``20 − nice`` (see setrlimit(2)); checked on this process's own limits
    and then tried once on a scratch thread, so a false answer costs nothing later.
    """
    base = _thread_niceness()
    if base is None or JOB_NICENESS == 0:
        return False
    limit = resource.getrlimit(resource.RLIMIT_NICE)[0] if hasattr(resource, "RLIMIT_NICE") else 0
    if os.geteuid() != 0 and limit != resource.RLIM_INFINITY and limit < 20 - base:
        return False
    outcome = []

    def attempt() -> None:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, base + JOB_NICENESS)
            os.setpriority(os.PRIO_PROCESS, tid, base)
            outcome.append(os.getpriority(os.PRIO_PROCESS, tid) == base)
        except OSError:
            outcome.append(False)

    scratch = threading.Thread(target=attempt, name="priority-probe")
    scratch.start()
    scratch.join()
    return bool(outcome and outcome[0])


@contextmanager
def _background_priority() -> Iterator[None]:
    """Run the body with this thread's nice value raised by :data:`JOB_NICENESS`, then restore it.

    A no-op where :func:`background_priority_available` is false. torch's intra-op worker
    threads (a job alone may use every core) keep their own priority: only then is no other
    session waiting for the CPU.
    """
    before = _thread_niceness() if background_priority_available() else None
    if before is None:
        yield
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, before + JOB_NICENESS))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, before)
        except OSError:  # checked possible above; should it fail now, the thread stays low-priority
            pass


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


def default_slots() -> int:
    """Jobs run at once: ``$BOUNDARY_COMPUTE_SLOTS``, else one per core where jobs run at background
    priority (:func:`background_priority_available`), else one core fewer (at least one).

    Without background priority, inference on every core competes on equal terms with the
    sliders' engine steps and Streamlit's own messages. 30 paced ResNet-20 users on 2 cores
    (``benchmarks/load_test.py --fresh``, jobs at normal priority): p50/p95 353/1145 ms with 2
    slots, 177/957 ms with 1 (and 223/634 ms with 2 slots at background priority). A core kept
    free trades refinement speed (the run took 175 s instead of 140 s to settle) for slider
    latency, which is what a user feels.
    """
    try:
        return max(1, int(os.environ[SLOTS_ENV]))
    except (KeyError, ValueError):
        pass
    cores = os.cpu_count() or 1
    return cores if background_priority_available() else max(1, cores - 1)


#: the process-wide queue every session shares
COMPUTE = ComputeQueue()
