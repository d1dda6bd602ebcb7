"""A packed file for a compressed model: the savings of pruning and quantization, on disk.

``save_compressed(result, path, arch=...)`` writes a :class:`core.method.engine.CompressionResult`
to one safetensors file; ``load_compressed(path)`` rebuilds the ``nn.Module`` whose
weights equal ``result.weights`` bit for bit.

Format (version :data:`FORMAT_VERSION`): a safetensors file with two uint8 tensors and
one metadata entry.

* metadata ``boundary_explorer``: a JSON header — format name and version, architecture
  name and kwargs, the compression settings, the engine's byte accounting, and the
  SHA256 of everything (header, table, data);
* ``table``: zlib-compressed JSON — one record per packed layer ``[name, shape, dtype,
  kept, n_high, n_low, b_high, b_low, mask kind]`` and one per state_dict entry stored
  as is ``[key, dtype, shape]``;
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

So the data is exactly what :func:`core.method.quantization.layer_storage` and the engine's
``model_bytes_compressed`` count (at most a byte less per layer where b_high = b_low; and
less for a float16/bfloat16 model, whose other tensors the engine counts as fp32);
``file size − model_bytes_compressed`` is the container: safetensors framing, the JSON
header and the compressed table (about 1–2 KB for the registry models).

Integrity: a truncated, altered, foreign or other-version file raises
:class:`PackedFileError` (a ``ValueError``) that says which.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.method.config import CompressionConfig
from core.workloads.models import CheckpointError, build, load_state_dict_into
from core.method.quantization import FLOAT_PASSTHROUGH_BITS, decode, index_bits, layer_storage, q_max

FORMAT_NAME = "boundary-explorer/packed"
FORMAT_VERSION = 1
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


def _pack_layer(result, name: str, row: Mapping) -> tuple[LayerRecord, list[np.ndarray]]:
    """The layer's record and its byte parts, in blob order: mask, (codes, scales) per stream, selector."""
    engine = result._engine
    weight = result.weights[name]
    shape, numel = tuple(weight.shape), weight.numel()
    kept, n_high, n_low = int(row["kept"]), int(row["n_high"]), int(row["n_low"])
    config = result.config
    record = LayerRecord(
        name=name, shape=shape, dtype=_dtype_name(weight.dtype), kept=kept, n_high=n_high, n_low=n_low,
        b_high=config.b_high if config.quantized else None, b_low=config.b_low if config.quantized else None,
        mask=_mask_kind(numel, kept))
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


def save_compressed(result, path: str | os.PathLike, arch: str | None = None,
                    arch_kwargs: Mapping | None = None, *, verify: bool = True) -> Path:
    """Write ``result`` (a :class:`core.method.engine.CompressionResult`) to ``path`` in the packed format.

    ``arch`` (a :mod:`core.workloads.models` registry name, with ``arch_kwargs`` for its builder) is
    recorded so :func:`load_compressed` can rebuild the module; without it, loading needs a
    ``model_template``. With ``verify`` the packed layers are decoded again and compared
    with ``result.weights`` bit for bit before the file is written. Returns the path.
    """
    from safetensors.torch import save_file

    if arch is not None:
        from core.workloads.models import REGISTRY

        if arch not in REGISTRY:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(REGISTRY)}")
    records, parts = [], []
    for row in result.stats.to_dict("records"):
        record, layer_parts = _pack_layer(result, row["name"], row)
        records.append(record)
        parts.extend(layer_parts)
    packed_keys = {f"{r.name}.weight" for r in records}
    state = {k: v for k, v in result.model.state_dict().items() if k not in packed_keys}
    state_table = [[key, _dtype_name(value.dtype), list(value.shape)] for key, value in state.items()]
    parts.extend(_tensor_bytes(value) for value in state.values())
    data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    table = {"layers": [[r.name, list(r.shape), r.dtype, r.kept, r.n_high, r.n_low, r.b_high, r.b_low, r.mask]
                        for r in records],
             "state": state_table}
    table_bytes = zlib.compress(json.dumps(table, separators=(",", ":")).encode(), 9)
    if verify:
        reader = _Reader(data)
        weights = result.weights
        for record in records:
            if not torch.equal(_unpack_layer(record, reader), weights[record.name].cpu()):
                raise RuntimeError(f"packing layer '{record.name}' is not lossless (a bug: please report it)")
    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "arch": arch, "arch_kwargs": dict(arch_kwargs or {}),
        "config": result.config.to_dict(),
        "retention": float(result.retention),
        "model_bytes_compressed": int(result.model_bytes_compressed),
        "model_bytes_fp32": int(result.model_bytes_fp32),
        "torch": torch.__version__,
    }
    header["sha256"] = _digest(header, table_bytes, data)
    tensors = {"table": torch.frombuffer(bytearray(table_bytes), dtype=torch.uint8), "data": torch.from_numpy(data)}
    path = Path(path)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(header, separators=(",", ":"))})
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


