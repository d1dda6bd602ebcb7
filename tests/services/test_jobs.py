"""core.services.jobs and core.services.tune_jobs on tiny models: progress, partial results, cancel, estimates.

The only timed assertion is the issue's contract, a cancel that takes effect within 2 s, checked
with a wide margin: the steps here take milliseconds, a checkpoint runs before every layer.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

import core.measure.sweeps as sweeps_module
from core.common import steps
from core.measure.sweeps import SweepConfig, run_sweep, sweep_plan
from core.services import tune_jobs
from core.services.jobs import Job, JobRegistry, Pace
from tests.measure.test_sweeps import balanced_fake, calibration, small_model


@pytest.fixture(autouse=True)
def fresh():
    threads = torch.get_num_threads()
    tune_jobs.clear()
    yield
    tune_jobs.clear()
    torch.set_num_threads(threads)


def test_pace_estimates_from_the_first_measured_step_and_revises():
    pace = Pace([0.0, 2.0, 1.0, 1.0])  # a cached step, then steps of cost 2, 1, 1
    assert pace.remaining_s() is None  # nothing measured yet
    pace.step(1)  # the cached step: costs nothing, tells nothing
    assert not pace.measured
    time.sleep(0.05)
    pace.step(2)
    first = pace.remaining_s()
    assert first is not None and first == pytest.approx(pace._seconds / 2 * 2, rel=1e-6)
    time.sleep(0.2)  # the next step is much slower: the estimate grows
    pace.step(3)
    assert pace.remaining_s() > first / 2
    assert Pace([0.0, 0.0]).remaining_s() == 0.0  # everything cached: nothing left


def test_a_job_reports_progress_partial_results_and_its_result():
    release = threading.Event()

    def work(job: Job) -> str:
        job.plan([1.0, 1.0, 1.0])
        for done in range(1, 4):
            job.progress(done, 3, f"step {done}")
            job.publish(list(range(done)))
            if done == 1:
                assert release.wait(10)
        return "finished"

    registry = JobRegistry()
    job = registry.submit("key", lambda: Job("key", work, expire_s=30), watcher=1)
    assert registry.submit("key", lambda: Job("key", work), watcher=2) is job  # a second session joins it
    deadline = time.monotonic() + 10
    while job.done < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.fraction == pytest.approx(1 / 3) and job.partial == [0] and job.estimate_s is not None
    release.set()
    assert job.wait(10) and job.result == "finished" and job.error is None and job.partial == [0, 1, 2]
    assert registry.running("key") is None


def test_a_watcher_that_stops_polling_lets_the_job_go(monkeypatch):
    job = Job("key", lambda job: None, expire_s=0.05)
    job.default_grace_s = 0.0
    job.watch("tab")
    assert not job.cancelled
    time.sleep(0.15)  # the tab stopped polling
    assert job.cancelled


def _sweep_config(**kwargs) -> SweepConfig:
    return SweepConfig(**{"taus": (0.0, 0.2, 0.4), "baselines": ("global_magnitude",), "calibration_size": 64,
                          **kwargs})


def test_tau_zero_is_measured_once_and_the_plan_counts_only_what_runs(tmp_path, monkeypatch):
    model, data, calib = small_model(), balanced_fake(), calibration()
    config = _sweep_config()
    runs = []
    real = sweeps_module._Runner.compute
    monkeypatch.setattr(sweeps_module._Runner, "compute", lambda self, row: runs.append(row) or real(self, row))
    plan = sweep_plan(model, config, data=data, calibration=calib, cache_root=tmp_path)
    frame = run_sweep(model, config, data=data, calibration=calib, cache_root=tmp_path)
    assert len(plan) == len(frame) == 2 + 3 * 4  # dense, then 3 τ × (boundary, magnitude) × (as is, BN recal)
    assert [r.method for r in runs if r.tau == 0.0] == ["dense", "dense"]  # τ = 0 runs as the dense model only
    assert sum(u > 0 for u in plan) == len(runs) == 2 + 2 * 4
    zero = frame[frame["tau"] == 0.0]
    for bn in (False, True):
        same = zero[zero["bn_recalibrated"] == bn]
        assert same["accuracy"].nunique() == 1 and (same["retention"] == 1.0).all()
    assert sweep_plan(model, config, data=data, calibration=calib, cache_root=tmp_path) == (0.0,) * len(plan)


def _tiny_loaded(model):
    class Loaded:  # what tune_jobs reads of a core.services.choices.LoadedModel
        key, card, mean, std = "tiny", None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    Loaded.model = model
    return Loaded()


def test_a_sweep_job_fills_in_row_by_row_and_its_result_is_shared(tmp_path, monkeypatch):
    model, data, calib = small_model(), balanced_fake(), calibration()
    monkeypatch.setattr(sweeps_module, "sweep_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(sweeps_module, "eval_data", lambda split, mean, std: data)
    monkeypatch.setattr(tune_jobs, "eval_data", lambda split, mean, std: data)
    monkeypatch.setattr(sweeps_module, "calibration_images", lambda n, seed, mean, std: calib)
    monkeypatch.setattr(sweeps_module, "_context", lambda *args: {"test": "tiny"})
    seen = []
    real = Job.publish
    monkeypatch.setattr(Job, "publish", lambda self, partial: seen.append(len(partial)) or real(self, partial))
    job = tune_jobs.sweep(_tiny_loaded(model), _sweep_config(), "cpu", watcher=1)
    assert job.wait(60) and job.error is None, job.error
    assert seen == list(range(1, len(job.result) + 1))  # one more row after every step
    assert job.first_estimate_s is not None and job.total == len(job.result)
    again = tune_jobs.sweep(_tiny_loaded(model), _sweep_config(), "cpu", watcher=2)  # another session
    assert again.wait(30) and again.error is None
    assert again.result["cached"].all() and again.pace.total_units == 0  # every row from the disk cache, no work
    assert again.result.drop(columns="cached").equals(job.result.drop(columns="cached"))


def test_cancel_takes_effect_within_two_seconds_inside_a_step(tmp_path, monkeypatch):
    """A job stopped in the middle of a forward pass: the next layer's checkpoint raises."""
    model, data, calib = small_model(), balanced_fake(60), calibration()
    monkeypatch.setattr(sweeps_module, "sweep_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(sweeps_module, "eval_data", lambda split, mean, std: data)
    monkeypatch.setattr(tune_jobs, "eval_data", lambda split, mean, std: data)
    monkeypatch.setattr(sweeps_module, "calibration_images", lambda n, seed, mean, std: calib)
    monkeypatch.setattr(sweeps_module, "_context", lambda *args: {"test": "cancel"})
    inside, release = threading.Event(), threading.Event()
    original = type(model.conv2).forward

    def slow_forward(self, x):  # the second conv blocks until the test has pressed Cancel
        if steps.in_job() and not inside.is_set():
            inside.set()
            release.wait(10)
        return original(self, x)

    monkeypatch.setattr(type(model.conv2), "forward", slow_forward)
    job = tune_jobs.sweep(_tiny_loaded(model), _sweep_config(), "cpu", watcher=1)
    assert inside.wait(30)
    pressed = time.monotonic()
    tune_jobs.stop(job, 1)
    release.set()
    assert job.wait(2.0), "the job did not stop within 2 s of the cancel"
    assert time.monotonic() - pressed < 2.0
    assert isinstance(job.error, steps.Cancelled) and job.result is None
    assert tune_jobs.RESULTS.get(job.key) is None


def test_a_job_waiting_for_the_queue_is_cancelled_there(monkeypatch):
    from core.services.compute_queue import ComputeQueue

    queue = ComputeQueue(slots=1)
    monkeypatch.setattr("core.services.jobs.COMPUTE", queue)
    with queue.job():  # another session's work holds the only slot
        def work(job: Job) -> None:
            with job.steps(), steps.turn():
                raise AssertionError("never reached: the slot is taken")

        job = Job("k", work)
        job.watch(1)
        job.start()
        time.sleep(0.2)
        job.cancel()
        assert job.wait(2.0)
    assert isinstance(job.error, steps.Cancelled)


def test_outside_a_job_steps_do_nothing():
    model = small_model()
    with steps.interruptible(model):
        assert not model.conv1._forward_pre_hooks  # no hooks unless a job runs
    steps.checkpoint()
    with steps.turn():
        pass


def test_cancel_requested_is_the_jobs_cancel_as_a_flag():
    assert not steps.cancel_requested()  # outside a job
    seen = []

    def work(job: Job) -> None:
        with job.steps():
            seen.append(steps.cancel_requested())
            job.cancel()
            seen.append(steps.cancel_requested())

    job = Job("k", work)
    job.watch(1)
    job.start()
    assert job.wait(10) and seen == [False, True]
