"""A packed file for a compressed model: the savings of pruning and quantization, on disk.

``save_compressed(result, path, arch=...)`` writes a :class:`core.method.engine.CompressionResult`
to one safetensors file; ``load_compressed(path)`` rebuilds the ``nn.Module`` whose
weights equal ``result.weights`` bit for bit.

Format (version :data:`FORMAT_VERSION`, or :data:`KEYED_FORMAT_VERSION` for a model with a packed
weight not called ``weight``): a safetensors file with two uint8 tensors and one metadata entry.

* metadata ``boundary_explorer``: a JSON header — format name and version, architecture
  name and kwargs, the compression settings, the engine's byte accounting, for a repaired
  model the ``repair`` it carries (method, calibration images, ridge, seed), and the
  SHA256 of everything (header, table, data);
* ``table``: zlib-compressed JSON — one record per packed layer ``[name, shape, dtype,
  kept, n_high, n_low, b_high, b_low, mask kind]`` and one per state_dict entry stored
  as is ``[key, dtype, shape]``. A packed layer's state_dict key is ``<name>.weight`` (a
  Conv/Linear module's weight); a layer whose weight is another parameter (an attention's
  ``in_proj_weight``, named by its dotted path) has its key as a tenth field, and such a file
  is written as version :data:`KEYED_FORMAT_VERSION`, so that a build that does not know the
  field says so instead of calling the file damaged;
* ``data``: the bytes, back to back, in table order (all sizes follow from the table).
  Per packed layer (each row of ``result.stats``):

  - the keep mask: a 1-bit mask over the flat weight (little-endian bit order) or, where
    smaller, the kept flat indices as little-endian uint16 (layers of ≤ 65,536 weights)
    or uint32; nothing when every weight is kept. The choice and its size are exactly
    :func:`core.method.quantization.mask_bytes`;
  - quantized: per chunk used (b_high first), the kept weights' integer codes in
    ascending flat-index order, offset by +q_max to be unsigned and bit-packed at b bits
    each (little-endian bit order, rounded up to a byte; float16 values for 16 bits),
    then that chunk's fp32 per-output-channel scales (the engine's own, so decoding is
    the engine's ``code · scale``); then, when both chunks are used and differ, 1 bit per
    kept weight selecting b_high;
  - pruning only: the kept weights in their dtype.

  Then every other state_dict entry (biases, BatchNorm statistics, layers not pruned in
  this setting), unchanged.

A *repaired* model (``repaired=``, :mod:`core.measure.repair`) is stored in the same layout
under the same records: the repair's values (or, quantized, its codes and scales) of the same
kept weights, and the other entries as the repair left them; so its data is exactly as large.

So the data is exactly what :func:`core.method.quantization.layer_storage` and the engine's
``model_bytes_compressed`` count (at most a byte less per layer where b_high = b_low; and
less for a float16/bfloat16 model, whose other tensors the engine counts as fp32);
``file size − model_bytes_compressed`` is the container: safetensors framing, the JSON
header and the compressed table (about 1–2 KB for the registry models).

Integrity: a truncated, damaged, foreign or other-version file raises
:class:`PackedFileError` (a ``ValueError``) that says which. The SHA256 in the header is a
checksum: it detects corruption (a cut-short download, a flipped bit), not tampering; anyone
can change a file and recompute it. So a file is never trusted for its checksum: a reader
(:func:`parse_compressed`, behind every public reader) checks every size, shape and count the
file declares against the limits below and against the bytes actually present *before*
allocating anything of that size, and builds a registry model only from checked constructor
arguments (:func:`core.workloads.models.check_arch_kwargs`). Reading a hostile file then costs
about its own size; loading a valid one, about the model's.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from core.method.config import CompressionConfig
from core.workloads.models import MAX_FILE_PARAMS, CheckpointError, load_state_dict_into
from core.workloads.provenance import build_file_arch, known_arch
from core.common.formatting import printable
from core.method.quantization import (
    FLOAT_PASSTHROUGH_BITS,
    SUPPORTED_BITS,
    decode,
    index_bits,
    layer_storage,
    q_max,
)

FORMAT_NAME = "boundary-explorer/packed"
FORMAT_VERSION = 1
#: The version of a file with a layer record that carries its state_dict key (a tenth field); files
#: whose packed weights are all modules' ``weight`` are still written, byte for byte, as version 1.
KEYED_FORMAT_VERSION = 2
METADATA_KEY = "boundary_explorer"
_CHUNK_VALUES = 1 << 20  # values packed per numpy call (a multiple of 8: chunks start on a byte)

# ---------------------------------------------------------------- limits on what a file may declare
# Each is checked before anything of the declared size is allocated. The registry's largest model,
# ResNet-18, packs to 6-12 MB with a ~1 KB header and a ~2 KB table (~14 KB decompressed).
#: A packed file read from a path (uploads have their own, smaller limit).
MAX_FILE_BYTES = 1 << 30
#: The safetensors JSON header, which holds the packed-model header: ~1 KB in practice.
MAX_HEADER_BYTES = 1 << 20
#: The layer table, compressed and decompressed (it is inflated with this bound, never more).
MAX_TABLE_BYTES = 4 << 20
#: Layer records plus stored tensors in the table (ResNet-18: 21 + 101).
MAX_TABLE_ROWS = 10_000
#: Characters of one layer or tensor name.
MAX_NAME_CHARS = 1_000
#: Dimensions of one tensor.
MAX_DIMS = 8
#: The dtypes a packed layer may have, and those of the tensors stored as they are.
LAYER_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")
STATE_DTYPES: tuple[str, ...] = LAYER_DTYPES + ("int64", "int32", "int16", "int8", "uint8", "bool")


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


# ---------------------------------------------------------------- one layer

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
    mask: str  # "all" | "bitmap" | "index"
    key: str | None = None  # the state_dict key when it is not ``<name>.weight`` (``….in_proj_weight``)

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


def _record_key(result, name: str) -> str | None:
    """Layer ``name``'s state_dict key for its record: ``None`` where it is ``<name>.weight`` (nine fields)."""
    key = result._engine.parameter_name(name)
    return None if key == f"{name}.weight" else key


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PackedFileError(f"the file names an unknown dtype {name!r}")
    return dtype


