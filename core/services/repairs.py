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

import threading
from collections.abc import Callable, Hashable
from functools import lru_cache

import torch

from core.common.lru import LRUCache
from core.measure.calibration import calibration_split
from core.measure.repair import METHODS, RepairCancelled, RepairConfig, RepairResult
from core.services.jobs import Job, JobRegistry

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

_JOBS = JobRegistry()


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
    _JOBS.clear()
    REPAIR_CACHE.clear()
    ESTIMATE_CACHE.clear()
    calibration.cache_clear()


class RepairJob(Job[RepairResult]):
    """One repair running in a worker thread, shared by every session that watches it (a :class:`Job`).

    ``done``/``total``/``layer``: the progress after the last finished layer. When the thread
    ends, exactly one of ``result`` (also put into :data:`REPAIR_CACHE`) and ``error`` is set
    (:class:`core.measure.repair.RepairCancelled` when it was cancelled).
    """

    def __init__(self, key: Hashable, work: Callable[[RepairJob], RepairResult], estimate_s: float | None = None):
        super().__init__(key, work, estimate_s, name="repair")

    @property
    def grace_s(self) -> float:
        return UNWATCHED_GRACE_S

    @property
    def layer(self) -> str:
        """The last repaired layer."""
        return self.label

    def cancelled_error(self) -> BaseException:
        return RepairCancelled(self.done, self.total)

    def is_cancellation(self, error: BaseException) -> bool:
        return isinstance(error, RepairCancelled) or super().is_cancellation(error)

    def progress(self, done: int, total: int, layer: str) -> None:
        """``on_progress`` of :func:`core.measure.repair.repair`."""
        super().progress(done, total, layer)

    def finish(self, result: RepairResult) -> None:
        REPAIR_CACHE.put(self.key, result)


class WatchedRepair:
    """The one repair job a session waits for: watching a new one lets go of the previous one.

    ``lock`` guards the slot (the session's lock); ``watcher`` is the session's id. A job let go of
    keeps running while another session watches it, else it is cancelled (:meth:`Job.unwatch`).
    """

    def __init__(self, lock: threading.Lock | threading.RLock, watcher: int):
        self._lock, self._watcher = lock, watcher
        self._job: RepairJob | None = None

    def watch(self, job: RepairJob) -> RepairJob:
        """Wait for ``job`` from now on (a job already watched is kept); returns it."""
        with self._lock:
            previous, self._job = self._job, job
        if previous is not None and previous is not job:
            previous.unwatch(self._watcher, now=True)
        return job

    def release(self, keep: Hashable | None = None) -> None:
        """Stop waiting unless the job is ``keep``'s and still running; a finished job is dropped too (its
        result lives in :data:`REPAIR_CACHE`)."""
        with self._lock:
            job = self._job
            if job is None or (keep is not None and job.key == keep and not job.finished):
                return
            self._job = None
        if not job.finished:
            job.unwatch(self._watcher, now=True)


def running(key: Hashable) -> RepairJob | None:
    """The job repairing ``key`` now, unless it was cancelled."""
    return _JOBS.running(key)


def submit(key: Hashable, work: Callable[[RepairJob], RepairResult], watcher: int,
           estimate_s: float | None = None) -> RepairJob:
    """The running job for ``key``, or a new one started on ``work(job)``; ``watcher`` watches it either way.

    ``work`` must honour ``job.cancelled`` (pass it as ``repair``'s ``cancel``). A job that was
    cancelled but has not reached its next layer yet is not joined: a new one starts.
    """
    return _JOBS.submit(key, lambda: RepairJob(key, work, estimate_s), watcher)
