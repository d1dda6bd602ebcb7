"""Uploads of channel-pruned files (core.services.uploads): packed file and .pt bundle rebuild the smaller model
with no template; a file for another architecture is one sentence (tiny CNN)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.deploy.channel_file import channel_bundle_bytes, with_channels
from core.deploy.packed_writer import compressed_bytes
from core.method.channel_config import ChannelConfig
from core.method.channels import ChannelPruner
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.services.uploads import read_upload
from core.workloads.models import CheckpointError, build

KWARGS = {"width": 8}
SETTING = CompressionConfig(tau=0.1, theta=0.3, b_low=4, b_high=8)


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = build("cifar_cnn", **KWARGS).eval()
    with torch.no_grad():  # spread BatchNorm scales: channel scores differ, as in a trained model
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.linspace(0.05, 1.0, module.num_features))
    result = ChannelPruner(model).apply(ChannelConfig(tau=0.6))
    assert result.params < result.params_dense
    return result


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_a_channel_packed_file_loads_with_no_template_as_recorded(pruned):
    compressed = Engine(pruned.model).apply(SETTING)
    data = with_channels(compressed_bytes(compressed, "cifar_cnn", KWARGS), pruned.record())
    loaded = read_upload(data, "small.packed")
    assert shapes(loaded.model) == shapes(pruned.model)  # the smaller module, rebuilt from the record alone
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), compressed.model(x), atol=1e-4)
    assert loaded.recorded is not None and loaded.recorded.config == SETTING and loaded.recorded.file_bytes == len(data)
    assert "channel-pruned" in loaded.note


def test_a_channel_bundle_loads_with_no_template(pruned):
    data = channel_bundle_bytes(pruned.model, pruned.record(), "cifar_cnn", KWARGS)
    loaded = read_upload(data, "small.pt")
    assert loaded.arch == "cifar_cnn" and shapes(loaded.model) == shapes(pruned.model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), pruned.model(x))
    assert "channel-pruned" in loaded.note


def test_a_channel_file_for_another_architecture_is_a_sentence(pruned):
    compressed = Engine(pruned.model).apply(SETTING)
    wrong_arch = with_channels(compressed_bytes(compressed, "resnet20", {}), pruned.record())  # groups it lacks
    with pytest.raises(CheckpointError, match="channel-pruned model that cannot be rebuilt as resnet20"):
        read_upload(wrong_arch, "small.packed")
    record = pruned.record()
    first = next(iter(record["kept"]))
    record["kept"][first] = [0, 99]  # a channel this width does not have: cut from a wider model
    wider = with_channels(compressed_bytes(compressed, "cifar_cnn", KWARGS), record)
    with pytest.raises(CheckpointError, match="outside 0"):
        read_upload(wider, "small.packed")
    bundle = channel_bundle_bytes(pruned.model, pruned.record(), "cifar_cnn", KWARGS)
    with pytest.raises(CheckpointError, match="is a channel-pruned cifar_cnn, not a resnet20"):
        read_upload(bundle, "small.pt", "resnet20")