def _mask_kind(numel: int, kept: int) -> str:
    if kept == numel:
        return "all"
    return "bitmap" if math.ceil(numel / 8) <= math.ceil(kept * index_bits(numel) / 8) else "index"


def _mask_bytes(record: LayerRecord) -> int:
    if record.mask == "all":
        return 0
    if record.mask == "bitmap":
        return math.ceil(record.numel / 8)
    return record.kept * index_bits(record.numel) // 8


def _encode_mask(keep: torch.Tensor, kind: str) -> np.ndarray:
    if kind == "all":
        return np.zeros(0, np.uint8)
    if kind == "bitmap":
        return np.packbits(keep.numpy(), bitorder="little")
    index = torch.nonzero(keep).reshape(-1).numpy()
    return _as_bytes(index.astype("<u2" if index_bits(keep.numel()) == 16 else "<u4"))


def _decode_mask(record: LayerRecord, raw: np.ndarray) -> torch.Tensor:
    """The flat boolean keep mask."""
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
    else:
        raise PackedFileError(f"layer '{record.name}': unknown mask kind {record.mask!r}")
    if not valid:
        raise PackedFileError(f"layer '{record.name}': the stored mask does not describe {record.kept} kept weights")
    return keep


def _code_bytes(count: int, bits: int) -> int:
    return 2 * count if bits == FLOAT_PASSTHROUGH_BITS else math.ceil(count * bits / 8)


def _encode_codes(codes: torch.Tensor, bits: int) -> np.ndarray:
    if bits == FLOAT_PASSTHROUGH_BITS:
        return _as_bytes(codes.to(torch.float16).numpy().astype("<f2"))
    return pack_bits((codes.to(torch.int16) + q_max(bits)).to(torch.uint8).numpy(), bits)


def _decode_codes(raw: np.ndarray, count: int, bits: int) -> torch.Tensor:
    if bits == FLOAT_PASSTHROUGH_BITS:
        return torch.from_numpy(raw.view("<f2").astype(np.float16))
    unsigned = unpack_bits(raw, count, bits)
    return torch.from_numpy(unsigned).to(torch.int16).sub_(q_max(bits)).to(torch.int8)


def _as_bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes (little-endian machine order, as safetensors stores them)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)


def _pack_layer(result, name: str, row: Mapping, repaired_weight: torch.Tensor | None = None,
                quantized: "QuantizedCodes | None" = None) -> tuple[LayerRecord, list[np.ndarray]]:
    """The layer's record and its byte parts, in blob order: mask, (codes, scales) per stream, selector.

    ``repaired_weight`` (with ``quantized``, its codes and scales, for a quantized setting): the
    values a repair gave the kept weights, stored under the engine's mask and bit-widths; see
    :func:`_repaired_layer`.
    """
    if repaired_weight is not None:
        return _repaired_layer(result, name, row, repaired_weight, quantized)
    engine = result._engine
    weight = result.weights[name]
    shape, numel = tuple(weight.shape), weight.numel()
    kept, n_high, n_low = int(row["kept"]), int(row["n_high"]), int(row["n_low"])
    config = result.config
    record = LayerRecord(
        name=name, shape=shape, dtype=_dtype_name(weight.dtype), kept=kept, n_high=n_high, n_low=n_low,
        b_high=config.b_high if config.quantized else None, b_low=config.b_low if config.quantized else None,
        mask=_mask_kind(numel, kept), key=_record_key(result, name))
    order = engine.rank_order(name)  # rank → flat index; kept = ranks [numel − kept, numel)
    keep = torch.zeros(numel, dtype=torch.bool)
    keep[order[numel - kept:]] = True
    parts = [_encode_mask(keep, record.mask)]
    if record.b_high is None:
        parts.append(_tensor_bytes(weight.reshape(-1)[keep]))
        return record, parts
    high = torch.zeros(numel, dtype=torch.bool)
    high[order[numel - n_high:]] = True
    for suffix, _, bits in record.streams:
        chunk = engine.chunk(name, bits)
        codes = torch.empty_like(chunk.codes_ranked)
        codes[order] = chunk.codes_ranked  # rank order → flat order
        select = keep if not record.mixed else (keep & high if suffix == "hi" else keep & ~high)
        parts.append(_encode_codes(codes[select], bits))
        if chunk.scales is not None:
            parts.append(_tensor_bytes(chunk.scales.to(torch.float32)))
    if record.mixed:
        parts.append(np.packbits(high[keep].numpy(), bitorder="little"))
    return record, parts


# ---------------------------------------------------------------- a repaired model

class QuantizedCodes(Protocol):
    """A repaired layer's quantized form (:class:`core.measure.repair.QuantizedLayer` is one):
    ``bits`` per weight (0 where pruned), int8 ``codes`` and per bit-width fp32 ``scales`` per output
    channel, so that the weight is ``codes · scales[bits]`` (at 16 bits the weight's float16 value)."""

    bits: torch.Tensor
    codes: torch.Tensor
    scales: Mapping[int, torch.Tensor]


