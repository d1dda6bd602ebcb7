"""Reading uploaded bytes safely: the limits, the checks that run before anything is allocated, and the parse.

* :func:`parse_checkpoint`: the object stored in an uploaded file, told from its content (a
  ``torch.save`` zip, a legacy ``torch.save`` pickle stream, or safetensors), read with
  ``torch.load(weights_only=True)`` or safetensors, never unpickling objects, never an exported
  program (``.pt2``).
* :func:`check_size`, :func:`check_tensors`, :func:`display_name`: the size of the upload, plain dense
  tensors, and the file's name as messages show it (never used as a path).

A hostile file must cost the server no more than its size: every limit below is checked before
anything of the size a file declares is allocated. Every problem raises
:class:`core.workloads.models.CheckpointError` whose message is whole sentences of this app.
:mod:`core.services.uploads` turns what this module reads into models. Nothing here imports Streamlit.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import re
import struct
import zipfile

import torch

from core.common.formatting import printable
from core.workloads.models import CheckpointError, sniff_format

# ---------------------------------------------------------------- limits (checked before allocating)
#: An uploaded checkpoint: 200 MB = 200·10⁶ bytes. Streamlit's ``server.maxUploadSize`` (200 in
#: .streamlit/config.toml, also passed to the uploader) is in "MB": its browser side multiplies by
#: 1000² (by 1024² on Windows), its server by 1024², and its uploader shows "200MB per file". So
#: 200·10⁶ is the one number every browser lets through, and the uploader's label says "200 MB".
MAX_UPLOAD_MB = 200
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 10**6
#: The largest model an upload may describe: 32 M parameters (128 MB in fp32), almost 3× the
#: largest shipped model (ResNet-18, 11.2 M). A tiny file must not make the server build a big model.
MAX_UPLOAD_PARAMS = 32_000_000
#: A ``torch.save`` file is a zip archive whose entries torch.save stores uncompressed (ratio 1:1).
#: Unpacked, all entries together may hold no more than an uncompressed upload can.
MAX_UNZIPPED_BYTES = MAX_UPLOAD_BYTES
#: One entry (one tensor's storage) may hold at most the largest model's parameters in fp32.
MAX_ZIP_ENTRY_BYTES = 4 * MAX_UPLOAD_PARAMS
#: Compression ratio allowed for entries over :data:`ZIP_RATIO_FLOOR`: 100:1. torch.save never
#: compresses; a checkpoint zipped again by hand deflates dense float weights about 1.1:1 and even
#: 99 %-pruned ones well under 100:1, while a deflate bomb sits near deflate's ceiling of 1032:1.
MAX_ZIP_RATIO = 100
ZIP_RATIO_FLOOR = 1 << 20
#: Entries of a zip archive (ResNet-18's state_dict: 122 tensors; an exported bundle: ~150). Zip's
#: directory is parsed into one Python object per entry, so the count is bounded first.
MAX_ZIP_ENTRIES = 4096
#: A checkpoint's pickle (data.pkl; or the pickles of a legacy file together): it holds only key
#: names and tensor metadata, ~15 KB for ResNet-18. Bounded because unpickling can take ~50× the
#: pickle's size in Python objects.
MAX_PICKLE_BYTES = 1 << 20
#: A safetensors file's JSON header (~12 KB for ResNet-18).
MAX_SAFETENSORS_HEADER_BYTES = 1 << 20
#: Characters of a file name shown in messages (the middle of longer names is elided).
MAX_SHOWN_NAME_CHARS = 80

_ZIP_DIRECTORY_ENTRY = b"PK\x01\x02"  # every entry of a zip's central directory starts with it
_SAVE_HINT = "Save the weights with torch.save(model.state_dict(), path) and upload that file."


def display_name(filename: object) -> str:
    """The uploaded file's name as shown in messages: printable, one line, at most 80 characters.

    The name is only ever shown, never used as a path (a name may hold '/', '..' or NUL).
    """
    shown = printable(filename, MAX_SHOWN_NAME_CHARS) if isinstance(filename, str) else ""
    return shown or "the upload"


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 10**6:,.1f} MB ({n_bytes:,} bytes)"


def _check_zip(data: bytes, name: str) -> None:
    """Refuse a zip bomb before ``torch.load`` inflates anything: entry count, each entry's size,
    compression ratio and pickle size, and the total, all read from the zip's directory."""
    damaged = CheckpointError(f"{name} is not a readable checkpoint: it starts like a PyTorch file (a zip "
                              f"archive), but its directory is damaged or cut short. {_SAVE_HINT}")
    if data.count(_ZIP_DIRECTORY_ENTRY) > MAX_ZIP_ENTRIES:
        raise CheckpointError(f"{name} is refused: its archive lists more than {MAX_ZIP_ENTRIES:,} entries, "
                              "far more than a state_dict has.")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OverflowError, EOFError, OSError, NotImplementedError,
            struct.error) as err:
        raise damaged from err
    total = 0
    for entry in entries:
        part, size = printable(entry.filename, 60), entry.file_size
        if size > MAX_ZIP_ENTRY_BYTES:
            raise CheckpointError(f"{name} is refused: its part '{part}' would unpack to {_mb(size)}; "
                                  f"one part may hold at most {_mb(MAX_ZIP_ENTRY_BYTES)}.")
        if entry.compress_type == zipfile.ZIP_STORED and entry.compress_size != size:
            raise damaged
        if size > ZIP_RATIO_FLOOR and size > MAX_ZIP_RATIO * entry.compress_size:
            raise CheckpointError(f"{name} is refused: its part '{part}' is compressed more than "
                                  f"{MAX_ZIP_RATIO}:1 ({entry.compress_size:,} bytes unpack to {size:,}), "
                                  "which no checkpoint needs.")
        if entry.filename.endswith("data.pkl") and size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{name} is refused: its pickle is {size:,} bytes, and a state_dict's "
                                  f"pickle (names and tensor shapes) needs far less than {MAX_PICKLE_BYTES:,}.")
        total += size
    if total > MAX_UNZIPPED_BYTES:
        raise CheckpointError(f"{name} is refused: it would unpack to {_mb(total)}; "
                              f"uploads may unpack to at most {_mb(MAX_UNZIPPED_BYTES)}.")


