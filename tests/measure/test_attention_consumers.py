"""Consumers of the layer list on a model whose pruned weights include an attention's in_proj_weight."""
from __future__ import annotations

import pytest
import torch
from torchvision.models.vision_transformer import VisionTransformer

from core.measure.baselines import magnitude_baseline
from core.measure.repair import ATTENTION_SKIP, RepairConfig, estimate_seconds, repair
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.method.pruning import layer_weight


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=10).eval()


IN_PROJ = "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"


@pytest.mark.parametrize("method", ["global_magnitude", "layer_l1"])
def test_magnitude_baselines_prune_the_in_proj_weight(vit, method):
    total = sum(layer_weight(vit, name).numel() for name in Engine(vit).layer_names)
    pruned, retention = magnitude_baseline(vit, method, total // 2)
    assert retention == pytest.approx(0.5, abs=1e-3)
    assert int((layer_weight(pruned, IN_PROJ) == 0).sum()) > 0
    assert int((layer_weight(vit, IN_PROJ) == 0).sum()) == 0  # the model itself is not modified


@pytest.mark.parametrize("method", ["none", "bn"])
def test_repair_skips_attention_projections_with_a_reason(vit, method):
    result = Engine(vit).apply(CompressionConfig(tau=0.2))
    fixed = repair(vit, result.model, torch.randn(8, 3, 32, 32), config=RepairConfig(method=method, n_images=4,
                                                                                    n_holdout=4))
    rows = fixed.errors.set_index("name")
    assert rows.loc[IN_PROJ, "action"] == ATTENTION_SKIP
    assert torch.equal(layer_weight(fixed.model, IN_PROJ), result.weights[IN_PROJ])
    assert estimate_seconds(vit, RepairConfig(method="reconstruct"), input_shape=(3, 32, 32)) > 0
