"""Per-group channel counts for a MAC target (core.measure.channel_allocation): shapes, the target, the judge."""
from __future__ import annotations

import pytest
import torch

from core.measure.accuracy import EvalData
from core.measure.channel_allocation import (
    SHAPES,
    ChannelJudge,
    ChannelSearchConfig,
    choose_channels,
    config_for_counts,
    counts_at,
    shape_counts,
    shape_weights,
)
from core.measure.repair import RepairConfig
from core.method.channels import ChannelError, ChannelPruner
from tests.method.channel_nets import res_mini

X8 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def mini():
    model = res_mini()
    return model, ChannelPruner(model, X8[:1])


def test_masks_for_counts_keep_the_highest_scored_channels(mini):
    _, pruner = mini
    group = next(g for g in pruner.groups if g.prunable)
    masks = pruner.masks_for_counts({group.name: 3})
    kept = (~masks[group.name]).nonzero().flatten()
    top = torch.argsort(pruner.scores()[group.name], descending=True)[:3]
    assert sorted(kept.tolist()) == sorted(top.tolist())
    assert pruner.masks_for_counts({group.name: 0})[group.name].sum() == group.channels - 1  # never all
    assert all(not m.any() for name, m in masks.items() if name != group.name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [0.9, 0.7, 0.5])
def test_every_shape_meets_the_mac_target_or_says_it_cannot(mini, shape, ratio):
    _, pruner = mini
    counts = shape_counts(pruner, shape, ratio)
    if counts is None:
        assert shape == "inner only"  # the streams kept whole may not reach it
        return
    macs = pruner.macs_of(pruner.masks_for_counts(counts))
    assert macs <= ratio * pruner.macs_dense
    assert macs > 0.5 * ratio * pruner.macs_dense  # the smallest cut that meets it, not any cut


def test_equal_share_keeps_the_same_share_of_every_group(mini):
    _, pruner = mini
    counts = shape_counts(pruner, "equal share", 0.6)
    channels = {g.name: g.channels for g in pruner.groups}
    shares = [counts[name] / channels[name] for name in counts]
    assert max(shares) - min(shares) <= 1 / min(channels[name] for name in counts) + 1e-9


def test_inner_only_keeps_residual_streams_whole(mini):
    _, pruner = mini
    weights = shape_weights(pruner, "inner only")
    streams = [g.name for g in pruner.groups if g.prunable and len(g.producers) > 1]
    assert streams and all(weights[name] == 0 for name in streams)
    counts = counts_at(pruner, weights, 0.5)
    channels = {g.name: g.channels for g in pruner.groups}
    assert all(counts[name] == channels[name] for name in streams)


def test_the_judge_picks_the_lowest_loss_and_repairs_each_allocation_once(mini):
    model, pruner = mini
    generator = torch.Generator().manual_seed(2)
    fit = torch.randn(32, 3, 8, 8, generator=generator)
    score = EvalData(torch.randn(40, 3, 8, 8, generator=generator), torch.randint(0, 10, (40,), generator=generator),
                     "train")
    config = ChannelSearchConfig(0.6, RepairConfig("reconstruct", n_images=32, n_holdout=0, batch_size=16), 40)
    judge = ChannelJudge(model, pruner, fit, score, config)
    choice = choose_channels(judge, ("uniform τ_ch", "equal share"))
    scored = choice.candidates.dropna(subset=["loss"])
    assert choice.shape == scored.loc[scored["loss"].idxmin(), "shape"]
    assert (scored["macs_ratio"] <= 0.6).all()
    assert len(judge.memo) == len(scored.drop_duplicates("loss"))  # each allocation repaired once


def test_bad_targets_are_sentences():
    with pytest.raises(ChannelError, match="MAC target"):
        ChannelSearchConfig(1.5)
    with pytest.raises(ValueError, match="criterion"):
        ChannelSearchConfig(0.5, criterion="accuracy")


@pytest.mark.parametrize("shape", ["equal share", "streams at half", "MAC-weighted"])
def test_the_per_group_tau_keeps_exactly_the_counts(mini, shape):
    _, pruner = mini
    counts = shape_counts(pruner, shape, 0.6)
    result = pruner.apply(config_for_counts(pruner, counts))
    kept = {row.name: int(row.kept) for row in result.groups.itertuples()}
    assert all(kept[name] == count for name, count in counts.items())
    assert result.macs == pruner.macs_of(pruner.masks_for_counts(counts))
