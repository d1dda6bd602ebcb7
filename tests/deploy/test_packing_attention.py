"""Packed files of models whose pruned weights include attention projections (``in_proj_weight``).

Such a layer is named by its parameter's dotted path and stored under that state_dict key (a
tenth field of its table record); other records keep nine fields. Files are written as version 3;
such records were introduced by version 2 (version-1 files have none), and both still read.
"""
from __future__ import annotations

import json
import zlib
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load

from core.deploy import packed_layout
from core.deploy.packed_layout import PackedFileError, expected_layer_bytes
from core.deploy.packed_reader import load_compressed, parse_compressed
from core.deploy.packed_writer import compressed_bytes, save_compressed
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.method.pruning import layer_weight
from core.workloads import torchvision_models as tv
from tests.deploy.test_packing_limits import forge
from tests.method.test_weight_discovery import Attention

SETTINGS = {
    "pruning only": CompressionConfig(tau=0.3),
    "mixed 4/8": CompressionConfig(tau=0.1, theta=0.3, b_low=4, b_high=8),
    "mixed 2/16": CompressionConfig(tau=0.2, theta=0.5, b_low=2, b_high=16),
    "one chunk": CompressionConfig(tau=0.2, theta=0.0, b_low=8, b_high=8),
}
PROJECTIONS = ("attn.in_proj_weight", "cross.q_proj_weight", "cross.k_proj_weight", "cross.v_proj_weight")


@pytest.fixture(scope="module")
def attention_engine() -> tuple[Attention, Engine]:
    torch.manual_seed(0)
    model = Attention().eval()
    return model, Engine(model, palette=(2, 4, 8, 16), example_input=torch.randn(1, 7, 8))


def table_of(data: bytes) -> tuple[dict, dict]:
    """A packed file's header and its decompressed layer table."""
    table = json.loads(zlib.decompress(bytes(load(data)["table"].numpy())))
    return parse_compressed(data).header, table


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_attention_projections_round_trip_bit_exactly(attention_engine, setting, tmp_path):
    model, engine = attention_engine
    result = engine.apply(SETTINGS[setting])
    stats = result.stats.set_index("name")
    assert all(0 < stats.loc[name, "kept"] < stats.loc[name, "numel"] for name in PROJECTIONS)
    path = save_compressed(result, tmp_path / "attention.packed")
    loaded = load_compressed(path, model_template=model)
    reference = result.model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())
    for name in PROJECTIONS:
        assert torch.equal(layer_weight(loaded, name), result.weights[name])
    x = torch.randn(3, 7, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), result.model(x))
    # every projection is packed (none stored as is), at exactly the engine's accounting
    packed = parse_compressed(path.read_bytes())
    assert {record.state_key for record in packed.layers} == {engine.parameter_name(n) for n in engine.layer_names}
    assert not {entry.key for entry in packed.state} & set(PROJECTIONS)
    for record in packed.layers:
        assert expected_layer_bytes(record) == stats.loc[record.name, "compressed_bytes"], record.name


def test_only_keyed_layers_have_a_tenth_field(attention_engine, tiny_net):
    _, engine = attention_engine
    header, table = table_of(compressed_bytes(engine.apply(SETTINGS["mixed 4/8"])))
    assert header["version"] == packed_layout.FORMAT_VERSION == 3
    rows = {row[0]: row for row in table["layers"]}
    assert rows["attn.in_proj_weight"][9:] == ["attn.in_proj_weight"]
    assert len(rows["attn.out_proj"]) == 9 and len(rows["embed"]) == 9  # modules' weights: as before
    header, table = table_of(compressed_bytes(Engine(tiny_net).apply(SETTINGS["mixed 4/8"])))
    assert header["version"] == packed_layout.FORMAT_VERSION
    assert all(len(row) == 9 for row in table["layers"])


def test_a_keyed_record_needs_version_2_or_later():
    row = ["attn", [4, 2], "float32", 8, 8, 0, None, None, "all", "attn.in_proj_weight"]
    data = bytes(32)
    with pytest.raises(PackedFileError, match="does not have 9 fields"):
        parse_compressed(forge([row], data=data, arch=None, version=1))
    for version in (2, 3):
        packed = parse_compressed(forge([row], data=data, arch=None, version=version))
        assert [record.state_key for record in packed.layers] == ["attn.in_proj_weight"]
        assert list(packed.decode()) == ["attn.in_proj_weight"]
    with pytest.raises(PackedFileError, match="does not have 9 or 10 fields"):
        parse_compressed(forge([row + ["x"]], data=data, arch=None, version=2))
    with pytest.raises(PackedFileError, match="not a name"):
        parse_compressed(forge([row[:9] + [7]], data=data, arch=None, version=2))
    twice = [row, ["other", [4, 2], "float32", 8, 8, 0, None, None, "all", "attn.in_proj_weight"]]
    with pytest.raises(PackedFileError, match="lists a tensor twice"):
        parse_compressed(forge(twice, data=data + data, arch=None, version=2))
    with pytest.raises(PackedFileError, match="version 4; this build reads versions 1, 2 and 3"):
        parse_compressed(forge([row], data=data, arch=None, version=4))


def test_a_repaired_projection_is_stored_under_its_key(attention_engine):
    """A repair (here: the kept in_proj weights scaled) is packed under the projection's own key."""
    model, engine = attention_engine
    result = engine.apply(SETTINGS["pruning only"])
    repaired_model = result.model
    fixed = Attention().eval()
    fixed.load_state_dict(repaired_model.state_dict())
    with torch.no_grad():
        fixed.attn.in_proj_weight.mul_(1.5)
    repair = SimpleNamespace(model=fixed, method="bias", seconds=0.1, changed=("attn.in_proj_weight",), n_images=4,
                             config=SimpleNamespace(ridge=0.0, seed=0, positions=1), quantized={})
    loaded = parse_compressed(compressed_bytes(result, repaired=repair)).load(model)
    assert torch.equal(loaded.attn.in_proj_weight, fixed.attn.in_proj_weight)
    assert all(torch.equal(v, fixed.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.slow
def test_torchvision_vit_b_16_packs_its_in_proj_weights():
    """ViT-B/16 at 32 px (4 patches): every encoder layer's in_proj_weight is pruned, quantized and packed;
    the file (recording ``torchvision:vit_b_16``) loads back without a template, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        kwargs = {"num_classes": 10, "image_size": 32}
        model = tv.build("vit_b_16", kwargs)
        engine = Engine(model, example_input=torch.randn(1, 3, 32, 32))
        in_proj = [name for name in engine.layer_names if name.endswith("in_proj_weight")]
        assert len(in_proj) == 12 and in_proj[0] == "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"
        result = engine.apply(CompressionConfig(tau=0.2, theta=0.3, b_low=4, b_high=8))
        stats = result.stats.set_index("name")
        assert (stats.loc[in_proj, "kept"] < stats.loc[in_proj, "numel"]).all()
        assert (stats.loc[in_proj, "macs_per_weight"] == 5.0).all()  # 4 patches + the class token
        data = compressed_bytes(result, tv.arch_name("vit_b_16"), kwargs)
        packed = parse_compressed(data, "vit")
        assert {record.state_key for record in packed.layers} >= set(in_proj)
        loaded = packed.load()
        original = result.model.state_dict()
        assert loaded.state_dict().keys() == original.keys()
        assert all(torch.equal(value, original[key]) for key, value in loaded.state_dict().items())
        example = torch.randn(2, 3, 32, 32)
        with torch.inference_mode():
            assert torch.equal(loaded(example), result.model(example))
    finally:
        torch.set_num_threads(threads)