#: Entries that mark a ``torch.export.save`` archive (.pt2): the current format, and the one of PyTorch 2.7.
_EXPORTED_PROGRAM_MARKERS = ("archive_format", "serialized_exported_program.json")


def _refuse_exported_program(data: bytes, name: str) -> None:
    """Refuse an exported program (``.pt2``): ``torch.export.load`` can run code from the file.

    Read in torch 2.14 (``torch/export/pt2_archive/_package.py``, ``torch/_export/serde/serialize.py``):
    weights and constants the archive's own config marks ``use_pickle`` are read with
    ``torch.load(weights_only=False)``, "opaque" constants with ``pickle.loads`` and custom objects
    with ``torch._C._pickle_load_obj``; ``deserialize_torch_artifact`` falls back to
    ``weights_only=False`` when the safe load fails; its docstring says "Never load data from an
    untrusted source". Unpickling arbitrary objects executes code, so the app never calls it.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
    if any(n.rsplit("/", 1)[-1] in _EXPORTED_PROGRAM_MARKERS for n in names):
        raise CheckpointError(f"{name} is an exported program (torch.export.save, .pt2). Loading one runs "
                              "torch.export.load, which unpickles objects from the file and can execute code, so "
                              f"this app refuses it. {_SAVE_HINT}")


def _check_legacy_pickles(data: bytes, name: str) -> None:
    """A legacy ``torch.save`` file is five pickles (magic number, protocol, system information,
    the object, storage keys) and then raw storages; the pickles must end within
    :data:`MAX_PICKLE_BYTES`. Scanned opcode by opcode (nothing is built or run)."""
    stream = io.BytesIO(data)
    try:
        for _ in range(5):
            for _op in pickletools.genops(stream):
                if stream.tell() > MAX_PICKLE_BYTES:
                    raise CheckpointError(
                        f"{name} is refused: its pickles run past {MAX_PICKLE_BYTES:,} bytes, and a state_dict's "
                        "pickle (names and tensor shapes) needs far less.")
    except CheckpointError:
        raise
    except Exception as err:  # pickletools raises ValueError and others for malformed streams
        raise CheckpointError(f"{name} is not a readable checkpoint: it starts like a file of PyTorch's "
                              f"legacy format, but its pickles are damaged or cut short. {_SAVE_HINT}") from err


def _torch_load(data: bytes, name: str) -> object:
    """``torch.load(weights_only=True)``; its errors become this app's sentences (the original is chained)."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({printable(found.group(1), 80)})" if found else ""
        raise CheckpointError(f"{name} is not a readable checkpoint: besides tensors it holds a pickled Python "
                              f"object{what}, and this app never unpickles objects. {_SAVE_HINT}") from err
    except Exception as err:  # damaged archive, storage sizes that disagree, cut-short data
        raise CheckpointError(f"{name} is not a readable checkpoint: PyTorch cannot read it, so it is damaged, "
                              f"cut short or not a checkpoint. {_SAVE_HINT}") from err


