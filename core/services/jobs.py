"""Cancellable background jobs shared between sessions: one worker thread per job, progress per step.

A :class:`Job` runs ``work(job)`` in a daemon thread. The work reports its steps
(:meth:`Job.progress`), may publish partial results as they are measured (:meth:`Job.publish`)
and must stop soon after :attr:`Job.cancelled` turns true; inside :meth:`Job.steps` the
measurements of :mod:`core.measure` do so by themselves (their :func:`core.common.steps.turn` and
checkpoints raise the job's cancellation, and each step takes its turn on the shared compute queue).

Lifetime. A job is shared: every session that asks for the same key (:meth:`JobRegistry.submit`)
watches the same job. It is cancelled by :meth:`Job.cancel`, by the last watcher leaving at once
(:meth:`Job.unwatch` with ``now``), or when no watcher has been live for :attr:`Job.grace_s`
seconds. A watcher is live until it unwatches; with ``expire_s`` set, also only for that many
seconds after its last :meth:`Job.watch` (a page that polls re-watches on every poll, so a closed
tab lets its job go).

Time. :attr:`Job.estimate_s` is the expected total seconds: the one given at the start, or, once
the work has given a :class:`Pace` and its first step that costs anything is measured, the
elapsed time plus the remaining work at the rate measured so far, revised after every step.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

from core.common.steps import Cancelled, job_steps
from core.services.compute_queue import COMPUTE

T = TypeVar("T")
log = logging.getLogger(__name__)


class Pace:
    """Expected seconds of a job whose steps have known relative costs (``units``; 0 for a step read from a cache).

    :meth:`step` records when each step ended; the rate (seconds per unit) is measured on the
    steps that cost anything, including the time spent waiting for the compute queue.
    """

    def __init__(self, units: Sequence[float]):
        self.units = tuple(float(u) for u in units)
        self.total_units = sum(self.units)
        self._last = time.perf_counter()
        self._done = 0
        self._units_done = 0.0
        self._seconds = 0.0  # spent on steps with units > 0
        self._lock = threading.Lock()

    def start(self) -> None:
        """The work starts now (time before it, e.g. building inputs, is not charged to a step)."""
        with self._lock:
            self._last = time.perf_counter()

    def step(self, done: int) -> None:
        """Steps up to ``done`` (1-based count) have ended now."""
        now = time.perf_counter()
        with self._lock:
            spent, self._last = now - self._last, now
            units = sum(self.units[self._done:done])
            self._done = max(self._done, done)
            if units > 0:
                self._units_done += units
                self._seconds += spent

    @property
    def measured(self) -> bool:
        """Whether a step that costs anything has been timed (the rate is known)."""
        return self._units_done > 0

    def remaining_s(self) -> float | None:
        """Seconds the steps not yet done should take at the measured rate; None before the rate is known."""
        with self._lock:
            if self._units_done <= 0:
                return 0.0 if self.total_units <= 0 else None
            rate = self._seconds / self._units_done
            return rate * max(0.0, self.total_units - self._units_done)


class Job(Generic[T]):
    """One piece of work in a worker thread, shared by every session that watches it.

    ``done``/``total``/``label``: the progress after the last finished step. When the thread
    ends, exactly one of ``result`` and ``error`` is set (a :class:`Cancelled`, or the subclass's
    :meth:`cancelled_error`, when it was cancelled). ``partial``: the latest partial result the
    work published (None before the first).
    """

    #: seconds a job with no live watcher keeps running
    default_grace_s = 2.0

    def __init__(self, key: Hashable, work: Callable[[Job[T]], T], estimate_s: float | None = None, *,
                 expire_s: float | None = None, name: str = "job"):
        self.key = key
        self.name = name
        self.done, self.total, self.label = 0, 0, ""
        self.started = time.perf_counter()
        self.result: T | None = None
        self.error: BaseException | None = None
        self.partial: object | None = None
        self.pace: Pace | None = None
        self.first_estimate_s: float | None = estimate_s
        self._estimate_s = estimate_s
        self.expire_s = expire_s
        self._work = work
        self._registry: JobRegistry | None = None
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._watchers: dict[Hashable, float | None] = {}  # watcher -> time of its last watch (None: never expires)
        self._unwatched_since: float | None = time.monotonic()
        self._thread = threading.Thread(target=self._main, name=f"{name}-job", daemon=True)

    # -------------------------------------------------------- state

    @property
    def grace_s(self) -> float:
        """Seconds a job nobody watches keeps running (a subclass may read a module setting)."""
        return self.default_grace_s

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def fraction(self) -> float:
        """Share of the steps done, in [0, 1] (0 until the first step is done)."""
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def estimate_s(self) -> float | None:
        """Expected total seconds: the given estimate, or the :class:`Pace`'s, revised after every step
        (never less than the time already spent while the job runs)."""
        estimate = self._estimate_s
        if estimate is None or self.finished:
            return estimate
        return max(estimate, self.elapsed_s)

    @property
    def cancelled(self) -> bool:
        """Cancelled, or no watcher has been live for :attr:`grace_s` (checked before every step)."""
        if self._cancel.is_set():
            return True
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            since = self._unwatched_since
            return not self._watchers and since is not None and now - since > self.grace_s

    def _expire(self, now: float) -> None:
        """Drop watchers whose last watch is older than ``expire_s`` (under the lock)."""
        if self.expire_s is None:
            return
        for watcher, seen in list(self._watchers.items()):
            if seen is not None and now - seen > self.expire_s:
                del self._watchers[watcher]
                if not self._watchers and self._unwatched_since is None:
                    self._unwatched_since = seen + self.expire_s

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the job to end; whether it has."""
        return self._finished.wait(timeout)

    # -------------------------------------------------------- watching and cancelling

    def watch(self, watcher: Hashable) -> None:
        """``watcher`` (a session's id) wants the result: the job keeps running (with ``expire_s``, for that long)."""
        with self._lock:
            self._watchers[watcher] = time.monotonic() if self.expire_s is not None else None
            self._unwatched_since = None

    def unwatch(self, watcher: Hashable, *, now: bool = False) -> None:
        """``watcher`` no longer waits. With ``now`` and nobody else watching, the job is cancelled at once;
        otherwise it is cancelled after :attr:`grace_s` unless someone watches it again."""
        with self._lock:
            self._watchers.pop(watcher, None)
            self._expire(time.monotonic())
            empty = not self._watchers
            if empty and self._unwatched_since is None:
                self._unwatched_since = time.monotonic()
        if empty and now:
            self.cancel()

    def cancel(self) -> None:
        """Stop at the next checkpoint (or while waiting for the queue)."""
        self._cancel.set()

    def cancelled_error(self) -> BaseException:
        """The exception a cancelled job ends with."""
        return Cancelled(self.done, self.total)

    def check(self) -> None:
        """Raise :meth:`cancelled_error` if cancelled (the checkpoints and the compute queue's poll call it)."""
        if self.cancelled:
            raise self.cancelled_error()

    # -------------------------------------------------------- what the work reports

    def progress(self, done: int, total: int, label: str) -> None:
        """Steps ``done`` of ``total`` are finished (``label``: the last one); the pace, if any, is told."""
        self.done, self.total, self.label = done, total, label
        if self.pace is not None and done > 0:
            self.pace.step(done)
            remaining = self.pace.remaining_s()
            if remaining is not None:
                self._estimate_s = self.elapsed_s + remaining
                if self.first_estimate_s is None:
                    self.first_estimate_s = self._estimate_s

    def publish(self, partial: object) -> None:
        """A partial result to show while the job runs (replaced by the next one)."""
        self.partial = partial

    def plan(self, units: Sequence[float]) -> Pace:
        """The relative cost of every step (0: read from a cache), so that the estimate follows the measured pace."""
        self.pace = Pace(units)
        self.pace.start()
        return self.pace

    @contextmanager
    def steps(self) -> Iterator[None]:
        """In the body, :mod:`core.measure` checkpoints raise this job's cancellation and each step takes a
        turn on the shared compute queue (waiting there, it still notices a cancel)."""
        with job_steps(self.check, lambda: COMPUTE.job(self.check)):
            yield

    # -------------------------------------------------------- the thread

    def finish(self, result: T) -> None:
        """Called in the worker thread with the result before the job ends (a subclass caches it)."""

    def start(self) -> Job[T]:
        self._thread.start()
        return self

    def is_cancellation(self, error: BaseException) -> bool:
        """Whether ``error`` is how this job's work stops when cancelled."""
        return isinstance(error, Cancelled)

    def _main(self) -> None:
        try:
            result = self._work(self)
            self.finish(result)
            self.result = result
            log.info("%s job finished in %.1f s", self.name, self.elapsed_s)
        except BaseException as err:  # noqa: BLE001 (handed to the page, which reports it)
            self.error = err
            if self.is_cancellation(err):
                log.info("%s job cancelled after %d of %d steps (%.1f s)", self.name, self.done, self.total,
                         self.elapsed_s)
            else:
                log.warning("%s job failed: %s: %s", self.name, type(err).__name__, err)
        finally:
            self._work = None  # its closure holds a session's objects: let them go with the job
            if self._registry is not None:
                self._registry.forget(self)
            self._finished.set()


class JobRegistry:
    """The running jobs of one kind, by key: a second request for a running key joins it."""

    def __init__(self) -> None:
        self._jobs: dict[Hashable, Job] = {}
        self._lock = threading.Lock()

    def running(self, key: Hashable) -> Job | None:
        """The job working on ``key`` now, unless it was cancelled."""
        with self._lock:
            job = self._jobs.get(key)
        return None if job is None or job.cancelled else job

    def submit(self, key: Hashable, make: Callable[[], Job], watcher: Hashable) -> Job:
        """The running job for ``key``, or ``make()`` started; ``watcher`` watches it either way.

        A job that was cancelled but has not reached its next checkpoint yet is not joined: a new one starts.
        """
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not job.cancelled and not job.finished:
                job.watch(watcher)
                return job
            job = self._jobs[key] = make()
            job._registry = self
            job.watch(watcher)
        return job.start()

    def forget(self, job: Job) -> None:
        """``job`` ended: it no longer answers for its key."""
        with self._lock:
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def clear(self) -> None:
        """Cancel and forget every running job."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            job.cancel()
