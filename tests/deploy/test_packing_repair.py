"""A packed file carrying a repair: the repaired model back bit for bit, under the same mask and bit-widths,
in a file whose data is exactly as large as the unrepaired one's."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from core.deploy.packed_layout import PackedFileError
from core.deploy.packed_reader import load_compressed, parse_compressed, read_compressed
from core.deploy.packed_writer import compressed_bytes, packed_file_bytes, repair_record, save_compressed
from core.measure.repair import METHODS, RepairConfig, repair, repair_setting
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads.models import build
from tests.deploy.test_packing_limits import forge
from tests.measure.test_repair import DeepNet, deep_net, images

SETTINGS = {
    "pruning only": CompressionConfig(tau=0.3),
    "mixed 4/8": CompressionConfig(tau=0.2, theta=0.4, b_low=4, b_high=8),
    "mixed 2/16": CompressionConfig(tau=0.2, theta=0.5, b_low=2, b_high=16),
    "one chunk 4/4": CompressionConfig(tau=0.1, theta=0.3, b_low=4, b_high=4),
    "BN scales pruned too": CompressionConfig(tau=0.2, theta=0.4, include_norm=True),
}
FAST = dict(n_images=64, n_holdout=0, batch_size=32)


@pytest.fixture(scope="module")
def dense():
    return deep_net()


@pytest.fixture(scope="module")
def engine(dense):
    return Engine(dense, palette=(2, 3, 4, 8, 16))


def engine_keep(engine: Engine, result, name: str) -> torch.Tensor:
    """The engine's keep-mask of a layer (from its ranks: a kept weight may still be 0)."""
    row = result.stats.set_index("name").loc[name]
    order = engine.rank_order(name).to(torch.int64)
    keep = torch.zeros(int(row["numel"]), dtype=torch.bool)
    keep[order[int(row["numel"]) - int(row["kept"]):]] = True
    return keep.view(result.weights[name].shape)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_file_gives_back_the_repaired_model(dense, engine, setting, method):
    result = engine.apply(SETTINGS[setting])
    fixed = repair_setting(dense, engine, result, images(96), RepairConfig(method, **FAST))
    plain, data = compressed_bytes(result), compressed_bytes(result, repaired=fixed)
    packed = parse_compressed(data)
    loaded = packed.load(model_template=DeepNet())
    # the repaired model, bit for bit: every tensor, hence every output
    reference = fixed.model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == reference[key].dtype and torch.equal(value, reference[key]), key
    x = images(16, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(x), fixed.model.eval()(x))
    # the same mask and bit-widths: the same records; nothing outside the engine's mask
    assert packed.layers == parse_compressed(plain).layers
    for name in result.stats["name"]:
        assert not bool((loaded.get_submodule(name).weight.detach()[~engine_keep(engine, result, name)] != 0).any())
    # the same data; the header grows by the repair record only
    assert packed.data.size == parse_compressed(plain).data.size
    record = repair_record(fixed)
    assert packed.repair == record and (record["method"], record["n_images"]) == (method, 64)
    assert (record["ridge"], record["seed"]) == (1e-3, 0)
    header_growth = len(json.dumps(json.dumps({"repair": record}, separators=(",", ":"))))  # JSON in JSON
    assert 0 < len(data) - len(plain) <= header_growth + 8  # safetensors pads its header to 8 bytes
    if method == "reconstruct":  # the repair did change the kept weights, and the file holds them
        assert any(not torch.equal(loaded.get_submodule(n).weight, result.weights[n]) for n in result.stats["name"])
        if SETTINGS[setting].quantized:
            assert set(fixed.quantized) == {"conv1", "conv2", "fc1", "fc2"}  # codes and scales: GPTQ's
    else:
        assert not fixed.quantized


def test_an_unrepaired_file_has_no_repair_record(dense, engine):
    packed = parse_compressed(compressed_bytes(engine.apply(SETTINGS["mixed 4/8"])))
    assert packed.repair is None


def test_save_load_and_size_with_a_registry_architecture(tmp_path):
    torch.manual_seed(0)
    model = build("cifar_cnn").eval()
    engine = Engine(model)
    result = engine.apply(CompressionConfig(tau=0.2, theta=0.3, b_low=2, b_high=8))
    fixed = repair_setting(model, engine, result, images(64, shape=(3, 32, 32)), RepairConfig("reconstruct", **FAST))
    path = save_compressed(result, tmp_path / "r.packed", arch="cifar_cnn", repaired=fixed)
    loaded = load_compressed(path)  # no template: the file names its architecture
    x = images(4, seed=3, shape=(3, 32, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x), fixed.model.eval()(x))
    assert path.stat().st_size == packed_file_bytes(result, "cifar_cnn", repaired=fixed)
    content = read_compressed(path)
    assert content.repair["method"] == "reconstruct" and content.data_bytes == parse_compressed(
        compressed_bytes(result, "cifar_cnn")).data.size


def test_a_repair_that_does_not_fit_the_setting_is_refused(dense, engine):
    quantized = engine.apply(SETTINGS["mixed 4/8"])
    # reconstructed without the result's bit-widths: float weights that no codes describe
    unquantized = repair(dense, quantized.model, images(96), RepairConfig("reconstruct", **FAST))
    with pytest.raises(ValueError, match="without giving its codes"):
        compressed_bytes(quantized, repaired=unquantized)
    # codes at other bit-widths than the setting's
    fixed = repair_setting(dense, engine, quantized, images(96), RepairConfig("reconstruct", **FAST))
    other = engine.apply(CompressionConfig(tau=0.2, theta=0.4, b_low=2, b_high=8))
    with pytest.raises(ValueError, match="other bit-widths"):
        compressed_bytes(other, repaired=fixed)
    # a nonzero weight where the setting prunes
    pruned = engine.apply(SETTINGS["pruning only"])
    fixed = repair_setting(dense, engine, pruned, images(96), RepairConfig("bias", **FAST))
    with torch.no_grad():
        fixed.model.conv1.weight.fill_(1.0)
    with pytest.raises(ValueError, match="changed pruned weights of 'conv1'"):
        compressed_bytes(pruned, repaired=fixed)
    # another model altogether
    other_model = dataclasses.replace(fixed, model=torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="differ in their tensors"):
        compressed_bytes(pruned, repaired=other_model)


def test_a_repair_record_that_is_not_a_mapping_is_refused():
    with pytest.raises(PackedFileError, match="repair record is not a mapping"):
        parse_compressed(forge([], repair=["reconstruct"]))
