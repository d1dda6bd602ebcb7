"""Explore's deployment table: exported to ONNX and measured in ONNX Runtime and OpenVINO as a job, on request."""
from __future__ import annotations

import pytest

import core.services.session_measurements as measurements
from core.measure.deploy_table import DeployConfig
from tests.app.apptest_tools import no_errors, start
from tests.app.test_pages import explorer

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def small_table(monkeypatch):
    """ResNet-20, 64 evaluation images, batch 1 only, a short timing budget: the same code path, in seconds."""
    monkeypatch.setattr(measurements, "DEPLOY_CONFIG", DeployConfig(batches=(1,), eval_images=64, budget_s=0.2))


def test_the_table_is_measured_on_request_and_offers_the_files():
    at = start(tau=0.2, latency_on=False)
    no_errors(at)
    assert not at.get("download_button") or not any("onnx" in b.label for b in at.get("download_button"))
    at.button(key="deploy_run").click().run()
    session = explorer(at)
    key = session.measurements.deploy_key(session.last_config, "none")
    job = at.session_state["explore_deploy_job"]
    for _ in range(300):  # the page's polling fragment, which AppTest does not run, tells the job it is watched
        if job.wait(1):
            break
        job.watch(id(session))
    assert job.finished, "the export and measurement did not finish"
    assert job.error is None, job.error
    at.run()
    no_errors(at)
    table = session.measurements.cached_deploy(session.last_config, "none")
    assert table is not None and job.key == key
    frames = [d.value for d in at.dataframe if "runtime" in d.value.columns]
    assert frames, [list(d.value.columns) for d in at.dataframe]
    shown = frames[0]
    assert {"runtime", "precision", "ms, batch 1", "accuracy %", "file"} <= set(shown.columns)
    assert {"torch eager"} <= set(shown["runtime"])
    labels = [b.label for b in at.get("download_button")]
    assert any("model.int8.onnx" in label for label in labels) and any("model.onnx" in label for label in labels)


def test_a_job_level_asks_for_the_repair_first():
    at = start(tau=0.2, repair="reconstruct", latency_on=False)
    no_errors(at)
    assert any("Run the repair first" in c.value for c in at.caption)
