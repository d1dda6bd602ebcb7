"""Explore at channel granularity (AppTest, the shipped ResNet-20): the controls, the counted figures, the charts."""
from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from core.method.channel_config import ChannelConfig
from tests.app.apptest_tools import has_chart, no_errors, start

pytestmark = pytest.mark.usefixtures("fresh_caches")


def metric(at: AppTest, prefix: str):
    found = [m for m in at.metric if m.label.startswith(prefix)]
    assert found, f"no metric starting with {prefix!r}: {[m.label for m in at.metric]}"
    return found[0]


def scores_meta(at: AppTest) -> dict:
    for chart in at.get("plotly_chart"):
        meta = json.loads(chart.proto.spec)["layout"].get("meta") or {}
        if "group" in meta:
            return meta
    raise AssertionError("no channel score histogram on the page")


def test_weight_granularity_is_the_default_and_unchanged():
    at = start(latency_on=False)
    no_errors(at)
    assert at.radio(key="explore_granularity").value == "weight"
    assert at.slider(key="tau") is not None and has_chart(at, "histogram")
    assert not has_chart(at, "channel_scores")


def test_channel_mode_counts_macs_and_moves_beta():
    at = start(explore_granularity="channel", explore_tau_ch=0.3, latency_on=False)
    no_errors(at)
    assert has_chart(at, "channel_scores") and has_chart(at, "channel_share")
    assert not has_chart(at, "histogram")  # the weight-level view is not drawn in channel mode
    session = at.session_state["explorer"]
    pruner = session.channels.pruner().pruner
    group = at.selectbox(key="explore_ch_group").value
    meta = scores_meta(at)
    assert meta["group"] == group
    assert meta["beta"] == pytest.approx(0.3 * float(pruner.scores()[group].max()), rel=1e-5)
    low = float(metric(at, "MACs").value.split("%")[0])
    at.slider(key="explore_tau_ch").set_value(0.8).run()
    no_errors(at)
    high_meta = scores_meta(at)
    assert high_meta["beta"] == pytest.approx(0.8 * float(pruner.scores()[group].max()), rel=1e-5)
    high = float(metric(at, "MACs").value.split("%")[0])
    assert high < low <= 100.0
    result = pruner.apply(ChannelConfig(tau=0.8))
    assert high == pytest.approx(100 * result.mac_ratio, abs=0.1)
    # the loaded model is untouched: the pruner holds its own copy, the session's model keeps every channel
    assert all(p.shape == q.shape for p, q in zip(session.loaded.model.parameters(), pruner.dense.parameters()))


def test_channel_repair_is_offered_as_a_job_and_back_to_weight_mode():
    at = start(explore_granularity="channel", explore_tau_ch=0.5, latency_on=False, explore_ch_repair="reconstruct")
    no_errors(at)
    assert at.radio(key="explore_ch_repair").value == "reconstruct"
    assert any(b.key == "explore_ch_repair_run" for b in at.button)
    at.radio(key="explore_granularity").set_value("weight").run()
    no_errors(at)
    assert has_chart(at, "histogram")
