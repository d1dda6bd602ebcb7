"""The chunk codes → one int8 grid per channel (core.deploy.int8_weights): exact where the docstring says."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.deploy.int8_weights import INT8_MAX, fold_batchnorm, layer_to_int8, to_int8
from core.method.quantization import q_max, quantize
from tests.deploy.onnx_setting import small_cnn


def _layer(seed: int, channels: int, per_channel: int, low: int, pattern: str):
    """A weight, its codes at ``low`` and 8 bits, and a per-weight bit-width: per channel all-8, all-low,
    mixed (largest |W| at 8 bits) or pruned, by ``pattern``."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, per_channel, generator=generator)
    q8, ql = quantize(w, 8), quantize(w, low)
    bits = torch.zeros(channels, per_channel, dtype=torch.int8)
    codes = torch.zeros(channels, per_channel, dtype=torch.int8)
    for c in range(channels):
        kind = pattern[c % len(pattern)]
        big = w[c].abs() >= w[c].abs().median()
        if kind == "8":
            bits[c] = 8
        elif kind == "l":
            bits[c] = low
        elif kind == "m":
            bits[c] = torch.where(big, 8, low).to(torch.int8)
        codes[c] = torch.where(bits[c] == 8, q8.codes[c], torch.where(bits[c] == low, ql.codes[c], 0))
    return w, bits, codes, {8: q8.scales, low: ql.scales}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), channels=st.integers(1, 6), per_channel=st.integers(1, 30),
       low=st.integers(2, 7), pattern=st.text(alphabet="8lmp", min_size=1, max_size=4))
def test_codes_are_exact_where_claimed(seed, channels, per_channel, low, pattern):
    _, bits, codes, scales = _layer(seed, channels, per_channel, low, pattern)
    layer, row = layer_to_int8(bits, codes, scales)
    assert layer.codes.dtype == torch.int8 and int(layer.codes.abs().max()) <= INT8_MAX
    eight, lowbits, pruned = bits == 8, bits == low, bits == 0
    # 8-bit codes are kept bit-identical, at the engine's own 8-bit scale
    assert torch.equal(layer.codes[eight], codes[eight])
    # pruned weights are exact zeros
    assert (layer.codes[pruned] == 0).all()
    k = INT8_MAX // q_max(low)
    for c in range(channels):
        if lowbits[c].any() and not eight[c].any():  # low-only channel: k·q, exact
            assert torch.equal(layer.codes[c][lowbits[c]], codes[c][lowbits[c]].to(torch.int16).mul(k).to(torch.int8))
            assert torch.allclose(layer.scales[c], scales[low][c] / k)
        if eight[c].any():
            assert layer.scales[c] == scales[8][c]
    # what is not exact is rounded by at most half an int8 step, and counted
    decoded = torch.where(eight, codes.float() * scales[8].reshape(-1, 1),
                          torch.where(lowbits, codes.float() * scales[low].reshape(-1, 1), 0.0))
    error = (layer.weight() - decoded).abs()
    assert (error <= layer.scales.reshape(-1, 1) / 2 + 1e-6).all()
    assert row["exact"] + row["rounded"] == int((bits != 0).sum())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), multiple=st.integers(1, 18), per_channel=st.integers(1, 40))
def test_a_low_scale_that_is_an_integer_multiple_of_the_8_bit_scale_maps_exactly(seed, multiple, per_channel):
    generator = torch.Generator().manual_seed(seed)
    s8 = torch.rand(3, generator=generator) + 0.01
    codes8 = torch.randint(-127, 128, (3, per_channel), generator=generator, dtype=torch.int8)
    codes4 = torch.randint(-7, 8, (3, per_channel), generator=generator, dtype=torch.int8)
    use8 = torch.rand(3, per_channel, generator=generator) < 0.5
    use8[:, 0] = True  # every channel has an 8-bit weight: the grid is s_8
    bits = torch.where(use8, 8, 4).to(torch.int8)
    codes = torch.where(use8, codes8, codes4)
    layer, row = layer_to_int8(bits, codes, {8: s8, 4: s8 * multiple})
    assert row["rounded"] == 0 and row["exact"] == bits.numel()
    assert torch.equal(layer.codes[~use8], (codes4[~use8].to(torch.int32) * multiple).to(torch.int8))  # 7·18 ≤ 127


def test_engine_scales_are_reported_as_rounded_in_mixed_channels():
    """The engine's s_4 / s_8 = 127/7 is not an integer: 4-bit weights in an 8-bit channel are rounded (and said so)."""
    _, bits, codes, scales = _layer(0, 4, 50, 4, "m")
    weights = to_int8({"layer": (bits, codes, scales)})
    row = weights.report.iloc[0]
    assert row.rounded > 0 and not weights.exact
    assert row.rel_error < 0.05


def test_batchnorm_folding_keeps_code_magnitudes_and_flips_signs_with_gamma():
    model = small_cnn()
    w = model.conv1.weight.detach()
    q = quantize(w, 8)
    weights = to_int8({"conv1": (torch.full(w.shape, 8, dtype=torch.int8), q.codes, {8: q.scales})})
    _, folded = fold_batchnorm(model, weights)
    k = model.bn1.weight / torch.sqrt(model.bn1.running_var + model.bn1.eps)
    sign = torch.where(k < 0, -1, 1).reshape(-1, 1, 1, 1)
    assert torch.equal(folded.layers["conv1"].codes.to(torch.int32), q.codes.to(torch.int32) * sign)
    torch.testing.assert_close(folded.layers["conv1"].scales, (q.scales * k.abs()).float())
    assert torch.equal(model.conv1.weight.detach(), w)  # the user's model is untouched
