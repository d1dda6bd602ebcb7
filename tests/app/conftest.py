"""AppTest runs the pages in this process: keep the Explore page's self-refining accuracy short in tests.

The page refines its paired estimate until the interval is within ``accuracy_target``; the
app's default (±1 point) can take the whole test set for a setting far from dense. Page
tests check behaviour, not precision, so they start at ±5 points unless a test sets another.
"""
import pytest

import ui.state


@pytest.fixture(autouse=True)
def coarse_accuracy_target(monkeypatch):
    monkeypatch.setitem(ui.state.DEFAULTS, "accuracy_target", 0.05)
