"""The Tune page's jobs in AppTest: a sweep runs in the background, the page stays usable, Cancel stops it.

The sweep is held in its second computed row (a wrapper around the row computation that waits at a
checkpoint), so that the page can be looked at and used while the job is running.
"""
from __future__ import annotations

import threading
import time

import pytest

from core.common import steps
from core.measure import sweeps
from core.services import tune_jobs
from tests.app.apptest_tools import no_errors, start, texts
from tests.app.tune_tools import run_jobs


@pytest.fixture(autouse=True)
def fresh(fresh_caches, tmp_path, monkeypatch):
    monkeypatch.setenv("BOUNDARY_CACHE_DIR", str(tmp_path))  # a fresh sweep cache
    tune_jobs.clear()
    yield
    tune_jobs.clear()


class Held:
    """Holds the sweep in its second computed row until ``proceed`` is set (a cancel still stops it)."""

    def __init__(self, monkeypatch):
        self.reached, self.proceed = threading.Event(), threading.Event()
        self.rows = 0
        real = sweeps._Runner.compute

        def compute(runner, row):
            values = real(runner, row)
            self.rows += 1
            if self.rows == 2:  # the dense row (and τ = 0, the dense model) are reported by then
                self.reached.set()
                while not self.proceed.wait(0.02):
                    steps.checkpoint()  # raises once the job is cancelled
            return values

        monkeypatch.setattr(sweeps._Runner, "compute", compute)


def small_sweep(at):
    at.switch_page("pages/tune.py").run()
    at.slider(key="tune_tau_max").set_value(0.3).run()
    at.slider(key="tune_steps").set_value(3).run()
    at.toggle(key="tune_bn").set_value(False).run()
    at.toggle(key="tune_quant").set_value(False).run()  # pruning only (the app starts on 4/8-bit weights)
    return at


def test_the_page_stays_usable_while_a_sweep_runs_and_cancel_stops_it(monkeypatch):
    held = Held(monkeypatch)
    at = small_sweep(start())
    at.button(key="tune_run").click().run()
    no_errors(at)
    assert held.reached.wait(120)
    at.run()  # a poll: progress, the estimate and Cancel are shown; the sweep runs in its thread
    job = tune_jobs.jobs()[0]
    assert not job.finished and job.done >= 3 and len(job.partial) == job.done  # dense, and τ = 0 from it
    assert [b for b in at.button if b.key == "tune_sweep_job_cancel"]
    # the rest of the page answers meanwhile: another section's widget reruns the page at once
    began = time.monotonic()
    at.slider(key="tune_theta_max").set_value(0.5).run()
    no_errors(at)
    assert time.monotonic() - began < 60 and not job.finished
    assert at.slider(key="tune_theta_max").value == 0.5
    # Cancel: the job stops (the contract is 2 s; the margin here is for a loaded test machine)
    at.button(key="tune_sweep_job_cancel").click().run()
    assert job.wait(10) and isinstance(job.error, steps.Cancelled)
    at.run()
    no_errors(at)
    assert any("was cancelled" in t for t in texts(at.info))
    assert "tune_frame" not in at.session_state
    assert not [b for b in at.button if b.key == "tune_sweep_job_cancel"]


def test_a_sweep_fills_in_and_tau_zero_is_measured_once(monkeypatch):
    computed = []
    real = sweeps._Runner.compute
    monkeypatch.setattr(sweeps._Runner, "compute", lambda runner, row: computed.append(row) or real(runner, row))
    at = small_sweep(start())
    run_jobs(at.button(key="tune_run").click().run())
    no_errors(at)
    frame = at.session_state["tune_frame"]
    assert len(frame) == 1 + 3 * 2  # dense, then 3 τ × (boundary, global magnitude)
    assert [row.method for row in computed if row.tau == 0.0] == ["dense"]  # τ = 0 is not run again
    zero = frame[frame["tau"] == 0.0]
    assert zero["accuracy"].nunique() == 1
