"""The accuracy repair in the app: the Explore page's Repair choice and the Learn page's measured story.

Repairs run on the default model (the shipped ResNet-20) with 64 calibration images and 32
held out (``core.services.repairs.REPAIR_IMAGES`` / ``REPAIR_HOLDOUT``), a second or two each.
"""
from __future__ import annotations

import json

import pytest

import core.services.repairs as repairs
import core.services.teaching as teaching
from tests.app.test_pages import explorer, metric, no_errors, start
from tests.services.repair_fixture import write_repair_csv
from core.workloads.models import state_dict_digest as weights_fingerprint
from ui.charts import REFERENCE

pytestmark = pytest.mark.usefixtures("fresh_caches")  # every test starts without cached models


@pytest.fixture(autouse=True)
def small_repairs(monkeypatch):
    monkeypatch.setattr(repairs, "REPAIR_IMAGES", 64)
    monkeypatch.setattr(repairs, "REPAIR_HOLDOUT", 32)


def chart(at, kind: str) -> dict | None:
    for element in at.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        if (spec["layout"].get("meta") or {}).get("kind") == kind:
            return spec
    return None


# ---------------------------------------------------------------- Explore

def test_reconstruction_repairs_a_copy_shows_the_layer_errors_and_none_gives_back_the_figures():
    at = start(tau=0.3)
    no_errors(at)
    session = explorer(at)
    model_before = weights_fingerprint(session.loaded.model)
    unrepaired = metric(at, "Accuracy Δ vs dense").value
    assert at.selectbox(key="repair").value == "none" and chart(at, "repair_errors") is None
    at.selectbox(key="repair").set_value("reconstruct").run()
    no_errors(at)
    assert at.session_state["bn_recal"] is True  # mirrored for the pages that read the old key
    config = session.last_config
    # on request: choosing the level does not start it; the figures are BN-recalibrated meanwhile, and say so
    assert session.repairs.cached(config, "reconstruct") is None
    assert any("not run for this setting" in i.value for i in at.info)
    assert "BN recalibration" in metric(at, "Accuracy Δ vs dense").help
    at.button(key="repair_run").click().run()
    no_errors(at)
    repaired = session.repairs.cached(config, "reconstruct")
    assert repaired is not None and repaired.n_images == 64 and repaired.n_holdout == 32
    assert any("repaired in" in p.proto.text for p in at.get("progress"))
    spec = chart(at, "repair_errors")
    before, after = spec["data"]
    assert before["x"] == after["x"] == repaired.errors["name"].tolist()
    assert sum(after["y"]) < sum(before["y"])  # reconstruction lowers the layers' output error
    accuracy = metric(at, "Accuracy Δ vs dense")
    assert "+ reconstruction" in accuracy.help
    estimate = session.accuracy.estimate(session.apply(config), "reconstruct", "cpu")
    assert estimate is not None and accuracy.value == f"{100 * estimate.delta:+.2f} pts"
    # off: the unrepaired figures, unchanged; the shared model never touched
    at.selectbox(key="repair").set_value("none").run()
    no_errors(at)
    assert metric(at, "Accuracy Δ vs dense").value == unrepaired
    assert "After repair" not in metric(at, "Accuracy Δ vs dense").help
    assert chart(at, "repair_errors") is None and at.session_state["bn_recal"] is False
    assert weights_fingerprint(session.loaded.model) == model_before
    assert weights_fingerprint(explorer(at).loaded.model) == model_before


def test_a_finished_repair_is_shown_to_another_session_at_once():
    first = start(tau=0.25, repair="bias")
    first.button(key="repair_run").click().run()
    no_errors(first)
    done = explorer(first).repairs.cached(explorer(first).last_config, "bias")
    assert done is not None
    second = start(tau=0.25, repair="bias")  # another user, same model and setting
    no_errors(second)
    assert explorer(second).repairs.cached(explorer(second).last_config, "bias") is done  # not repaired again
    assert not any("repaired in" in p.proto.text for p in second.get("progress"))  # no job ran
    assert chart(second, "repair_errors") is not None


def test_an_old_bn_recal_setting_is_the_bn_level():
    at = start(tau=0.3, bn_recal=True)  # as the Tune page, or a session from before the levels, leaves it
    no_errors(at)
    assert at.session_state["repair"] == "bn" and at.selectbox(key="repair").value == "bn"
    assert "BN recalibration" in metric(at, "Accuracy Δ vs dense").help


