"""Architectures named by files: registry names and torchvision:<name>, each checked before it is built."""
from __future__ import annotations

import pytest
from torch import nn

from core.workloads.models import CheckpointError
from core.workloads.provenance import build_file_arch, check_file_arch, describe, known_arch


def test_names_are_recognised():
    assert known_arch("resnet20") and known_arch("torchvision:resnet50")
    assert not known_arch("torchvision:nope") and not known_arch("vgg99") and not known_arch(None)


def test_both_kinds_are_checked_and_built():
    assert check_file_arch("cifar_cnn", {"width": 8}) == {"width": 8}
    assert check_file_arch("torchvision:resnet18", {"num_classes": 3}) == {"num_classes": 3}
    model = build_file_arch("torchvision:squeezenet1_1", {"num_classes": 3})
    assert isinstance(model, nn.Module) and model.classifier[1].out_channels == 3
    assert describe("torchvision:resnet18", {"num_classes": 3}) == "torchvision resnet18 (3 classes)"
    assert describe("resnet20") == "CIFAR ResNet-20 (He et al. 2016)"


def test_the_smaller_limit_applies_to_torchvision_models():
    with pytest.raises(CheckpointError, match="at most 5,000,000"):
        check_file_arch("torchvision:resnet18", {}, "f.packed", max_params=5_000_000)
    with pytest.raises(CheckpointError, match="unknown architecture"):
        check_file_arch("torchvision", {}, "f.packed")
