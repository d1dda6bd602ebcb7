"""The realized-savings table behind the Explore page as a queued, cancellable job shared by every session (no Streamlit).

:func:`submit` starts (or joins) one :class:`DeployJob` for a setting and returns at once. The job
exports the setting's three ONNX files (:func:`core.measure.deploy_export.export_setting`) into a
folder of its own and measures :func:`core.measure.deploy_table.measure_deployment`; each step is a
turn of the shared compute queue and a checkpoint (:mod:`core.common.steps`), so a cancel stops it
between steps (within one accuracy batch). The finished :class:`core.measure.deploy_table.DeployTable`
is kept process-wide in :data:`DEPLOY_CACHE` under the caller's key (model key, compression setting,
repair level, :class:`core.measure.deploy_table.DeployConfig`): every session on the same setting
reuses it, and its ``files`` stay on disk for the download buttons (:data:`FILES_ROOT`; the folder
of an entry the LRU drops is removed).

The caller gives ``work(job)`` nothing but the inputs (:func:`deploy_work` builds it): the dense
model, the engine and its result, the repair (or None), calibration images (unlabelled training or
user images; never test images) and the evaluation data.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Hashable
from pathlib import Path

import torch
from torch import nn

from core.common.lru import LRUCache
from core.common.steps import turn
from core.deploy.onnx_export import ExportConfig
from core.measure.accuracy import EvalData
from core.measure.deploy_export import export_setting
from core.measure.deploy_table import (
    DeployCancelled,
    DeployConfig,
    DeployTable,
    measure_deployment,
)
from core.services.jobs import Job, JobRegistry

#: where each job's files are written (one folder per job), process-wide
FILES_ROOT = Path(tempfile.gettempdir()) / "boundary-explorer-onnx"
#: seconds after its last poll that a session still counts as watching
EXPIRE_S = 20.0


class _FolderCache(LRUCache):
    """An LRU of finished tables whose evicted entries' folders are deleted."""

    def put(self, key: Hashable, value: DeployTable) -> None:
        before = {id(v): v for v in self.values()}
        super().put(key, value)
        after = {id(v) for v in self.values()}
        for gone in (v for i, v in before.items() if i not in after):
            shutil.rmtree(gone.files.folder, ignore_errors=True)


#: finished tables by job key (a few kB each, plus ~1.5× the model's fp32 size on disk)
DEPLOY_CACHE = _FolderCache(8)
_JOBS = JobRegistry()


class DeployJob(Job[DeployTable]):
    """One export + measurement in a worker thread (:class:`core.services.jobs.Job`); its result goes to
    :data:`DEPLOY_CACHE`. ``done``/``total``/``label``: the last finished step."""

    def __init__(self, key: Hashable, work: Callable[[Job[DeployTable]], DeployTable], estimate_s: float | None = None):
        super().__init__(key, work, estimate_s, expire_s=EXPIRE_S, name="deploy")

    def cancelled_error(self) -> BaseException:
        return DeployCancelled(self.done, self.total)

    def is_cancellation(self, error: BaseException) -> bool:
        return isinstance(error, DeployCancelled) or super().is_cancellation(error)

    def finish(self, result: DeployTable) -> None:
        DEPLOY_CACHE.put(self.key, result)


def deploy_work(dense: nn.Module, engine, result, calibration: torch.Tensor, data: EvalData | None, *,
                repaired=None, config: DeployConfig | None = None,
                export: ExportConfig | None = None) -> Callable[[Job[DeployTable]], DeployTable]:
    """The work of a :class:`DeployJob`: export into a new folder under :data:`FILES_ROOT`, then measure.

    Export errors (:class:`core.deploy.onnx_export.ExportError`, ``CalibrationError``) and missing
    runtimes end the job with that error (``job.error``), whose message is meant for the user.
    ``config``/``export``: None for the defaults.
    """
    config = config or DeployConfig()
    export = export or ExportConfig()

    def work(job: Job[DeployTable]) -> DeployTable:
        FILES_ROOT.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="setting-", dir=FILES_ROOT))
        try:
            with job.steps():  # checkpoints raise this job's cancellation; each step is a compute-queue turn
                job.check()
                job.progress(0, 1, "exporting to ONNX")
                with turn():
                    files = export_setting(dense, engine, result, folder, calibration, repaired=repaired, config=export)
                model = repaired.model if repaired is not None else result.model
                return measure_deployment(dense, model, files, data, config=config, on_progress=job.progress,
                                          cancel=lambda: job.cancelled)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    return work


def cached(key: Hashable) -> DeployTable | None:
    """The finished table for ``key``, if any session measured it."""
    return DEPLOY_CACHE.get(key)


def running(key: Hashable) -> DeployJob | None:
    """The job measuring ``key`` now, unless it was cancelled."""
    return _JOBS.running(key)


def submit(key: Hashable, work: Callable[[Job[DeployTable]], DeployTable], watcher: Hashable,
           estimate_s: float | None = None) -> DeployJob:
    """The running job for ``key``, or a new one started on ``work(job)``; ``watcher`` watches it either way."""
    return _JOBS.submit(key, lambda: DeployJob(key, work, estimate_s), watcher)
