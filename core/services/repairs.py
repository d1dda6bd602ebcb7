"""Accuracy repair behind the Explore page: the levels, the shared cache and the cancellable jobs (no Streamlit).

The page offers four *levels*, each including the ones before it (:data:`LEVELS`, the
methods of :mod:`core.measure.repair`):

* ``"none"``: the compressed model as the engine gives it;
* ``"bn"``: BatchNorm recalibration, exactly the explorer's original option (per session,
  :meth:`core.services.session_repairs.SessionRepairs.model`; seconds, no job);
* ``"bias"`` and ``"reconstruct"``: :func:`core.measure.repair.repair` on unlabelled
  calibration images from the CIFAR-10 *training* split (:func:`calibration`), never the test
  set and never the user's evaluation images. Tens of seconds on ResNet-18, so they run as a
  :class:`RepairJob`: a worker thread that takes its turn on the shared compute queue,
  reports its progress per layer and stops before the next layer when cancelled.

A finished repair is kept process-wide in :data:`REPAIR_CACHE`, keyed by
(model key, compression setting, :class:`core.measure.repair.RepairConfig`): every session on
the same model and setting reuses it. A repaired model is as large as the model, so the cache is
a small LRU. Cached models are shared: callers only run them (eval mode), never change them.

Jobs are shared too: two sessions that ask for the same repair watch the same job. A job is
cancelled (through ``repair(..., cancel=)``) when :meth:`RepairJob.cancel` is called, or when
nobody has watched it for :data:`UNWATCHED_GRACE_S` seconds (a page that was interrupted and
did not come back for it). The page re-watches a job on every rerun, so a rerun for an
unrelated widget does not restart a repair; a slider move releases it at once
(:meth:`core.services.session.ExploreSession.update`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from functools import lru_cache

import torch

from core.common.lru import LRUCache
from core.measure.calibration import calibration_split
from core.measure.repair import METHODS, RepairCancelled, RepairConfig, RepairResult

#: the Explore page's repair levels, in order (each includes the ones before it)
LEVELS: tuple[str, ...] = METHODS
#: what the page calls each level
LABELS: dict[str, str] = {"none": "none", "bn": "BN recalibration", "bias": "+ bias correction",
                          "reconstruct": "+ reconstruction"}
#: the levels that run :func:`core.measure.repair.repair` as a job (``"bn"`` keeps the explorer's own path)
JOB_LEVELS: tuple[str, ...] = ("bias", "reconstruct")
#: calibration images that fit a repair, and further held-out ones for the per-layer error table
#: (module-level so that a test can make the repairs small)
REPAIR_IMAGES = 512
REPAIR_HOLDOUT = 128
REPAIR_SEED = 0
#: finished repairs, process-wide: (model key, CompressionConfig, RepairConfig) -> RepairResult.
#: Each holds a full model (ResNet-18: 45 MB), hence few entries.
REPAIR_CACHE = LRUCache(4)
#: time estimates (seconds), keyed as the repairs
ESTIMATE_CACHE = LRUCache(256)
#: how long a job nobody watches keeps running (a page's rerun re-watches it within its first paint)
UNWATCHED_GRACE_S = 2.0

log = logging.getLogger(__name__)
_JOBS: dict[Hashable, "RepairJob"] = {}
_JOBS_LOCK = threading.Lock()


def check_level(level: str) -> str:
    """``level`` if it is one of :data:`LEVELS`, else ``ValueError`` naming the choices."""
    if level not in LEVELS:
        raise ValueError(f"repair must be one of {', '.join(LEVELS)}; got {level!r}")
    return level


def level_of(repair: bool | str | None) -> str:
    """The level of a repair argument: a level name, or the explorer's old BN flag (True → ``"bn"``)."""
    if repair is None or repair is False:
        return "none"
    if repair is True:
        return "bn"
    return check_level(repair)


def level_from_settings(data: dict) -> str | None:
    """The repair level stored in a settings record (JSON object), or None when it names none.

    Files written before the levels existed carry only ``"bn_recalibrated"``: true maps to
    ``"bn"``, false to ``"none"``. A ``"repair"`` entry wins over it; an unknown one is a ``ValueError``.
    """
    if not isinstance(data, dict):
        return None
    if data.get("repair") is not None:
        level = data["repair"]
        if not isinstance(level, str):
            raise ValueError(f"'repair' must be one of {', '.join(LEVELS)}; got {level!r}")
        return check_level(level)
    if "bn_recalibrated" in data:
        return "bn" if data["bn_recalibrated"] is True else "none"
    return None


def repair_config(level: str) -> RepairConfig:
    """The :class:`RepairConfig` the explorer uses for ``level`` (its images from :data:`REPAIR_IMAGES`)."""
    return RepairConfig(check_level(level), n_images=REPAIR_IMAGES, n_holdout=REPAIR_HOLDOUT, seed=REPAIR_SEED)