class Repaired(Protocol):
    """What :func:`compressed_bytes` needs of a repair (:class:`core.measure.repair.RepairResult` is one).

    ``model``: the repaired module (same architecture and dtypes as the result's model, the same
    kept weights nonzero at most); ``quantized``: per re-quantized layer its codes and scales;
    ``config``: ``method``, ``n_images``, ``ridge``, ``seed``, ``positions``; ``n_images`` the
    calibration images fitted, ``seconds`` the repair's time, ``changed`` the state_dict keys it changed.
    """

    model: nn.Module
    method: str
    seconds: float
    changed: tuple[str, ...]
    n_images: int
    config: object
    quantized: Mapping[str, QuantizedCodes]


def repair_record(repaired: Repaired) -> dict:
    """The header's ``repair`` entry: which repair the stored weights carry, and on what."""
    config = repaired.config
    return {"method": str(repaired.method), "n_images": int(repaired.n_images), "ridge": float(config.ridge),
            "seed": int(config.seed), "positions": int(config.positions),
            "seconds": round(float(repaired.seconds), 3), "changed": len(repaired.changed)}


def _repaired_layer(result, name: str, row: Mapping, weight: torch.Tensor,
                    quantized: QuantizedCodes | None) -> tuple[LayerRecord, list[np.ndarray]]:
    """A packed layer holding a repair's values of the kept weights, under the *engine's* mask and chunks.

    The record (mask kind, counts, bit-widths) is the unrepaired one's, so the bytes are the same
    size. Pruning only: the repaired values of the kept weights, in their dtype. Quantized: the
    repair's codes and scales (``quantized``), which must use exactly the engine's kept weights and
    high/low split; at 16 bits the repaired weight's float16 value. Raises ``ValueError`` when the
    repair does not fit the setting (a nonzero weight outside the mask, other bit-widths, or a
    quantized layer whose weights changed without codes).
    """
    engine = result._engine
    original = result.weights[name]
    shape, numel = tuple(original.shape), original.numel()
    key = _record_key(result, name)
    if tuple(weight.shape) != shape or weight.dtype != original.dtype:
        raise ValueError(f"the repaired '{result._engine.parameter_name(name)}' is {weight.dtype} "
                         f"{tuple(weight.shape)}, the result's {original.dtype} {shape}: a repair of another model")
    kept, n_high, n_low = int(row["kept"]), int(row["n_high"]), int(row["n_low"])
    config = result.config
    record = LayerRecord(
        name=name, shape=shape, dtype=_dtype_name(original.dtype), kept=kept, n_high=n_high, n_low=n_low,
        b_high=config.b_high if config.quantized else None, b_low=config.b_low if config.quantized else None,
        mask=_mask_kind(numel, kept), key=key)
    order = engine.rank_order(name)
    keep = torch.zeros(numel, dtype=torch.bool)
    keep[order[numel - kept:]] = True
    flat = weight.detach().cpu().reshape(-1)
    if bool((flat[~keep] != 0).any()):
        raise ValueError(f"the repair changed pruned weights of '{name}': the packed file keeps the setting's mask")
    parts = [_encode_mask(keep, record.mask)]
    if record.b_high is None:
        parts.append(_tensor_bytes(flat[keep]))
        return record, parts
    if quantized is None:
        raise ValueError(f"the repair changed the quantized layer '{name}' without giving its codes: repair a "
                         "quantized result with quant=bit_widths(engine, result)")
    bits = torch.as_tensor(quantized.bits).cpu().reshape(-1)
    high = torch.zeros(numel, dtype=torch.bool)
    high[order[numel - n_high:]] = True
    wanted = torch.where(high, config.b_high, torch.where(keep, config.b_low, 0)).to(bits.dtype)
    if bits.numel() != numel or not torch.equal(bits, wanted):
        raise ValueError(f"the repair of '{name}' used other bit-widths than the setting's "
                         f"({config.b_low}/{config.b_high} bit on the engine's kept weights)")
    codes = torch.as_tensor(quantized.codes).cpu().reshape(-1)
    for suffix, _, b in record.streams:
        select = keep if not record.mixed else (keep & high if suffix == "hi" else keep & ~high)
        if b == FLOAT_PASSTHROUGH_BITS:
            parts.append(_encode_codes(flat[select], b))
            continue
        if b not in quantized.scales:
            raise ValueError(f"the repair of '{name}' gives no scales for {b} bits")
        scales = torch.as_tensor(quantized.scales[b]).cpu().to(torch.float32).reshape(-1)
        if scales.numel() != record.channels:
            raise ValueError(f"the repair of '{name}' gives {scales.numel()} scales for {b} bits, the layer has "
                             f"{record.channels} output channels")
        parts.append(_encode_codes(codes[select], b))
        parts.append(_tensor_bytes(scales))
    if record.mixed:
        parts.append(np.packbits(high[keep].numpy(), bitorder="little"))
    return record, parts


