"""The Tune page's τ sweep with repair levels (AppTest): repaired series, per-level answers, apply, cancel.

The repairs fit on 32 training images here (``REPAIR_IMAGES`` patched) and the sweep evaluates on
500 test images of the shipped ResNet-20: seconds, not minutes.
"""
from __future__ import annotations

import json
import threading

import pytest

from core.common import steps
from core.measure import sweeps
from core.services import repairs, tune_jobs
from tests.app.apptest_tools import no_errors, start, texts
from tests.app.tune_tools import run_jobs


@pytest.fixture(autouse=True)
def fresh(fresh_caches, tmp_path, monkeypatch):
    monkeypatch.setenv("BOUNDARY_CACHE_DIR", str(tmp_path))  # a fresh sweep cache
    monkeypatch.setattr(repairs, "REPAIR_IMAGES", 32)
    tune_jobs.clear()
    yield
    tune_jobs.clear()


def repair_sweep(at, *, quant: bool):
    at.switch_page("pages/tune.py").run()
    at.slider(key="tune_tau_max").set_value(0.3).run()
    at.slider(key="tune_steps").set_value(3).run()
    at.toggle(key="tune_bn").set_value(False).run()
    at.toggle(key="tune_quant").set_value(quant).run()
    at.multiselect(key="tune_repairs").set_value(["reconstruct"]).run()
    return at


def test_repaired_series_are_drawn_answered_from_their_own_points_and_applied():
    at = repair_sweep(start(), quant=True)
    run_jobs(at.button(key="tune_run").click().run())
    no_errors(at)
    frame = at.session_state["tune_frame"]
    repaired = frame[frame["repair"] == "reconstruct"]
    # the app starts on θ = 0.3, 4/8 bit: the repaired series is that quantized setting's, at every τ
    assert sorted(repaired["tau"]) == [0.0, 0.15, 0.3] and repaired["theta"].eq(0.3).all()
    assert repaired["b_low"].eq(4).all() and repaired["b_high"].eq(8).all()
    (chart,) = [c for c in at.get("plotly_chart") if "tune_acc" in c.proto.id and "partial" not in c.proto.id]
    assert "boundary pruning, 4/8 bit + reconstruction" in {trace.get("name") for trace in json.loads(chart.proto.spec)["data"]}

    at.number_input(key="tune_points").set_value(100.0).run()  # every τ passes at every level
    summary = next(m.value for m in at.markdown if m.value.startswith("Within 100 points of dense"))
    assert "τ = 0.3 no repair" in summary and "τ = 0.3 with reconstruction" in summary
    at.number_input(key="tune_points").set_value(0.0).run()  # nothing above τ = 0 keeps every point...
    best = repaired[repaired["tau"] > 0]["accuracy"].max()
    dense = frame.loc[frame["method"] == "dense", "accuracy"].iloc[0]
    if best < dense:  # ...unless a repaired point reached the dense accuracy on these images
        assert any("no swept τ > 0 stays within 0 points" in c.value for c in at.caption)

    at.number_input(key="tune_points").set_value(100.0).run()
    at.button(key="tune_apply_reconstruct").click().run()
    no_errors(at)
    assert at.session_state["tau"] == 0.3 and at.session_state["repair"] == "reconstruct"
    assert at.session_state["quantize"] is True and at.session_state["b_low"] == 4


def test_cancel_stops_a_sweep_inside_its_repair(monkeypatch):
    inside = threading.Event()
    real = sweeps.repair_setting

    def repair_setting(*args, cancel=None, **kwargs):
        inside.set()
        while not cancel():  # the sweep's cancel flag (core.common.steps.cancel_requested)
            threading.Event().wait(0.02)
        return real(*args, cancel=cancel, **kwargs)  # raises RepairCancelled before its first layer

    monkeypatch.setattr(sweeps, "repair_setting", repair_setting)
    at = repair_sweep(start(), quant=False)
    at.button(key="tune_run").click().run()
    assert inside.wait(120)
    at.run()
    (job,) = tune_jobs.jobs()
    at.button(key="tune_sweep_job_cancel").click().run()
    assert job.wait(10) and isinstance(job.error, steps.Cancelled)  # a cancel, not a failed repair
    at.run()
    no_errors(at)
    assert any("was cancelled" in t for t in texts(at.info))
    assert "tune_frame" not in at.session_state
