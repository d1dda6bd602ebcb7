"""The Tune page's measurements as queued, cancellable jobs shared by every session (no Streamlit).

Each function starts (or joins) one :class:`TuneJob` and returns at once:

* :func:`sweep`: the τ sweep or the θ sweep on CIFAR-10 (:func:`core.measure.sweeps.run_sweep`);
* :func:`sensitivity`: the per-layer sensitivity map (:func:`core.measure.sensitivity.measure_sensitivity`);
* :func:`per_layer`: the automatic per-layer τ, its joint check and its verification on test images
  (:mod:`core.measure.allocation_joint`, :mod:`core.measure.allocation_verify`);
* :func:`per_layer_repaired`: the automatic per-layer τ judged after a repair (bias, reconstruction) and
  verified with it (:mod:`core.measure.allocation_repair`, :mod:`core.measure.tune_per_layer_repair`);
* :func:`user_sweep`: the τ or θ sweep on the user's own images (:func:`core.services.user_tuning.run_user_sweep`).

What every job does (:class:`core.services.jobs.Job`): it runs in a worker thread; every row or
cell is one turn on the shared compute queue (:data:`core.services.compute_queue.COMPUTE`), so
other sessions' work interleaves with it; :attr:`Job.partial` holds the rows measured so far (a
DataFrame), published after every step; a cancel stops it within one layer's forward pass
(:mod:`core.common.steps`), and what was measured before stays in the disk caches, so running it
again resumes where it stopped. The estimate comes from the measured first step: every step's cost
is counted beforehand in images run through the model (0 for a row on disk), and the estimate is
the elapsed time plus the remaining images at the rate measured so far, revised after every step.

Sharing. A job is keyed by everything its result depends on (model, settings, images, device):
sessions asking for the same key watch one job. A session watches by polling
(:meth:`Job.watch` on every poll); a session that has not polled for :data:`EXPIRE_S` seconds is
gone, and a job nobody watches is cancelled. Every row of the CIFAR-10 jobs is in the disk caches of
:mod:`core.measure` (keyed as before), so a repeat from any session reads them back without running
the model; a sweep on the user's images, which has no disk cache, keeps its finished result in
:data:`RESULTS` for every session of this process.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from core.common.lru import LRUCache
from core.common.steps import interruptible, turn
from core.measure.accuracy import eval_data, has_batchnorm, predict
from core.measure.allocation import Allocation, Target, per_layer_tau
from core.measure.allocation import layer_options
from core.measure.allocation_joint import candidate_allocations, choose_jointly
from core.measure.allocation_repair import (
    RepairedChoice,
    RepairJudge,
    SearchConfig,
    choose_after_repair,
    scoring_split,
)
from core.measure.allocation_verify import (
    Comparison,
    compare_at_equal_retention,
    test_images,
)
from core.measure.repair import RepairConfig
from core.measure.sensitivity import (
    Sensitivity,
    SensitivityConfig,
    measure_sensitivity,
    recipe_outputs,
    resolve_precision,
    sensitivity_images,
    sensitivity_plan,
)
from core.measure.sweeps import SweepConfig, run_sweep, sweep_engine, sweep_plan
from core.measure.tune_per_layer_repair import Verification, baseline_settings, verify_after_repair
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.services.choices import LoadedModel
from core.services import repairs
from core.services.jobs import Job, JobRegistry
from core.services.user_tuning import (
    run_user_sweep,
    tune_data,
    tune_model,
    user_sweep_plan,
)
from core.workloads.image_folder import ImageSet

#: seconds after its last poll that a session still counts as watching (a closed tab lets its job go)
EXPIRE_S = 20.0
#: images of the warm-up forward pass before a job's first timed step
WARM_UP_IMAGES = 32
#: finished sweeps on the user's images by job key, process-wide (a frame each: small)
RESULTS = LRUCache(32)
#: the per-layer τ after repair: labelled training images each allocation is scored on, greedy moves tried
PER_LAYER_SCORE_IMAGES = 1000
PER_LAYER_GREEDY_STEPS = 6
_JOBS = JobRegistry()


class TuneJob(Job):
    """A Tune measurement in a worker thread (:class:`core.services.jobs.Job`); with ``remember``, its result
    goes to :data:`RESULTS`."""

    def __init__(self, key: Hashable, work: Callable[[Job], object], name: str, remember: bool):
        super().__init__(key, work, expire_s=EXPIRE_S, name=name)
        self.remember = remember

    def finish(self, result: object) -> None:
        if self.remember:
            RESULTS.put(self.key, result)


@dataclass(frozen=True)
class PerLayerResult:
    """The automatic per-layer τ and its verification against uniform τ and global magnitude."""

    allocation: Allocation
    comparison: Comparison


def _model_id(loaded: LoadedModel) -> str | None:
    card = loaded.card or {}
    return f"sha256:{card['sha256']}" if "sha256" in card else None


def _start(key: Hashable, work: Callable[[Job], object], watcher: Hashable, name: str, remember: bool = False) -> Job:
    """The running job for ``key``, or a new one (that returns a result in :data:`RESULTS` at once).

    ``remember``: keep the finished result in :data:`RESULTS` (for work without a disk cache).
    """
    def run(job: Job) -> object:
        found = RESULTS.get(key)
        if found is not None:
            job.progress(1, 1, "from the cache")
            return found
        with job.steps():
            return work(job)

    return _JOBS.submit(key, lambda: TuneJob(key, run, name, remember), watcher)


def running(key: Hashable) -> Job | None:
    """The job working on ``key`` now, unless it was cancelled."""
    return _JOBS.running(key)


def jobs() -> list[Job]:
    """Every Tune job running now."""
    return _JOBS.jobs()


def clear() -> None:
    """Cancel every Tune job and forget the finished results (tests)."""
    _JOBS.clear()
    RESULTS.clear()


def stop(job: Job, watcher: Hashable) -> None:
    """``watcher``'s Cancel: it stops watching; with nobody else watching, the job stops at its next checkpoint."""
    job.unwatch(watcher, now=True)


