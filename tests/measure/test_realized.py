"""Realized savings: the packed file measured on disk and every execution path timed."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.deploy.packed_reader import load_compressed
from core.deploy.packed_writer import save_compressed
from core.measure.realized import measure_file_sizes, measure_realized


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


def test_file_sizes_are_the_files_on_disk(mlp, tmp_path):
    result = Engine(mlp).apply(CompressionConfig(tau=0.5, theta=0.3, b_low=4, b_high=8))
    packed, reference = measure_file_sizes(result)
    path = save_compressed(result, tmp_path / "m.safetensors")
    assert packed == os.path.getsize(path)
    assert torch.equal(load_compressed(path, mlp)[0].weight, result.model[0].weight)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    assert reference == os.path.getsize(tmp_path / "dense.safetensors")
    assert packed < reference  # 4/8-bit codes of half the weights: smaller than fp32


def test_measure_realized_reports_every_path_and_leaves_inputs_alone(mlp):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    result = Engine(mlp).apply(CompressionConfig(tau=0.4, theta=0.0, b_low=8, b_high=8))
    realized = measure_realized(result, torch.randn(1, 64), batch_size=4, budget_s=0.0)
    assert list(realized.paths["path"]) == ["dense", "sparse", "int8", "auto"]
    assert (realized.paths["ms"] > 0).all()
    assert realized.paths.loc[0, "speedup"] == 1.0
    assert realized.ms(realized.fastest) == realized.paths["ms"].min()
    assert realized.times_smaller == realized.state_dict_bytes / realized.file_bytes > 1
    assert set(realized.auto_layers["name"]) == {"0", "2"}
    assert realized.auto_layers["chosen"].isin(["dense", "sparse", "int8"]).all()
    with pytest.raises(KeyError, match="not measured"):
        realized.ms("gpu-magic")
    assert all(torch.equal(v, before[k]) for k, v in mlp.state_dict().items())
