"""Export in Explore's channel mode: the settings JSON records granularity, τ_ch and the kept channels, and
loading it back puts Explore in channel mode at that τ_ch (AppTest, the default shipped model)."""
from __future__ import annotations

import json

import pytest

from tests.app.apptest_tools import no_errors, start


@pytest.fixture(autouse=True)
def fresh(fresh_caches):
    yield


def test_channel_settings_are_exported_and_applied_back():
    at = start(explore_granularity="channel", explore_tau_ch=0.7, explore_ch_repair="bn")
    at.switch_page("pages/export.py").run()
    no_errors(at)
    text = next(c.value for c in at.code if '"granularity"' in c.value)
    data = json.loads(text)
    assert (data["granularity"], data["tau_ch"], data["norm"], data["fold_bn"]) == ("channel", 0.7, "l2", True)
    assert data["repair"] == "bn" and data["channels"]["kept"]
    assert data["channel_result"]["mac_ratio"] < 1
    assert any("Channel granularity: τ_ch = 0.7" in c.value for c in at.caption)

    at.session_state["explore_granularity"], at.session_state["explore_tau_ch"] = "weight", 0.2
    at.session_state["explore_ch_repair"] = "none"
    at.file_uploader(key="settings_file").set_value(("ch.json", text.encode(), "application/json")).run()
    at.button(key="apply_settings").click().run()
    no_errors(at)
    assert at.session_state["explore_granularity"] == "channel" and at.session_state["explore_tau_ch"] == 0.7
    assert at.session_state["explore_ch_repair"] == "bn"
    assert any("Settings applied" in s.value for s in at.success)

    weight = dict(data, granularity="weight")  # a weight file (old files have no granularity) sets no channel mode
    at.session_state["explore_granularity"] = "weight"
    at.file_uploader(key="settings_file").set_value(("w.json", json.dumps(weight).encode(), "application/json")).run()
    at.button(key="apply_settings").click().run()
    no_errors(at)
    assert at.session_state["explore_granularity"] == "weight"
