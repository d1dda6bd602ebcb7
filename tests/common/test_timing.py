import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from core.common.timing import Timing, percentile, time_call, time_interleaved


def test_drops_a_function_measured_much_slower():
    stats = time_interleaved({"fast": lambda: None, "slow": lambda: time.sleep(0.004)},
                             torch.device("cpu"), warmup=2, min_rounds=3, budget_s=0.0, drop_slower_than=4.0)
    assert stats["slow"].rounds == 1 and stats["fast"].rounds >= 3
    assert stats["slow"].median_s >= 0.004 > stats["fast"].median_s


def test_rounds_are_interleaved_and_bounded():
    order = []
    stats = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                             warmup=1, min_rounds=4, max_rounds=4)
    assert order == ["a", "b"] * 5  # one warm-up round, then four timed rounds, in turn
    assert stats["a"].rounds == stats["b"].rounds == 4


def test_hooks_run_outside_the_timed_window():
    seen = []
    time_interleaved({"a": lambda: seen.append("call")}, warmup=0, min_rounds=2, max_rounds=2,
                     before_call=lambda name: seen.append(f"before {name}"),
                     after_call=lambda name: seen.append(f"after {name}"))
    assert seen == ["before a", "call", "after a"] * 2


def test_time_call_measures_the_call():
    assert time_call(lambda: time.sleep(0.002)) >= 0.002


def test_bad_round_counts_are_refused():
    with pytest.raises(ValueError, match="min_rounds"):
        time_interleaved({"a": lambda: None}, min_rounds=5, max_rounds=2)


@given(st.lists(st.floats(min_value=0, max_value=1e3, allow_nan=False), min_size=1, max_size=60))
def test_median_p95_min_are_measured_values_in_order(samples):
    timing = Timing(samples_s=tuple(samples))
    assert timing.p95_s in samples and timing.min_s == min(samples)
    assert timing.min_s <= timing.median_s <= max(samples)
    assert percentile(samples, 100) == max(samples)
    assert sum(s <= timing.p95_s for s in samples) >= 0.95 * len(samples)
