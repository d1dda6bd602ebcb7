"""AppTest runs the pages in this process: keep the Explore page's self-refining accuracy short in tests,
and give tests that load models a process without cached ones.

The page refines its paired estimate until the interval is within ``accuracy_target``; the
app's default (±1 point) can take the whole test set for a setting far from dense. Page
tests check behaviour, not precision, so they start at ±5 points unless a test sets another.
"""
import pytest
import streamlit as st
import torch

import core.services.session
import ui.state


@pytest.fixture(autouse=True)
def coarse_accuracy_target(monkeypatch):
    monkeypatch.setitem(ui.state.DEFAULTS, "accuracy_target", 0.05)


@pytest.fixture
def fresh_caches():
    """No cached models or results before and after the test; PyTorch's thread count restored after."""
    threads = torch.get_num_threads()
    st.cache_resource.clear()
    core.services.session.clear_caches()
    yield
    st.cache_resource.clear()
    core.services.session.clear_caches()
    torch.set_num_threads(threads)