def test_a_slider_move_never_starts_a_repair_and_the_estimate_is_revised_while_it_runs():
    at = start(tau=0.3, repair="reconstruct")
    session = explorer(at)
    at.button(key="repair_run").click().run()
    no_errors(at)
    assert session.repairs.cached(session.last_config, "reconstruct") is not None
    progress = [p.proto.text for p in at.get("progress")]
    assert any("repaired in" in text for text in progress), progress
    at.slider(key="tau").set_value(0.35).run()  # a new setting: the repair is out of date, not restarted
    no_errors(at)
    assert session.repairs.cached(session.last_config, "reconstruct") is None
    assert any("not run for this setting" in i.value for i in at.info)


def test_progress_text_revises_the_time_left_from_the_layers_done():
    from types import SimpleNamespace

    from ui.repair_view import _progress_text

    job = SimpleNamespace(done=5, total=20, layer="layer2.0.conv1", elapsed_s=10.0)
    text = _progress_text(job, estimate=100.0)
    assert "about 30 s left" in text and "first estimate 100 s" in text  # 15 layers × 2 s measured per layer


def test_the_automatic_repair_runs_after_a_rest_unless_stopped(monkeypatch):
    import ui.repair_view as repair_view

    monkeypatch.setattr(repair_view, "REST_S", 0.05)
    at = start(tau=0.3, repair_auto=True)
    session = explorer(at)
    key = repr(session.repairs.key(session.last_config, "reconstruct"))
    at.session_state["explore_repair_stopped"] = key  # what a Stop click leaves (its rerun cannot be timed here)
    at.session_state["repair"] = "reconstruct"
    at.run()
    no_errors(at)
    assert session.repairs.cached(session.last_config, "reconstruct") is None  # stopped: not started by itself
    assert any("stopped for this setting" in i.value for i in at.info)
    at.selectbox(key="repair").set_value("none").run()  # another choice clears the stop: nothing lingers
    assert not any("stopped" in i.value for i in at.info)
    at.selectbox(key="repair").set_value("reconstruct").run()  # automatic, after the rest: it runs
    no_errors(at)
    assert session.repairs.cached(session.last_config, "reconstruct") is not None


def test_a_model_without_labelled_data_offers_no_repair_and_says_why():
    at = start(model_key="synthetic:mlp")
    no_errors(at)
    box = at.selectbox(key="repair")
    assert box.disabled and box.options == ["none"]
    assert "no labelled images" in box.help


# ---------------------------------------------------------------- Learn

def test_learn_without_the_csv_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setitem(teaching.REPAIR_CSVS, "resnet18", tmp_path / "repair_resnet18.csv")
    at = start()
    at.switch_page("pages/learn.py").run()
    no_errors(at)
    assert any("10.09 %" in m.value for m in at.markdown)  # the paper's figure, quoted
    assert any("not here yet" in i.value for i in at.info)
    assert any(c.value == teaching.REPAIR_COMMANDS["resnet18"] for c in at.code)
    assert chart(at, "repair_accuracy") is None


def test_learn_with_the_csv_shows_the_measured_figures(monkeypatch, tmp_path):
    path = write_repair_csv(tmp_path / "repair_resnet18.csv")
    monkeypatch.setitem(teaching.REPAIR_CSVS, "resnet18", path)
    at = start()
    at.switch_page("pages/learn.py").run()
    no_errors(at)
    text = " ".join(m.value for m in at.markdown)
    assert "keeps **11.2 %**" in text and "scores **10.00 %**" in text and "dense: 88.17 %" in text
    for figure in ("65.43 %", "70.12 %", "80.21 %"):  # BN, bias, reconstruction at τ = 0.2, from the file
        assert figure in text
    spec = chart(at, "repair_accuracy")
    series = [trace["name"] for trace in spec["data"] if trace.get("meta") != REFERENCE]
    assert series == ["pruned, no repair", "+ BN recalibration", "+ bias correction", "+ reconstruction"]
    references = [trace["name"] for trace in spec["data"] if trace.get("meta") == REFERENCE]
    assert references == ["dense (88.17 %)", "chance (10 classes)"]  # named in the legend, not as text on the plot
    assert any("+ reconstruction (%)" in table.value.columns for table in at.dataframe)
    assert not any("not here yet" in i.value for i in at.info)
