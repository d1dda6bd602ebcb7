"""core.services.channel_demo: the Learn page's timed convolution (tiny sizes)."""
from __future__ import annotations

import pytest

from core.services.channel_demo import channel_speed_demo


def test_same_share_of_weights_kept_but_only_channels_shrink_the_macs():
    demo = channel_speed_demo(kept=0.25, channels=16, size=8, batch=2, budget_s=0.02)
    rows = demo.table.set_index(demo.table["variant"].str.split(" ").str[0])
    assert list(rows.index) == ["dense", "zeroed", "removed"]
    assert rows.loc["dense", "weights kept"] == 1.0
    assert rows.loc["zeroed", "weights kept"] == pytest.approx(0.25, abs=0.01)
    assert rows.loc["removed", "weights kept"] == pytest.approx(0.25, abs=0.01)  # as a share of the dense conv's
    assert rows.loc["zeroed", "MACs (counted)"] == rows.loc["dense", "MACs (counted)"]  # zeros are still multiplied
    assert rows.loc["removed", "MACs (counted)"] == rows.loc["dense", "MACs (counted)"] // 4
    assert (demo.table["median ms"] > 0).all() and demo.rounds >= 5
    assert rows.loc["dense", "speed-up"] == 1.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kept"):
        channel_speed_demo(kept=0.0)
    with pytest.raises(ValueError, match="positive"):
        channel_speed_demo(channels=0)
