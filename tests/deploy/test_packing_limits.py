"""Hostile packed files: every size a file declares is checked before anything of that size is allocated.

The SHA256 in a packed file is a checksum anyone can recompute, so every forged file here carries a
*correct* one (as an attacker's would): the limits, not the checksum, must stop it. Each refusal is
also checked to be cheap: Python-level peak allocation (tracemalloc) stays far below what the file
declares, and the call returns quickly.
"""
from __future__ import annotations

import json
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from core.deploy import packed_layout, packed_validation
from core.deploy.packed_layout import METADATA_KEY, PackedFileError
from core.deploy.packed_reader import load_compressed, parse_compressed, read_compressed, read_compressed_bytes
from core.deploy.packed_writer import compressed_bytes
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads.models import MAX_FILE_PARAMS, CheckpointError, build

SMALL_MLP = dict(layers=2, in_dim=8, out_dim=4, hidden=6)


def forge(layers: list, state: list | None = None, data: bytes = b"", *, arch: str | None = "mlp",
          arch_kwargs: dict | None = None, table: bytes | None = None, **header) -> bytes:
    """A packed file with the given table and data, and a correct SHA256 (anyone can compute it)."""
    table = zlib.compress(json.dumps({"layers": layers, "state": state or []}).encode()) if table is None else table
    blob = np.frombuffer(data, dtype=np.uint8)
    fields = {"format": packed_layout.FORMAT_NAME, "version": packed_layout.FORMAT_VERSION, "arch": arch,
              "arch_kwargs": arch_kwargs if arch_kwargs is not None else {}, "config": {"tau": 0.1}}
    fields.update(header)
    fields["sha256"] = packed_layout.file_digest(fields, table, blob)
    table_tensor = torch.frombuffer(bytearray(table), dtype=torch.uint8) if table else torch.zeros(0, dtype=torch.uint8)
    tensors = {"table": table_tensor, "data": torch.from_numpy(blob.copy())}
    return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(fields)})


def good_file(arch_kwargs: dict | None = None) -> bytes:
    """A genuine packed file of a small MLP."""
    torch.manual_seed(0)
    kwargs = arch_kwargs or SMALL_MLP
    result = Engine(build("mlp", **kwargs)).apply(CompressionConfig(tau=0.2, theta=0.4, b_low=2, b_high=8))
    return compressed_bytes(result, arch="mlp", arch_kwargs=kwargs)


