"""Reading a packed file: checked first (every declared size), then its layers decoded and its model rebuilt."""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.common.formatting import printable
from core.deploy.packed_layout import (
    LayerRecord,
    PackedFileError,
    StateEntry,
    code_bytes,
    decode_codes,
    decode_mask,
    decode_selector,
    dtype_from_name,
    file_digest,
    layer_bytes,
    mask_bytes,
    selector_stored_bytes,
)
from core.deploy.packed_validation import (
    check_fits,
    check_header,
    inflate_table,
    parse_table,
    read_file_bytes,
    split_file,
)
from core.method.config import CompressionConfig
from core.method.quantization import FLOAT_PASSTHROUGH_BITS, decode
from core.workloads.models import MAX_FILE_PARAMS, load_state_dict_into
from core.workloads.provenance import build_file_arch

# ---------------------------------------------------------------- decoding the data blob

class DataReader:
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


def unpack_layer(record: LayerRecord, reader: DataReader) -> torch.Tensor:
    """Decode one layer with dense, vectorized ops: codes are scattered into a zero tensor of the
    layer's shape and decoded as the engine does (``code · scale`` per channel, cast to the dtype);
    positions not kept hold code 0, hence +0."""
    where = f"layer '{record.name}'"
    dtype = dtype_from_name(record.dtype)
    keep = decode_mask(record, reader.take(mask_bytes(record), f"{where}'s mask"))
    if record.b_high is None:
        values = reader.tensor(dtype, (record.kept,), f"{where}'s values")
        return torch.zeros(record.numel, dtype=dtype).masked_scatter_(keep, values).view(record.shape)
    streams = []
    for suffix, count, bits in record.streams:
        codes = decode_codes(reader.take(code_bytes(count, bits), f"{where}'s {suffix} codes"), count, bits)
        scales = None
        if bits != FLOAT_PASSTHROUGH_BITS:
            scales = reader.tensor(torch.float32, (record.channels,), f"{where}'s {suffix} scales")
        streams.append((codes, scales, bits))
    if record.mixed:
        high_kept = decode_selector(record, reader.take(selector_stored_bytes(record), f"{where}'s high/low selector"))
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


# ---------------------------------------------------------------- a checked file and its decoded content

class _HeaderFields:
    """The fields a packed file's header records (architecture, settings, pre-processing, repair), read as written."""

    header: dict

    @property
    def arch(self) -> str | None:
        return self.header.get("arch")

    @property
    def arch_kwargs(self) -> dict:
        return dict(self.header.get("arch_kwargs") or {})

    @property
    def config(self) -> CompressionConfig:
        """The setting the file was compressed with (also from files that stored ``layer_tau`` as pairs)."""
        return CompressionConfig.from_dict(self.header.get("config", {}))

    @property
    def input_spec(self) -> dict | None:
        """The recorded pre-processing (``Preprocess.to_dict()``), or None (files without one, and older files)."""
        value = self.header.get("input")
        return dict(value) if isinstance(value, dict) else None

    @property
    def repair(self) -> dict | None:
        """The repair the stored weights carry (:func:`core.deploy.packed_writer.repair_record`: method,
        n_images, ridge, seed, …), or None (an unrepaired file). Read from the header as written: shown,
        never acted on."""
        value = self.header.get("repair")
        return dict(value) if isinstance(value, dict) else None


@dataclass(frozen=True)
class PackedFile(_HeaderFields):
    """A packed file whose framing, header, table and SHA256 are checked, and whose every declared size
    agrees with the bytes present; nothing is decoded yet (see :meth:`decode` and :meth:`load`)."""

    label: str
    header: dict
    layers: list[LayerRecord]
    state: list[StateEntry]
    data: np.ndarray  # the payload, a read-only view into the file's bytes
    file_bytes: int
    max_params: int

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every state_dict key the file holds, with the shape and dtype it declares."""
        shapes = {r.state_key: (r.shape, dtype_from_name(r.dtype)) for r in self.layers}
        shapes.update({entry.key: (entry.shape, entry.dtype) for entry in self.state})
        return shapes

    def decode(self) -> dict[str, torch.Tensor]:
        """The full state_dict (packed layers decoded); memory: about the model's size."""
        reader = DataReader(self.data)
        state = {record.state_key: unpack_layer(record, reader) for record in self.layers}
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
        check_fits(model, self.shapes(), self.label)
        load_state_dict_into(model, self.decode(), self.label)
        return model.eval()


