import functools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from core.deploy import packed_layout, packed_writer
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads.models import build
from core.deploy.packed_layout import PackedFileError, pack_bits, unpack_bits
from core.deploy.packed_reader import load_compressed, read_compressed
from core.deploy.packed_writer import save_compressed
from tests.conftest import TinyNet, same_state, state_fingerprint

SETTINGS = {
    "pruning only": CompressionConfig(tau=0.3),
    "mixed 4/8": CompressionConfig(tau=0.1, theta=0.3, b_low=4, b_high=8),
    "mixed 2/16": CompressionConfig(tau=0.2, theta=0.5, b_low=2, b_high=16),
    "fraction": CompressionConfig(tau=0.05, theta=0.25, theta_mode="fraction", b_low=3, b_high=8),
}


def assert_same_weights(model: nn.Module, result) -> None:
    for name, weight in result.weights.items():
        loaded = model.get_submodule(name).weight
        assert loaded.dtype == weight.dtype and torch.equal(loaded, weight), name
    reference = result.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


# ---------------------------------------------------------------- bit packing

def test_pack_bits_hand_checked():
    # LSB first: 1 → (1,0), 2 → (0,1), 3 → (1,1): bits 1,0,0,1,1,1 → 0b00111001
    assert pack_bits(np.array([1, 2, 3], np.uint8), 2).tolist() == [0b00111001]
    assert pack_bits(np.array([5, 0, 7], np.uint8), 3).tolist() == [0b11000101, 0b1]
    assert pack_bits(np.array([200, 7], np.uint8), 8).tolist() == [200, 7]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(0, 300), st.integers(0, 2**31 - 1))
def test_pack_bits_round_trip(bits, n, seed):
    values = np.random.default_rng(seed).integers(0, 1 << bits, n).astype(np.uint8)
    packed = pack_bits(values, bits)
    assert packed.size == math.ceil(n * bits / 8)
    assert np.array_equal(unpack_bits(packed, n, bits), values)


def test_pack_bits_across_chunks(monkeypatch):
    monkeypatch.setattr(packed_layout, "_CHUNK_VALUES", 16)
    values = np.random.default_rng(0).integers(0, 8, 101).astype(np.uint8)
    packed = pack_bits(values, 3)
    monkeypatch.setattr(packed_layout, "_CHUNK_VALUES", 1 << 20)
    assert np.array_equal(packed, pack_bits(values, 3))
    assert np.array_equal(unpack_bits(packed, 101, 3), values)


# ---------------------------------------------------------------- round trips

@functools.lru_cache(maxsize=None)
def registry_engine(arch: str) -> tuple[nn.Module, dict, Engine]:
    torch.manual_seed(0)
    model = build(arch)
    return model, state_fingerprint(model), Engine(model, palette=(2, 3, 4, 8, 16))


@pytest.mark.parametrize("arch", ["mlp", "cifar_cnn", "resnet20"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_round_trip_registry_models(arch, setting, tmp_path):
    model, before, engine = registry_engine(arch)
    result = engine.apply(SETTINGS[setting])
    path = save_compressed(result, tmp_path / "m.safetensors", arch=arch)
    loaded = load_compressed(path)
    assert type(loaded) is type(model) and not loaded.training
    assert_same_weights(loaded, result)
    assert same_state(model, before)
    packed = read_compressed(path)
    # the data is exactly the engine's accounting (b_low ≠ b_high here); the rest is the container
    assert packed.data_bytes == result.model_bytes_compressed
    assert abs(os.path.getsize(path) / result.model_bytes_compressed - 1) < 0.05


def test_round_trip_resnet18_size_within_5_percent(tmp_path):
    torch.manual_seed(0)
    model = build("resnet18")  # random init: the trained checkpoint may not exist here
    result = Engine(model).apply(CompressionConfig(tau=0.1, theta=0.1, b_low=4, b_high=8))
    path = save_compressed(result, tmp_path / "r18.safetensors", arch="resnet18")
    assert_same_weights(load_compressed(path), result)
    size = os.path.getsize(path)
    assert abs(size / result.model_bytes_compressed - 1) < 0.05
    assert size < result.model_bytes_fp32 / 3  # 90 % retention, 8-bit codes + 1-bit mask


def test_arch_kwargs_are_recorded(tmp_path):
    model = build("mlp", layers=3, in_dim=20, out_dim=7, hidden=33)
    result = Engine(model).apply(CompressionConfig(tau=0.2, theta=0.2))
    path = save_compressed(result, tmp_path / "m.safetensors", arch="mlp",
                           arch_kwargs=dict(layers=3, in_dim=20, out_dim=7, hidden=33))
    assert_same_weights(load_compressed(path), result)


@st.composite
def configs(draw) -> CompressionConfig:
    mode = draw(st.sampled_from(["relative", "absolute", "fraction"]))
    theta = draw(st.one_of(st.none(), st.floats(0, 1 if mode == "fraction" else 1.2)))
    b_low, b_high = sorted(draw(st.lists(st.sampled_from([2, 3, 4, 8, 16]), min_size=2, max_size=2)))
    return CompressionConfig(tau=draw(st.floats(0, 1)), theta=theta, theta_mode=mode, b_low=b_low, b_high=b_high,
                             include_norm=draw(st.booleans()))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(configs(), st.integers(0, 3))
def test_round_trip_any_setting_tiny_net(tmp_path, config, seed):
    torch.manual_seed(seed)
    model = TinyNet().eval()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
    result = Engine(model, palette=(2, 3, 4, 8, 16)).apply(config)
    path = save_compressed(result, tmp_path / "t.safetensors")
    loaded = load_compressed(path, model_template=TinyNet())
    assert_same_weights(loaded, result)
    data = read_compressed(path).data_bytes
    if config.theta is None or config.b_low != config.b_high:
        assert data == result.model_bytes_compressed
    else:  # one shared stream instead of two: at most a byte less per layer
        assert 0 <= result.model_bytes_compressed - data <= len(result.stats)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models(dtype, tmp_path):
    torch.manual_seed(1)
    model = TinyNet().to(dtype).eval()
    for config in (CompressionConfig(tau=0.2), CompressionConfig(tau=0.2, theta=0.4, b_low=2, b_high=8)):
        result = Engine(model).apply(config)
        path = save_compressed(result, tmp_path / "t.safetensors")
        assert_same_weights(load_compressed(path, model_template=TinyNet().to(dtype)), result)


def test_edge_layers(tmp_path):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3, bias=False))
    nn.init.zeros_(model[2].weight)  # an all-zero layer
    engine = Engine(model)
    for config in (CompressionConfig(tau=1.0), CompressionConfig(tau=1.0, theta=1.0),
                   CompressionConfig(tau=0.0, theta=0.5, b_low=4, b_high=4)):
        result = engine.apply(config)
        path = save_compressed(result, tmp_path / "e.safetensors")
        assert_same_weights(load_compressed(path, model_template=model), result)


