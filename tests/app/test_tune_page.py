"""The Tune page's per-layer sections, driven headless with AppTest (small settings: 2 τ values, 100 images)."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

import core.measure.allocation_joint
import core.measure.allocation_verify
import core.measure.sensitivity
import core.services.session
from core.method.config import CompressionConfig
from tests.app.apptest_tools import APP, no_errors
from tests.app.tune_tools import run_jobs

TIMEOUT = 300


@pytest.fixture(scope="module")
def sensitivity_cache(tmp_path_factory):
    """One sensitivity cache for this module: the first test measures the map, the next reads it back."""
    return tmp_path_factory.mktemp("sensitivity")


@pytest.fixture(autouse=True)
def fresh(fresh_caches, tmp_path, monkeypatch, sensitivity_cache):
    """Fresh model caches, the joint-check and verification caches in a temporary folder, the module's sensitivity."""
    monkeypatch.setattr(core.measure.sensitivity, "sensitivity_cache_dir", lambda: sensitivity_cache)
    for module in (core.measure.allocation_joint, core.measure.allocation_verify):
        monkeypatch.setattr(module, "allocation_cache_dir", lambda: tmp_path / "allocation")
    yield


def test_sensitivity_map_per_layer_tau_and_apply_in_one_click(tmp_path):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page("pages/tune.py").run()
    no_errors(at)
    assert not [b for b in at.button if b.key == "tune_alloc_run"]  # the per-layer section waits for a sensitivity
    at.multiselect(key="tune_sens_taus").set_value([0.1, 0.3]).run()
    at.select_slider(key="tune_sens_images").set_value(100).run()
    run_jobs(at.button(key="tune_sens_run").click().run())
    no_errors(at)
    sensitivity = at.session_state["tune_sens"]
    assert sensitivity.taus == (0.1, 0.3) and sensitivity.n == 100 and sensitivity.computed == len(sensitivity.layers)
    assert "training images" in sensitivity.images
    charts = {c.proto.id for c in at.get("plotly_chart")}
    assert any("tune_sens_map" in key for key in charts)
    # a second measurement of the same settings is read from the disk cache
    run_jobs(at.button(key="tune_sens_run").click().run())
    assert at.session_state["tune_sens"].cached == len(sensitivity.layers)

    for label, key in (("stored size (KiB)", "tune_alloc_bytes"), ("largest estimated drop (points)", "tune_alloc_drop")):
        at.radio(key="tune_alloc_kind").set_value(label).run()
        no_errors(at)
        assert at.number_input(key=key).value > 0
    at.radio(key="tune_alloc_kind").set_value("retention (% of Conv/Linear weights kept)").run()
    at.number_input(key="tune_alloc_retention").set_value(50.0).run()
    at.radio(key="tune_alloc_verify").set_value("1,000 test images (faster)").run()
    run_jobs(at.button(key="tune_alloc_run").click().run())
    no_errors(at)
    allocation, comparison = at.session_state["tune_alloc"]
    assert allocation.retention <= 0.5
    frame = comparison.frame
    assert set(frame["method"]) == {"dense", "uniform", "per_layer", "global_magnitude"}
    assert set(frame["bn_recalibrated"]) == {False, True}
    assert (frame["n"] == 1000).all()
    table = next(t for t in at.dataframe if "accuracy (%)" in t.value.columns)
    assert len(table.value) == 8
    assert "automatic per-layer τ" in set(table.value["method"])
    charts = {c.proto.id for c in at.get("plotly_chart")}
    assert any("tune_alloc_chart" in key for key in charts) and any("tune_alloc_taus" in key for key in charts)

    at.button(key="tune_alloc_apply").click().run()
    no_errors(at)
    applied = at.session_state["layer_tau"]
    assert applied == allocation.layer_tau and len(applied) == len(sensitivity.layers)
    assert at.session_state["tau"] == 0.0 and at.session_state["quantize"] is False
    assert at.session_state["bn_recal"] is True
    assert comparison.config == CompressionConfig(layer_tau=applied)


def test_per_layer_tau_chosen_and_verified_after_reconstruction_then_applied(monkeypatch):
    from core.services import repairs, tune_jobs

    monkeypatch.setattr(repairs, "REPAIR_IMAGES", 32)  # small repairs, the candidates only (the greedy search
    monkeypatch.setattr(tune_jobs, "PER_LAYER_SCORE_IMAGES", 100)  # is tested in tests/measure/test_allocation_repair)
    monkeypatch.setattr(tune_jobs, "PER_LAYER_GREEDY_STEPS", 0)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page("pages/tune.py").run()
    at.multiselect(key="tune_sens_taus").set_value([0.1, 0.3]).run()
    at.select_slider(key="tune_sens_images").set_value(100).run()
    run_jobs(at.button(key="tune_sens_run").click().run())
    at.selectbox(key="tune_alloc_repair").set_value("reconstruct").run()
    no_errors(at)
    assert [r.value for r in at.radio if r.key == "tune_alloc_kind_rep"] == ["retention (% of Conv/Linear weights kept)"]
    at.number_input(key="tune_alloc_retention").set_value(50.0).run()
    at.radio(key="tune_alloc_verify").set_value("1,000 test images (faster)").run()
    run_jobs(at.button(key="tune_alloc_rep_run").click().run(), timeout=900)
    no_errors(at)
    found = at.session_state["tune_alloc_rep"]
    frame = found.verification.frame
    assert found.level == "reconstruct" and found.allocation.retention <= 0.5 + 1e-3
    assert list(frame["method"])[:2] == ["dense", "per-layer τ"]
    assert {"uniform τ", "global magnitude", "sensitivity allocation"} <= set(frame["method"])
    assert (frame["n"] == 1000).all() and (frame.loc[frame["method"] != "dense", "repair_seconds"] > 0).all()
    candidates = found.allocation.candidates
    assert candidates.attrs["repair"] == "reconstruct" and candidates["chosen"].sum() == 1
    assert "training images" in candidates.attrs["images"]  # chosen on training images, verified on test images
    assert any("paired differences" in c.value for c in at.caption)

    at.button(key="tune_alloc_rep_apply").click().run()
    no_errors(at)
    assert at.session_state["layer_tau"] == found.allocation.layer_tau and at.session_state["tau"] == 0.0
    assert at.session_state["repair"] == "reconstruct"