def _read_raw(path: Path) -> tuple[dict, bytes, np.ndarray, int]:
    """The header, table and data blob, after checking the container's framing and the SHA256."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    label = path.name
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PackedFileError(f"cannot read {label}: {err}") from err
    size = len(raw)
    if size < 8:
        raise PackedFileError(f"{label} is truncated or not a packed model file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if 8 + header_len > size:
        raise PackedFileError(f"{label} is truncated or not a packed model file: "
                              f"its header needs {8 + header_len} bytes, the file has {size}")
    try:
        st_header = json.loads(raw[8:8 + header_len])
        metadata = st_header.get("__metadata__") or {}
        ends = [entry["data_offsets"][1] for key, entry in st_header.items() if key != "__metadata__"]
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        raise PackedFileError(f"{label} is not a packed model file (unreadable header: {err})") from err
    if METADATA_KEY not in metadata:
        raise PackedFileError(f"{label} is not a Boundary Explorer packed model file (no '{METADATA_KEY}' header)")
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise PackedFileError(f"{label} is truncated: {size} bytes, its header describes {expected}")
    if size > expected:
        raise PackedFileError(f"{label} is altered: {size - expected} bytes follow the data its header describes")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except ValueError as err:
        raise PackedFileError(f"{label}: the packed-model header is not valid JSON ({err})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise PackedFileError(f"{label} is not a Boundary Explorer packed model file")
    if header.get("version") != FORMAT_VERSION:
        raise PackedFileError(
            f"{label} is packed format version {header.get('version')!r}; this build reads version {FORMAT_VERSION}")
    try:
        tensors = load(raw)
        table, data = tensors["table"], tensors["data"]
    except (SafetensorError, ValueError, RuntimeError, KeyError) as err:
        raise PackedFileError(f"{label} is damaged: {err}") from err
    if table.dtype != torch.uint8 or data.dtype != torch.uint8:
        raise PackedFileError(f"{label} is damaged: unexpected tensor types")
    table_bytes, data = table.numpy().tobytes(), data.numpy()
    if header.get("sha256") != _digest(header, table_bytes, data):
        raise PackedFileError(f"{label} is altered or damaged: its content does not match the SHA256 in its header")
    return header, table_bytes, data, size


def read_compressed(path: str | os.PathLike) -> PackedModel:
    """Read and verify a packed file; returns its header and the full, decoded state_dict."""
    path = Path(path)
    header, table_bytes, data, size = _read_raw(path)
    try:
        table = json.loads(zlib.decompress(table_bytes))
        records = [LayerRecord(name, tuple(shape), dtype, kept, n_high, n_low, b_high, b_low, mask)
                   for name, shape, dtype, kept, n_high, n_low, b_high, b_low, mask in table["layers"]]
        state_table = [(key, _dtype(dtype), tuple(shape)) for key, dtype, shape in table["state"]]
    except (KeyError, TypeError, ValueError, zlib.error) as err:
        raise PackedFileError(f"{path.name}: the packed-model table is unreadable ({err})") from err
    reader = _Reader(data)
    state = {f"{record.name}.weight": _unpack_layer(record, reader) for record in records}
    for key, dtype, shape in state_table:
        state[key] = reader.tensor(dtype, shape, f"'{key}'")
    if reader.at != data.size:
        raise PackedFileError(f"{path.name}: {data.size - reader.at} stored bytes are not described by its table")
    return PackedModel(header=header, layers=records, state_dict=state, file_bytes=size, data_bytes=int(data.size))


def load_compressed(path: str | os.PathLike, model_template: nn.Module | None = None) -> nn.Module:
    """The compressed model stored at ``path``, in eval mode; its weights equal the saved result's.

    The module is rebuilt from the recorded registry architecture, or from a deep copy of
    ``model_template`` (never modified) when given: needed for models outside the registry.
    """
    packed = read_compressed(path)
    label = Path(path).name
    if model_template is not None:
        with torch.no_grad():
            model = copy.deepcopy(model_template)
    elif packed.arch is not None:
        model = build(packed.arch, **packed.header.get("arch_kwargs", {}))
    else:
        raise ValueError(f"{label} records no architecture: pass model_template=<an instance of the model>")
    own = model.state_dict()
    for key, value in packed.state_dict.items():  # keep the stored dtype: bit-exact, no casting
        if key in own and own[key].dtype != value.dtype:
            raise CheckpointError(f"{label}: '{key}' is {value.dtype} in the file, "
                                  f"{own[key].dtype} in the model it is loaded into")
    load_state_dict_into(model, packed.state_dict, label)
    return model.eval()


def state_dict_file_bytes(model: nn.Module, path: str | os.PathLike) -> int:
    """Size on disk of ``model``'s plain state_dict saved with safetensors (the uncompressed reference)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return os.path.getsize(path)


def packed_file_bytes(result, arch: str | None = None, arch_kwargs: Mapping | None = None) -> int:
    """The measured size on disk of ``result`` in the packed format (written to a temporary file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = save_compressed(result, Path(folder) / "model.safetensors", arch, arch_kwargs, verify=False)
        return os.path.getsize(path)


def expected_layer_bytes(record: LayerRecord) -> int:
    """The engine's accounting for one packed layer (for tests and the app)."""
    if record.b_high is None:
        return layer_storage(record.numel, record.channels, record.kept, 0, None, None,
                             dense_bits=torch.finfo(_dtype(record.dtype)).bits).total
    return layer_storage(record.numel, record.channels, record.n_high, record.n_low,
                         record.b_high, record.b_low).total