def test_template_is_not_modified_and_arch_is_needed(tmp_path, tiny_net):
    result = Engine(tiny_net).apply(CompressionConfig(tau=0.4, theta=0.5))
    path = save_compressed(result, tmp_path / "t.safetensors")
    template = TinyNet()
    before = state_fingerprint(template)
    loaded = load_compressed(path, model_template=template)
    assert loaded is not template and same_state(template, before)
    with pytest.raises(ValueError, match="model_template"):
        load_compressed(path)
    with pytest.raises(ValueError, match="does not fit"):
        load_compressed(path, model_template=build("mlp"))
    with pytest.raises(ValueError, match="unknown architecture"):
        save_compressed(result, tmp_path / "x.safetensors", arch="vgg99")


# ---------------------------------------------------------------- damaged files

@pytest.fixture
def packed_file(tmp_path):
    torch.manual_seed(0)
    result = Engine(build("mlp", layers=2, in_dim=32, out_dim=16, hidden=24)).apply(
        CompressionConfig(tau=0.2, theta=0.4, b_low=2, b_high=8))
    path = save_compressed(result, tmp_path / "good.safetensors", arch="mlp",
                           arch_kwargs=dict(layers=2, in_dim=32, out_dim=16, hidden=24))
    return path


@pytest.mark.parametrize("keep", [0, 5, 8, 100, 0.5, -1])
def test_truncated_file(packed_file, keep):
    data = packed_file.read_bytes()
    keep = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    packed_file.write_bytes(data[:keep])
    with pytest.raises(PackedFileError, match="truncated|not a"):
        load_compressed(packed_file)


def test_appended_bytes(packed_file):
    packed_file.write_bytes(packed_file.read_bytes() + b"\0\0")
    with pytest.raises(PackedFileError, match="altered"):
        load_compressed(packed_file)


def test_altered_payload_byte(packed_file):
    data = bytearray(packed_file.read_bytes())
    data[-20] ^= 0x01
    packed_file.write_bytes(bytes(data))
    with pytest.raises(PackedFileError, match="SHA256"):
        load_compressed(packed_file)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(0, 1, exclude_max=True))
def test_any_altered_byte_is_an_error(packed_file, where):
    original = packed_file.read_bytes()
    data = bytearray(original)
    data[int(where * len(data))] ^= 0xFF
    altered = packed_file.with_name("altered.safetensors")
    altered.write_bytes(bytes(data))
    with pytest.raises(PackedFileError):
        load_compressed(altered)


def test_wrong_version(monkeypatch, tmp_path):
    result = Engine(TinyNet()).apply(CompressionConfig(tau=0.2))
    monkeypatch.setattr(packed_writer, "FORMAT_VERSION", 99)
    path = save_compressed(result, tmp_path / "future.safetensors")
    monkeypatch.undo()
    with pytest.raises(PackedFileError, match="version 99; this build reads versions 1, 2 and 3 \\(a newer build"):
        load_compressed(path, model_template=TinyNet())


def test_foreign_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(PackedFileError, match="not a Boundary Explorer"):
        load_compressed(plain)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a model at all")
    with pytest.raises(PackedFileError):
        load_compressed(text)
    with pytest.raises(PackedFileError, match="cannot read"):
        load_compressed(tmp_path / "missing.safetensors")


def test_packed_file_bytes_is_the_file_size(tmp_path, tiny_net):
    result = Engine(tiny_net).apply(CompressionConfig(tau=0.3, theta=0.5))
    path = save_compressed(result, tmp_path / "t.safetensors")
    assert packed_writer.packed_file_bytes(result) == os.path.getsize(path)