def _warm_up(engine: Engine, images: torch.Tensor) -> None:
    """One small forward pass of the dense model (a private copy), so that the first timed step does not also
    pay the process's first use of the model's kernels (measured: about twice a later step's time)."""
    model = engine.apply(CompressionConfig()).model
    with interruptible(model):
        predict(model.to(memory_format=torch.channels_last) if images.ndim == 4 else model, images[:WARM_UP_IMAGES])


# ---------------------------------------------------------------- the jobs

def sweep(loaded: LoadedModel, config: SweepConfig, device: str, watcher: Hashable) -> Job:
    """The τ (or θ) sweep of ``config`` on CIFAR-10 for ``loaded``; its result is run_sweep's frame.

    Repaired rows (``config.repair_levels``) fit on the Explore page's repair images
    (:func:`core.services.repairs.calibration`), so a setting applied from here shows there the
    accuracy measured here (on the same evaluation images)."""
    key = ("sweep", loaded.key, config, str(device))
    model_id = _model_id(loaded)
    where = {"model_id": model_id, "mean": loaded.mean, "std": loaded.std, "device": device}

    def work(job: Job) -> pd.DataFrame:
        if config.repair_levels:  # the images the Explore page's repair fits on, so that both show one figure
            with turn():
                where["repair_images"] = repairs.calibration(config.repair_images, repairs.REPAIR_HOLDOUT,
                                                             config.repair_seed, tuple(loaded.mean),
                                                             tuple(loaded.std))[0]
        units = sweep_plan(loaded.model, config, **where)
        engine = None
        if any(units):  # what every computed row needs, made before the first step is timed for the estimate
            with turn():
                images = eval_data("test", tuple(loaded.mean), tuple(loaded.std)).images
                engine = sweep_engine(loaded.model, config)
                _warm_up(engine, images)
        job.plan(units)
        return run_sweep(loaded.model, config, **where, on_progress=job.progress, on_rows=job.publish, engine=engine)

    return _start(key, work, watcher, "sweep")


