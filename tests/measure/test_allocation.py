"""The per-layer τ allocation, its joint check and its verification (core.measure.allocation*), on small models and synthetic data."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import core.measure.allocation as alloc
import core.measure.allocation_joint as joint
import core.measure.allocation_verify as verify
from core.measure.allocation import Target, layer_options, per_layer_tau
from core.measure.allocation_verify import compare_at_equal_retention
from core.measure.sensitivity import COLUMNS, Sensitivity, SensitivityConfig, measure_sensitivity
from core.method.config import CompressionConfig
from core.method.engine import Engine
from tests.conftest import same_state, state_fingerprint
from tests.measure.test_sensitivity import fake_data, small_model


class TwoLayers(nn.Module):
    """Two Linear layers of the same size (64×64) and a small head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def two_layers() -> TwoLayers:
    torch.manual_seed(0)
    return TwoLayers().eval()


TAUS = (0.1, 0.3, 0.6, 0.9)


def fake_sensitivity(engine: Engine, drops: dict[str, list[float]], taus=TAUS) -> Sensitivity:
    """A Sensitivity with the given drops (fractions) per layer along ``taus``."""
    total = sum(engine.sorted_magnitudes(name).numel() for name in drops)
    records = []
    for name, values in drops.items():
        numel = engine.sorted_magnitudes(name).numel()
        for tau, drop in zip(taus, values):
            records.append({"layer": name, "tau": tau, "numel": numel, "share": numel / total, "kept": 0,
                            "retention": 0.0, "n": 1000, "newly_wrong": round(1000 * drop), "newly_right": 0,
                            "drop": drop, "drop_low": drop, "drop_high": drop, "loss_increase": drop, "kl": drop})
    return Sensitivity(frame=pd.DataFrame.from_records(records, columns=list(COLUMNS)), taus=tuple(taus),
                       layers=tuple(drops), dense_accuracy=0.9, n=1000, images="fake", precision="fp32",
                       bn_recalibration=False, seconds=0.0, computed=0, cached=0)


def engine_kept(engine: Engine, config: CompressionConfig, layers) -> int:
    stats = engine.apply(config).stats.set_index("name")
    return int(stats.loc[list(layers), "kept"].sum())


def test_the_less_sensitive_layer_is_pruned_harder():
    engine = Engine(two_layers())
    sensitivity = fake_sensitivity(engine, {"a": [0.01, 0.05, 0.2, 0.5], "b": [0.0, 0.001, 0.01, 0.03],
                                            "head": [0.0, 0.01, 0.05, 0.2]})
    allocation = per_layer_tau(sensitivity, engine, Target("retention", 0.5))
    assert allocation.layer_tau["b"] > allocation.layer_tau["a"]
    assert allocation.kept["b"] < allocation.kept["a"]
    swapped = per_layer_tau(fake_sensitivity(engine, {"a": [0.0, 0.001, 0.01, 0.03], "b": [0.01, 0.05, 0.2, 0.5],
                                                      "head": [0.0, 0.01, 0.05, 0.2]}),
                            engine, Target("retention", 0.5))
    assert swapped.layer_tau["a"] > swapped.layer_tau["b"]


@pytest.mark.parametrize("rho", [0.9, 0.5, 0.37, 0.25])
def test_retention_budget_is_met_exactly_and_the_engine_agrees(rho):
    engine = Engine(two_layers())
    sensitivity = fake_sensitivity(engine, {"a": [0.01, 0.03, 0.1, 0.3], "b": [0.005, 0.02, 0.15, 0.4],
                                            "head": [0.0, 0.01, 0.05, 0.2]})
    allocation = per_layer_tau(sensitivity, engine, Target("retention", rho))
    budget = math.floor(rho * allocation.numel)
    assert allocation.total_kept <= budget
    assert allocation.total_kept == budget  # random weights: no ties, so the exact count is reachable
    config = allocation.config()
    assert engine_kept(engine, config, sensitivity.layers) == allocation.total_kept
    for name, kept in allocation.kept.items():
        assert engine.apply(config).stats.set_index("name").loc[name, "kept"] == kept
    assert 0 <= allocation.predicted_drop == pytest.approx(sum(allocation.layer_drop.values()))


def test_bytes_budget_is_met_under_it():
    engine = Engine(two_layers())
    sensitivity = fake_sensitivity(engine, {"a": [0.01, 0.03, 0.1, 0.3], "b": [0.005, 0.02, 0.15, 0.4],
                                            "head": [0.0, 0.01, 0.05, 0.2]})
    dense = engine.apply(CompressionConfig()).model_bytes_compressed
    for fraction in (0.8, 0.5, 0.35):
        target = int(fraction * dense)
        allocation = per_layer_tau(sensitivity, engine, Target("bytes", target))
        size = engine.apply(allocation.config()).model_bytes_compressed
        assert size <= target
        assert size >= target - 64  # the back-off lands close to the budget


