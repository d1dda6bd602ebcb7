"""core.measure.allocation_repair: per-layer τ judged after the repair, on a small model and synthetic data."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import core.measure.allocation_repair as ar
from core.common.steps import Cancelled, job_steps
from core.measure.accuracy import EvalData
from core.measure.allocation import Target, layer_options
from core.measure.allocation_joint import candidate_allocations
from core.measure.repair import RepairConfig, repair_setting
from core.measure.sensitivity import (
    SensitivityConfig,
    measure_sensitivity,
    recipe_outputs,
)
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads import data as core_data
from core.workloads.data import CifarSplit
from tests.conftest import same_state, state_fingerprint
from tests.measure.test_repair import deep_net, images

FAST_REPAIR = RepairConfig("reconstruct", n_images=32, n_holdout=0, batch_size=32)


def labelled(model, n: int = 60, seed: int = 7) -> EvalData:
    x = images(n, seed=seed)
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[::4] = (labels[::4] + 1) % 10
    return EvalData(x, labels, "train")


@pytest.fixture(scope="module")
def setup():
    model = deep_net()
    engine = Engine(model)
    data = labelled(model, 100)
    sensitivity = measure_sensitivity(model, SensitivityConfig(taus=(0.1, 0.3, 0.6), precision="fp32", n_images=100),
                                      data=data, engine=engine, use_cache=False)
    return model, engine, sensitivity


def make_judge(setup, steps: int = 3, method: str = "reconstruct", criterion: str = "loss"):
    model, engine, sensitivity = setup
    search = ar.SearchConfig(repair=RepairConfig(method, n_images=32, n_holdout=0, batch_size=32), score_images=60,
                             steps=steps, move=0.05, criterion=criterion)
    return ar.RepairJudge(model, engine, layer_options(sensitivity, engine), images(32, seed=3), labelled(model),
                          search)


# ---------------------------------------------------------------- the moves (pure)

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 500), min_size=2, max_size=6), st.data())
def test_a_move_keeps_the_total_and_stays_within_each_layer(numels, data):
    names = [f"l{i}" for i in range(len(numels))]
    numel = dict(zip(names, numels))
    kept = {n: data.draw(st.integers(0, numel[n])) for n in names}
    donor, receiver = data.draw(st.sampled_from(names)), data.draw(st.sampled_from(names))
    amount = data.draw(st.integers(0, 600))
    if donor == receiver or amount > kept[donor] or amount > numel[receiver] - kept[receiver]:
        with pytest.raises(ValueError):
            ar.move_weights(kept, donor, receiver, amount, numel)
        return
    moved = ar.move_weights(kept, donor, receiver, amount, numel)
    assert sum(moved.values()) == sum(kept.values())
    assert all(0 <= moved[n] <= numel[n] for n in names)
    assert moved[donor] == kept[donor] - amount and moved[receiver] == kept[receiver] + amount
    assert {n: moved[n] for n in names if n not in (donor, receiver)} == \
        {n: kept[n] for n in names if n not in (donor, receiver)}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.floats(-1, 1), st.integers(0, 50), st.floats(-1, 1)),
                min_size=2, max_size=5))
def test_best_move_is_the_largest_predicted_decrease(layers):
    rates = {f"l{i}": ar.Rates(give, harm if give else math.inf, take, gain if take else -math.inf)
             for i, (give, harm, take, gain) in enumerate(layers)}
    move = ar.best_move(rates, set())
    pairs = [(d, r, min(rates[d].give, rates[r].take) * (rates[r].gain - rates[d].harm))
             for d in rates for r in rates if d != r and rates[d].give and rates[r].take]
    helpful = [p for p in pairs if p[2] > 0]
    if not helpful:
        assert move is None
        return
    donor, receiver, amount, predicted = move
    assert predicted == pytest.approx(max(p[2] for p in helpful))
    assert amount == min(rates[donor].give, rates[receiver].take)
    assert ar.best_move(rates, {(d, r) for d, r, _ in pairs}) is None  # every pair tried: none left


def test_search_config_is_checked():
    with pytest.raises(ValueError, match="criterion"):
        ar.SearchConfig(criterion="accuracy")
    with pytest.raises(ValueError, match="move"):
        ar.SearchConfig(move=0)
    with pytest.raises(ValueError, match="steps"):
        ar.SearchConfig(steps=-1)
    with pytest.raises(ValueError, match="50,000"):
        ar.SearchConfig(repair=RepairConfig(n_images=4096), score_images=47_000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ar.SearchConfig().steps = 3


# ---------------------------------------------------------------- the judge

def test_the_judge_scores_the_repaired_model_and_memoises(setup, monkeypatch):
    model, engine, _ = setup
    before = state_fingerprint(model)
    judge = make_judge(setup)
    kept = {name: o.numel // 3 for name, o in judge.options.items()}
    score = judge(kept)
    config, reached = judge.config_for(kept)
    assert reached == kept  # random weights: every count is reachable
    fixed = repair_setting(model, engine, engine.apply(config), judge.fit, judge.repair_config)
    predicted, log_probs = recipe_outputs(fixed.model, judge.score_data.images, "fp32")
    labels = judge.score_data.labels
    assert score.accuracy == pytest.approx(float((predicted == labels).float().mean()))
    assert score.loss == pytest.approx(float(-log_probs[torch.arange(len(labels)), labels].mean()), rel=1e-5)
    assert score.kl > 0 and score.n == len(labels)
    assert judge.evaluations == 1
    monkeypatch.setattr(ar, "repair_setting", lambda *a, **k: (_ for _ in ()).throw(AssertionError("memoised")))
    assert judge(dict(kept)) == score
    assert same_state(model, before)  # the input model is never modified


def test_without_repair_the_judge_runs_the_pruned_model(setup):
    judge = make_judge(setup, method="none")
    full = {name: o.numel for name, o in judge.options.items()}
    assert judge(full).kl == pytest.approx(0.0, abs=1e-6)  # every weight kept, no repair: the dense model
    assert judge({n: k // 4 for n, k in full.items()}).kl > 1e-4


# ---------------------------------------------------------------- the greedy search and the choice

def test_greedy_keeps_the_total_and_only_accepts_improvements(setup):
    judge = make_judge(setup, steps=2)
    start = {name: o.numel // 2 for name, o in judge.options.items()}
    calls = []
    out = ar.greedy_after_repair(judge, start, on_progress=lambda d, t, label: calls.append((d, t, label)))
    assert sum(out.kept.values()) == sum(start.values())
    assert all(0 <= out.kept[n] <= judge.options[n].numel for n in out.kept)
    assert out.score.loss <= judge(start).loss
    accepted = out.steps[out.steps["accepted"]]
    assert (accepted["after"] < accepted["before"]).all()
    assert (out.steps["moved"] <= round(0.05 * sum(start.values()))).all()
    if len(accepted):
        assert out.kept != start and out.score.loss < judge(start).loss
    assert calls and calls[0][0] == 1 and all(d <= t for d, t, _ in calls)
    assert 0 < out.evaluations <= 1 + 2 * len(start) + 5 * 2


def test_choice_is_the_lowest_criterion_after_repair_at_the_same_total(setup):
    _, engine, sensitivity = setup
    judge = make_judge(setup, steps=1)
    found = candidate_allocations(sensitivity, engine, Target("retention", 0.4))
    choice = ar.choose_after_repair(judge, found)
    frame = choice.allocation.candidates
    assert frame["chosen"].sum() == 1
    assert frame.loc[frame["chosen"], "loss"].iloc[0] == frame["loss"].min()
    assert choice.allocation.total_kept <= found[0].total_kept
    assert engine.apply(choice.allocation.config()).stats.set_index("name").loc[
        list(choice.allocation.layer_tau), "kept"].sum() == choice.allocation.total_kept
    assert "◀" in ar.format_choice(frame)
    assert frame.attrs["repair"] == "reconstruct"


def test_a_cancelled_job_stops_the_search(setup):
    judge = make_judge(setup, steps=3)
    start = {name: o.numel // 2 for name, o in judge.options.items()}
    checks = []

    def check():
        checks.append(1)
        if len(checks) > 4:
            raise Cancelled()

    with job_steps(check), pytest.raises(Cancelled):
        ar.greedy_after_repair(judge, start)
    assert judge.evaluations < 2 * len(start)


# ---------------------------------------------------------------- the data: training images only, disjoint

def test_a_choice_never_reads_test_images_and_scores_on_images_it_did_not_fit(setup, monkeypatch):
    model, engine, sensitivity = setup
    labels = torch.randint(0, 10, (50_000,), generator=torch.Generator().manual_seed(1))
    reads = []

    def sample(split, index, root=None):
        reads.append((split, index.clone()))
        if split != "train":
            raise AssertionError(f"the per-layer choice read the {split} split")
        pixels = torch.randint(0, 256, (len(index), 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(int(index.sum())))
        return CifarSplit(pixels, labels[index], "train", "fake")

    def whole(split="train", *args, **kwargs):
        raise AssertionError(f"the per-layer choice read the whole {split} split")

    for module in (core_data, ar, __import__("core.measure.accuracy", fromlist=["x"])):
        for name in ("load_jpeg_sample",):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, sample)
        for name in ("load_cifar10", "load_jpeg_split", "eval_data"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, whole)
    fit, score = ar.scoring_split(32, 60, seed=0)
    assert [split for split, _ in reads] == ["train", "train"]
    fit_index, score_index = reads[0][1], reads[1][1]
    assert len(set(fit_index.tolist()) & set(score_index.tolist())) == 0
    assert len(fit) == 32 and len(score) == 60 and torch.equal(score.labels, labels[score_index])
    search = ar.SearchConfig(repair=FAST_REPAIR, score_images=60, steps=1, move=0.05)
    judge = ar.RepairJudge(model, engine, layer_options(sensitivity, engine), fit, score, search)
    ar.choose_after_repair(judge, candidate_allocations(sensitivity, engine, Target("retention", 0.4)))
    assert {split for split, _ in reads} == {"train"} and len(reads) == 2


def test_scoring_split_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="n_fit"):
        ar.scoring_split(40_000, 20_000)
    with pytest.raises(ValueError, match="n_score"):
        ar.scoring_split(10, 0)


def test_config_for_reaches_counts_with_the_engine(setup):
    _, engine, _ = setup
    judge = make_judge(setup)
    kept = {name: max(1, o.numel // 5) for name, o in judge.options.items()}
    config, reached = judge.config_for(kept)
    stats = engine.apply(config).stats.set_index("name")
    assert {n: int(stats.loc[n, "kept"]) for n in kept} == reached
    assert all(reached[n] <= kept[n] for n in kept)
    assert isinstance(config, CompressionConfig)
