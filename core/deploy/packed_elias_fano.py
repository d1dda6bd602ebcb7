"""Elias–Fano code of a sorted set of positions: the packed file's entropy-coded keep mask and selector.

A keep mask of density p costs a bitmap 1 bit per weight; its entropy is H(p) (0.50 bit at the
11 % a ResNet-18 keeps at τ = 0.2). The Elias–Fano code of the kept positions costs about
``2 + log₂(1/p)`` bits per kept weight (0.57 bit per weight at p = 0.11) and, unlike an adaptive
entropy coder (Golomb–Rice gaps, ANS, arithmetic coding), its size is a function of the two counts
alone (:func:`core.method.quantization.elias_fano_bytes`). That keeps the engine's byte accounting,
which sees only counts on every slider move, exactly equal to the file.

Layout, for ``count`` ≥ 1 positions ``x_0 < … < x_{count−1}`` in ``[0, universe)`` and
``r = elias_fano_low_bits(universe, count)``:

* low part: ``x_i mod 2^r`` for each i, ``r`` bits each, little-endian bit order, rounded up to a byte;
* upper part: a bit vector of ``count + ⌊(universe−1)/2^r⌋ + 1`` bits with bit ``⌊x_i/2^r⌋ + i`` set for
  each i (the high parts in unary), little-endian bit order, rounded up to a byte; padding bits 0.

Why our own ~100 lines and not a library: the PyPI Elias–Fano packages (pyEliasFano) are pure Python
over lists (seconds for the 1.2 M kept positions of ResNet-18) and unmaintained; roaring bitmaps
(pyroaring) store a set this dense as plain bitmaps; entropy coders (constriction) give a size that
depends on the content. Both directions here are a few vectorized numpy passes (ResNet-18's 11 M
weights: tens of milliseconds), and decoding allocates only what the validated counts imply.
"""
from __future__ import annotations

import math

import numpy as np

from core.method.quantization import elias_fano_bytes, elias_fano_low_bits

_CHUNK_VALUES = 1 << 18  # values per numpy call when packing wide integers (a multiple of 8)


# ---------------------------------------------------------------- unsigned integers of 0…32 bits

def pack_uint(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers ``< 2**bits`` (bits 0…32) into ``ceil(n·bits/8)`` bytes, LSB first."""
    values = np.asarray(values).reshape(-1)
    if not 0 <= bits <= 32:
        raise ValueError(f"can only pack 0…32 bits, got {bits}")
    if values.size and (int(values.min()) < 0 or int(values.max()) >> bits):
        raise ValueError(f"a value does not fit in {bits} bits")
    values = np.ascontiguousarray(values, dtype="<u4")
    out = np.empty(math.ceil(values.size * bits / 8), dtype=np.uint8)
    if bits == 0:
        return out
    for start in range(0, values.size, _CHUNK_VALUES):
        part = values[start:start + _CHUNK_VALUES].view(np.uint8).reshape(-1, 4)
        planes = np.unpackbits(part, axis=1, bitorder="little")[:, :bits]  # (m, bits)
        packed = np.packbits(planes.reshape(-1), bitorder="little")
        offset = start * bits // 8
        out[offset:offset + packed.size] = packed
    return out


def unpack_uint(data: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_uint`: ``n`` unsigned integers (int64) from exactly ``ceil(n·bits/8)`` bytes."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.size != math.ceil(n * bits / 8):
        raise ValueError(f"expected {math.ceil(n * bits / 8)} bytes for {n} values at {bits} bits, got {data.size}")
    if bits == 0:
        return np.zeros(n, dtype=np.int64)
    padded = np.concatenate([data, np.zeros(5, np.uint8)])  # a value spans ≤ 5 bytes (32 bits + a 7-bit shift)
    offsets = np.arange(n, dtype=np.int64) * bits
    start, shift = offsets >> 3, offsets & 7
    window = np.zeros(n, dtype=np.int64)
    for j in range(math.ceil((bits + 7) / 8)):
        window |= padded[start + j].astype(np.int64) << (8 * j)
    return (window >> shift) & ((1 << bits) - 1)


# ---------------------------------------------------------------- the code

def elias_fano_encode(positions: np.ndarray, universe: int) -> np.ndarray:
    """The Elias–Fano code (module layout) of strictly increasing ``positions`` in ``[0, universe)``.

    Exactly :func:`core.method.quantization.elias_fano_bytes` ``(universe, len(positions))`` bytes;
    nothing for no positions.
    """
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    count = positions.size
    if count == 0:
        return np.zeros(0, np.uint8)
    if positions[0] < 0 or positions[-1] >= universe or bool((np.diff(positions) <= 0).any()):
        raise ValueError(f"Elias–Fano codes strictly increasing positions in [0, {universe})")
    r = elias_fano_low_bits(universe, count)
    low = pack_uint(positions & ((1 << r) - 1), r)
    upper = np.zeros(count + ((universe - 1) >> r) + 1, dtype=np.uint8)
    upper[(positions >> r) + np.arange(count)] = 1
    return np.concatenate([low, np.packbits(upper, bitorder="little")])


def elias_fano_decode(raw: np.ndarray, universe: int, count: int, what: str) -> np.ndarray:
    """The ``count`` strictly increasing positions (int64) in ``[0, universe)`` that ``raw`` codes.

    ``raw`` is untrusted: it must be exactly :func:`~core.method.quantization.elias_fano_bytes` long,
    its upper part must set exactly ``count`` bits and no padding bit, and the positions it gives must
    be strictly increasing and below ``universe``; otherwise ``ValueError`` naming ``what`` (the
    packed layout re-raises it as :class:`~core.deploy.packed_layout.PackedFileError`).
    Memory is bounded by the counts (at most ``count + universe/2^r + 1`` bytes for the upper part's
    bits, 8 bytes per position), which the reader has already checked against its limits.
    """
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    size = elias_fano_bytes(universe, count)
    if raw.size != size:
        raise ValueError(f"{what} is {raw.size:,} bytes, its counts call for {size:,}")
    if count == 0:
        return np.zeros(0, np.int64)
    r = elias_fano_low_bits(universe, count)
    low_bytes = math.ceil(count * r / 8)
    upper_bits = count + ((universe - 1) >> r) + 1
    upper = np.unpackbits(raw[low_bytes:], bitorder="little")
    if int(np.count_nonzero(upper)) != count or upper[upper_bits:].any():
        raise ValueError(f"{what} is damaged: its Elias–Fano code does not describe {count:,} positions")
    if count * r % 8 and int(raw[low_bytes - 1]) >> (count * r % 8):
        raise ValueError(f"{what} is damaged: its Elias–Fano code has stray bits")
    high = np.flatnonzero(upper) - np.arange(count)
    positions = (high << r) | unpack_uint(raw[:low_bytes], count, r)
    if positions[-1] >= universe or bool((np.diff(positions) <= 0).any()):
        raise ValueError(f"{what} is damaged: its Elias–Fano code gives positions out of order or "
                              f"beyond {universe:,}")
    return positions