def test_max_drop_keeps_the_estimated_drop_under_it():
    engine = Engine(two_layers())
    sensitivity = fake_sensitivity(engine, {"a": [0.01, 0.03, 0.1, 0.3], "b": [0.005, 0.02, 0.15, 0.4],
                                            "head": [0.0, 0.01, 0.05, 0.2]})
    previous = None
    for drop in (0.0, 0.01, 0.05, 0.2):
        allocation = per_layer_tau(sensitivity, engine, Target("max_drop", drop))
        assert allocation.predicted_drop <= drop + 1e-9
        if previous is not None:
            assert allocation.total_kept <= previous  # a larger allowance never keeps more
        previous = allocation.total_kept
    assert previous < allocation.numel


def test_an_unreachable_target_is_refused():
    engine = Engine(two_layers())
    sensitivity = fake_sensitivity(engine, {"a": [0.0] * 4, "b": [0.0] * 4, "head": [0.0] * 4}, taus=(0.05, 0.1))
    with pytest.raises(ValueError, match="cannot reach retention"):
        per_layer_tau(sensitivity, engine, Target("retention", 0.05))
    with pytest.raises(ValueError, match="cannot reach stored size"):
        per_layer_tau(sensitivity, engine, Target("bytes", 100))


@pytest.mark.parametrize("kind, value, message", [
    ("retention", 0.0, r"\(0, 1\]"), ("retention", 1.2, r"\(0, 1\]"), ("bytes", -5, "positive"),
    ("max_drop", 2, r"\[0, 1\]"), ("speed", 1, "one of"), ("retention", float("nan"), "finite"),
    ("retention", "0.3", "number"),
])
def test_target_refuses_bad_values(kind, value, message):
    with pytest.raises(ValueError, match=message):
        Target(kind, value)


def test_hull_keeps_the_convex_lower_envelope():
    cost = np.array([10.0, 8.0, 6.0, 4.0, 2.0])
    drop = np.array([0.0, 0.5, 0.6, 2.0, 2.1])
    assert alloc._hull(cost, drop) == [0, 2, 4]  # point 1 lies above 0→2, point 3 above 2→4


def test_tau_for_kept_hits_exact_counts_and_respects_ties():
    engine = Engine(two_layers())
    sensitivity = fake_sensitivity(engine, {"a": [0.0] * 4})
    option = layer_options(sensitivity, engine)[0]
    for kept in (4096, 4000, 2048, 17, 1):
        tau, reached = option.tau_for_kept(kept)
        assert reached == kept == option.kept_at(tau)
        assert engine_kept(engine, CompressionConfig(layer_tau={"a": tau}), ["a"]) == kept
    # ties: a layer whose weights take four values can only keep multiples of its groups
    model = two_layers()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]).repeat(1024).view(64, 64))
    engine = Engine(model)
    option = layer_options(fake_sensitivity(engine, {"a": [0.0] * 4}), engine)[0]
    tau, reached = option.tau_for_kept(3000)
    assert reached == 2048 and option.kept_at(tau) == 2048


def test_uniform_tau_for_kept_is_the_closest_count():
    engine = Engine(two_layers())
    layers = ["a", "b", "head"]
    total = sum(engine.sorted_magnitudes(n).numel() for n in layers)
    for fraction in (0.8, 0.4, 0.2):
        kept = int(fraction * total)
        tau = verify.uniform_tau_for_kept(engine, layers, kept)
        got = engine_kept(engine, CompressionConfig(tau=tau), layers)
        assert abs(got - kept) <= 3


