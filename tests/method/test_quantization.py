import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.method.quantization import (
    Chunk,
    dequantize,
    elias_fano_bytes,
    elias_fano_low_bits,
    layer_storage,
    mask_bytes,
    q_max,
    quantize,
    selector_bytes,
)


def test_quantize_hand_checked_4bit():
    w = torch.tensor([[0.7, -0.35, 0.05], [0.0, 0.0, 0.0]])
    q = quantize(w, 4)  # q_max = 7: row 0 scale 0.1, row 1 all zero → scale 1
    assert q.scales.tolist() == pytest.approx([0.1, 1.0])
    assert q.codes.tolist() == [[7, -4, 0], [0, 0, 0]]  # -3.5 rounds half to even → -4
    assert dequantize(w, 4)[0].tolist() == pytest.approx([0.7, -0.4, 0.0])


def test_two_bits_is_ternary():
    w = torch.randn(6, 10)
    codes = quantize(w, 2).codes
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert q_max(2) == 1 and q_max(8) == 127


def test_sixteen_bit_passthrough():
    w = torch.randn(3, 3)
    assert torch.equal(dequantize(w, 16), w.half().float())


def test_bad_bits():
    with pytest.raises(ValueError, match="palette"):
        quantize(torch.randn(2, 2), 9)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(1, 6), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_error_at_most_half_a_step(bits, rows, cols, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q = quantize(w, bits)
    err = (q.dequantize() - w).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-6).all()


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 3, 4, 5, 8, 16]), st.integers(0, 2**31 - 1))
def test_chunk_decodes_to_direct_quantization(bits, seed):
    w = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(seed))
    order = torch.argsort(w.abs().reshape(-1), stable=True)
    chunk = Chunk.build(w, order, bits)
    ranked = chunk.decode_ranks(order, 0, w.numel(), w.dtype)
    direct = dequantize(w, bits).reshape(-1)[order]
    assert torch.equal(ranked, direct)


def test_storage_accounting():
    # 1000 weights, 100 kept: bitmap 125 B, 100 16-bit indices 200 B, Elias–Fano with r = 3 low bits
    # 38 B (300 bits) + 29 B (100 + 124 + 1 upper bits) = 67 B → Elias–Fano
    assert elias_fano_low_bits(1000, 100) == 3 and elias_fano_bytes(1000, 100) == 67
    assert mask_bytes(1000, 100) == 67
    assert mask_bytes(1000, 10) == 12  # Elias–Fano r = 6: 8 B + 4 B beat 10 indices × 2 B and the bitmap
    assert mask_bytes(1000, 900) == 125  # dense: the bitmap
    assert mask_bytes(1000, 1000) == 0
    s = layer_storage(1000, 10, n_high=60, n_low=40, b_high=8, b_low=4)
    # selector: 60 of 100 high → the 13 B bitmap (Elias–Fano would take 20 B)
    assert (s.mask, s.values, s.selector, s.scales) == (67, 60 + 20, 13, 2 * 10 * 4)
    assert selector_bytes(1000, 50) == elias_fano_bytes(1000, 50) < 125  # few high: Elias–Fano
    dense = layer_storage(1000, 10, 1000, 0, None, None)
    assert dense.total == 4000