def _repaired_state(result, repaired: Repaired) -> dict[str, torch.Tensor]:
    """The repaired model's state_dict (on the CPU), checked to have the result's keys, shapes and dtypes."""
    own = result.model.state_dict()
    state = {k: v.detach().cpu() for k, v in repaired.model.state_dict().items()}
    if state.keys() != own.keys():
        extra = sorted(set(state) ^ set(own))
        raise ValueError(f"the repaired model and the result differ in their tensors (e.g. '{extra[0]}'): "
                         "a repair of another model")
    for key, value in own.items():
        if state[key].shape != value.shape or state[key].dtype != value.dtype:
            raise ValueError(f"the repaired '{key}' is {state[key].dtype} {tuple(state[key].shape)}, the result's "
                             f"{value.dtype} {tuple(value.shape)}: a repair of another model")
    return state


class _Reader:
    """Takes consecutive byte ranges from the data blob."""

    def __init__(self, blob: np.ndarray):
        self.blob, self.at = blob, 0

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or self.at + n > self.blob.size:
            raise PackedFileError(f"the data ends inside {what}: the header describes more bytes than are stored")
        part = self.blob[self.at:self.at + n]
        self.at += n
        return part

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> torch.Tensor:
        size = torch.empty((), dtype=dtype).element_size()
        raw = self.take(math.prod(shape) * size, what).copy()
        return torch.from_numpy(raw).view(dtype).reshape(shape)


def _unpack_layer(record: LayerRecord, reader: _Reader) -> torch.Tensor:
    """Decode one layer with dense, vectorized ops: codes are scattered into a zero tensor of the
    layer's shape and decoded as the engine does (``code · scale`` per channel, cast to the dtype);
    positions not kept hold code 0, hence +0."""
    where = f"layer '{record.name}'"
    dtype = _dtype(record.dtype)
    keep = _decode_mask(record, reader.take(_mask_bytes(record), f"{where}'s mask"))
    if record.b_high is None:
        values = reader.tensor(dtype, (record.kept,), f"{where}'s values")
        return torch.zeros(record.numel, dtype=dtype).masked_scatter_(keep, values).view(record.shape)
    streams = []
    for suffix, count, bits in record.streams:
        codes = _decode_codes(reader.take(_code_bytes(count, bits), f"{where}'s {suffix} codes"), count, bits)
        scales = None
        if bits != FLOAT_PASSTHROUGH_BITS:
            scales = reader.tensor(torch.float32, (record.channels,), f"{where}'s {suffix} scales")
        streams.append((codes, scales, bits))
    if record.mixed:
        sel = reader.take(math.ceil(record.kept / 8), f"{where}'s high/low selector")
        bits = np.unpackbits(sel, count=record.kept, bitorder="little")
        if int(np.count_nonzero(bits)) != record.n_high:
            raise PackedFileError(f"{where}: the selector marks {int(np.count_nonzero(bits))} weights high, "
                                  f"expected {record.n_high}")
        high_kept = torch.from_numpy(bits).view(torch.bool)
        high = torch.zeros(record.numel, dtype=torch.bool).masked_scatter_(keep, high_kept)
        selects = [high, keep & ~high]
    else:
        selects = [keep] * len(streams)
    decoded = []
    for (codes, scales, bits), select in zip(streams, selects):
        full = torch.zeros(record.numel, dtype=codes.dtype).masked_scatter_(select, codes)
        decoded.append(decode(full.view(record.shape), scales, bits, dtype))
    if not decoded:  # nothing kept
        return torch.zeros(record.shape, dtype=dtype)
    return decoded[0] if len(decoded) == 1 else torch.where(selects[0].view(record.shape), *decoded)


# ---------------------------------------------------------------- the file

def _digest(header: Mapping, table: bytes, data: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    digest.update(len(table).to_bytes(8, "little"))
    digest.update(table)
    digest.update(memoryview(np.ascontiguousarray(data)))
    return digest.hexdigest()


def compressed_bytes(result, arch: str | None = None, arch_kwargs: Mapping | None = None, *,
                     verify: bool = True, input_spec: Mapping | None = None,
                     repaired: Repaired | None = None) -> bytes:
    """``result`` (a :class:`core.method.engine.CompressionResult`) in the packed format, as bytes.

    ``arch`` (a :mod:`core.workloads.models` registry name or ``torchvision:<name>``, with
    ``arch_kwargs`` for its builder) is recorded so :func:`load_compressed` can rebuild the module;
    without it, loading needs a ``model_template``. ``input_spec`` (the pre-processing,
    :meth:`core.workloads.preprocess.Preprocess.to_dict`) is recorded under ``input`` when given.

    ``repaired`` (a :class:`core.measure.repair.RepairResult` of ``result.model``; quantized
    settings repaired with ``quant=bit_widths(engine, result)``): the file stores the repaired
    model instead, under the same mask and bit-widths: the repaired values (or codes and scales)
    of the kept weights and every other tensor as the repair left it (biases, BatchNorm shift and
    statistics), so :func:`load_compressed` gives a model whose state equals ``repaired.model``'s
    bit for bit. The data is exactly as large as without the repair (same records, same tensors);
    the header grows by the ``repair`` entry (:func:`repair_record`). ``ValueError`` when the
    repair does not fit the setting.

    With ``verify`` the packed layers are decoded again and compared with ``result.weights`` (the
    repaired weights) bit for bit first.
    """
    from safetensors.torch import save

    if arch is not None and not known_arch(arch):
        from core.workloads.models import REGISTRY

        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(REGISTRY)} or torchvision:<name>")
    source = result.model.state_dict() if repaired is None else _repaired_state(result, repaired)
    quantized = {} if repaired is None else dict(repaired.quantized)
    records, parts, expected = [], [], {}
    for row in result.stats.to_dict("records"):
        name = row["name"]
        weight = None
        if repaired is not None:
            weight = source[result._engine.parameter_name(name)]
            if name not in quantized and torch.equal(weight, result.weights[name].cpu()):
                weight = None  # not changed by the repair: the engine's own chunks
        record, layer_parts = _pack_layer(result, name, row, weight, quantized.get(name))
        records.append(record)
        parts.extend(layer_parts)
        expected[name] = result.weights[name] if weight is None else weight
    packed_keys = {r.state_key for r in records}
    state = {k: v for k, v in source.items() if k not in packed_keys}
    state_table = [[key, _dtype_name(value.dtype), list(value.shape)] for key, value in state.items()]
    parts.extend(_tensor_bytes(value) for value in state.values())
    data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    table = {"layers": [r.row for r in records], "state": state_table}
    table_bytes = zlib.compress(json.dumps(table, separators=(",", ":")).encode(), 9)
    if verify:
        reader = _Reader(data)
        for record in records:
            if not torch.equal(_unpack_layer(record, reader), expected[record.name].cpu()):
                if repaired is not None and record.name in quantized:
                    raise ValueError(f"the repaired '{record.state_key}' is not its codes · scales: the repair's "
                                     "quantized form does not describe its weights")
                raise RuntimeError(f"packing layer '{record.name}' is not lossless (a bug: please report it)")
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION if all(r.key is None for r in records) else KEYED_FORMAT_VERSION,
        "arch": arch, "arch_kwargs": dict(arch_kwargs or {}),
        "config": result.config.to_dict(),
        "retention": float(result.retention),
        "model_bytes_compressed": int(result.model_bytes_compressed),
        "model_bytes_fp32": int(result.model_bytes_fp32),
        "torch": torch.__version__,
    }
    if input_spec is not None:
        header["input"] = dict(input_spec)
    if repaired is not None:
        header["repair"] = repair_record(repaired)
    header["sha256"] = _digest(header, table_bytes, data)
    tensors = {"table": torch.frombuffer(bytearray(table_bytes), dtype=torch.uint8), "data": torch.from_numpy(data)}
    return save(tensors, metadata={METADATA_KEY: json.dumps(header, separators=(",", ":"))})


