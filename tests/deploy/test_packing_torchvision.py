"""Packed files of torchvision models record their provenance and load back without a template."""
from __future__ import annotations

import torch

from core.deploy.packed_reader import load_compressed, parse_compressed
from core.deploy.packed_writer import compressed_bytes, save_compressed
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads import torchvision_models as tv


def test_a_torchvision_model_loads_back_bit_exactly_without_a_template(tmp_path):
    torch.manual_seed(0)
    model = tv.build("squeezenet1_1", {"num_classes": 5})
    result = Engine(model).apply(CompressionConfig(tau=0.2, theta=0.3, b_low=4, b_high=8))
    spec = {"image_size": 32, "resize_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
    path = save_compressed(result, tmp_path / "m.packed", arch="torchvision:squeezenet1_1",
                           arch_kwargs={"num_classes": 5}, input_spec=spec)
    loaded = load_compressed(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), result.model.state_dict().values()))
    packed = parse_compressed(path.read_bytes())
    assert packed.arch == "torchvision:squeezenet1_1" and packed.arch_kwargs == {"num_classes": 5}
    assert packed.input_spec == spec


def test_files_without_an_input_record_still_read(tmp_path):
    result = Engine(tv.build("squeezenet1_1", {"num_classes": 2})).apply(CompressionConfig(tau=0.1))
    packed = parse_compressed(compressed_bytes(result, "torchvision:squeezenet1_1", {"num_classes": 2}))
    assert packed.input_spec is None and packed.load() is not None


def test_unknown_architectures_are_refused_when_writing():
    result = Engine(tv.build("squeezenet1_1", {"num_classes": 2})).apply(CompressionConfig(tau=0.1))
    try:
        compressed_bytes(result, "torchvision:not_a_model")
    except ValueError as err:
        assert "torchvision:<name>" in str(err)
    else:  # pragma: no cover
        raise AssertionError("an unknown architecture was written")
