"""ui.tune_tradeoff.show_granularity_tradeoff on a page of its own (AppTest.from_function; the shipped default model)."""
from __future__ import annotations

import functools

import pytest
from streamlit.testing.v1 import AppTest

import core.measure.granularity_tradeoff as tradeoff_module
import ui.tune_tradeoff
from core.services import tune_jobs
from tests.app.apptest_tools import has_chart, no_errors
from tests.app.tune_tools import run_jobs


def _page() -> None:
    from ui.sidebar import page_setup
    from ui.tune_tradeoff import show_granularity_tradeoff

    session = page_setup()
    show_granularity_tradeoff(session)


@pytest.fixture(autouse=True)
def fresh(fresh_caches, tmp_path, monkeypatch):
    monkeypatch.setattr(tradeoff_module, "tradeoff_cache_dir", lambda: tmp_path / "tradeoff")
    quick = functools.partial(tradeoff_module.TradeoffConfig, latency_budget_s=0.02, latency_runs=2)
    monkeypatch.setattr(ui.tune_tradeoff, "TradeoffConfig", quick)  # a short timing: behaviour, not figures
    tune_jobs.clear()
    yield
    tune_jobs.clear()


def test_the_section_measures_both_granularities_and_draws_one_chart_with_its_front():
    at = AppTest.from_function(_page, default_timeout=300).run()
    no_errors(at)
    assert any("Run the granularity comparison" in i.value for i in at.info)
    at.multiselect(key="tune_tradeoff_weight_taus").set_value([0.3])
    at.multiselect(key="tune_tradeoff_channel_taus").set_value([0.7])
    at.multiselect(key="tune_tradeoff_repairs").set_value(["none"])
    at.select_slider(key="tune_tradeoff_per_class").set_value(20)
    at.select_slider(key="tune_tradeoff_batch").set_value(1).run()
    run_jobs(at.button(key="tune_tradeoff_run").click().run())
    no_errors(at)
    frame = at.session_state["tune_tradeoff_frame"]
    assert list(frame["granularity"]) == ["dense", "weight", "channel"] and (frame["n"] == 200).all()
    assert frame.loc[1, "mac_ratio"] == 1.0 and frame.loc[2, "mac_ratio"] < 1.0
    assert has_chart(at, "tune_tradeoff_chart")
    assert any(c.value.startswith("What you see:") for c in at.caption)
    at.radio(key="tune_tradeoff_chart_axis").set_value("measured latency").run()
    no_errors(at)
    assert has_chart(at, "tune_tradeoff_chart")
