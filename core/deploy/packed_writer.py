"""Writing a compression result (or its repair) as a packed file: each layer's bytes, the table, the header.

``save_compressed(result, path, arch=...)`` writes a :class:`core.method.engine.CompressionResult`
to one safetensors file (the layout is :mod:`core.deploy.packed_layout`'s);
:func:`core.deploy.packed_reader.load_compressed` rebuilds the ``nn.Module`` whose weights equal
``result.weights`` bit for bit.

A *repaired* model (``repaired=``, :mod:`core.measure.repair`) is stored in the same layout under the
same records: the repair's values (or, quantized, its codes and scales) of the same kept weights, and
the other entries as the repair left them; so its data is exactly as large.
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from core.deploy.packed_layout import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_KEY,
    LayerRecord,
    dtype_name,
    encode_codes,
    encode_mask,
    encode_selector,
    file_digest,
    mask_kind,
    tensor_bytes,
)
from core.deploy.packed_reader import DataReader, unpack_layer
from core.method.quantization import FLOAT_PASSTHROUGH_BITS
from core.workloads.provenance import known_arch

# ---------------------------------------------------------------- one layer

def _record_key(result, name: str) -> str | None:
    """Layer ``name``'s state_dict key for its record: ``None`` where it is ``<name>.weight`` (nine fields)."""
    key = result._engine.parameter_name(name)
    return None if key == f"{name}.weight" else key


def _layer_record(result, name: str, row: Mapping) -> tuple[LayerRecord, torch.Tensor, torch.Tensor]:
    """Layer ``name``'s record in the result's setting (``row``: its row of ``result.stats``), its rank
    order (rank → flat index) and its flat keep mask (kept = ranks [numel − kept, numel))."""
    weight = result.weights[name]
    shape, numel = tuple(weight.shape), weight.numel()
    kept, n_high, n_low = int(row["kept"]), int(row["n_high"]), int(row["n_low"])
    config = result.config
    record = LayerRecord(
        name=name, shape=shape, dtype=dtype_name(weight.dtype), kept=kept, n_high=n_high, n_low=n_low,
        b_high=config.b_high if config.quantized else None, b_low=config.b_low if config.quantized else None,
        mask=mask_kind(numel, kept), key=_record_key(result, name))
    order = result._engine.rank_order(name)
    keep = torch.zeros(numel, dtype=torch.bool)
    keep[order[numel - kept:]] = True
    return record, order, keep


def _high_mask(record: LayerRecord, order: torch.Tensor) -> torch.Tensor:
    """The flat mask of the weights in the b_high chunk (the top ``n_high`` ranks)."""
    high = torch.zeros(record.numel, dtype=torch.bool)
    high[order[record.numel - record.n_high:]] = True
    return high


def _stream_mask(record: LayerRecord, keep: torch.Tensor, high: torch.Tensor, suffix: str) -> torch.Tensor:
    """The flat mask of the weights in stream ``suffix`` ("hi" or "lo"; every kept one when not mixed)."""
    return keep if not record.mixed else (keep & high if suffix == "hi" else keep & ~high)


