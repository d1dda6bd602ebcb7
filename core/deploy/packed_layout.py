"""The packed file's format and byte layout: name and versions, each layer's mask, codes and scales, and their sizes.

Format (version :data:`FORMAT_VERSION`; :data:`READ_VERSIONS` are read): a safetensors file with two
uint8 tensors and one metadata entry.

* metadata ``boundary_explorer``: a JSON header — format name and version, architecture
  name and kwargs, the compression settings, the engine's byte accounting, for a repaired
  model the ``repair`` it carries (method, calibration images, ridge, seed), and the
  SHA256 of everything (header, table, data; :func:`file_digest`);
* ``table``: zlib-compressed JSON — one record per packed layer ``[name, shape, dtype,
  kept, n_high, n_low, b_high, b_low, mask kind]`` (:class:`LayerRecord`) and one per state_dict
  entry stored as is ``[key, dtype, shape]`` (:class:`StateEntry`). A packed layer's state_dict key
  is ``<name>.weight`` (a Conv/Linear module's weight); a layer whose weight is another parameter
  (an attention's ``in_proj_weight``, named by its dotted path) has its key as a tenth field
  (version 1 files never have one; version 2 files were those that did);
* ``data``: the bytes, back to back, in table order (all sizes follow from the table).
  Per packed layer (each row of ``result.stats``):

  - the keep mask, whichever of these is smallest (``bitmap`` on a tie, then ``index``): a 1-bit
    mask over the flat weight (little-endian bit order), the kept flat indices as little-endian
    uint16 (layers of ≤ 65,536 weights) or uint32, or (version 3) the Elias–Fano code of the kept
    flat indices (``elias-fano``, :mod:`core.deploy.packed_elias_fano`); nothing when every weight
    is kept. The choice follows from the counts and is recorded; its size is exactly
    :func:`core.method.quantization.mask_bytes`;
  - quantized: per chunk used (b_high first), the kept weights' integer codes in
    ascending flat-index order, offset by +q_max to be unsigned and bit-packed at b bits
    each (little-endian bit order, rounded up to a byte; float16 values for 16 bits),
    then that chunk's fp32 per-output-channel scales (the engine's own, so decoding is
    the engine's ``code · scale``); then, when both chunks are used and differ, the selector of
    the b_high weights: 1 bit per kept weight (in flat order), or (version 3) where smaller the
    Elias–Fano code of the high ones' positions among the kept (size:
    :func:`core.method.quantization.selector_bytes`);
  - pruning only: the kept weights in their dtype.

  Then every other state_dict entry (biases, BatchNorm statistics, layers not pruned in
  this setting), unchanged.

A *repaired* model (:mod:`core.measure.repair`) is stored in the same layout under the same
records (:mod:`core.deploy.packed_writer`), so its data is exactly as large.

So the data is exactly what :func:`core.method.quantization.layer_storage` and the engine's
``model_bytes_compressed`` count (at most a byte less per layer where b_high = b_low; and
less for a float16/bfloat16 model, whose other tensors the engine counts as fp32);
``file size − model_bytes_compressed`` is the container: safetensors framing, the JSON
header and the compressed table (about 1–2 KB for the registry models).

Versions 1 and 2 (files written before the Elias–Fano code) are read as written: their masks are
bitmaps or index lists and their selectors bitmaps (:attr:`LayerRecord.version` says which rules a
record follows). Measured on the shipped ResNet-18 at τ = 0.2, 4/8 bit, θ = 0.3: the masks take
0.73 MB instead of 1.40 MB, and the file is 25× smaller than the fp32 state_dict file instead of
18× (``benchmarks/packed_size.py``).

Writing is :mod:`core.deploy.packed_writer`; reading, :mod:`core.deploy.packed_reader`, after the
checks of :mod:`core.deploy.packed_validation`.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from core.deploy.packed_elias_fano import elias_fano_decode, elias_fano_encode
from core.method.quantization import (
    FLOAT_PASSTHROUGH_BITS,
    elias_fano_bytes,
    index_bits,
    layer_storage,
    q_max,
)
from core.workloads.models import CheckpointError

FORMAT_NAME = "boundary-explorer/packed"
#: The version every file is written as: Elias–Fano masks and selectors where smaller; a layer
#: record may carry its state_dict key as a tenth field.
FORMAT_VERSION = 3
#: The version files with a keyed layer record were written as before version 3 (bitmap/index
#: masks, bitmap selectors); files without one were version 1.
KEYED_FORMAT_VERSION = 2
#: The versions this build reads.
READ_VERSIONS: tuple[int, ...] = (1, KEYED_FORMAT_VERSION, FORMAT_VERSION)
#: The mask kinds, by the first version that has them.
MASK_KINDS: tuple[str, ...] = ("all", "bitmap", "index", "elias-fano")
METADATA_KEY = "boundary_explorer"
_CHUNK_VALUES = 1 << 20  # values packed per numpy call (a multiple of 8: chunks start on a byte)


class PackedFileError(CheckpointError):
    """A packed model file is truncated, altered, of another format version, or not one at all."""


# ---------------------------------------------------------------- bit packing (vectorized)

def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers ``< 2**bits`` (bits 1…8) into ``ceil(n·bits/8)`` bytes, LSB first."""
    values = np.ascontiguousarray(values, dtype=np.uint8)
    if not 1 <= bits <= 8:
        raise ValueError(f"can only bit-pack 1…8 bits, got {bits}")
    if values.size and int(values.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    if bits == 8:
        return values.copy()
    n = values.size
    out = np.empty(math.ceil(n * bits / 8), dtype=np.uint8)
    for start in range(0, n, _CHUNK_VALUES):
        part = values[start:start + _CHUNK_VALUES]
        planes = np.unpackbits(part[:, None], axis=1, count=bits, bitorder="little")  # (m, bits)
        packed = np.packbits(planes.reshape(-1), bitorder="little")
        offset = start * bits // 8
        out[offset:offset + packed.size] = packed
    return out


def unpack_bits(data: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` unsigned integers (uint8) from the packed bytes."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.size != math.ceil(n * bits / 8):
        raise ValueError(f"expected {math.ceil(n * bits / 8)} bytes for {n} values at {bits} bits, got {data.size}")
    if bits == 8:
        return data.copy()
    out = np.empty(n, dtype=np.uint8)
    for start in range(0, n, _CHUNK_VALUES):
        m = min(_CHUNK_VALUES, n - start)
        offset = start * bits // 8
        planes = np.unpackbits(data[offset:offset + math.ceil(m * bits / 8)], count=m * bits, bitorder="little")
        out[start:start + m] = np.packbits(planes.reshape(m, bits), axis=1, bitorder="little")[:, 0]
    return out


# ---------------------------------------------------------------- the table's records

@dataclass(frozen=True)
class LayerRecord:
    """The table's description of one packed layer."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kept: int
    n_high: int
    n_low: int
    b_high: int | None  # None: pruning only, kept weights stored in their dtype
    b_low: int | None
    mask: str  # "all" | "bitmap" | "index" | "elias-fano" (version 3)
    key: str | None = None  # the state_dict key when it is not ``<name>.weight`` (``….in_proj_weight``)
    version: int = FORMAT_VERSION  # the file's format version: which mask kinds and selector codes apply

    @property
    def state_key(self) -> str:
        """The weight's state_dict key."""
        return self.key if self.key is not None else f"{self.name}.weight"

    @property
    def row(self) -> list:
        """The table's record: nine fields, and the key as a tenth where it is not ``<name>.weight``."""
        fields = [self.name, list(self.shape), self.dtype, self.kept, self.n_high, self.n_low, self.b_high,
                  self.b_low, self.mask]
        return fields + ([self.key] if self.key is not None else [])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        return self.shape[0] if len(self.shape) >= 2 else 1

    @property
    def streams(self) -> list[tuple[str, int, int]]:
        """(name, count, bits) of each value stream, in storage order."""
        if self.b_high is None:
            return [("val", self.kept, 0)]
        if self.b_high == self.b_low:  # one chunk serves both: one stream, no selector
            return [("hi", self.kept, self.b_high)] if self.kept else []
        return [(s, n, b) for s, n, b in (("hi", self.n_high, self.b_high), ("lo", self.n_low, self.b_low)) if n > 0]

    @property
    def mixed(self) -> bool:
        return len(self.streams) == 2

    @property
    def selector(self) -> str | None:
        """How the high/low selector is stored: ``"bitmap"``, ``"elias-fano"`` (version 3, where smaller),
        or ``None`` (not mixed)."""
        if not self.mixed:
            return None
        if self.version >= FORMAT_VERSION and elias_fano_bytes(self.kept, self.n_high) < math.ceil(self.kept / 8):
            return "elias-fano"
        return "bitmap"


@dataclass(frozen=True)
class StateEntry:
    """A state_dict entry the packed file stores as is."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ---------------------------------------------------------------- a layer's mask and codes, as bytes

def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PackedFileError(f"the file names an unknown dtype {name!r}")
    return dtype


def mask_kind(numel: int, kept: int, version: int = FORMAT_VERSION) -> str:
    """The mask kind a file of ``version`` stores for ``kept`` of ``numel`` weights: the smallest
    (``bitmap`` on a tie, then ``index``; ``elias-fano`` only from version 3), ``all`` when all are kept."""
    if kept == numel:
        return "all"
    sizes = {"bitmap": math.ceil(numel / 8), "index": math.ceil(kept * index_bits(numel) / 8)}
    if version >= FORMAT_VERSION:
        sizes["elias-fano"] = elias_fano_bytes(numel, kept)
    return min(sizes, key=sizes.__getitem__)  # dicts keep order: the first of equal sizes wins


def mask_bytes(record: LayerRecord) -> int:
    """Bytes of the record's stored keep mask."""
    if record.mask == "all":
        return 0
    if record.mask == "bitmap":
        return math.ceil(record.numel / 8)
    if record.mask == "elias-fano":
        return elias_fano_bytes(record.numel, record.kept)
    return record.kept * index_bits(record.numel) // 8


def encode_mask(keep: torch.Tensor, kind: str) -> np.ndarray:
    """The stored bytes of the flat boolean ``keep`` mask as ``kind`` (:func:`mask_kind`)."""
    if kind == "all":
        return np.zeros(0, np.uint8)
    if kind == "bitmap":
        return np.packbits(keep.numpy(), bitorder="little")
    index = np.flatnonzero(keep.numpy())
    if kind == "elias-fano":
        return elias_fano_encode(index, keep.numel())
    return _as_bytes(index.astype("<u2" if index_bits(keep.numel()) == 16 else "<u4"))


def decode_mask(record: LayerRecord, raw: np.ndarray) -> torch.Tensor:
    """The flat boolean keep mask (``raw``: exactly :func:`mask_bytes` untrusted bytes); a mask that does not
    describe ``record.kept`` distinct weights raises :class:`PackedFileError`."""
    numel = record.numel
    if record.mask == "all":
        return torch.ones(numel, dtype=torch.bool)
    if record.mask == "bitmap":
        bits = np.unpackbits(raw, count=numel, bitorder="little")
        valid = int(np.count_nonzero(bits)) == record.kept
        keep = torch.from_numpy(bits).view(torch.bool)
    elif record.mask == "index":
        index = torch.from_numpy(raw.view("<u2" if index_bits(numel) == 16 else "<u4").astype(np.int64))
        valid = index.numel() == record.kept and (
            index.numel() == 0 or (int(index[-1]) < numel and bool((index[1:] > index[:-1]).all())))
        keep = torch.zeros(numel, dtype=torch.bool)
        if valid:
            keep[index] = True
    elif record.mask == "elias-fano":
        keep = torch.zeros(numel, dtype=torch.bool)
        keep[torch.from_numpy(_elias_fano(raw, numel, record.kept, f"layer '{record.name}''s mask"))] = True
        valid = True
    else:
        raise PackedFileError(f"layer '{record.name}': unknown mask kind {record.mask!r}")
    if not valid:
        raise PackedFileError(f"layer '{record.name}': the stored mask does not describe {record.kept} kept weights")
    return keep


def encode_selector(high_kept: torch.Tensor, record: LayerRecord) -> np.ndarray:
    """The stored selector of a mixed layer: ``high_kept`` is, per kept weight in flat order, whether it is high."""
    if record.selector == "elias-fano":
        return elias_fano_encode(np.flatnonzero(high_kept.numpy()), record.kept)
    return np.packbits(high_kept.numpy(), bitorder="little")


def decode_selector(record: LayerRecord, raw: np.ndarray) -> torch.Tensor:
    """Per kept weight (flat order), whether it is high; from exactly :func:`selector_stored_bytes` untrusted
    bytes, which must mark ``record.n_high`` weights (else :class:`PackedFileError`)."""
    where = f"layer '{record.name}'"
    if record.selector == "elias-fano":
        high = torch.zeros(record.kept, dtype=torch.bool)
        high[torch.from_numpy(_elias_fano(raw, record.kept, record.n_high, f"{where}'s high/low selector"))] = True
        return high
    bits = np.unpackbits(raw, count=record.kept, bitorder="little")
    if int(np.count_nonzero(bits)) != record.n_high:
        raise PackedFileError(f"{where}: the selector marks {int(np.count_nonzero(bits))} weights high, "
                              f"expected {record.n_high}")
    return torch.from_numpy(bits).view(torch.bool)


def selector_stored_bytes(record: LayerRecord) -> int:
    """Bytes of the record's stored selector (0 when not mixed)."""
    if record.selector is None:
        return 0
    return elias_fano_bytes(record.kept, record.n_high) if record.selector == "elias-fano" else math.ceil(record.kept / 8)


def _elias_fano(raw: np.ndarray, universe: int, count: int, what: str) -> np.ndarray:
    try:
        return elias_fano_decode(raw, universe, count, what)
    except ValueError as err:
        raise PackedFileError(str(err)) from err


def code_bytes(count: int, bits: int) -> int:
    return 2 * count if bits == FLOAT_PASSTHROUGH_BITS else math.ceil(count * bits / 8)


def encode_codes(codes: torch.Tensor, bits: int) -> np.ndarray:
    if bits == FLOAT_PASSTHROUGH_BITS:
        return _as_bytes(codes.to(torch.float16).numpy().astype("<f2"))
    return pack_bits((codes.to(torch.int16) + q_max(bits)).to(torch.uint8).numpy(), bits)


def decode_codes(raw: np.ndarray, count: int, bits: int) -> torch.Tensor:
    if bits == FLOAT_PASSTHROUGH_BITS:
        return torch.from_numpy(raw.view("<f2").astype(np.float16))
    unsigned = unpack_bits(raw, count, bits)
    return torch.from_numpy(unsigned).to(torch.int16).sub_(q_max(bits)).to(torch.int8)


def _as_bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes (little-endian machine order, as safetensors stores them)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)


# ---------------------------------------------------------------- byte counts

def layer_bytes(record: LayerRecord) -> int:
    """The bytes the data blob holds for one layer (mask, codes and scales per stream, selector)."""
    total = mask_bytes(record)
    if record.b_high is None:
        return total + record.kept * dtype_from_name(record.dtype).itemsize
    for _, count, bits in record.streams:
        total += code_bytes(count, bits) + (0 if bits == FLOAT_PASSTHROUGH_BITS else 4 * record.channels)
    return total + selector_stored_bytes(record)


def expected_layer_bytes(record: LayerRecord) -> int:
    """The engine's accounting for one packed layer (for tests and the app); a version-3 record's
    :func:`layer_bytes` equals it (at most a byte less where b_high = b_low)."""
    if record.b_high is None:
        return layer_storage(record.numel, record.channels, record.kept, 0, None, None,
                             dense_bits=torch.finfo(dtype_from_name(record.dtype)).bits).total
    return layer_storage(record.numel, record.channels, record.n_high, record.n_low,
                         record.b_high, record.b_low).total


# ---------------------------------------------------------------- the checksum

def file_digest(header: Mapping, table: bytes, data: np.ndarray) -> str:
    """The SHA256 the header records: of the header (without ``sha256``), the table's length and bytes, the data."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    digest.update(len(table).to_bytes(8, "little"))
    digest.update(table)
    digest.update(memoryview(np.ascontiguousarray(data)))
    return digest.hexdigest()
