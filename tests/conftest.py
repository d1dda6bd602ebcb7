"""Shared fixtures: small models whose weights are known; which form of the slow end-to-end tests runs."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

#: ``BOUNDARY_FULL_TESTS=1``: the slow end-to-end tests in their full form (every test image, longer runs);
#: by default, and in CI, their small form, which checks the same property on fewer images
FULL_TESTS = os.environ.get("BOUNDARY_FULL_TESTS") == "1"


class TinyNet(nn.Module):
    """Conv → BN → ReLU → pool → Linear: every kind of layer the engine distinguishes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.fc(x.flatten(1))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU ×2, flatten, Linear → 10 classes on 8×8 images (no pooling: varied predictions)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
    return net


def state_fingerprint(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, fingerprint: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == fingerprint.keys() and all(torch.equal(state[k], fingerprint[k]) for k in state)