def sensitivity(loaded: LoadedModel, config: SensitivityConfig, device: str, watcher: Hashable) -> Job:
    """The per-layer sensitivity of ``loaded``; ``partial`` is the frame of cells so far, the result a Sensitivity."""
    key = ("sensitivity", loaded.key, config, str(device))
    where = {"model_id": _model_id(loaded), "mean": loaded.mean, "std": loaded.std, "device": device}

    def work(job: Job) -> Sensitivity:
        units = sensitivity_plan(loaded.model, config, **where)
        engine = None
        if any(units):  # built before the first step is timed for the estimate (a cached run needs none)
            with turn():
                engine = Engine(loaded.model)
                images = sensitivity_images(config, None, loaded.mean, loaded.std)[0].images
                recipe_outputs(engine.apply(CompressionConfig()).model, images[:WARM_UP_IMAGES],  # as the cells run
                               resolve_precision(config.precision, device), None, device)
        job.plan(units)
        return measure_sensitivity(loaded.model, config, **where, engine=engine, on_progress=job.progress,
                                   on_cells=job.publish)

    return _start(key, work, watcher, "sensitivity")


def per_layer(loaded: LoadedModel, measured: Sensitivity, target: Target, *, joint: bool, verify_images: int | None,
              bn_recalibration: bool, calibration_size: int, device: str, watcher: Hashable) -> Job:
    """Choose the per-layer τ for ``target`` from ``measured`` (jointly checked when ``joint``), then verify it.

    The result is a :class:`PerLayerResult`; the steps are the joint check's candidates, then the
    verification's rows (dense, uniform τ, per-layer τ, global magnitude; each also BN-recalibrated).
    """
    joint = joint and target.kind != "max_drop"
    key = ("per_layer", loaded.key, measured.key, measured.config, target, joint, verify_images, bn_recalibration,
           calibration_size, str(device))
    where = {"model_id": _model_id(loaded), "mean": loaded.mean, "std": loaded.std, "device": device}

    def work(job: Job) -> PerLayerResult:
        with turn():
            engine = Engine(loaded.model)  # ranks every weight once (seconds for a ResNet-18)
        config = measured.config or SensitivityConfig()
        bn = bn_recalibration and has_batchnorm(loaded.model)
        candidates = len(candidate_allocations(measured, engine, target)) if joint else 0
        one = measured.n + (config.calibration_size if bn else 0)
        verify_n = verify_images or 10_000
        flags = (False, True) if bn else (False,)
        rows = [verify_n + (calibration_size if flag else 0) for _ in range(4) for flag in flags]
        job.plan([one] * candidates + rows)

        def offset(start: int) -> Callable[[int, int, str], None]:
            return lambda done, total, label: job.progress(start + done, candidates + len(rows), label)

        if joint:
            allocation = choose_jointly(loaded.model, measured, engine, target, **where, on_progress=offset(0))
        else:
            allocation = per_layer_tau(measured, engine, target)
        with turn():
            test = test_images(verify_images, loaded.mean, loaded.std)
        comparison = compare_at_equal_retention(
            loaded.model, allocation, engine=engine, data=test, calibration_size=calibration_size,
            bn_recalibration=bn, **where, on_progress=offset(candidates))
        return PerLayerResult(allocation, comparison)

    return _start(key, work, watcher, "per-layer τ")


@dataclass(frozen=True)
class RepairedPerLayerResult:
    """The per-layer τ chosen after a repair (:func:`core.measure.allocation_repair.choose_after_repair`) and its
    verification on test images, every row after the same repair (:func:`verify_after_repair`)."""

    choice: RepairedChoice
    verification: Verification
    level: str

    @property
    def allocation(self) -> Allocation:
        return self.choice.allocation


