"""Hostile inputs for every upload the app reads: the checkpoint uploader (read_upload) and the settings
uploader (read_settings).

Each case gets a clear CheckpointError / ConfigError (never another exception), runs no code from the
file (a pickle payload would leave a marker file), writes nothing (the test runs in an empty working
folder with a private temporary folder, both still empty after), and costs about the file's size:
Python-level peak allocation while refusing stays small, and one subprocess measures the process's
RSS while three of the issue's bombs are refused.
"""
from __future__ import annotations

import collections
import functools
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

import core.services.uploads as uploads
import core.services.safe_files as safe_files
from core.method.config import CompressionConfig, ConfigError
from core.method.engine import Engine
from core.services.choices import LoadedModel
from core.services.uploads import BUNDLE_FORMAT, MAX_UPLOAD_BYTES, read_settings, read_upload
from core.workloads.models import CheckpointError, build, sniff_format
from tests.deploy.test_packing_limits import forge, good_file

ROOT = Path(__file__).resolve().parents[2]
MARK_NAME = "payload-ran.flag"


# ---------------------------------------------------------------- builders

def leave_mark(path: str) -> str:
    """Runs only if a file's pickle is executed."""
    Path(path).write_text("executed")
    return path


class Payload:
    """Unpickling this calls :func:`leave_mark`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return leave_mark, (self.path,)


def saved(obj, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def resnet20_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build("resnet20").state_dict()


def state_with(**changes) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in resnet20_state().items()}
    for key, value in changes.items():
        state[key.replace("__", ".")] = value
    return state


@functools.lru_cache(maxsize=None)
def good_pt() -> bytes:
    return saved(resnet20_state())


def bundle(arch="mlp", arch_kwargs='{"hidden": 8000}', state=None) -> bytes:
    """An exported bundle, as :func:`core.services.uploads.export_bundle` writes it, with chosen fields."""
    return saved({"format": BUNDLE_FORMAT, "arch": arch, "arch_kwargs": arch_kwargs,
                  "state_dict": state if state is not None else build("mlp").state_dict(), "masks": {},
                  "settings": "{}"})


def write_zip(entries: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip archive from (name, stored bytes, method, crc, uncompressed size): its directory says what we like."""
    out, central = io.BytesIO(), []
    for name, payload, method, crc, size in entries:
        offset, raw_name = out.tell(), name.encode()
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(payload), size,
                              len(raw_name), 0) + raw_name + payload)
        central.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(payload), size,
                                   len(raw_name), 0, 0, 0, 0, 0, offset) + raw_name)
    directory = b"".join(central)
    start = out.tell()
    out.write(directory)
    out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), start, 0))
    return out.getvalue()


_STORAGE = object()


class _Tensor:
    def __init__(self, numel: int):
        self.numel = numel

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_STORAGE, 0, (self.numel,), (1,), False, collections.OrderedDict())


class _TorchPickler(pickle.Pickler):
    """Writes data.pkl as torch.save does, for a float tensor of ``numel`` values in storage '0'."""

    def __init__(self, file, numel: int):
        super().__init__(file, protocol=2)
        self.numel = numel

    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", self.numel) if obj is _STORAGE else None


