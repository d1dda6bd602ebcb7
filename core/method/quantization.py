"""Symmetric uniform quantization per output channel, the chunk store, and size accounting.

For a bit-width b in 2…8 and output channel c (dim 0 of a Conv/Linear weight; one scale
for the whole tensor when the weight is 1-D, as for norm scales):

    q_max = 2^(b−1) − 1,   s_c = max|W_c| / q_max   (s_c = 1 when max|W_c| = 0),
    code  = clamp(round(W / s_c), −q_max, q_max)     (int8),   Ŵ = code · s_c.

b = 16 is a float16 passthrough: Ŵ = fp16(W). A *chunk* is one layer quantized at one
bit-width, stored in the engine's rank order (ascending |W|) so a θ move re-selects a
contiguous range of chunk entries and never re-quantizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 16)
DEFAULT_PALETTE: tuple[int, ...] = (2, 3, 4, 8)
FLOAT_PASSTHROUGH_BITS = 16


def check_bits(bits: int, palette: tuple[int, ...] = SUPPORTED_BITS, where: str = "bit-width") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{where} must be an integer, got {type(bits).__name__}")
    if bits not in palette:
        raise ValueError(f"{where} {bits} is not in the palette {tuple(palette)}")
    return bits


def q_max(bits: int) -> int:
    return (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes (int8, or fp16 values for b = 16) and per-channel fp32 scales."""

    codes: torch.Tensor
    scales: torch.Tensor | None
    bits: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        return decode(self.codes, self.scales, self.bits, self.dtype)