def _pack_layer(result, name: str, row: Mapping, repaired_weight: torch.Tensor | None = None,
                quantized: QuantizedCodes | None = None) -> tuple[LayerRecord, list[np.ndarray]]:
    """The layer's record and its byte parts, in blob order: mask, (codes, scales) per stream, selector.

    ``repaired_weight`` (with ``quantized``, its codes and scales, for a quantized setting): the
    values a repair gave the kept weights, stored under the engine's mask and bit-widths; see
    :func:`_repaired_layer`.
    """
    if repaired_weight is not None:
        return _repaired_layer(result, name, row, repaired_weight, quantized)
    record, order, keep = _layer_record(result, name, row)
    parts = [encode_mask(keep, record.mask)]
    if record.b_high is None:
        parts.append(tensor_bytes(result.weights[name].reshape(-1)[keep]))
        return record, parts
    high = _high_mask(record, order)
    for suffix, _, bits in record.streams:
        chunk = result._engine.chunk(name, bits)
        codes = torch.empty_like(chunk.codes_ranked)
        codes[order] = chunk.codes_ranked  # rank order → flat order
        parts.append(encode_codes(codes[_stream_mask(record, keep, high, suffix)], bits))
        if chunk.scales is not None:
            parts.append(tensor_bytes(chunk.scales.to(torch.float32)))
    if record.mixed:
        parts.append(encode_selector(high[keep], record))
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
    original = result.weights[name]
    shape = tuple(original.shape)
    if tuple(weight.shape) != shape or weight.dtype != original.dtype:
        raise ValueError(f"the repaired '{result._engine.parameter_name(name)}' is {weight.dtype} "
                         f"{tuple(weight.shape)}, the result's {original.dtype} {shape}: a repair of another model")
    record, order, keep = _layer_record(result, name, row)
    config, numel = result.config, record.numel
    flat = weight.detach().cpu().reshape(-1)
    if bool((flat[~keep] != 0).any()):
        raise ValueError(f"the repair changed pruned weights of '{name}': the packed file keeps the setting's mask")
    parts = [encode_mask(keep, record.mask)]
    if record.b_high is None:
        parts.append(tensor_bytes(flat[keep]))
        return record, parts
    if quantized is None:
        raise ValueError(f"the repair changed the quantized layer '{name}' without giving its codes: repair a "
                         "quantized result with quant=bit_widths(engine, result)")
    bits = torch.as_tensor(quantized.bits).cpu().reshape(-1)
    high = _high_mask(record, order)
    wanted = torch.where(high, config.b_high, torch.where(keep, config.b_low, 0)).to(bits.dtype)
    if bits.numel() != numel or not torch.equal(bits, wanted):
        raise ValueError(f"the repair of '{name}' used other bit-widths than the setting's "
                         f"({config.b_low}/{config.b_high} bit on the engine's kept weights)")
    codes = torch.as_tensor(quantized.codes).cpu().reshape(-1)
    for suffix, _, b in record.streams:
        select = _stream_mask(record, keep, high, suffix)
        if b == FLOAT_PASSTHROUGH_BITS:
            parts.append(encode_codes(flat[select], b))
            continue
        if b not in quantized.scales:
            raise ValueError(f"the repair of '{name}' gives no scales for {b} bits")
        scales = torch.as_tensor(quantized.scales[b]).cpu().to(torch.float32).reshape(-1)
        if scales.numel() != record.channels:
            raise ValueError(f"the repair of '{name}' gives {scales.numel()} scales for {b} bits, the layer has "
                             f"{record.channels} output channels")
        parts.append(encode_codes(codes[select], b))
        parts.append(tensor_bytes(scales))
    if record.mixed:
        parts.append(encode_selector(high[keep], record))
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


# ---------------------------------------------------------------- the file

def compressed_bytes(result, arch: str | None = None, arch_kwargs: Mapping | None = None, *,
                     verify: bool = True, input_spec: Mapping | None = None,
                     repaired: Repaired | None = None) -> bytes:
    """``result`` (a :class:`core.method.engine.CompressionResult`) in the packed format, as bytes.

    ``arch`` (a :mod:`core.workloads.models` registry name or ``torchvision:<name>``, with
    ``arch_kwargs`` for its builder) is recorded so :func:`~core.deploy.packed_reader.load_compressed`
    can rebuild the module; without it, loading needs a ``model_template``. ``input_spec`` (the
    pre-processing, :meth:`core.workloads.preprocess.Preprocess.to_dict`) is recorded under ``input``
    when given.

    ``repaired`` (a :class:`core.measure.repair.RepairResult` of ``result.model``; quantized
    settings repaired with ``quant=bit_widths(engine, result)``): the file stores the repaired
    model instead, under the same mask and bit-widths: the repaired values (or codes and scales)
    of the kept weights and every other tensor as the repair left it (biases, BatchNorm shift and
    statistics), so :func:`~core.deploy.packed_reader.load_compressed` gives a model whose state
    equals ``repaired.model``'s bit for bit. The data is exactly as large as without the repair
    (same records, same tensors); the header grows by the ``repair`` entry (:func:`repair_record`).
    ``ValueError`` when the repair does not fit the setting.

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
    state_table = [[key, dtype_name(value.dtype), list(value.shape)] for key, value in state.items()]
    parts.extend(tensor_bytes(value) for value in state.values())
    data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    table = {"layers": [r.row for r in records], "state": state_table}
    table_bytes = zlib.compress(json.dumps(table, separators=(",", ":")).encode(), 9)
    if verify:
        reader = DataReader(data)
        for record in records:
            if not torch.equal(unpack_layer(record, reader), expected[record.name].cpu()):
                if repaired is not None and record.name in quantized:
                    raise ValueError(f"the repaired '{record.state_key}' is not its codes · scales: the repair's "
                                     "quantized form does not describe its weights")
                raise RuntimeError(f"packing layer '{record.name}' is not lossless (a bug: please report it)")
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
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
    header["sha256"] = file_digest(header, table_bytes, data)
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