def _safetensors_load(data: bytes, name: str) -> object:
    from safetensors.torch import load

    if int.from_bytes(data[:8], "little") > MAX_SAFETENSORS_HEADER_BYTES:
        raise CheckpointError(f"{name} is refused: its safetensors header would be larger than "
                              f"{MAX_SAFETENSORS_HEADER_BYTES:,} bytes, far more than a state_dict needs.")
    try:
        return load(data)
    except Exception as err:  # safetensors checks every offset against the bytes present
        raise CheckpointError(f"{name} is not a readable checkpoint: it starts like a safetensors file, but "
                              "its header or data is damaged or cut short. Save the weights again with "
                              "safetensors.torch.save_file(model.state_dict(), path).") from err


def parse_checkpoint(data: bytes, filename: str) -> object:
    """The object stored in an uploaded file, read safely (no arbitrary unpickling, no bombs).

    The format comes from the content (:func:`core.workloads.models.sniff_format`): a
    ``torch.save`` zip (its directory checked by :func:`_check_zip` first), a legacy
    ``torch.save`` pickle stream (its pickles' length checked first) or safetensors.
    """
    name = display_name(filename)
    data = bytes(data)
    kind = sniff_format(data)
    if kind == "torch":
        _check_zip(data, name)
        _refuse_exported_program(data, name)
        return _torch_load(data, name)
    if kind == "torch-legacy":
        _check_legacy_pickles(data, name)
        return _torch_load(data, name)
    if kind == "safetensors":
        return _safetensors_load(data, name)
    raise CheckpointError(f"{name} is not a readable checkpoint: its content is neither a PyTorch file "
                          f"(torch.save) nor a safetensors file, whatever its name says. {_SAVE_HINT}")


def check_size(data: object, name: str, max_bytes: int) -> None:
    """An upload of 1 … ``max_bytes`` bytes (inclusive), else a sentence with both sizes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CheckpointError("The upload is not a file.")
    if len(data) == 0:
        raise CheckpointError(f"{name} is empty (0 bytes).")
    if len(data) > max_bytes:
        raise CheckpointError(f"{name} is {_mb(len(data))}; the limit is {_mb(max_bytes)}.")


def check_tensors(state: dict[str, torch.Tensor], name: str) -> None:
    """Plain dense tensors only (a sparse or other layout could expand when used)."""
    for key, value in state.items():
        if value.layout != torch.strided:
            raise CheckpointError(f"{name}: tensor '{printable(key, 80)}' is not a dense tensor "
                                  f"({printable(value.layout, 40)}). {_SAVE_HINT}")