def save_compressed(result, path: str | os.PathLike, arch: str | None = None,
                    arch_kwargs: Mapping | None = None, *, verify: bool = True,
                    input_spec: Mapping | None = None, repaired: Repaired | None = None) -> Path:
    """Write ``result`` (or its repair, ``repaired``) to ``path`` in the packed format
    (:func:`compressed_bytes`); returns the path."""
    data = compressed_bytes(result, arch, arch_kwargs, verify=verify, input_spec=input_spec, repaired=repaired)
    path = Path(path)
    path.write_bytes(data)
    return path


@dataclass(frozen=True)
class PackedModel:
    """A packed file's content: its header, layer records and the full state_dict (packed layers decoded)."""

    header: dict
    layers: list[LayerRecord]
    state_dict: dict[str, torch.Tensor]
    file_bytes: int
    data_bytes: int  # the payload without the container: what the engine's accounting counts

    @property
    def arch(self) -> str | None:
        return self.header.get("arch")

    @property
    def config(self) -> CompressionConfig:
        """The setting the file was compressed with (also from files that stored ``layer_tau`` as pairs)."""
        return CompressionConfig.from_dict(self.header.get("config", {}))

    @property
    def repair(self) -> dict | None:
        """The repair the stored weights carry (see :attr:`PackedFile.repair`), or None."""
        value = self.header.get("repair")
        return dict(value) if isinstance(value, dict) else None


# ---------------------------------------------------------------- reading: every declared size checked first

def _json(text: bytes | str, label: str, what: str) -> object:
    """Parsed JSON, or :class:`PackedFileError` (also for nesting too deep for Python's parser)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise PackedFileError(f"{label} is not a packed model file: its {what} is not valid JSON.") from err


def _span(entry: object, name: str, label: str) -> tuple[int, int]:
    """The (start, end) of one of the container's two uint8 tensors, as its header declares them."""
    if not isinstance(entry, dict) or entry.get("dtype") != "U8":
        raise PackedFileError(f"{label} is damaged: its '{name}' entry is not a byte tensor.")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) == 1 and _is_count(shape[0])
            and isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[1] - offsets[0] == shape[0]):
        raise PackedFileError(f"{label} is damaged: the size and position of its '{name}' data disagree.")
    return offsets[0], offsets[1]


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _split(raw: bytes, label: str) -> tuple[dict, bytes, np.ndarray]:
    """The safetensors container's metadata, table bytes and data (a read-only view into ``raw``).

    Checks the framing against the bytes present: the header length (≤ :data:`MAX_HEADER_BYTES`),
    exactly the two tensors ``table`` and ``data``, back to back, ending where the file ends.
    """
    size = len(raw)
    if size < 8:
        raise PackedFileError(f"{label} is truncated or not a packed model file ({size} bytes).")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise PackedFileError(f"{label} is not a packed model file: its header would be {header_len:,} bytes, "
                              f"and packed headers are at most {MAX_HEADER_BYTES:,}.")
    if 8 + header_len > size:
        raise PackedFileError(f"{label} is truncated or not a packed model file: "
                              f"its header needs {8 + header_len:,} bytes, the file has {size:,}.")
    st_header = _json(raw[8:8 + header_len], label, "header")
    metadata = st_header.get("__metadata__") if isinstance(st_header, dict) else None
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise PackedFileError(f"{label} is not a Boundary Explorer packed model file (no '{METADATA_KEY}' header).")
    if set(st_header) != {"__metadata__", "table", "data"}:
        raise PackedFileError(f"{label} is damaged: it should hold exactly the tensors 'table' and 'data'.")
    table_span, data_span = _span(st_header["table"], "table", label), _span(st_header["data"], "data", label)
    first, second = sorted((table_span, data_span))
    if first[0] != 0 or second[0] != first[1]:
        raise PackedFileError(f"{label} is damaged: its two tensors do not follow each other.")
    expected = 8 + header_len + second[1]
    if size < expected:
        raise PackedFileError(f"{label} is truncated: {size:,} bytes, its header describes {expected:,}.")
    if size > expected:
        raise PackedFileError(f"{label} is altered: {size - expected:,} bytes follow the data its header describes.")
    if table_span[1] - table_span[0] > MAX_TABLE_BYTES:
        raise PackedFileError(f"{label} is not a packed model file this build reads: its layer table is "
                              f"{table_span[1] - table_span[0]:,} bytes, at most {MAX_TABLE_BYTES:,} are read.")
    base = 8 + header_len
    table = raw[base + table_span[0]:base + table_span[1]]
    data = np.frombuffer(raw, dtype=np.uint8, count=data_span[1] - data_span[0], offset=base + data_span[0])
    return metadata, table, data


