"""Learn's "Why channels give speed and zeros do not": the demo is timed on click, never typed in (AppTest)."""
from __future__ import annotations

from core.services import channel_demo
from tests.app.apptest_tools import no_errors, start


def test_the_channel_demo_is_measured_on_click(monkeypatch):
    calls = []
    real = channel_demo.channel_speed_demo

    def small(kept):  # the page's call, on a smaller convolution (seconds → milliseconds)
        calls.append(kept)
        return real(kept, channels=32, size=8, batch=2, budget_s=0.02)

    monkeypatch.setattr(channel_demo, "channel_speed_demo", small)
    at = start()
    at.switch_page("pages/learn.py").run()
    no_errors(at)
    assert not [d for d in at.dataframe if "speed-up" in d.value.columns]  # nothing before the click
    at.slider(key="learn_demo_kept").set_value(0.25).run()
    at.button(key="learn_demo_run").click().run()
    no_errors(at)
    assert calls == [0.25]
    table = next(d.value for d in at.dataframe if "speed-up" in d.value.columns)
    assert len(table) == 3 and table["MACs (counted)"].iloc[2] * 4 == table["MACs (counted)"].iloc[0]
    assert any("Measured just now" in c.value for c in at.caption)
