"""Fidelity to the dense model: agreement and mean KL divergence."""
from __future__ import annotations

import copy

import pytest
import torch

from core.measure.fidelity import fidelity


def test_identical_models_agree_fully_and_a_changed_one_does_not(tiny_net):
    images = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    same = fidelity(tiny_net, copy.deepcopy(tiny_net), images, batch_size=7)
    assert same.agreement == 1.0 and same.mean_kl == pytest.approx(0.0, abs=1e-7) and same.n == 40
    other = copy.deepcopy(tiny_net)
    with torch.no_grad():
        other.fc.weight.mul_(-1)
    moved = fidelity(tiny_net, other, images)
    assert moved.agreement < 1.0 and moved.mean_kl > 0 and moved.agreement_low <= moved.agreement
    with pytest.raises(ValueError, match="at least one image"):
        fidelity(tiny_net, other, images[:0])