def zeros_deflated(size: int, chunk: int = 1 << 20) -> bytes:
    """Raw deflate of ``size`` zero bytes, built from one repeated block (no need to compress it all)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(chunk)
    first = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    middle = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    return first + middle * (size // chunk - 1) + packer.flush()


def torch_bomb(size: int, crc: int = 0) -> bytes:
    """(a) a torch.save-shaped archive whose one storage is ``size`` zero bytes, deflated (~1000:1)."""
    pkl = io.BytesIO()
    _TorchPickler(pkl, size // 4).dump({"w": _Tensor(size // 4)})
    pkl = pkl.getvalue()
    return write_zip([("archive/data.pkl", pkl, 0, zlib.crc32(pkl), len(pkl)),
                      ("archive/byteorder", b"little", 0, zlib.crc32(b"little"), 6),
                      ("archive/data/0", zeros_deflated(size), 8, crc, size),
                      ("archive/version", b"3\n", 0, zlib.crc32(b"3\n"), 2)])


def many_entries(count: int) -> bytes:
    return write_zip([(f"archive/data/{i}", b"", 0, 0, 0) for i in range(count)])


def table_bomb(size: int = 1 << 30) -> bytes:
    """(c) a packed file whose table is a zlib bomb: ``size`` spaces in about size/1000 bytes."""
    packer = zlib.compressobj(9)
    spaces = b" " * (1 << 20)
    first = packer.compress(spaces) + packer.flush(zlib.Z_FULL_FLUSH)
    middle = packer.compress(spaces) + packer.flush(zlib.Z_FULL_FLUSH)
    return forge([], table=first + middle * (size // len(spaces) - 1) + packer.flush())


def safetensors_header(header: bytes, rest: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + rest


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# ---------------------------------------------------------------- the checkpoint uploader: read_upload

BIG = 2 << 30
#: name → (build (data, filename, arch); what the message must say)
UPLOADS: dict[str, tuple] = {
    "empty file": (lambda: (b"", "empty.pt", "resnet20"), "is empty"),
    "random bytes": (lambda: (os.urandom(4096), "noise.pt", "resnet20"), "neither a PyTorch file"),
    "plain text named .pt": (lambda: (b"hello, not a model", "notes.pt", "resnet20"), "neither a PyTorch file"),
    "random bytes named .safetensors": (lambda: (os.urandom(512), "x.safetensors", "resnet20"),
                                        "neither a PyTorch file"),
    "pickle protocol 0 text": (lambda: (pickle.dumps({"a": 1}, protocol=0), "p0.pt", "resnet20"),
                               "neither a PyTorch file"),
    "truncated torch file (half)": (lambda: (good_pt()[:len(good_pt()) // 2], "half.pt", "resnet20"),
                                    "directory is damaged|PyTorch cannot read it"),
    "truncated torch file (100 bytes)": (lambda: (good_pt()[:100], "cut.pt", "resnet20"),
                                         "directory is damaged|PyTorch cannot read it"),
    "corrupted zip directory": (lambda: (good_pt()[:-60] + os.urandom(38) + good_pt()[-22:], "bad.pt", "resnet20"),
                                "directory is damaged|PyTorch cannot read it"),
    "plain zip, not torch": (lambda: (write_zip([("readme.txt", b"hi", 0, zlib.crc32(b"hi"), 2)]), "a.pt",
                                      "resnet20"), "PyTorch cannot read it"),
    "stored entry with lying size": (lambda: (write_zip([("archive/data.pkl", b"x", 0, 0, 5)]), "lie.pt",
                                              "resnet20"), "directory is damaged"),
    "pickle payload (torch.save)": (lambda: (saved({"fc.weight": torch.zeros(1), "x": Payload(MARK_NAME)}),
                                             "evil.pt", "resnet20"), "never unpickles objects"),
    "pickle payload (legacy torch.save)": (lambda: (saved({"x": Payload(MARK_NAME)}, legacy=True), "evil1.pt",
                                                    "resnet20"), "never unpickles objects"),
    "pickle payload (pickle.dump)": (lambda: (pickle.dumps({"x": Payload(MARK_NAME)}, protocol=2), "evil2.pt",
                                              "resnet20"), "never unpickles|damaged or cut short"),
    "deflate bomb, 2 GiB entry in 2 MB": (lambda: (torch_bomb(BIG), "bomb.pt", "resnet20"), "would unpack to"),
    "deflate bomb under the size limits": (lambda: (torch_bomb(4 << 20), "ratio.pt", "resnet20"),
                                           "compressed more than 100:1"),
    "5000 zip entries": (lambda: (many_entries(5000), "many.pt", "resnet20"), "more than 4,096 entries"),
    "2 MB pickle (torch.save)": (lambda: (saved({"k" * 2_000_000: torch.zeros(1)}), "key.pt", "resnet20"),
                                 "its pickle is"),
    "2 MB pickles (legacy torch.save)": (lambda: (saved({"k" * 2_000_000: torch.zeros(1)}, legacy=True), "key.pt",
                                                  "resnet20"), "pickles run past"),
    "safetensors header of 2^40 bytes": (lambda: ((1 << 40).to_bytes(8, "little") + b"{" + bytes(64), "h.safetensors",
                                                  "resnet20"), "neither a PyTorch file"),
    "safetensors header of 2 MiB": (lambda: (safetensors_header(b"{" + b" " * (2 << 20) + b"}"), "h.safetensors",
                                             "resnet20"), "header would be larger"),
    "safetensors, data missing": (lambda: (save_safetensors({"w": torch.zeros(1000)})[:-100], "cut.safetensors",
                                           "resnet20"), "damaged or cut short"),
    "safetensors claiming 10^10 values": (lambda: (safetensors_header(
        json.dumps({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 4 * 10**10]}}).encode(),
        bytes(16)), "huge.safetensors", "resnet20"), "damaged or cut short"),
    "safetensors, deeply nested header": (lambda: (safetensors_header(b'{"a":' + deep_json(100_000) + b"}"),
                                                   "deep.safetensors", "resnet20"), "damaged or cut short"),
    "wrong architecture": (lambda: (good_pt(), "r20.pt", "cifar_cnn"), "does not fit this architecture"),
    "no architecture given": (lambda: (good_pt(), "plain.pt", None), "does not say which architecture"),
    "NaN weight": (lambda: (saved(state_with(fc__weight=torch.full((10, 64), float("nan")))), "nan.pt", "resnet20"),
                   "NaN or infinite"),
    "infinite weight": (lambda: (saved(state_with(conv1__weight=torch.full((16, 3, 3, 3), float("inf")))), "inf.pt",
                                 "resnet20"), "NaN or infinite"),
    "list instead of a state_dict": (lambda: (saved([torch.zeros(3)]), "list.pt", "resnet20"),
                                     "does not hold a state_dict"),
    "dict of numbers": (lambda: (saved({"epochs": 3}), "meta.pt", "resnet20"), "does not hold a state_dict"),
    "extra key": (lambda: (saved(state_with(extra=torch.zeros(1))), "extra.pt", "resnet20"), "unexpected key 'extra'"),
    "missing key": (lambda: (saved({k: v for k, v in resnet20_state().items() if k != "fc.bias"}), "missing.pt",
                             "resnet20"), "'fc.bias' is missing"),
    "wrong shape": (lambda: (saved(state_with(fc__bias=torch.zeros(11))), "shape.pt", "resnet20"),
                    "'fc.bias' has shape \\(11,\\)"),
    "sparse tensor": (lambda: (saved(state_with(fc__bias=torch.zeros(10).to_sparse())), "sparse.pt", "resnet20"),
                      "not a dense tensor"),
    "bundle: hidden=8000": (lambda: (bundle(), "b.pt", None), "'hidden' to 8000; it must be a whole number from 1"),
    "bundle: unknown argument": (lambda: (bundle(arch_kwargs='{"__class__": 1}'), "b.pt", None), "accepts only"),
    "bundle: argument as text": (lambda: (bundle(arch_kwargs='{"hidden": "128"}'), "b.pt", None), "'hidden' to '128'"),
    "bundle: argument true": (lambda: (bundle(arch_kwargs='{"hidden": true}'), "b.pt", None), "'hidden' to True"),
    "bundle: arguments not JSON": (lambda: (bundle(arch_kwargs="hidden=8000"), "b.pt", None), "not a JSON object"),
    "bundle: arguments nested 100,000 deep": (lambda: (bundle(arch_kwargs="[" * 100_000), "b.pt", None),
                                              "not a JSON object"),
    "bundle: a billion parameters": (lambda: (bundle(arch_kwargs='{"layers": 64, "hidden": 4096, "in_dim": 4096, '
                                                                 '"out_dim": 4096}'), "b.pt", None),
                                     "at most 32,000,000"),
    "bundle: unknown architecture": (lambda: (bundle(arch="vgg99", arch_kwargs="{}"), "b.pt", None),
                                     "unknown architecture 'vgg99'"),
    "packed: a layer of 4e8 weights": (lambda: (forge([["0", [20_000, 20_000], "float32", 0, 0, 0, None, None,
                                                        "index"]]), "p.safetensors", None), "400,000,000 values"),
    "packed: table zlib bomb (1 GiB in 1 MB)": (lambda: (table_bomb(), "t.safetensors", None), "unpacks to more than"),
    "packed: hidden=8000": (lambda: (forge([], arch_kwargs={"hidden": 8000}), "k.safetensors", None),
                            "'hidden' to 8000"),
    "packed: truncated": (lambda: (good_file()[:-10], "cut.safetensors", None), "truncated"),
    "packed: altered byte": (lambda: (good_file()[:-10] + b"x" + good_file()[-9:], "alt.safetensors", None),
                             "SHA256"),
    "packed: no architecture": (lambda: (forge([], arch=None), "n.safetensors", None), "records no architecture"),
    "packed: settings include_norm 'yes'": (lambda: (forge([], config={"include_norm": "yes"}), "c.safetensors",
                                                     None), "settings this app cannot use"),
}


IMPERATIVES = ("Save", "Pick", "Export", "Upload", "Load", "Try", "Re-run", "Choose", "Use", "Check")


def instructions(message: str) -> int:
    """How many sentences of ``message`` tell the user to do something."""
    return sum(sentence.strip().split(" ")[0] in IMPERATIVES for sentence in message.split(". "))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """An empty working folder and a private temporary folder; both must stay empty."""
    work, temp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    yield work, temp
    assert not list(work.iterdir()), "something was written to the working folder"
    assert not list(temp.iterdir()), "something was written to the temporary folder"


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("case", list(UPLOADS))
def test_hostile_upload_is_refused_clearly_and_cheaply(case, sandbox):
    build_case, match = UPLOADS[case]
    data, filename, arch = build_case()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match=match) as raised:
            read_upload(data, filename, arch)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(raised.value)
    assert message.endswith("."), message  # whole sentences of this app, not a library's text
    assert "\x1b" not in message and "Re-running" not in message and "weights_only" not in message
    assert instructions(message) <= 1, message
    assert not (sandbox[0] / MARK_NAME).exists(), "the file's pickle was executed"
    assert peak < 2 * len(data) + (16 << 20), f"{peak:,} bytes allocated in Python to refuse {len(data):,}"
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_the_payload_is_live(sandbox):
    """Plain unpickling does run the payload (so the check above can fail)."""
    pickle.loads(pickle.dumps({"x": Payload(MARK_NAME)}))
    assert (sandbox[0] / MARK_NAME).read_text() == "executed"
    (sandbox[0] / MARK_NAME).unlink()


def test_the_deflate_bomb_is_live():
    """A small instance of the bomb loads with torch.load: deflated entries are inflated (so the limits matter)."""
    size = 1 << 20
    loaded = torch.load(io.BytesIO(torch_bomb(size, zlib.crc32(bytes(size)))), weights_only=True)
    assert loaded["w"].shape == (size // 4,)


def test_total_unzipped_size_is_limited(monkeypatch):
    monkeypatch.setattr(safe_files, "MAX_UNZIPPED_BYTES", 100_000)
    with pytest.raises(CheckpointError, match="at most 0.1 MB \\(100,000 bytes\\)"):
        read_upload(good_pt(), "r20.pt", "resnet20")


def test_size_limit_boundary():
    """``max_bytes`` is inclusive: a file of exactly the limit is read, one byte more is refused."""
    data = good_pt()
    assert read_upload(data, "exact.pt", "resnet20", max_bytes=len(data)).arch == "resnet20"
    expected = f"is .* \\({len(data):,} bytes\\); the limit is .* \\({len(data) - 1:,} bytes\\)"
    with pytest.raises(CheckpointError, match=expected):
        read_upload(data, "over.pt", "resnet20", max_bytes=len(data) - 1)


def test_upload_limit_agrees_with_streamlit_config():
    """Streamlit counts server.maxUploadSize in MB of 10^6 bytes in the browser (1024² on Windows, and on
    its server, where it caps the whole request): the app's limit is that many 10^6 bytes, and the server's
    cap leaves room for the multipart framing around a file of exactly the limit. (The uploader's label and
    its max_upload_size are checked in tests/app/test_hostile_uploads.py.)"""
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == uploads.MAX_UPLOAD_MB
    assert MAX_UPLOAD_BYTES == uploads.MAX_UPLOAD_MB * 10**6
    assert config["server"]["maxUploadSize"] * 2**20 >= MAX_UPLOAD_BYTES + (1 << 20)


@pytest.mark.parametrize("name", ["é" * 150 + ".pt", "../../etc/passwd.pt", "a/b/c.pt", "nul\0byte.pt", "",
                                  "\x1b[31mred\x1b[0m.pt", "[x](http://evil.example).pt", "\u202egnp.pt",
                                  " " * 10, "con.pt"])
def test_any_file_name_is_only_shown(name, sandbox):
    """Hostile names never become paths, and show without control characters, on one line, ≤ 80 characters."""
    packed = good_file()
    loaded = read_upload(packed, name + ".packed.safetensors")
    shown = loaded.source
    assert shown and len(shown) <= 80 and not any(c in shown for c in "\0\x1b\n\u202e")
    with pytest.raises(CheckpointError) as raised:
        read_upload(b"junk", name)
    assert "\0" not in str(raised.value) and "\x1b" not in str(raised.value)


def test_misleading_extensions_are_read_by_content():
    """A torch file named .safetensors, and a safetensors file named .pt, load (the name is not the format)."""
    state = resnet20_state()
    assert read_upload(good_pt(), "really_torch.safetensors", "resnet20").arch == "resnet20"
    st_bytes = save_safetensors({k: v.contiguous() for k, v in state.items()})
    assert read_upload(st_bytes, "really_safetensors.pt", "resnet20").arch == "resnet20"
    assert read_upload(saved(state, legacy=True), "legacy.bin", "resnet20").arch == "resnet20"
    # a safetensors header of 640 bytes makes the file start with \x80\x02, like a pickle: still safetensors
    header = b"{" + b" " * 638 + b"}"
    assert sniff_format(len(header).to_bytes(8, "little") + header) == "safetensors"
    assert sniff_format(good_pt()) == "torch" and sniff_format(saved(state, legacy=True)) == "torch-legacy"


def test_valid_packed_file_with_a_300_byte_name_loads(sandbox):
    name = "模型" * 50 + ".safetensors"  # 312 bytes in UTF-8: once refused with "File name too long"
    assert len(name.encode()) > 255
    loaded = read_upload(good_file(), name)
    assert loaded.arch == "mlp" and "File name too long" not in loaded.note
    assert loaded.label.startswith("Uploaded: 模型")


# ---------------------------------------------------------------- the settings uploader: read_settings

SETTINGS: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "not valid JSON"),
    "not JSON": (b"tau = 0.3", "not valid JSON"),
    "invalid UTF-8": (b'{"tau": "\xc3\x28"}', "not valid JSON"),
    "over 1 MB": (b" " * (10**6 + 1), "1,000,001 bytes"),
    "200 KB of [": (b"[" * 200_000, "nested too deeply"),
    "200 KB of {\"a\":": (b'{"a":' * 40_000, "nested too deeply|not valid JSON"),
    "nested config": (b'{"config": ' + deep_json(5000) + b"}", "nested too deeply"),
    "a number with 5000 digits": (b'{"tau": ' + b"9" * 5000 + b"}", "not valid JSON"),
    "tau 1e999999": (b'{"tau": 1e999999}', "tau must be in \\[0, 1\\], got inf"),
    "tau NaN": (b'{"tau": NaN}', "got nan"),
    "tau Infinity": (b'{"tau": -Infinity}', "got -inf"),
    "tau as text": (b'{"tau": "0.3"}', "tau must be a number"),
    "tau null": (b'{"tau": null}', "tau must be a number"),
    "tau negative": (b'{"tau": -0.1}', "tau must be in"),
    "tau 1.5": (b'{"tau": 1.5}', "tau must be in"),
    "include_norm yes": (b'{"include_norm": "yes"}', "include_norm must be true or false, got 'yes'"),
    "include_norm 1": (b'{"include_norm": 1}', "include_norm must be true or false"),
    "theta negative": (b'{"theta": -1}', "theta must be a finite number"),
    "theta as text": (b'{"theta": "high"}', "theta must be a number"),
    "theta_mode unknown": (b'{"theta": 0.3, "theta_mode": "sideways"}', "theta_mode must be one of"),
    "theta_mode a number": (b'{"theta_mode": 3}', "theta_mode must be one of"),
    "fraction above 1": (b'{"theta": 2, "theta_mode": "fraction"}', "in 'fraction' mode must be in \\[0, 1\\]"),
    "b_low 1": (b'{"theta": 0.3, "b_low": 1}', "b_low"),
    "b_low 4.5": (b'{"b_low": 4.5}', "b_low must be a whole number"),
    "b_high true": (b'{"b_high": true}', "b_high must be a whole number"),
    "b_high 64": (b'{"theta": 0.3, "b_high": 64}', "b_high"),
    "b_low above b_high": (b'{"theta": 0.3, "b_low": 8, "b_high": 4}', "must not exceed"),
    "layer_tau a list of numbers": (b'{"layer_tau": [1, 2]}', "layer_tau must map layer names"),
    "layer_tau value as text": (b'{"layer_tau": {"fc": "x"}}', "tau for layer 'fc' must be a number"),
    "layer_tau value 2": (b'{"layer_tau": {"fc": 2}}', "tau for layer 'fc' must be in"),
    "unknown key __class__": (b'{"__class__": 1}', "unknown setting '__class__'"),
    "markdown link key": (b'{"[text](http://evil.example)": 1}', "unknown setting '\\[text\\]"),
    "image key": (b'{"![x](http://evil.example/a.png)": 1}', "unknown setting"),
    "top level list": (b"[]", "must be a JSON object, got list"),
    "top level string": (b'"tau"', "must be a JSON object, got str"),
    "top level number": (b"0.3", "must be a JSON object, got float"),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_hostile_settings_are_refused(case):
    text, match = SETTINGS[case]
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=match):
            read_settings(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(text) + (2 << 20), f"{peak:,} bytes allocated to refuse {len(text):,}"


def test_settings_size_limit_fires_before_parsing(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("parsed a file over the limit")

    monkeypatch.setattr(json, "loads", never)
    with pytest.raises(ConfigError, match="at most 1,000,000"):
        read_settings(b"{" * (10**6 + 1))
    monkeypatch.undo()
    exact = b'{"tau": 0.25}'.ljust(10**6)  # exactly the limit: read
    assert read_settings(exact) == CompressionConfig(tau=0.25)


def test_exported_settings_still_read_back():
    loaded = LoadedModel("k", "label", "mlp", build("mlp"), "vector", False)
    config = CompressionConfig(tau=0.3, theta=0.2, b_low=2, b_high=8, layer_tau={"0": 0.5})
    text = uploads.settings_json(config, loaded, Engine(loaded.model).apply(config))
    assert read_settings(text) == config == read_settings(text.encode())


# ---------------------------------------------------------------- measured memory (one subprocess)

_MEASURE = r"""
import json, sys, threading, time
import psutil
from core.services.uploads import read_upload
from core.workloads.models import CheckpointError

process = psutil.Process()
results = {}
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    baseline, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    try:
        read_upload(data, path.rsplit("/", 1)[-1], "resnet20")
        outcome = "accepted"
    except CheckpointError as err:
        outcome = str(err)
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    results[path] = {"bytes": len(data), "rss_increase": max(peak[0], process.memory_info().rss) - baseline,
                     "seconds": elapsed, "outcome": outcome}
print(json.dumps(results))
"""


@pytest.mark.slow
def test_bombs_cost_about_their_size_in_rss(tmp_path):
    """The process's RSS (sampled every millisecond) while the issue's bombs are refused stays under twice
    the file's size plus 32 MiB of interpreter noise; they used to take +5.2, +1.9 and +0.95 GB."""
    files = {"bomb.pt": torch_bomb(BIG), "layer.safetensors": forge([["0", [20_000, 20_000], "float32", 0, 0, 0,
                                                                       None, None, "index"]]),
             "table.safetensors": table_bomb()}
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _MEASURE, *paths], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for path, figures in results.items():
        assert figures["outcome"] != "accepted", path
        assert figures["rss_increase"] < 2 * figures["bytes"] + (32 << 20), (path, figures)
        assert figures["seconds"] < 5, (path, figures)