def test_comparison_at_equal_retention_on_a_small_model(tmp_path):
    model = small_model()
    before = state_fingerprint(model)
    data = fake_data(model, n=120)
    calibration = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    engine = Engine(model)
    sensitivity = measure_sensitivity(model, SensitivityConfig(taus=(0.1, 0.3, 0.6), precision="fp32", n_images=100),
                                      data=data, engine=engine, cache_root=tmp_path / "s")
    allocation = per_layer_tau(sensitivity, engine, Target("retention", 0.4))
    calls = []
    comparison = compare_at_equal_retention(model, allocation, engine=engine, data=data, calibration=calibration,
                                            cache_root=tmp_path / "a", on_progress=lambda d, t, l: calls.append(d))
    frame = comparison.frame.set_index(["method", "bn_recalibrated"])
    assert len(frame) == 8 and calls == list(range(9))
    kept = allocation.total_kept
    for method in ("per_layer", "global_magnitude"):
        for bn in (False, True):
            assert frame.loc[(method, bn), "kept"] == kept  # the same retention, to the weight
    assert abs(frame.loc[("uniform", False), "kept"] - kept) <= 0.01 * allocation.numel
    assert frame.loc[("dense", False), "drop"] == 0 and frame.loc[("dense", False), "retention"] == 1
    for (method, bn), row in frame.iterrows():
        right = comparison.predictions[(method, bn)] == data.labels
        assert row["accuracy"] == pytest.approx(float(right.float().mean()))
        assert row["drop"] == pytest.approx(frame.loc[("dense", False), "accuracy"] - row["accuracy"])
    size = engine.apply(allocation.config()).model_bytes_compressed
    assert frame.loc[("per_layer", False), "bytes"] == size
    assert abs(frame.loc[("global_magnitude", True), "bytes"] - size) <= 0.05 * size  # same kept, other layers
    delta, low, high = comparison.difference("per_layer", "global_magnitude", True)
    assert low <= delta <= high
    assert comparison.config == allocation.config()
    assert same_state(model, before)
    # the second run reads every row from the cache
    again = compare_at_equal_retention(model, allocation, engine=engine, data=data, calibration=calibration,
                                       cache_root=tmp_path / "a")
    assert again.frame["cached"].all()
    assert again.frame["accuracy"].tolist() == comparison.frame["accuracy"].tolist()
    text = verify.format_comparison(comparison.frame)
    assert "automatic per-layer τ" in text and "global magnitude" in text


def test_candidates_share_the_budget_and_magnitude_is_global_magnitude(tmp_path):
    from core.measure.baselines import magnitude_baseline

    model = small_model()
    engine = Engine(model)
    sensitivity = measure_sensitivity(model, SensitivityConfig(taus=(0.1, 0.3, 0.6), precision="fp32", n_images=100),
                                      data=fake_data(model), engine=engine, cache_root=tmp_path)
    found = joint.candidate_allocations(sensitivity, engine, Target("retention", 0.4))
    assert [c.method for c in found] == ["sensitivity", "magnitude", "blend 0.25", "blend 0.5", "blend 0.75"]
    total = found[0].total_kept
    for candidate in found:
        assert candidate.total_kept == total  # no ties in random weights: every count is reachable
        assert engine_kept(engine, candidate.config(), sensitivity.layers) == total
    pruned, _ = magnitude_baseline(model, "global_magnitude", found[0].numel - total)
    for name, kept in found[1].kept.items():
        assert kept == int(torch.count_nonzero(pruned.get_submodule(name).weight))
    assert [c.method for c in joint.candidate_allocations(sensitivity, engine, Target("max_drop", 0.05))] == \
        ["sensitivity"]
    dense = engine.apply(CompressionConfig()).model_bytes_compressed
    for candidate in joint.candidate_allocations(sensitivity, engine, Target("bytes", dense // 2)):
        assert engine.apply(candidate.config()).model_bytes_compressed <= dense // 2


def test_choose_jointly_keeps_the_most_accurate_candidate_and_caches(tmp_path, monkeypatch):
    import core.measure.sensitivity as sens

    model = small_model()
    data = fake_data(model)
    engine = Engine(model)
    calibration = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    config = SensitivityConfig(taus=(0.1, 0.3, 0.6), precision="fp32", n_images=100)
    sensitivity = measure_sensitivity(model, config, data=data, engine=engine, cache_root=tmp_path / "s")
    chosen = joint.choose_jointly(model, sensitivity, engine, Target("retention", 0.4), data=data,
                                  calibration=calibration, cache_root=tmp_path / "a")
    frame = chosen.candidates
    assert len(frame) == 5 and frame["chosen"].sum() == 1
    best = frame[frame["chosen"]].iloc[0]
    assert best["candidate"] == chosen.method and best["accuracy"] == frame["accuracy"].max()
    # the figure is the candidate run whole on the sensitivity's images, BN recalibrated
    images, _, _ = sens.sensitivity_images(config, data)
    predicted, _ = sens.recipe_outputs(engine.apply(chosen.config()).model, images.images, "fp32", calibration)
    assert best["accuracy"] == pytest.approx(float((predicted == images.labels).float().mean()))
    monkeypatch.setattr(sens, "recipe_outputs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("cached")))
    again = joint.choose_jointly(model, sensitivity, engine, Target("retention", 0.4), data=data,
                                 calibration=calibration, cache_root=tmp_path / "a")
    assert again.layer_tau == chosen.layer_tau
    assert "◀" in joint.format_candidates(frame)
