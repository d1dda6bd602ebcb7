"""The packed file's Elias–Fano masks and selectors (format version 3), and files of versions 1 and 2.

* encode → decode is the identity for any mask (empty, full, tiny, any density), at exactly the
  accounting's size (:func:`core.method.quantization.mask_bytes` / ``selector_bytes``);
* hostile codes of the right size are refused with a :class:`PackedFileError` (never another
  exception), cheaply, also inside a forged file with a correct SHA256;
* the files in ``tests/deploy/data`` were written by version 1 and version 2 of the format (before the
  Elias–Fano code) and still load, bit for bit.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from core.deploy.packed_elias_fano import (
    elias_fano_decode,
    elias_fano_encode,
    pack_uint,
    unpack_uint,
)
from core.deploy.packed_layout import (
    LayerRecord,
    PackedFileError,
    decode_mask,
    decode_selector,
    encode_mask,
    encode_selector,
    mask_bytes,
    mask_kind,
    selector_stored_bytes,
)
from core.deploy.packed_reader import parse_compressed
from core.deploy.packed_writer import compressed_bytes
from core.method import quantization
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads.models import build
from tests.deploy.test_packing_limits import SMALL_MLP, forge, refused_cheaply
from tests.method.test_weight_discovery import Attention

DATA = Path(__file__).parent / "data"


def record_for(numel: int, kept: int, n_high: int | None = None, version: int = 3) -> LayerRecord:
    """A 1-D layer record with these counts (mixed 2/8 bit when ``n_high`` is given)."""
    bits = (None, None) if n_high is None else (8, 2)
    n_high = kept if n_high is None else n_high
    return LayerRecord("layer", (numel,), "float32", kept, n_high, kept - n_high, *bits,
                       mask=mask_kind(numel, kept, version), version=version)


@st.composite
def masks(draw) -> np.ndarray:
    """Boolean masks: empty, full, tiny, and random ones of any density, some clustered."""
    numel = draw(st.sampled_from([1, 2, 7, 8, 9, 64, 65, 1000, 5000, 70_000]) | st.integers(1, 3000))
    kind = draw(st.sampled_from(["none", "all", "density", "runs"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind in ("none", "all"):
        return np.full(numel, kind == "all")
    if kind == "density":
        return rng.random(numel) < draw(st.sampled_from([0.0005, 0.01, 0.11, 0.3, 0.5, 0.9, 0.999]))
    return np.repeat(rng.random(numel // 16 + 1) < 0.2, 16)[:numel]  # runs of 16: structured, not i.i.d.


# ---------------------------------------------------------------- the code itself

@settings(max_examples=200, deadline=None)
@given(masks())
def test_mask_encode_decode_is_the_identity_at_the_accounted_size(mask):
    keep = torch.from_numpy(mask)
    numel, kept = mask.size, int(mask.sum())
    record = record_for(numel, kept)
    raw = encode_mask(keep, record.mask)
    assert raw.size == mask_bytes(record) == quantization.mask_bytes(numel, kept)
    assert torch.equal(decode_mask(record, raw), keep)
    if kept:  # the code itself, whether or not it is the smallest here
        positions = np.flatnonzero(mask)
        code = elias_fano_encode(positions, numel)
        assert code.size == quantization.elias_fano_bytes(numel, kept)
        assert np.array_equal(elias_fano_decode(code, numel, kept, "mask"), positions)


@settings(max_examples=100, deadline=None)
@given(masks(), st.data())
def test_selector_encode_decode_is_the_identity_at_the_accounted_size(high, data):
    kept, n_high = high.size, int(high.sum())
    if not 0 < n_high < kept:  # a selector exists only when both chunks are used
        return
    numel = kept + data.draw(st.integers(0, 50))
    record = record_for(numel, kept, n_high)
    assert record.mixed
    raw = encode_selector(torch.from_numpy(high), record)
    assert raw.size == selector_stored_bytes(record) == quantization.selector_bytes(kept, n_high)
    assert torch.equal(decode_selector(record, raw), torch.from_numpy(high))


@pytest.mark.parametrize("bits", range(33))
def test_pack_uint_round_trip(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 8, 9, 1001):
        values = rng.integers(0, 1 << bits, n, dtype=np.uint64) if bits else np.zeros(n, np.uint64)
        packed = pack_uint(values, bits)
        assert packed.size == math.ceil(n * bits / 8)
        assert np.array_equal(unpack_uint(packed, n, bits), values.astype(np.int64))
    with pytest.raises(ValueError, match="does not fit"):
        pack_uint(np.array([1 << bits], np.uint64), bits)
    with pytest.raises(ValueError, match="does not fit"):
        pack_uint(np.array([-1]), bits)


def test_elias_fano_hand_checked():
    # positions 1, 5, 6 of 16: r = 2 (2 + 1 bytes at r = 1, 1 + 1 at r = 2, 2 + 1 at r = 3);
    # low parts 1, 1, 2 at 2 bits → 0b10_01_01; high parts 0, 1, 1 → upper bits 0+0, 1+1, 1+2 → 0b1101
    # (3 + ⌊15/4⌋ + 1 = 7 upper bits)
    assert quantization.elias_fano_low_bits(16, 3) == 2
    assert elias_fano_encode(np.array([1, 5, 6]), 16).tolist() == [0b100101, 0b1101]
    assert quantization.mask_bytes(16, 3) == 2  # the bitmap is smaller here
    assert mask_kind(16, 3) == "bitmap" and mask_kind(10_000, 1_100) == "elias-fano"
    assert mask_kind(10_000, 1_100, version=2) == "bitmap"  # versions 1 and 2 had no Elias–Fano
    assert mask_kind(100_000, 10) == "elias-fano" and mask_kind(100_000, 10, version=1) == "index"


def test_elias_fano_refuses_what_it_cannot_code():
    with pytest.raises(ValueError, match="strictly increasing"):
        elias_fano_encode(np.array([3, 3]), 10)
    with pytest.raises(ValueError, match="strictly increasing"):
        elias_fano_encode(np.array([10]), 10)
    with pytest.raises(ValueError, match="1 ≤ count ≤ universe"):
        quantization.elias_fano_low_bits(3, 4)


# ---------------------------------------------------------------- hostile codes

HOSTILE = {
    # 3 of 16, r = 2: 1 low byte (6 bits used), 1 upper byte (7 bits used); the valid code is [0b100101, 0b1101]
    "too many upper bits": ([0b100101, 0b11101], "does not describe 3 positions"),
    "too few upper bits": ([0b100101, 0b00001], "does not describe 3 positions"),
    "an upper padding bit": ([0b100101, 0b10001101], "does not describe 3 positions"),
    "a low padding bit": ([0b1100101, 0b1101], "stray bits"),
    "positions not increasing": ([0b000001, 0b111], "out of order"),  # highs 0, 0, 0; lows 1, 0, 0
    "beyond the universe": ([0b010101, 0b1001001], "beyond 16"),  # highs 0, 2, 4 → positions 1, 9, 17
    "one byte short": ([0b100101], "1 bytes, its counts call for 2"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_elias_fano_codes_are_refused(case):
    raw, match = HOSTILE[case]
    record = LayerRecord("layer", (16,), "float32", 3, 3, 0, None, None, "elias-fano")  # forced: not the smallest
    with pytest.raises(PackedFileError, match=match):
        decode_mask(record, np.array(raw, np.uint8))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4000), st.data())
def test_random_bytes_decode_or_are_refused_never_crash(numel, data):
    kept = data.draw(st.integers(1, numel))
    size = quantization.elias_fano_bytes(numel, kept)
    raw = np.frombuffer(data.draw(st.binary(min_size=size, max_size=size)), np.uint8)
    try:
        positions = elias_fano_decode(raw, numel, kept, "mask")
    except ValueError:
        return
    assert positions.size == kept and (np.diff(positions) > 0).all() and 0 <= positions[0] and positions[-1] < numel


def forged_mask_file(code: bytes, kind: str = "elias-fano", version: int = 3, kept: int = 5) -> bytes:
    """SMALL_MLP with layer 0 (6×8) pruning only, ``kept`` weights of 1.0, the given mask bytes; a correct SHA256."""
    layers = [["0", [6, 8], "float32", kept, kept, 0, None, None, kind]]
    state = [["0.bias", "float32", [6]], ["2.weight", "float32", [4, 6]], ["2.bias", "float32", [4]]]
    values = np.ones(kept, "<f4").tobytes()
    return forge(layers, state, code + values + bytes(4 * (6 + 24 + 4)), arch_kwargs=SMALL_MLP, version=version)


def test_forged_files_with_elias_fano_masks():
    # 5 of 48: r = 3; positions 0, 9, 18, 27, 36 → lows 0,1,2,3,4; highs 0,1,2,3,4 → upper bits 0,2,4,6,8
    good = elias_fano_encode(np.array([0, 9, 18, 27, 36]), 48).tobytes()
    assert len(good) == quantization.elias_fano_bytes(48, 5) == 4  # beats the 6-byte bitmap
    model = parse_compressed(forged_mask_file(good), "forged").load()
    assert model[0].weight.reshape(-1).nonzero().reshape(-1).tolist() == [0, 9, 18, 27, 36]
    bad = bytearray(good)
    bad[-1] ^= 0x80  # an upper padding bit
    refused_cheaply(forged_mask_file(bytes(bad)), "does not describe 5 positions",
                    reader=lambda d: parse_compressed(d, "x").decode())
    refused_cheaply(forged_mask_file(good, version=2), "mask kind 'elias-fano', its counts call for 'bitmap'")
    refused_cheaply(forged_mask_file(bytes(6), kind="bitmap"), "mask kind 'bitmap', its counts call for 'elias-fano'")
    refused_cheaply(forged_mask_file(good + b"\0"), "describes .* bytes of data, the file holds")


def test_huge_declared_elias_fano_layer_is_refused_before_allocating():
    """A few hundred bytes claiming 2·10⁸ weights with 10⁶ kept: the Elias–Fano data the counts imply is
    absent, so the file is refused by its size, before anything of that size is decoded."""
    data = forge([["0", [20_000, 10_000], "float32", 10**6, 10**6, 0, None, None, "elias-fano"]], arch=None)
    assert len(data) < 1000
    refused_cheaply(data, "describes .* bytes of data, the file holds 0")


# ---------------------------------------------------------------- whole files

def test_elias_fano_file_round_trip_identical_state_dict():
    """A sparse setting (Elias–Fano masks and selectors) loads back bit for bit, at exactly the accounting."""
    torch.manual_seed(0)
    kwargs = {"layers": 3, "in_dim": 256, "out_dim": 10, "hidden": 256}
    result = Engine(build("mlp", **kwargs)).apply(CompressionConfig(tau=0.8, theta=0.98, b_low=4, b_high=8))
    packed = parse_compressed(compressed_bytes(result, "mlp", kwargs))
    assert packed.header["version"] == 3
    assert {r.mask for r in packed.layers} >= {"elias-fano"} and "elias-fano" in {r.selector for r in packed.layers}
    assert packed.data.size == result.model_bytes_compressed
    state, reference = packed.decode(), result.model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], v) for k, v in reference.items())


@pytest.mark.parametrize("stem, version", [("v1_mlp", 1), ("v2_attention", 2)])
def test_files_of_older_versions_still_load(stem, version):
    """Files written by the code of commit 8b6e939 (versions 1 and 2: bitmap/index masks, bitmap selectors)."""
    packed = parse_compressed((DATA / f"{stem}.packed.safetensors").read_bytes(), stem)
    assert packed.header["version"] == version
    assert {r.mask for r in packed.layers} <= {"all", "bitmap", "index"}
    assert all(r.selector in (None, "bitmap") for r in packed.layers)
    expected = load_file(str(DATA / f"{stem}.expected.safetensors"))
    model = packed.load() if packed.arch else packed.load(Attention().eval())
    state = model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