def per_layer_repaired(loaded: LoadedModel, measured: Sensitivity, target: Target, level: str, *,
                       verify_images: int | None, device: str, watcher: Hashable) -> Job:
    """Choose the per-layer τ for a retention ``target`` *after the repair* ``level``, then verify it.

    Candidates (sensitivity allocation, global magnitude's per-layer counts, blends) and a few greedy
    moves between layers are each judged after that repair (Explore's repair images and seed), on
    labelled *training* images disjoint from the fitting ones; the choice is then verified on test
    images against uniform τ, global magnitude and the sensitivity allocation, every one repaired the
    same way. Steps: the candidates, the greedy evaluations (at most 2·layers + 5·steps), the
    verification rows.
    """
    key = ("per_layer_repaired", loaded.key, measured.key, measured.config, target, level, verify_images, str(device))

    def work(job: Job) -> RepairedPerLayerResult:
        with turn():
            engine = Engine(loaded.model)  # ranks every weight once (seconds for a ResNet-18)
            candidates = candidate_allocations(measured, engine, target)
            search = SearchConfig(repair=RepairConfig(level, n_images=repairs.REPAIR_IMAGES, n_holdout=0,
                                                      seed=repairs.REPAIR_SEED),
                                  score_images=PER_LAYER_SCORE_IMAGES, steps=PER_LAYER_GREEDY_STEPS)
            fit, score = scoring_split(search.repair.n_images, search.score_images, search.repair.seed,
                                       loaded.mean, loaded.std)
            judge = RepairJudge(loaded.model, engine, layer_options(measured, engine), fit, score, search)
        greedy = 2 * len(judge.options) + 5 * search.steps if search.steps else 0  # at most
        verify = 5
        job.plan([1.0] * len(candidates) + [1.0] * greedy + [1.0] * verify)

        def offset(start: int) -> Callable[[int, int, str], None]:
            return lambda done, total, label: job.progress(start + done, len(candidates) + greedy + verify, label)

        choice = choose_after_repair(judge, candidates, offset(0), offset(len(candidates)))
        allocation = choice.allocation
        settings = {"per-layer τ": allocation.config(), **baseline_settings(judge, allocation),
                    "sensitivity allocation": candidates[0].config()}
        with turn():
            test = test_images(verify_images, loaded.mean, loaded.std)
        verification = verify_after_repair(judge, settings, test,
                                           lambda _: offset(len(candidates) + greedy))
        return RepairedPerLayerResult(choice, verification, level)

    return _start(key, work, watcher, "per-layer τ after repair")


def user_sweep(loaded: LoadedModel, images: ImageSet, configs: Sequence[CompressionConfig], n_images: int | None,
               calibration: int | None, watcher: Hashable, name: str = "sweep") -> Job:
    """The sweep of ``configs`` on the user's ``images`` (a fixed subset of ``n_images``); ``calibration``:
    BN-recalibrate on the first that many of them. The result is run_user_sweep's frame plus ``description``."""
    key = ("user_sweep", loaded.key, images.key, tuple(configs), n_images, calibration)

    def work(job: Job) -> pd.DataFrame:
        tuned = tune_model(loaded)
        with turn():  # unlabelled images are labelled by the dense model: a forward pass
            data = tune_data(images, loaded.model, n_images)
        calibration_images = images.images[:calibration] if calibration else None
        job.plan(user_sweep_plan(tuned, data, configs, calibration_images))

        def publish(frame: pd.DataFrame) -> None:
            job.publish(frame.assign(description=data.description))

        frame = run_user_sweep(tuned, data, configs, calibration_images, on_progress=job.progress, on_rows=publish)
        return frame.assign(description=data.description)

    return _start(key, work, watcher, f"your-images {name}", remember=True)
