"""Limits on what a packed file may declare, and the checks of its untrusted framing, header and table against them.

Integrity: a truncated, damaged, foreign or other-version file raises
:class:`~core.deploy.packed_layout.PackedFileError` (a ``ValueError``) that says which. The SHA256
in the header is a checksum: it detects corruption (a cut-short download, a flipped bit), not
tampering; anyone can change a file and recompute it. So a file is never trusted for its checksum:
a reader (:func:`core.deploy.packed_reader.parse_compressed`, behind every public reader) checks
every size, shape and count the file declares against the limits below and against the bytes
actually present *before* allocating anything of that size, and builds a registry model only from
checked constructor arguments (:func:`core.workloads.models.check_arch_kwargs`). Reading a hostile
file then costs about its own size; loading a valid one, about the model's.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.common.formatting import printable
from core.deploy.packed_layout import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_KEY,
    READ_VERSIONS,
    LayerRecord,
    PackedFileError,
    StateEntry,
    mask_kind,
)
from core.method.quantization import SUPPORTED_BITS
from core.workloads.models import CheckpointError

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


# ---------------------------------------------------------------- the container: framing and header

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


def split_file(raw: bytes, label: str) -> tuple[dict, bytes, np.ndarray]:
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


def check_header(metadata: dict, label: str) -> dict:
    """The packed-model header: format, version, architecture and its arguments, settings."""
    text = metadata[METADATA_KEY]
    header = _json(text, label, "packed-model header") if isinstance(text, str) else None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise PackedFileError(f"{label} is not a Boundary Explorer packed model file.")
    version = header.get("version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise PackedFileError(f"{label} is packed format version {printable(repr(version), 40)}; this build reads "
                              f"versions {', '.join(map(str, READ_VERSIONS[:-1]))} and {READ_VERSIONS[-1]}"
                              f"{' (a newer build wrote it)' if _is_count(version) and version > FORMAT_VERSION else ''}.")
    if header.get("arch") is not None and not isinstance(header["arch"], str):
        raise PackedFileError(f"{label} is damaged: its architecture name is not text.")
    if not isinstance(header.get("arch_kwargs", {}), dict):
        raise PackedFileError(f"{label} is damaged: its architecture arguments are not a mapping.")
    if not isinstance(header.get("input", {}), dict):
        raise PackedFileError(f"{label} is damaged: its pre-processing record is not a mapping.")
    if not isinstance(header.get("repair", {}), dict):
        raise PackedFileError(f"{label} is damaged: its repair record is not a mapping.")
    return header


# ---------------------------------------------------------------- the table: every record checked

def inflate_table(table: bytes, label: str) -> bytes:
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


def _layer(row: object, label: str, max_params: int, version: int = FORMAT_VERSION) -> LayerRecord:
    """One layer record of a ``version`` file's table, every field checked (types, ranges, against each
    other, and the mask kind against the one ``version`` stores for these counts).

    From version 2 a record may carry its state_dict key as a tenth field."""
    fields = (9,) if version == 1 else (9, 10)
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
    if mask != mask_kind(numel, kept, version):
        raise PackedFileError(f"{label} is damaged: {where} declares the mask kind {printable(repr(mask), 20)}, "
                              f"its counts call for {mask_kind(numel, kept, version)!r}.")
    return LayerRecord(name, shape, dtype, kept, n_high, n_low, b_high, b_low, mask, key, version)


def parse_table(text: bytes, label: str, max_params: int, version: int = FORMAT_VERSION
                ) -> tuple[list[LayerRecord], list[StateEntry]]:
    """The table's layer records and state_dict entries, checked; at most ``max_params`` values in all.
    ``version``: the file's format version (:data:`~core.deploy.packed_layout.READ_VERSIONS`; see :func:`_layer`)."""
    table = _json(text, label, "layer table")
    if not (isinstance(table, dict) and isinstance(table.get("layers"), list) and isinstance(table.get("state"), list)):
        raise PackedFileError(f"{label} is damaged: its layer table lacks the 'layers' and 'state' lists.")
    if len(table["layers"]) + len(table["state"]) > MAX_TABLE_ROWS:
        raise PackedFileError(f"{label} is refused: its table lists more than {MAX_TABLE_ROWS:,} tensors.")
    records = [_layer(row, label, max_params, version) for row in table["layers"]]
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


# ---------------------------------------------------------------- the model a file is loaded into; a file on disk

def check_fits(model: nn.Module, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], label: str) -> None:
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


def read_file_bytes(path: str | os.PathLike) -> bytes:
    """A packed file's bytes, refusing files over :data:`MAX_FILE_BYTES` before reading them."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PackedFileError(f"{path.name} is {size:,} bytes; packed files are read up to {MAX_FILE_BYTES:,}.")
        return path.read_bytes()
    except OSError as err:
        raise PackedFileError(f"cannot read {path.name}: {printable(err.strerror or err)}.") from err