def refused_cheaply(data: bytes, match: str, reader=read_compressed_bytes, budget_bytes: int = 8 << 20,
                    budget_s: float = 2.0) -> str:
    """``reader(data)`` raises a CheckpointError matching ``match``, allocating < ``budget_bytes`` in Python
    (tracemalloc also sees numpy's and PyTorch's CPU allocations made through Python's allocator hooks)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match=match) as raised:
            reader(data)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < budget_bytes, f"peak {peak:,} bytes while refusing"
    assert elapsed < budget_s, f"{elapsed:.2f} s to refuse"
    return str(raised.value)


def test_forged_but_valid_file_loads():
    """The forging helper makes files the reader accepts: the refusals below are due to the limits."""
    data = forge([["0", [6, 8], "float32", 48, 48, 0, None, None, "all"]],
                 [["0.bias", "float32", [6]], ["2.weight", "float32", [4, 6]], ["2.bias", "float32", [4]]],
                 bytes(4 * (48 + 6 + 24 + 4)), arch_kwargs=SMALL_MLP)
    model = parse_compressed(data, "forged.safetensors").load()
    assert model[0].weight.shape == (6, 8)
    assert parse_compressed(good_file(), "good").load()[0].weight.shape == (6, 8)


# ---------------------------------------------------------------- the findings

def test_huge_declared_layer_is_refused_before_allocating():
    """(b) a few hundred bytes claiming one layer of 4·10⁸ weights (kept 0: no data needed)."""
    data = forge([["0", [20_000, 20_000], "float32", 0, 0, 0, None, None, "index"]])
    assert len(data) < 1000
    message = refused_cheaply(data, "describes 400,000,000 values")
    assert f"{MAX_FILE_PARAMS:,}" in message
    refused_cheaply(data, "400,000,000", reader=lambda d: parse_compressed(d, "x", max_params=10**6).load())


def test_declared_layer_must_fit_the_architecture_before_decoding():
    """Under the hard cap but not the recorded model's shape: refused before decoding (load builds the small
    model first and compares shapes)."""
    data = forge([["0", [10_000, 10_000], "float32", 0, 0, 0, None, None, "index"]], arch_kwargs=SMALL_MLP)
    refused_cheaply(data, "'0.weight' has shape \\(10000, 10000\\), expected \\(6, 8\\)",
                    reader=lambda d: parse_compressed(d, "x").load())


def test_table_zlib_bomb_is_inflated_with_a_bound():
    """(c) the table is a zlib bomb: 64 MiB of spaces in ~64 KB; inflated to at most MAX_TABLE_BYTES."""
    bomb = zlib.compressobj(9)
    spaces = b" " * (1 << 20)
    table = b"".join(bomb.compress(spaces) for _ in range(64)) + bomb.flush()
    data = forge([], table=table)
    assert len(data) < 200_000
    refused_cheaply(data, "unpacks to more than", budget_bytes=3 * packed_validation.MAX_TABLE_BYTES)


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden": 8000}, "'hidden' to 8000; it must be a whole number from 1 to 4096"),
    ({"layers": 64, "hidden": 4096, "in_dim": 4096, "out_dim": 4096}, "at most 268,435,456"),
    ({"hidden": "128"}, "'hidden' to '128'"),
    ({"hidden": True}, "'hidden' to True"),
    ({"hidden": 0}, "from 1 to 4096"),
    ({"__class__": 1}, "accepts only: layers, in_dim, out_dim, hidden"),
])
def test_arch_kwargs_are_checked_before_building(kwargs, match):
    """(d) the header's constructor arguments: a whitelist with bounds, checked before the model is built."""
    data = forge([], arch_kwargs=kwargs)
    assert len(data) < 1000
    refused_cheaply(data, match, reader=lambda d: parse_compressed(d, "x").load())


def test_unknown_architecture_is_refused():
    refused_cheaply(forge([], arch="vgg99"), "unknown architecture 'vgg99'",
                    reader=lambda d: parse_compressed(d, "x").load())


# ---------------------------------------------------------------- every declared field

LAYER = ["0", [6, 8], "float32", 48, 48, 0, None, None, "all"]


def with_field(index: int, value) -> list:
    row = list(LAYER)
    row[index] = value
    return [row]


