"""The Export page's Repair choice: the packed download carries the repair, with its progress and its estimate.

Repairs run on the default model (the shipped ResNet-20) with 64 calibration images
(``core.services.repairs.REPAIR_IMAGES`` for the shared levels, ``export_repair.CALIBRATION_IMAGES``
for ``bn``), a second or two each.
"""
from __future__ import annotations

import pytest
import torch

import core.services.export_repair as export_repair
import core.services.repairs as repairs
from core.common.formatting import fmt_bytes
from core.deploy.packed_reader import parse_compressed
from core.deploy.packed_writer import compressed_bytes
from core.method.config import CompressionConfig
from tests.app.test_pages import explorer, metric, no_errors, start

pytestmark = pytest.mark.usefixtures("fresh_caches")  # every test starts without cached models

SETTING = dict(tau=0.3, quantize=True, theta_mode="relative", theta_relative=0.4, b_low=4, b_high=8)
CONFIG = CompressionConfig(tau=0.3, theta=0.4, b_low=4, b_high=8)


@pytest.fixture(autouse=True)
def small_repairs(monkeypatch):
    monkeypatch.setattr(repairs, "REPAIR_IMAGES", 64)
    monkeypatch.setattr(repairs, "REPAIR_HOLDOUT", 32)
    monkeypatch.setattr(export_repair, "CALIBRATION_IMAGES", 64)


@pytest.fixture
def progress_calls(monkeypatch):
    """Every ``on_progress`` call the page's repair makes (the page's progress bar is fed by them)."""
    calls = []
    real = export_repair.repaired_packed

    def recording(*args, on_progress=None, **kwargs):
        def progress(done, total, layer):
            calls.append((done, total, layer))
            on_progress(done, total, layer)
        return real(*args, on_progress=progress, **kwargs)

    monkeypatch.setattr(export_repair, "repaired_packed", recording)
    return calls


def captions(at) -> list[str]:
    return [c.value for c in at.caption]


def test_the_packed_download_carries_the_chosen_repair(progress_calls):
    at = start(**SETTING)
    at.switch_page("pages/export.py").run()
    no_errors(at)
    choice = at.radio(key="export_repair")
    assert choice.value == "none" and choice.options == ["None", "BN recalibration", "+ bias correction",
                                                         "+ reconstruction"]
    choice.set_value("reconstruct").run()
    no_errors(at)
    assert any(text.startswith("Repair time · estimated: about") for text in captions(at))
    at.button(key="pack_model").click().run()
    no_errors(at)
    (data,) = at.session_state["_packed"].values()
    assert metric(at, "File size").value == fmt_bytes(len(data))
    assert any("Carries the repair “+ reconstruction”" in text for text in captions(at))
    assert at.get("download_button")[0].proto.label.startswith("Download packed model")
    # the progress went through every layer of the repair
    assert progress_calls and progress_calls[-1][0] == progress_calls[-1][1] == 20
    # the file: the repair recorded, the repaired model bit for bit, the unrepaired file's data size
    session = explorer(at)
    packed = parse_compressed(data)
    assert packed.repair["method"] == "reconstruct" and packed.repair["n_images"] == 64
    assert packed.config == CONFIG
    repaired = session.repairs.cached(CONFIG, "reconstruct")
    loaded = packed.load()
    reference = repaired.model.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())
    plain = parse_compressed(compressed_bytes(session.apply(CONFIG), arch=session.loaded.arch))
    assert packed.data.size == plain.data.size and packed.layers == plain.layers
    # back to no repair: a plain file, packed anew
    at.radio(key="export_repair").set_value("none").run()
    at.button(key="pack_model").click().run()
    no_errors(at)
    (data,) = at.session_state["_packed"].values()
    assert parse_compressed(data).repair is None


def test_bn_recalibration_packs_the_recalibrated_statistics():
    at = start(**SETTING)
    at.switch_page("pages/export.py").run()
    at.radio(key="export_repair").set_value("bn").run()
    at.button(key="pack_model").click().run()
    no_errors(at)
    (data,) = at.session_state["_packed"].values()
    packed = parse_compressed(data)
    assert packed.repair["method"] == "bn" and packed.repair["changed"] > 0
    before = explorer(at).apply(CONFIG).model.state_dict()
    after = packed.load().state_dict()
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    assert all(torch.equal(after[f"{name}.weight"], before[f"{name}.weight"])  # the weights: the setting's own
               for name in explorer(at).engine.layer_names)


def test_the_default_follows_the_explore_page_s_repair_level():
    at = start(**SETTING, repair="bias")
    at.switch_page("pages/export.py").run()
    no_errors(at)
    assert at.radio(key="export_repair").value == "bias"


def test_models_without_training_images_here_offer_no_repair():
    at = start()
    at.sidebar.selectbox(key="model_key").set_value("synthetic:mlp").run()
    at.switch_page("pages/export.py").run()
    no_errors(at)
    assert at.radio(key="export_repair").disabled
    assert any("offered for CIFAR-10 models" in text for text in captions(at))
    at.button(key="pack_model").click().run()
    no_errors(at)
    (data,) = at.session_state["_packed"].values()
    assert parse_compressed(data).repair is None