def channel_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """s_c = max|W_c| / q_max per output channel (one scale for a 1-D weight); 1 where max is 0."""
    magnitude = weight.detach().float().abs()
    per_channel = magnitude.reshape(magnitude.shape[0], -1).amax(1) if weight.ndim >= 2 else magnitude.amax().reshape(1)
    scales = per_channel / q_max(bits)
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def _broadcast(scales: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return scales.reshape((-1,) + (1,) * (len(shape) - 1)) if len(shape) >= 2 else scales.reshape(())


def quantize(weight: torch.Tensor, bits: int) -> QuantizedTensor:
    """Quantize ``weight`` at ``bits`` (2…8 symmetric per channel, or 16 = fp16 passthrough)."""
    check_bits(bits)
    shape, dtype = tuple(weight.shape), weight.dtype
    if bits == FLOAT_PASSTHROUGH_BITS:
        return QuantizedTensor(weight.detach().to(torch.float16).clone(), None, bits, shape, dtype)
    scales = channel_scales(weight, bits)
    limit = q_max(bits)
    codes = torch.round(weight.detach().float() / _broadcast(scales, shape)).clamp_(-limit, limit).to(torch.int8)
    return QuantizedTensor(codes, scales, bits, shape, dtype)


def decode(codes: torch.Tensor, scales: torch.Tensor | None, bits: int, dtype: torch.dtype,
           channel: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ = code · s_c in ``dtype``. With ``channel`` (flat codes), ``scales[channel]`` is used per element."""
    if bits == FLOAT_PASSTHROUGH_BITS:
        return codes.to(dtype)
    if channel is not None:
        scale = scales[channel] if scales.numel() > 1 else scales
    else:
        scale = _broadcast(scales, tuple(codes.shape))
    return (codes.to(torch.float32) * scale).to(dtype)


def dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Direct quantize-then-decode of ``weight`` at ``bits`` (the reference the chunk store must equal)."""
    return quantize(weight, bits).dequantize()


@dataclass(frozen=True)
class Chunk:
    """One layer pre-quantized at one bit-width, codes permuted into the engine's rank order."""

    bits: int
    codes_ranked: torch.Tensor
    scales: torch.Tensor | None
    channel_numel: int  # weights per scale group, to find each ranked code's scale

    @classmethod
    def build(cls, weight: torch.Tensor, order: torch.Tensor, bits: int) -> Chunk:
        quantized = quantize(weight, bits)
        channel_numel = weight.numel() // weight.shape[0] if weight.ndim >= 2 else weight.numel()
        return cls(bits, quantized.codes.reshape(-1)[order].contiguous(), quantized.scales, channel_numel)

    def decode_ranks(self, order: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Decoded weights for ranks ``start:stop`` (``order`` maps rank → flat index)."""
        codes = self.codes_ranked[start:stop]
        channel = None if self.scales is None else order[start:stop] // self.channel_numel
        return decode(codes, self.scales, self.bits, dtype, channel)

    @property
    def nbytes(self) -> int:
        scale_bytes = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.codes_ranked.numel() * self.codes_ranked.element_size() + scale_bytes


# ---------------------------------------------------------------- storage accounting

SCALE_BYTES = 4  # one fp32 scale per output channel and stored bit-width


def index_bits(numel: int) -> int:
    """Bits per stored index of a kept weight: 16 when the layer has ≤ 65,536 weights, else 32."""
    return 16 if numel <= 1 << 16 else 32


def elias_fano_low_bits(universe: int, count: int) -> int:
    """The low-bit width ``r`` of the Elias–Fano code of ``count`` ≥ 1 distinct positions in ``[0, universe)``.

    The one of ⌊log₂(universe/count)⌋ − 1, …, + 1 (at least 0) whose :func:`elias_fano_bytes` is
    smallest (the smaller ``r`` on a tie): a function of the two counts only, so writer, reader and
    accounting agree without storing it.
    """
    if count < 1 or universe < count:
        raise ValueError(f"Elias–Fano needs 1 ≤ count ≤ universe, got {count} of {universe}")
    floor_log = (universe // count).bit_length() - 1
    return min(range(max(0, floor_log - 1), floor_log + 2), key=lambda r: (_elias_fano_size(universe, count, r), r))


def _elias_fano_size(universe: int, count: int, r: int) -> int:
    """Bytes of the low part (``count·r`` bits) plus the upper part (``count + ⌊(universe−1)/2^r⌋ + 1`` bits)."""
    return math.ceil(count * r / 8) + math.ceil((count + ((universe - 1) >> r) + 1) / 8)


def elias_fano_bytes(universe: int, count: int) -> int:
    """Bytes of the Elias–Fano code of ``count`` distinct positions in ``[0, universe)`` (0 for none).

    Each position's low ``r`` bits (:func:`elias_fano_low_bits`) packed at ``r`` bits, then one bit
    per position plus one per bucket of ``2^r`` (the high parts in unary), each part rounded up to a
    byte. About ``2 + log₂(universe/count)`` bits per position, *whichever* positions they are: the
    size follows from the two counts, so the accounting stays exact. For a mask of density 0.11
    that is 0.57 bit per weight (the entropy H(0.11) is 0.50, a bitmap 1).
    """
    return 0 if count == 0 else _elias_fano_size(universe, count, elias_fano_low_bits(universe, count))


@dataclass(frozen=True)
class LayerStorage:
    """Bytes a compressed layer occupies when stored: each part packed on its own, rounded up to bytes.

    * ``mask``: the smallest of a 1-bit keep mask, the kept weights' indices and their Elias–Fano
      code (:func:`elias_fano_bytes`); 0 when every weight is kept.
    * ``values``: kept weights at their bits (fp weights at their dtype's bits when not quantized).
    * ``selector``: which kept weights take the high chunk, only when both are used: 1 bit per kept
      weight, or the Elias–Fano code of the high ones' ranks among the kept where smaller.
    * ``scales``: one fp32 scale per output channel for each integer bit-width actually used.
    """

    mask: int
    values: int
    selector: int
    scales: int

    @property
    def total(self) -> int:
        return self.mask + self.values + self.selector + self.scales


def mask_bytes(numel: int, kept: int) -> int:
    """Bytes of the keep mask: 0 when all are kept, else the smallest of bitmap, index list, Elias–Fano."""
    if kept == numel:
        return 0
    return min(math.ceil(numel / 8), math.ceil(kept * index_bits(numel) / 8), elias_fano_bytes(numel, kept))


def selector_bytes(kept: int, n_high: int) -> int:
    """Bytes of the high/low selector over ``kept`` weights, ``n_high`` of them high: 1 bit each, or
    the Elias–Fano code of the high ones' positions among the kept where that is smaller."""
    return min(math.ceil(kept / 8), elias_fano_bytes(kept, n_high))


def layer_storage(numel: int, n_channels: int, n_high: int, n_low: int,
                  b_high: int | None, b_low: int | None, dense_bits: int = 32) -> LayerStorage:
    """Stored size of one layer with ``n_high`` weights at ``b_high`` and ``n_low`` at ``b_low``.

    ``b_high = b_low = None`` means no quantization: every kept weight at ``dense_bits``.
    """
    kept = n_high + n_low
    if b_high is None:
        return LayerStorage(mask_bytes(numel, kept), math.ceil(kept * dense_bits / 8), 0, 0)
    used = [(n, b) for n, b in ((n_high, b_high), (n_low, b_low)) if n > 0]
    values = sum(math.ceil(n * b / 8) for n, b in used)
    mixed = n_high > 0 and n_low > 0 and b_high != b_low
    selector = selector_bytes(kept, n_high) if mixed else 0
    int_widths = {b for _, b in used if b != FLOAT_PASSTHROUGH_BITS}
    return LayerStorage(mask_bytes(numel, kept), values, selector, len(int_widths) * n_channels * SCALE_BYTES)