def _header(metadata: dict, label: str) -> dict:
    """The packed-model header: format, version, architecture and its arguments, settings."""
    text = metadata[METADATA_KEY]
    header = _json(text, label, "packed-model header") if isinstance(text, str) else None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise PackedFileError(f"{label} is not a Boundary Explorer packed model file.")
    if header.get("version") not in (FORMAT_VERSION, KEYED_FORMAT_VERSION):
        raise PackedFileError(f"{label} is packed format version {printable(repr(header.get('version')), 40)}; "
                              f"this build reads version {FORMAT_VERSION} and version {KEYED_FORMAT_VERSION}.")
    if header.get("arch") is not None and not isinstance(header["arch"], str):
        raise PackedFileError(f"{label} is damaged: its architecture name is not text.")
    if not isinstance(header.get("arch_kwargs", {}), dict):
        raise PackedFileError(f"{label} is damaged: its architecture arguments are not a mapping.")
    if not isinstance(header.get("input", {}), dict):
        raise PackedFileError(f"{label} is damaged: its pre-processing record is not a mapping.")
    if not isinstance(header.get("repair", {}), dict):
        raise PackedFileError(f"{label} is damaged: its repair record is not a mapping.")
    return header


def _inflate(table: bytes, label: str) -> bytes:
    """The table's JSON, decompressed to at most :data:`MAX_TABLE_BYTES` (never more is allocated)."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(table, MAX_TABLE_BYTES + 1)
    except zlib.error as err:
        raise PackedFileError(f"{label} is damaged: its layer table is not valid compressed data.") from err
    if len(text) > MAX_TABLE_BYTES:
        raise PackedFileError(f"{label} is refused: its layer table unpacks to more than {MAX_TABLE_BYTES:,} bytes "
                              "(a packed table is a few kilobytes).")
    if not inflater.eof or inflater.unused_data:
        raise PackedFileError(f"{label} is damaged: its layer table is cut short or followed by stray bytes.")
    return text


def _name(value: object, label: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise PackedFileError(f"{label} is damaged: a layer or tensor name in its table is not a name "
                              f"(text of 1 to {MAX_NAME_CHARS} characters).")
    return value


def _shape(value: object, where: str, label: str, max_params: int) -> tuple[int, ...]:
    if not (isinstance(value, list) and len(value) <= MAX_DIMS and all(_is_count(d) and d <= max_params
                                                                       for d in value)):
        raise PackedFileError(f"{label} is damaged: the shape of {where} is not a list of at most {MAX_DIMS} "
                              f"sizes from 0 to {max_params:,}.")
    return tuple(value)


def _dtype_of(value: object, allowed: tuple[str, ...], where: str, label: str) -> torch.dtype:
    if value not in allowed:
        raise PackedFileError(f"{label} is damaged: {where} has the type {printable(repr(value), 40)}; "
                              f"packed files use {', '.join(allowed)}.")
    return getattr(torch, value)


def _layer(row: object, label: str, max_params: int, keyed: bool = False) -> LayerRecord:
    """One layer record of the table, every field checked (types, ranges, and against each other).

    ``keyed`` (a version-:data:`KEYED_FORMAT_VERSION` file): a record may carry its state_dict key as a
    tenth field."""
    fields = (9, 10) if keyed else (9,)
    if not isinstance(row, list) or len(row) not in fields:
        raise PackedFileError(f"{label} is damaged: a layer record of its table does not have "
                              f"{' or '.join(map(str, fields))} fields.")
    name, shape, dtype, kept, n_high, n_low, b_high, b_low, mask = row[:9]
    key = _name(row[9], label) if len(row) == 10 else None
    where = f"layer '{printable(_name(name, label), 80)}'"
    shape = _shape(shape, where, label, max_params)
    _dtype_of(dtype, LAYER_DTYPES, where, label)
    numel = math.prod(shape)
    if not (_is_count(kept) and _is_count(n_high) and _is_count(n_low) and kept <= numel):
        raise PackedFileError(f"{label} is damaged: {where} declares impossible counts of kept weights.")
    if b_high is None and b_low is None:
        counts_fit = n_high == kept and n_low == 0
    elif b_high in SUPPORTED_BITS and b_low in SUPPORTED_BITS and b_low <= b_high:
        counts_fit = n_high + n_low == kept
    else:
        raise PackedFileError(f"{label} is damaged: {where} declares the bit-widths "
                              f"{printable(repr(b_high), 20)}/{printable(repr(b_low), 20)}.")
    if not counts_fit:
        raise PackedFileError(f"{label} is damaged: {where} declares high/low counts that do not add up to its "
                              "kept weights.")
    if mask != _mask_kind(numel, kept):
        raise PackedFileError(f"{label} is damaged: {where} declares the mask kind {printable(repr(mask), 20)}, "
                              f"its counts call for {_mask_kind(numel, kept)!r}.")
    return LayerRecord(name, shape, dtype, kept, n_high, n_low, b_high, b_low, mask, key)


def _layer_bytes(record: LayerRecord) -> int:
    """The bytes the data blob holds for one layer (mask, codes and scales per stream, selector)."""
    total = _mask_bytes(record)
    if record.b_high is None:
        return total + record.kept * _dtype(record.dtype).itemsize
    for _, count, bits in record.streams:
        total += _code_bytes(count, bits) + (0 if bits == FLOAT_PASSTHROUGH_BITS else 4 * record.channels)
    return total + (math.ceil(record.kept / 8) if record.mixed else 0)


def _table(text: bytes, label: str, max_params: int, keyed: bool = False) -> tuple[list[LayerRecord], list[StateEntry]]:
    """The table's layer records and state_dict entries, checked; at most ``max_params`` values in all.
    ``keyed``: layer records may carry their state_dict key (see :func:`_layer`)."""
    table = _json(text, label, "layer table")
    if not (isinstance(table, dict) and isinstance(table.get("layers"), list) and isinstance(table.get("state"), list)):
        raise PackedFileError(f"{label} is damaged: its layer table lacks the 'layers' and 'state' lists.")
    if len(table["layers"]) + len(table["state"]) > MAX_TABLE_ROWS:
        raise PackedFileError(f"{label} is refused: its table lists more than {MAX_TABLE_ROWS:,} tensors.")
    records = [_layer(row, label, max_params, keyed) for row in table["layers"]]
    state = []
    for row in table["state"]:
        if not isinstance(row, list) or len(row) != 3:
            raise PackedFileError(f"{label} is damaged: a tensor record of its table does not have 3 fields.")
        key = _name(row[0], label)
        where = f"tensor '{printable(key, 80)}'"
        state.append(StateEntry(key, _dtype_of(row[1], STATE_DTYPES, where, label),
                                _shape(row[2], where, label, max_params)))
    keys = [r.state_key for r in records] + [entry.key for entry in state]
    if len(set(keys)) != len(keys):
        raise PackedFileError(f"{label} is damaged: its table lists a tensor twice.")
    values = sum(r.numel for r in records) + sum(math.prod(entry.shape) for entry in state)
    if values > max_params:
        raise PackedFileError(f"{label} is refused: it describes {values:,} values, and at most {max_params:,} "
                              "are loaded.")
    return records, state


@dataclass(frozen=True)
class StateEntry:
    """A state_dict entry the packed file stores as is."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PackedFile:
    """A packed file whose framing, header, table and SHA256 are checked, and whose every declared size
    agrees with the bytes present; nothing is decoded yet (see :meth:`decode` and :meth:`load`)."""

    label: str
    header: dict
    layers: list[LayerRecord]
    state: list[StateEntry]
    data: np.ndarray  # the payload, a read-only view into the file's bytes
    file_bytes: int
    max_params: int

    @property
    def arch(self) -> str | None:
        return self.header.get("arch")

    @property
    def arch_kwargs(self) -> dict:
        return dict(self.header.get("arch_kwargs") or {})

    @property
    def config(self) -> CompressionConfig:
        return CompressionConfig.from_dict(self.header.get("config", {}))

    @property
    def input_spec(self) -> dict | None:
        """The recorded pre-processing (``Preprocess.to_dict()``), or None (files without one, and older files)."""
        value = self.header.get("input")
        return dict(value) if isinstance(value, dict) else None

    @property
    def repair(self) -> dict | None:
        """The repair the stored weights carry (:func:`repair_record`: method, n_images, ridge, seed, …),
        or None (an unrepaired file). Read from the header as written: shown, never acted on."""
        value = self.header.get("repair")
        return dict(value) if isinstance(value, dict) else None

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every state_dict key the file holds, with the shape and dtype it declares."""
        shapes = {r.state_key: (r.shape, _dtype(r.dtype)) for r in self.layers}
        shapes.update({entry.key: (entry.shape, entry.dtype) for entry in self.state})
        return shapes

    def decode(self) -> dict[str, torch.Tensor]:
        """The full state_dict (packed layers decoded); memory: about the model's size."""
        reader = _Reader(self.data)
        state = {record.state_key: _unpack_layer(record, reader) for record in self.layers}
        for entry in self.state:
            state[entry.key] = reader.tensor(entry.dtype, entry.shape, f"'{printable(entry.key, 80)}'")
        return state

    def load(self, model_template: nn.Module | None = None) -> nn.Module:
        """The module, in eval mode, with the file's weights; the model is built (from the recorded,
        checked architecture, or as a deep copy of ``model_template``) and its shapes compared with
        the table's *before* anything is decoded."""
        if model_template is not None:
            with torch.no_grad():
                model = copy.deepcopy(model_template)
        elif self.arch is not None:
            model = build_file_arch(self.arch, self.arch_kwargs, self.label, self.max_params)
        else:
            raise ValueError(f"{self.label} records no architecture: pass model_template=<an instance of the model>")
        _check_fits(model, self.shapes(), self.label)
        load_state_dict_into(model, self.decode(), self.label)
        return model.eval()