FORGED = {
    "shape not a list": (with_field(1, "6x8"), "shape of layer '0'"),
    "negative dimension": (with_field(1, [-6, 8]), "shape of layer '0'"),
    "too many dimensions": (with_field(1, [1] * 9), "at most 8 sizes"),
    "float dimension": (with_field(1, [6.0, 8]), "shape of layer '0'"),
    "boolean dimension": (with_field(1, [True, 8]), "shape of layer '0'"),
    "unknown dtype": (with_field(2, "complex128"), "type 'complex128'"),
    "dtype not a string": (with_field(2, ["float32"]), "has the type"),
    "kept above numel": (with_field(3, 49), "impossible counts"),
    "negative kept": (with_field(3, -1), "impossible counts"),
    "kept as text": (with_field(3, "48"), "impossible counts"),
    "high count does not add up": (with_field(4, 47), "do not add up"),
    "bit-width 1": ([["0", [6, 8], "float32", 48, 48, 0, 8, 1, "all"]], "bit-widths"),
    "bit-widths reversed": ([["0", [6, 8], "float32", 48, 48, 0, 2, 8, "all"]], "bit-widths"),
    "one bit-width missing": ([["0", [6, 8], "float32", 48, 48, 0, 8, None, "all"]], "bit-widths"),
    "wrong mask kind": (with_field(8, "bitmap"), "mask kind 'bitmap'"),
    "unknown mask kind": (with_field(8, "magic"), "mask kind 'magic'"),
    "record too short": ([LAYER[:8]], "9 or 10 fields"),
    "record not a list": ([{"name": "0"}], "9 or 10 fields"),
    "empty name": (with_field(0, ""), "not a name"),
    "name too long": (with_field(0, "x" * 1001), "not a name"),
    "name not text": (with_field(0, 7), "not a name"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_forged_table_fields_are_refused(case):
    layers, match = FORGED[case]
    refused_cheaply(forge(layers, data=bytes(192)), match)


def test_table_rows_and_duplicates():
    many = [["s%d" % i, "float32", [1]] for i in range(packed_validation.MAX_TABLE_ROWS + 1)]
    refused_cheaply(forge([], many, bytes(4 * len(many))), "more than 10,000 tensors", budget_bytes=32 << 20)
    twice = [["b", "float32", [1]], ["b", "float32", [1]]]
    refused_cheaply(forge([], twice, bytes(8)), "lists a tensor twice")
    refused_cheaply(forge([], [["b", "float32", [2]]], bytes(4)), "describes 8 bytes of data, the file holds 4")
    refused_cheaply(forge([], [["b", "float32", [1]]], bytes(8)), "describes 4 bytes of data, the file holds 8")


def test_damaged_tables_and_headers():
    refused_cheaply(forge([], table=b"not zlib at all"), "not valid compressed data")
    cut = zlib.compress(json.dumps({"layers": [], "state": []}).encode())[:-3]
    refused_cheaply(forge([], table=cut), "cut short")
    refused_cheaply(forge([], table=zlib.compress(b"[" * 100_000)), "not valid JSON")
    refused_cheaply(forge([], table=zlib.compress(b'{"layers": 5, "state": []}')), "lacks the 'layers'")
    refused_cheaply(forge([], version=99), "version 99")
    refused_cheaply(forge([], arch=5), "architecture name is not text")
    refused_cheaply(forge([], arch_kwargs=[1, 2]), "not a mapping")
    refused_cheaply(forge([], config={"tau": "lots"}), "settings this app cannot use")
    refused_cheaply(forge([], config={"include_norm": "yes"}), "settings this app cannot use")


def test_container_framing_is_checked_against_the_bytes_present():
    good = good_file()
    header_len = int.from_bytes(good[:8], "little")
    refused_cheaply((10**12).to_bytes(8, "little") + good[8:], "header would be 1,000,000,000,000 bytes")
    refused_cheaply(good[:8 + header_len + 3], "truncated")
    refused_cheaply(good + b"\0", "altered: 1 bytes follow")
    nested = b"[" * 50_000
    refused_cheaply(len(nested).to_bytes(8, "little") + nested, "header is not valid JSON")
    forged_header = json.loads(good[8:8 + header_len])
    forged_header["data"]["data_offsets"][1] += 10**9  # claims a gigabyte more data than is present
    text = json.dumps(forged_header).encode()
    refused_cheaply(len(text).to_bytes(8, "little") + text + good[8 + header_len:], "disagree|truncated")
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    message = refused_cheaply(bytes(flipped), "SHA256")
    assert "detects corruption" in message and "does not prove who made the file" in message


def test_file_size_limit_applies_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.safetensors"
    path.write_bytes(good_file())
    monkeypatch.setattr(packed_validation, "MAX_FILE_BYTES", 100)
    with pytest.raises(PackedFileError, match="packed files are read up to 100"):
        load_compressed(path)


def test_bytes_and_path_readers_agree(tmp_path):
    data = good_file()
    path = tmp_path / ("é" * 100 + ".safetensors")  # the path API still takes a path
    path.write_bytes(data)
    from_path, from_bytes = load_compressed(path), parse_compressed(data, "x").load()
    for key, value in from_path.state_dict().items():
        assert torch.equal(value, from_bytes.state_dict()[key])
    assert read_compressed_bytes(data, "whatever/../name\0.pt").data_bytes == read_compressed(path).data_bytes
