"""Greedy MAC moves between channel groups after the repair (core.measure.channel_greedy)."""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from core.measure.accuracy import EvalData
from core.measure.allocation_repair import Score
from core.measure.channel_allocation import (
    ChannelChoice,
    ChannelJudge,
    ChannelSearchConfig,
    shape_counts,
)
from core.measure.channel_greedy import greedy_channels, refine
from core.measure.repair import RepairConfig
from core.method.channels import ChannelPruner
from tests.method.channel_nets import res_mini

X8 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def mini():
    model = res_mini()
    return model, ChannelPruner(model, X8[:1])


class WeightedLoss:
    """A stand-in judge: loss = Σ_g cost_g · (channels removed from g); records every allocation it scored."""

    def __init__(self, pruner: ChannelPruner, ratio: float, cost: dict[str, float]):
        self.pruner, self.cost = pruner, cost
        self.config = SimpleNamespace(target_macs=ratio, criterion="loss", steps=6, move=0.05)
        self.memo: dict[tuple, Score] = {}
        self.channels = {g.name: g.channels for g in pruner.groups}

    def __call__(self, counts):
        key = tuple(sorted(counts.items()))
        if key not in self.memo:
            loss = sum(self.cost[name] * (self.channels[name] - k) for name, k in counts.items())
            self.memo[key] = Score(accuracy=0.5, loss=loss, kl=loss, n=1, seconds=0.0)
        return self.memo[key]


def test_moves_go_from_the_cheap_group_to_the_costly_one_and_stay_under_the_bound(mini):
    _, pruner = mini
    ratio = 0.6
    start = shape_counts(pruner, "equal share", ratio)
    costly = max(start, key=lambda name: start[name])  # the widest group hurts most per channel lost
    cost = {name: (10.0 if name == costly else 0.01) for name in start}
    judge = WeightedLoss(pruner, ratio, cost)
    result = greedy_channels(judge, start, steps=6, move=0.05)
    assert result.counts[costly] > start[costly]
    assert result.score.loss < judge(start).loss
    assert pruner.macs_of(pruner.masks_for_counts(result.counts)) <= ratio * pruner.macs_dense
    assert result.steps["accepted"].any()
    # every accepted step lowered the criterion; a rejected one left the counts alone
    accepted = result.steps[result.steps["accepted"]]
    assert (accepted["after"] < accepted["before"]).all()


def test_with_the_real_judge_the_result_meets_the_target_and_scores_no_worse(mini):
    model, pruner = mini
    generator = torch.Generator().manual_seed(3)
    fit = torch.randn(32, 3, 8, 8, generator=generator)
    score = EvalData(torch.randn(40, 3, 8, 8, generator=generator), torch.randint(0, 10, (40,), generator=generator),
                     "train")
    config = ChannelSearchConfig(0.6, RepairConfig("reconstruct", n_images=32, n_holdout=0, batch_size=16), 40)
    judge = ChannelJudge(model, pruner, fit, score, config)
    start = shape_counts(pruner, "equal share", 0.6)
    seen = []
    result = greedy_channels(judge, start, steps=2, move=0.05, progress=lambda done, total, label: seen.append(done))
    assert pruner.macs_of(pruner.masks_for_counts(result.counts)) <= 0.6 * pruner.macs_dense
    assert result.score.loss <= judge(start).loss
    assert result.evaluations == len(judge.memo) and seen and seen == sorted(seen)


def test_bad_steps_are_refused(mini):
    _, pruner = mini
    with pytest.raises(ValueError, match="move"):
        greedy_channels(WeightedLoss(pruner, 0.6, {}), {}, steps=1, move=1.5)


def test_refine_chooses_the_greedy_result_only_when_it_scores_lower(mini):
    _, pruner = mini
    start = shape_counts(pruner, "equal share", 0.6)
    costly = max(start, key=lambda name: start[name])
    frame = pd.DataFrame([{"shape": "equal share", "macs_ratio": 0.6, "loss": 1.0, "note": ""}])
    choice = ChannelChoice("equal share", start, frame, 1.0)
    judge = WeightedLoss(pruner, 0.6, {name: (10.0 if name == costly else 0.01) for name in start})
    refined, greedy = refine(judge, choice)
    assert refined.shape == "greedy after repair (from equal share)" and refined.counts == greedy.counts
    assert list(refined.candidates["shape"]) == ["equal share", refined.shape]
    flat = WeightedLoss(pruner, 0.6, {name: 0.0 for name in start})  # nothing can score lower than 0
    same, _ = refine(flat, choice)
    assert same is choice
    judge.config.steps = 0
    assert refine(judge, choice) == (choice, None)


def test_the_fill_spends_the_macs_left_under_the_bound_on_the_group_that_gains_most(mini):
    _, pruner = mini
    start = shape_counts(pruner, "equal share", 0.5)  # well under the judge's bound of 0.6 × dense
    costly = max(start, key=lambda name: start[name])
    judge = WeightedLoss(pruner, 0.6, {name: (10.0 if name == costly else 0.01) for name in start})
    result = greedy_channels(judge, start, steps=0, move=0.05)
    fills = result.steps[result.steps["step"] == "fill"]
    assert len(fills) and fills["accepted"].iloc[0] and fills["receiver"].iloc[0] == costly

    def macs(counts):
        return pruner.macs_of(pruner.masks_for_counts(counts))

    assert macs(start) < macs(result.counts) <= 0.6 * pruner.macs_dense
    assert result.counts[costly] > start[costly] and result.score.loss < judge(start).loss