def _check_fits(model: nn.Module, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], label: str) -> None:
    """The file's tensors are exactly the model's, with the same shapes and dtypes (bit-exact, no casting)."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in shapes:
            raise CheckpointError(f"{label} does not fit this architecture: key '{key}' is missing.")
        shape, dtype = shapes[key]
        if shape != tuple(value.shape):
            raise CheckpointError(f"{label} does not fit this architecture: '{key}' has shape {shape}, "
                                  f"expected {tuple(value.shape)}.")
        if dtype != value.dtype:
            raise CheckpointError(f"{label}: '{key}' is {dtype} in the file, {value.dtype} in the model it is "
                                  "loaded into.")
    extra = [key for key in shapes if key not in own]
    if extra:
        raise CheckpointError(f"{label} does not fit this architecture: unexpected key "
                              f"'{printable(extra[0], 80)}'.")


def parse_compressed(data: bytes, label: str = "the packed file", max_params: int = MAX_FILE_PARAMS) -> PackedFile:
    """Check a packed file held in memory, without decoding it; the entry point for every reader.

    In order, each before anything of the size it declares is allocated: the container's framing
    against the file's length, the header (≤ :data:`MAX_HEADER_BYTES`), the SHA256, the table
    (decompressed to at most :data:`MAX_TABLE_BYTES`), every record's types, counts and bit-widths,
    at most ``max_params`` values in all, and the data size the table implies against the bytes
    present. ``label`` names the file in messages (it is never used as a path).
    """
    raw = bytes(data)  # immutable: the data view below must not change under us
    label = printable(label, 80)
    metadata, table_bytes, blob = _split(raw, label)
    header = _header(metadata, label)
    try:
        intact = header.get("sha256") == _digest(header, table_bytes, blob)
    except (ValueError, TypeError, RecursionError):
        intact = False
    if not intact:
        raise PackedFileError(f"{label} is damaged or was changed: its content does not match the SHA256 in its "
                              "header (a checksum that detects corruption; it does not prove who made the file).")
    try:
        CompressionConfig.from_dict(header.get("config", {}))
    except ValueError as err:
        raise PackedFileError(f"{label} records settings this app cannot use: {printable(err)}.") from err
    records, state = _table(_inflate(table_bytes, label), label, max_params,
                            keyed=header.get("version") == KEYED_FORMAT_VERSION)
    described = sum(map(_layer_bytes, records)) + sum(entry.nbytes for entry in state)
    if described != blob.size:
        raise PackedFileError(f"{label} is damaged: its table describes {described:,} bytes of data, "
                              f"the file holds {blob.size:,}.")
    return PackedFile(label, header, records, state, blob, len(raw), max_params)


def _read_file(path: str | os.PathLike) -> bytes:
    """A packed file's bytes, refusing files over :data:`MAX_FILE_BYTES` before reading them."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PackedFileError(f"{path.name} is {size:,} bytes; packed files are read up to {MAX_FILE_BYTES:,}.")
        return path.read_bytes()
    except OSError as err:
        raise PackedFileError(f"cannot read {path.name}: {printable(err.strerror or err)}.") from err


