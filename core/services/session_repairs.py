"""One explorer session's repair levels: which apply, the models at each level, and the repair job it waits for.

The levels, the process-wide cache of repaired models and the shared cancellable jobs are
:mod:`core.services.repairs`; this module is one session's use of them. ``"bn"`` (BatchNorm
recalibration) is a per-session copy made inside the caller's queued job; ``"bias"`` and
``"reconstruct"`` are repairs shared by every session (:data:`core.services.repairs.REPAIR_CACHE`),
made by a job (:meth:`SessionRepairs.start`) or in the calling thread (:meth:`SessionRepairs.run`).
Repairs never change the shared model, the engine's snapshot or a result: they run on private copies.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from functools import lru_cache

import torch
from torch import nn

from core.common.lru import LRUCache
from core.measure.accuracy import bn_recalibrate, calibration_images
from core.measure.repair import RepairResult, bit_widths, estimate_seconds
from core.measure.repair import repair as run_repair
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult
from core.services import repairs
from core.services.compute_queue import COMPUTE
from core.services.repairs import JOB_LEVELS, LABELS as REPAIR_LABELS, REPAIR_CACHE, RepairJob, check_level, level_of
from core.services.session_context import SessionContext

#: augmented CIFAR-10 training images that BN recalibration runs on
CALIBRATION_IMAGES = 512


@lru_cache(maxsize=2)
def _calibration(n: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return calibration_images(n, mean=mean, std=std)


def clear_caches() -> None:
    """Forget the process-wide repairs and BN calibration images (tests)."""
    repairs.clear()
    _calibration.cache_clear()


def module_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


class SessionRepairs:
    """The repair levels of one session: per-session BN copies, shared repaired models, the job waited for."""

    def __init__(self, context: SessionContext):
        self._context = context
        self._bn_models = LRUCache(2)  # config -> this session's BN-recalibrated copy
        self._repaired_on = LRUCache(1)  # (repair key, device) -> a private copy of a shared repaired model
        self._job = repairs.WatchedRepair(self._context.lock, id(self))  # the repair this session waits for

    # -------------------------------------------------------- levels

    def unavailable(self) -> dict[str, str]:
        """Why each repair level that does not apply here does not (a sentence per level); others apply.

        * every level above ``"none"`` needs labelled images to show its effect on;
        * every one needs unlabelled calibration images that are not the images the accuracy is
          measured on: the CIFAR-10 training split, so only CIFAR-10 models (also when the user's
          images replace the test set); the user's images are never used to repair;
        * ``"bn"`` needs a BatchNorm layer.
        """
        context = self._context
        if not context.has_labels:
            why = ("repair changes the accuracy figures, and there are no labelled images to measure them on here"
                   + (" (your images have no class folders)." if context.data is not None else "."))
            return {level: why for level in repairs.LEVELS[1:]}
        if not context.evaluates_cifar:
            why = ("repair fits the model on unlabelled calibration images, which must not be the images its "
                   "accuracy is measured on. For CIFAR-10 models they come from the CIFAR-10 training split; this "
                   "model has no training images here (your images are its evaluation set).")
            return {level: why for level in repairs.LEVELS[1:]}
        reasons = {}
        if not context.has_batchnorm:
            reasons["bn"] = "this model has no BatchNorm layer, so there are no statistics to recalibrate."
        return reasons

    def levels(self) -> list[str]:
        """The repair levels that apply to this model and data, ``"none"`` first."""
        unavailable = self.unavailable()
        return [level for level in repairs.LEVELS if level not in unavailable]

    def applied_level(self, repair: bool | str | None) -> str:
        """The level the figures are for when ``repair`` is asked: it, or ``"none"`` where it does not apply."""
        level = level_of(repair)
        return level if level in self.levels() else "none"

    @staticmethod
    def variant(level: str) -> object:
        """How a level keys the shared prediction stores and accuracies (False / True: as before the levels)."""
        if level in JOB_LEVELS:
            return ("repair", repairs.repair_config(level))
        return level == "bn"

    def key(self, config: CompressionConfig, level: str) -> tuple:
        """The process-wide key of a repair: (model, setting, :class:`RepairConfig`)."""
        return (self._context.key, config, repairs.repair_config(level))

    def cached(self, config: CompressionConfig, level: str) -> RepairResult | None:
        """The finished repair of ``config`` at ``level`` if any session made it (and it is still cached)."""
        return REPAIR_CACHE.get(self.key(config, level)) if level in JOB_LEVELS else None

    def running(self, config: CompressionConfig, level: str) -> bool:
        """Whether a repair of ``config`` at ``level`` is running now (this session's or another's)."""
        return level in JOB_LEVELS and repairs.running(self.key(config, level)) is not None

    def cached_estimate(self, config: CompressionConfig, level: str) -> float | None:
        """The time estimate of that repair (seconds) if any session made it; None for a level without a job."""
        return repairs.ESTIMATE_CACHE.get(self.key(config, level)) if level in JOB_LEVELS else None

    def _check_job_level(self, level: str) -> str:
        level = check_level(level)
        if level not in JOB_LEVELS:
            raise ValueError(f"repair level {level!r} runs no repair job "
                             f"(the levels with one: {', '.join(JOB_LEVELS)})")
        reason = self.unavailable().get(level)
        if reason is not None:
            raise ValueError(f"{REPAIR_LABELS[level]} does not apply here: {reason}")
        return level

    # -------------------------------------------------------- repairing

    def _repair(self, result: CompressionResult, level: str, *, queued: bool,
                on_progress: Callable[[int, int, str], None] | None = None,
                cancel: Callable[[], bool] | None = None,
                poll: Callable[[], object] | None = None) -> RepairResult:
        """Repair ``result`` at ``level`` on private copies of the dense and the compressed model.

        ``queued``: take a turn on the compute queue (``poll`` while waiting); False inside a job already.
        """
        config = repairs.repair_config(level)
        loaded, engine = self._context.loaded, self._context.engine

        def work() -> RepairResult:
            fit, held = repairs.calibration(config.n_images, config.n_holdout, config.seed,
                                            tuple(loaded.mean), tuple(loaded.std))
            with torch.no_grad():  # private copies: the repair runs and hooks both models' modules
                dense = copy.deepcopy(loaded.model).cpu().eval()
                pruned = copy.deepcopy(result.model).cpu().eval()
            quant = bit_widths(engine, result) if result.config.quantized else None
            return run_repair(dense, pruned, fit, config, holdout=held, quant=quant,
                              on_progress=on_progress, cancel=cancel)

        if not queued:
            return work()
        with COMPUTE.job(poll):
            return work()

    def run(self, result: CompressionResult, level: str, *,
            on_progress: Callable[[int, int, str], None] | None = None,
            cancel: threading.Event | Callable[[], bool] | None = None,
            poll: Callable[[], object] | None = None) -> RepairResult:
        """The repair of ``result`` at ``level`` (``"bias"`` or ``"reconstruct"``), in the calling thread.

        From :data:`REPAIR_CACHE` if made before, else made now as one queued job and cached.
        ``cancel`` (an Event or a callable) stops it before the next layer
        (:class:`core.measure.repair.RepairCancelled`; nothing is cached).
        """
        level = self._check_job_level(level)
        key = self.key(result.config, level)
        cached = REPAIR_CACHE.get(key)
        if cached is None:
            stop = cancel.is_set if isinstance(cancel, threading.Event) else cancel
            cached = self._repair(result, level, queued=True, on_progress=on_progress, cancel=stop, poll=poll)
            REPAIR_CACHE.put(key, cached)
        return cached

    def estimate(self, result: CompressionResult, level: str, poll: Callable[[], object] | None = None) -> float:
        """Estimated seconds of the repair, before it starts (:func:`core.measure.repair.estimate_seconds`).

        A queued job (it times a few forward passes on a private copy); cached per repair key.
        """
        level = self._check_job_level(level)
        key = self.key(result.config, level)
        cached = repairs.ESTIMATE_CACHE.get(key)
        if cached is None:
            with COMPUTE.job(poll):
                with torch.no_grad():
                    model = copy.deepcopy(result.model).cpu()
                cached = estimate_seconds(model, repairs.repair_config(level),
                                          quantized=result.config.quantized and level == "reconstruct",
                                          input_shape=tuple(self._context.loaded.example_input(1).shape[1:]))
            repairs.ESTIMATE_CACHE.put(key, cached)
        return cached

    # -------------------------------------------------------- the job this session waits for

    def start(self, result: CompressionResult, level: str) -> RepairJob:
        """Start the repair of ``result`` at ``level`` in a worker thread, or join the one running.

        The job takes its turn on the compute queue, reports per layer (``job.done`` of
        ``job.total``) and is cancelled by the next slider move
        (:meth:`core.services.session.ExploreSession.update` with another setting or level), by
        :meth:`stop`, or after nobody watched it for a while
        (:data:`core.services.repairs.UNWATCHED_GRACE_S`). When it ends, ``job.result`` is cached
        for every session. Check :meth:`cached` first: a finished repair is not re-run.
        """
        level = self._check_job_level(level)
        key = self.key(result.config, level)

        def work(job: RepairJob) -> RepairResult:
            return self._repair(result, level, queued=True, on_progress=job.progress,
                                cancel=lambda: job.cancelled, poll=job.check)

        return self._job.watch(repairs.submit(key, work, id(self), repairs.ESTIMATE_CACHE.get(key)))

    def release(self, keep: tuple | None = None) -> None:
        """Stop waiting for this session's repair unless it is ``keep``'s; nobody else waiting: it is cancelled."""
        self._job.release(keep)

    def stop(self) -> None:
        """The user's Stop: this session no longer waits for its repair (cancelled unless another session waits)."""
        self.release()

    def leave(self, job: RepairJob) -> None:
        """The page stopped waiting for ``job`` (interrupted): it keeps running for a short grace period."""
        job.unwatch(id(self))

    # -------------------------------------------------------- models at a level

    def calibration_images(self) -> torch.Tensor:
        """BN recalibration's images: augmented CIFAR-10 *training* images (never the evaluation images)."""
        if not self._context.evaluates_cifar:
            raise ValueError(self.unavailable().get("bn") or "this model has no calibration images here")
        loaded = self._context.loaded
        return _calibration(CALIBRATION_IMAGES, loaded.mean, loaded.std)

    def model(self, result: CompressionResult, level: bool | str) -> nn.Module:
        """The compressed model for accuracy at repair level ``level`` (a level, or the old BN flag).

        ``"none"``: ``result.model``. ``"bn"``: BN-recalibrated (a per-session copy, cached per
        setting). ``"bias"``/``"reconstruct"``: the shared repaired model (run it, never change it),
        repaired now inside the caller's queued job if no session has it cached.
        Recalibrating or repairing runs the model on training images: call it inside a queued job.
        """
        level = self.applied_level(level)
        if level == "none":
            return result.model
        if level in JOB_LEVELS:
            key = self.key(result.config, level)
            cached = REPAIR_CACHE.get(key)
            if cached is None:
                cached = self._repair(result, level, queued=False)
                REPAIR_CACHE.put(key, cached)
            return cached.model
        cached = self._bn_models.get(result.config)
        if cached is None:
            cached = bn_recalibrate(result.model, self.calibration_images())
            self._bn_models.put(result.config, cached)
        return cached

    def model_on(self, result: CompressionResult, level: str, device: str) -> nn.Module:
        """:meth:`model` on ``device``; a shared repaired model is copied there (privately), never moved."""
        model = self.model(result, level)
        if level not in JOB_LEVELS:
            return model.to(device)
        if device == "cpu":
            return model
        key = (self.key(result.config, level), device)
        found = self._repaired_on.get(key)
        if found is None:
            with torch.no_grad():
                found = copy.deepcopy(model).to(device).eval()
            self._repaired_on.put(key, found)
        return found

    def drop_recalibrated(self) -> None:
        """Forget the BN-recalibrated copies (the data changed)."""
        self._bn_models = LRUCache(2)

    def session_bytes(self) -> int:
        """Bytes of the copies this session holds alone: BN-recalibrated models, repaired models off the CPU."""
        return sum(module_bytes(m) for m in self._bn_models.values() + self._repaired_on.values())

    def shared_bytes(self) -> int:
        """Bytes of this model's repaired models in the process-wide cache (shared by every session)."""
        return sum(module_bytes(r.model) for key, r in REPAIR_CACHE.items() if key[0] == self._context.key)
