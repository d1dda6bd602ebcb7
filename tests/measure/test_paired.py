import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from core.measure.paired import (PairedEstimate, PredictionStore, balanced_order, paired_estimate,
                                 paired_interval)


@given(st.lists(st.integers(0, 4), min_size=1, max_size=300), st.integers(0, 10))
def test_balanced_order_is_a_permutation_with_balanced_prefixes(labels, seed):
    labels = torch.tensor(labels)
    order = balanced_order(labels, seed)
    assert sorted(order.tolist()) == list(range(len(labels)))
    counts = torch.bincount(labels, minlength=5)
    present = int((counts > 0).sum())
    # while every class still has images, each prefix of k·C holds k of each
    full_rounds = int(counts[counts > 0].min())
    for k in range(1, full_rounds + 1):
        prefix = torch.bincount(labels[order[:k * present]], minlength=5)
        assert (prefix[counts > 0] == k).all()


def test_the_same_seed_gives_the_same_order():
    labels = torch.arange(100) % 10
    assert torch.equal(balanced_order(labels, 3), balanced_order(labels, 3))
    assert not torch.equal(balanced_order(labels, 3), balanced_order(labels, 4))


@given(st.integers(0, 200), st.integers(0, 200), st.integers(1, 2000), st.integers(0, 5000))
def test_paired_interval_contains_the_estimate_and_closes_on_the_whole_set(right, wrong, extra, more):
    n = right + wrong + extra
    population = n + more
    low, high = paired_interval(right, wrong, n, population)
    delta = (right - wrong) / n
    assert -1 <= low <= delta <= high <= 1
    if more == 0:
        assert low == high == delta  # every image seen: the figure is exact
    else:
        assert high > low  # never a zero-width interval before the end, even with no discordant image


def test_paired_interval_matches_the_formula():
    right, wrong, n, population = 30, 70, 1000, 10_000
    r, w, m = right + 1, wrong + 1, n + 2
    mean = (r - w) / m
    var = ((r + w) / m - mean ** 2) * m / (m - 1)
    half = 1.959963984540054 * math.sqrt(var / n) * math.sqrt((population - n) / (population - 1))
    low, high = paired_interval(right, wrong, n, population)
    assert low == pytest.approx(-0.04 - half) and high == pytest.approx(-0.04 + half)


def test_paired_is_narrower_than_unpaired_when_few_images_disagree():
    estimate = PairedEstimate(n=1000, population=10_000, correct=850, dense_correct=870, newly_wrong=30,
                              newly_right=10)
    p, q = estimate.accuracy, estimate.dense_accuracy
    unpaired_half = 1.96 * math.sqrt(p * (1 - p) / 1000 + q * (1 - q) / 1000)  # two independent samples
    assert estimate.delta == pytest.approx(-0.02)
    assert estimate.delta_half_width < unpaired_half / 2


def test_stores_fill_from_the_front_and_estimates_count_each_kind():
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    dense, compressed = PredictionStore(6), PredictionStore(6)
    dense_predictions = torch.tensor([0, 1, 1, 1, 0, 0])  # right, right, wrong, right, right, wrong
    compressed_predictions = torch.tensor([0, 0, 0, 1, 1, 1])  # right, wrong, right, right, wrong, right
    calls = []

    def from_(predictions):
        return lambda a, b: calls.append((a, b)) or predictions[a:b]

    dense.extend_to(4, from_(dense_predictions))
    compressed.extend_to(4, from_(compressed_predictions))
    dense.extend_to(3, from_(dense_predictions))  # already known: nothing computed
    assert calls == [(0, 4), (0, 4)]
    estimate = paired_estimate(labels, dense, compressed)
    assert (estimate.n, estimate.correct, estimate.dense_correct) == (4, 3, 3)
    assert (estimate.newly_wrong, estimate.newly_right) == (1, 1) and not estimate.complete
    dense.extend_to(99, from_(dense_predictions))
    compressed.extend_to(6, from_(compressed_predictions))
    final = paired_estimate(labels, dense, compressed)
    assert final.complete and final.delta == pytest.approx((4 - 4) / 6)
