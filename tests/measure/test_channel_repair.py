"""Repair of a channel-pruned model (core.measure.channel_repair): least squares on kept inputs, BatchNorm, contract."""
from __future__ import annotations

import threading

import pytest
import torch

from core.measure.channel_repair import estimate_channel_repair_seconds, repair_channels
from core.measure.repair import RepairCancelled, RepairConfig
from core.method.channels import ChannelConfig, ChannelPruner
from tests.method.channel_nets import res_mini

IMAGES = torch.randn(192, 3, 8, 8, generator=torch.Generator().manual_seed(3))
CONFIG = RepairConfig("reconstruct", n_images=128, n_holdout=64, positions=0, batch_size=64)


@pytest.fixture(scope="module")
def pruned():
    dense = res_mini()
    pruner = ChannelPruner(dense, IMAGES[:1])
    return dense, pruner.apply(ChannelConfig(0.5))


def test_reconstruction_lowers_the_next_layers_error(pruned):
    dense, result = pruned
    fixed = repair_channels(dense, result, IMAGES, CONFIG)
    errors = fixed.errors.set_index("name")
    # a1 lost input channels (the stream a2 writes): re-solved on the kept ones, its output error drops
    for name in ("a1", "b1", "fc"):
        assert errors.loc[name, "err_after"] < errors.loc[name, "err_before"], name
        assert "re-solved" in errors.loc[name, "action"]
    x = IMAGES[128:]
    with torch.no_grad():
        before = (result.model(x) - dense(x)).pow(2).mean()
        after = (fixed.model(x) - dense(x)).pow(2).mean()
    assert after < before
    assert fixed.model.stem.weight.shape == result.model.stem.weight.shape


def test_inputs_never_modified(pruned):
    dense, result = pruned
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    small_state = {k: v.clone() for k, v in result.model.state_dict().items()}
    repair_channels(dense, result, IMAGES, RepairConfig("reconstruct", n_images=64, n_holdout=0, batch_size=64))
    assert all(torch.equal(v, dense_state[k]) for k, v in dense.state_dict().items())
    assert all(torch.equal(v, small_state[k]) for k, v in result.model.state_dict().items())


def test_bn_only_and_none(pruned):
    dense, result = pruned
    none = repair_channels(dense, result, IMAGES, RepairConfig("none", n_images=64, n_holdout=0))
    assert none.changed == ()
    bn = repair_channels(dense, result, IMAGES, RepairConfig("bn", n_images=64, n_holdout=0))
    assert any("running_mean" in key for key in bn.changed)


def test_progress_cancel_and_estimate(pruned):
    dense, result = pruned
    seen = []
    repair_channels(dense, result, IMAGES, RepairConfig("reconstruct", n_images=64, n_holdout=0, batch_size=64),
                    on_progress=lambda done, total, name: seen.append((done, total, name)))
    assert seen and seen[-1][0] == seen[-1][1]
    stop = threading.Event()
    stop.set()
    with pytest.raises(RepairCancelled):
        repair_channels(dense, result, IMAGES, RepairConfig("reconstruct", n_images=64, n_holdout=0), cancel=stop)
    assert estimate_channel_repair_seconds(result, RepairConfig("reconstruct", n_images=64), input_shape=(3, 8, 8)) > 0