@lru_cache(maxsize=2)
def calibration(n_fit: int, n_holdout: int, seed: int, mean: tuple[float, ...],
                std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fitting and held-out calibration images from the CIFAR-10 *training* split (decoded once, shared).

    :func:`core.measure.calibration.calibration_split`, normalised with the model's ``mean``/``std``.
    The tensors are shared: callers only read them.
    """
    return calibration_split(n_fit, n_holdout, seed=seed, mean=tuple(mean), std=tuple(std))


def clear() -> None:
    """Forget finished repairs, estimates and calibration images (running jobs are cancelled)."""
    with _JOBS_LOCK:
        jobs = list(_JOBS.values())
        _JOBS.clear()
    for job in jobs:
        job.cancel()
    REPAIR_CACHE.clear()
    ESTIMATE_CACHE.clear()
    calibration.cache_clear()


class RepairJob:
    """One repair running in a worker thread, shared by every session that watches it.

    ``done``/``total``/``layer``: the progress after the last finished layer. When the thread
    ends, exactly one of ``result`` (also put into :data:`REPAIR_CACHE`) and ``error`` is set
    (:class:`core.measure.repair.RepairCancelled` when it was cancelled).
    """

    def __init__(self, key: Hashable, work: Callable[["RepairJob"], RepairResult], estimate_s: float | None = None):
        self.key = key
        self.estimate_s = estimate_s
        self.done, self.total, self.layer = 0, 0, ""
        self.started = time.perf_counter()
        self.result: RepairResult | None = None
        self.error: BaseException | None = None
        self._work = work
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._watchers: set[int] = set()
        self._unwatched_since: float | None = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="repair-job", daemon=True)

    # -------------------------------------------------------- state

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def fraction(self) -> float:
        """Share of the layers done, in [0, 1] (0 until the first layer is done)."""
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def cancelled(self) -> bool:
        """Cancelled, or nobody has watched it for :data:`UNWATCHED_GRACE_S` (checked before every layer)."""
        if self._cancel.is_set():
            return True
        with self._lock:
            since = self._unwatched_since
            return not self._watchers and since is not None and time.monotonic() - since > UNWATCHED_GRACE_S

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the job to end; whether it has."""
        return self._finished.wait(timeout)

    # -------------------------------------------------------- watching and cancelling

    def watch(self, watcher: int) -> None:
        """``watcher`` (a session's id) wants the result: the job keeps running."""
        with self._lock:
            self._watchers.add(watcher)
            self._unwatched_since = None

    def unwatch(self, watcher: int, *, now: bool = False) -> None:
        """``watcher`` no longer waits. With ``now`` and nobody else watching, the job is cancelled at once;
        otherwise it is cancelled after :data:`UNWATCHED_GRACE_S` unless someone watches it again."""
        with self._lock:
            self._watchers.discard(watcher)
            empty = not self._watchers
            if empty and self._unwatched_since is None:
                self._unwatched_since = time.monotonic()
        if empty and now:
            self.cancel()

    def cancel(self) -> None:
        """Stop before the next layer (or while waiting for the queue); nothing is cached."""
        self._cancel.set()

    def check(self) -> None:
        """Raise :class:`RepairCancelled` if cancelled (the compute queue's poll while the job waits)."""
        if self.cancelled:
            raise RepairCancelled(self.done, self.total)

    def progress(self, done: int, total: int, layer: str) -> None:
        """``on_progress`` of :func:`core.measure.repair.repair`."""
        self.done, self.total, self.layer = done, total, layer

    # -------------------------------------------------------- the thread

    def start(self) -> "RepairJob":
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            result = self._work(self)
            REPAIR_CACHE.put(self.key, result)
            self.result = result
            log.info("repair (%s) finished in %.1f s", result.method, result.seconds)
        except RepairCancelled as err:
            self.error = err
            log.info("repair cancelled after %d of %d layers (%.1f s)", err.done, err.total, self.elapsed_s)
        except BaseException as err:  # noqa: BLE001 (handed to the page, which reports it)
            self.error = err
            log.warning("repair failed: %s: %s", type(err).__name__, err)
        finally:
            self._work = None  # its closure holds the session's result: let it go with the job
            with _JOBS_LOCK:
                if _JOBS.get(self.key) is self:
                    del _JOBS[self.key]
            self._finished.set()


def running(key: Hashable) -> RepairJob | None:
    """The job repairing ``key`` now, unless it was cancelled."""
    with _JOBS_LOCK:
        job = _JOBS.get(key)
    return None if job is None or job.cancelled else job


def submit(key: Hashable, work: Callable[[RepairJob], RepairResult], watcher: int,
           estimate_s: float | None = None) -> RepairJob:
    """The running job for ``key``, or a new one started on ``work(job)``; ``watcher`` watches it either way.

    ``work`` must honour ``job.cancelled`` (pass it as ``repair``'s ``cancel``). A job that was
    cancelled but has not reached its next layer yet is not joined: a new one starts.
    """
    with _JOBS_LOCK:
        job = _JOBS.get(key)
        if job is not None and not job.cancelled and not job.finished:
            job.watch(watcher)
            return job
        job = _JOBS[key] = RepairJob(key, work, estimate_s)
        job.watch(watcher)
    return job.start()