def read_compressed_bytes(data: bytes, label: str = "the packed file", max_params: int = MAX_FILE_PARAMS
                          ) -> PackedModel:
    """Read and verify a packed file held in memory; returns its header and the full, decoded state_dict."""
    packed = parse_compressed(data, label, max_params)
    return PackedModel(header=packed.header, layers=packed.layers, state_dict=packed.decode(),
                       file_bytes=packed.file_bytes, data_bytes=int(packed.data.size))


def read_compressed(path: str | os.PathLike) -> PackedModel:
    """Read and verify a packed file; returns its header and the full, decoded state_dict."""
    return read_compressed_bytes(_read_file(path), Path(path).name)


def load_compressed(path: str | os.PathLike, model_template: nn.Module | None = None) -> nn.Module:
    """The compressed model stored at ``path``, in eval mode; its weights equal the saved result's.

    The module is rebuilt from the recorded architecture, a registry name or ``torchvision:<name>``
    (its arguments checked by :func:`core.workloads.provenance.check_file_arch`), or from a deep copy
    of ``model_template`` (never modified) when given: needed for models of neither kind.
    """
    return parse_compressed(_read_file(path), Path(path).name).load(model_template)


def state_dict_file_bytes(model: nn.Module, path: str | os.PathLike) -> int:
    """Size on disk of ``model``'s plain state_dict saved with safetensors (the uncompressed reference)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return os.path.getsize(path)


def packed_file_bytes(result, arch: str | None = None, arch_kwargs: Mapping | None = None, *,
                      repaired: Repaired | None = None) -> int:
    """The size of ``result``'s packed file (with ``repaired``: of its repair's): exactly the bytes
    :func:`save_compressed` writes."""
    return len(compressed_bytes(result, arch, arch_kwargs, verify=False, repaired=repaired))


def expected_layer_bytes(record: LayerRecord) -> int:
    """The engine's accounting for one packed layer (for tests and the app)."""
    if record.b_high is None:
        return layer_storage(record.numel, record.channels, record.kept, 0, None, None,
                             dense_bits=torch.finfo(_dtype(record.dtype)).bits).total
    return layer_storage(record.numel, record.channels, record.n_high, record.n_low,
                         record.b_high, record.b_low).total
