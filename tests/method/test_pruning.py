import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from core.method.pruning import (BoundaryPruning, boundary_mask, boundary_prune, boundary_unstructured,
                          check_tau, prunable_layers)


def test_boundary_mask_hand_checked():
    w = torch.tensor([[0.1, -0.5], [1.0, -0.19]])
    # β = 0.2 · 1.0 = 0.2: keep |W| ≥ 0.2
    assert boundary_mask(w, 0.2).tolist() == [[False, True], [True, False]]
    assert boundary_prune(w, 0.2).tolist() == [[0.0, -0.5], [1.0, -0.0]]


def test_boundary_keeps_equal_to_beta():
    w = torch.tensor([0.5, 1.0, -0.25])
    assert boundary_mask(w, 0.5).tolist() == [True, True, False]  # |W| = β is kept
    assert boundary_mask(w, 1.0).tolist() == [False, True, False]


def test_tau_zero_keeps_all_and_zero_layer_keeps_all():
    assert boundary_mask(torch.randn(50), 0.0).all()
    assert boundary_mask(torch.zeros(7), 0.7).all()  # β = 0, nothing divides by zero


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_check_tau_rejects(bad):
    with pytest.raises(ValueError, match="tau"):
        check_tau(bad)


def test_check_tau_type():
    with pytest.raises(TypeError):
        check_tau("0.2")


def test_prunable_layers_default_excludes_norm(tiny_net):
    assert [layer.name for layer in prunable_layers(tiny_net)] == ["conv", "fc"]
    assert [layer.name for layer in prunable_layers(tiny_net, include_norm=True)] == ["conv", "bn", "fc"]
    assert [layer.name for layer in prunable_layers(tiny_net, layers=["fc"])] == ["fc"]
    with pytest.raises(ValueError, match="'bn' is not a prunable layer"):
        prunable_layers(tiny_net, layers=["bn"])


def test_model_without_prunable_layer():
    with pytest.raises(ValueError, match="no prunable layer"):
        prunable_layers(nn.Sequential(nn.ReLU()))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=64),
       st.floats(0, 1), st.floats(0, 1))
def test_retention_non_increasing_in_tau(values, t1, t2):
    w = torch.tensor(values)
    lo, hi = sorted((t1, t2))
    assert boundary_mask(w, hi).sum() <= boundary_mask(w, lo).sum()


def test_torch_prune_method_matches_and_removes():
    torch.manual_seed(1)
    layer = nn.Linear(20, 10)
    expected = boundary_mask(layer.weight, 0.3)
    original = layer.weight.detach().clone()
    boundary_unstructured(layer, "weight", tau=0.3)
    assert torch.equal(layer.weight_mask.bool(), expected)
    assert torch.equal(layer.weight, original * expected)
    prune.remove(layer, "weight")
    assert isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight.detach(), original * expected)


def test_torch_prune_method_via_global_api():
    torch.manual_seed(2)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    masks = [boundary_mask(m.weight, 0.25) for m in (a, b)]
    for m in (a, b):
        BoundaryPruning.apply(m, "weight", tau=0.25)
    assert all(torch.equal(m.weight_mask.bool(), mask) for m, mask in zip((a, b), masks))
    assert math.isclose(BoundaryPruning(0.25).tau, 0.25)