@dataclass(frozen=True)
class PackedModel(_HeaderFields):
    """A packed file's content: its header, layer records and the full state_dict (packed layers decoded)."""

    header: dict
    layers: list[LayerRecord]
    state_dict: dict[str, torch.Tensor]
    file_bytes: int
    data_bytes: int  # the payload without the container: what the engine's accounting counts


# ---------------------------------------------------------------- the readers

def parse_compressed(data: bytes, label: str = "the packed file", max_params: int = MAX_FILE_PARAMS) -> PackedFile:
    """Check a packed file held in memory, without decoding it; the entry point for every reader.

    In order, each before anything of the size it declares is allocated (the limits are
    :mod:`core.deploy.packed_validation`'s): the container's framing against the file's length, the
    header (≤ :data:`~core.deploy.packed_validation.MAX_HEADER_BYTES`), the SHA256, the table
    (decompressed to at most :data:`~core.deploy.packed_validation.MAX_TABLE_BYTES`), every record's
    types, counts and bit-widths, at most ``max_params`` values in all, and the data size the table
    implies against the bytes present. ``label`` names the file in messages (it is never used as a path).
    """
    raw = bytes(data)  # immutable: the data view below must not change under us
    label = printable(label, 80)
    metadata, table_bytes, blob = split_file(raw, label)
    header = check_header(metadata, label)
    try:
        intact = header.get("sha256") == file_digest(header, table_bytes, blob)
    except (ValueError, TypeError, RecursionError):
        intact = False
    if not intact:
        raise PackedFileError(f"{label} is damaged or was changed: its content does not match the SHA256 in its "
                              "header (a checksum that detects corruption; it does not prove who made the file).")
    try:
        CompressionConfig.from_dict(header.get("config", {}))
    except ValueError as err:
        raise PackedFileError(f"{label} records settings this app cannot use: {printable(err)}.") from err
    records, state = parse_table(inflate_table(table_bytes, label), label, max_params, version=header["version"])
    described = sum(map(layer_bytes, records)) + sum(entry.nbytes for entry in state)
    if described != blob.size:
        raise PackedFileError(f"{label} is damaged: its table describes {described:,} bytes of data, "
                              f"the file holds {blob.size:,}.")
    return PackedFile(label, header, records, state, blob, len(raw), max_params)


def read_compressed_bytes(data: bytes, label: str = "the packed file", max_params: int = MAX_FILE_PARAMS
                          ) -> PackedModel:
    """Read and verify a packed file held in memory; returns its header and the full, decoded state_dict."""
    packed = parse_compressed(data, label, max_params)
    return PackedModel(header=packed.header, layers=packed.layers, state_dict=packed.decode(),
                       file_bytes=packed.file_bytes, data_bytes=int(packed.data.size))


def read_compressed(path: str | os.PathLike) -> PackedModel:
    """Read and verify a packed file; returns its header and the full, decoded state_dict."""
    return read_compressed_bytes(read_file_bytes(path), Path(path).name)


def load_compressed(path: str | os.PathLike, model_template: nn.Module | None = None) -> nn.Module:
    """The compressed model stored at ``path``, in eval mode; its weights equal the saved result's.

    The module is rebuilt from the recorded architecture, a registry name or ``torchvision:<name>``
    (its arguments checked by :func:`core.workloads.provenance.check_file_arch`), or from a deep copy
    of ``model_template`` (never modified) when given: needed for models of neither kind.
    """
    return parse_compressed(read_file_bytes(path), Path(path).name).load(model_template)
