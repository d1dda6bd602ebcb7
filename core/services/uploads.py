"""Safe uploads, and exports that load back.

* :func:`read_upload` turns uploaded bytes into a model of a built-in architecture or of any
  torchvision classification architecture (``arch="torchvision:<name>"``, number of classes read
  from the weights): ``torch.load(weights_only=True)`` or safetensors, never unpickling objects; the format is
  told from the content (never from the file name, which is only ever shown, never used as a
  path); a :class:`core.workloads.models.CheckpointError` whose message is whole sentences of
  this app (never a library's text) says what is wrong for every bad file.
* :func:`export_bundle` / :func:`settings_json` / :func:`packed_bytes` are what the app offers
  for download; an exported bundle is a ``torch.save`` dict of plain tensors and strings that
  :func:`read_upload` loads back (architecture recognised from the bundle). Settings are
  stored in the one serialised form, :meth:`CompressionConfig.to_dict`; :func:`read_settings`
  reads them back. Every export records where the model came from (``arch``, ``arch_kwargs`` and,
  for torchvision models, the pre-processing under ``input``), so that it loads back without a
  template; files without ``input`` (older exports) take the defaults.

A hostile file must cost the server no more than its size: every limit below is checked before
anything of the size a file declares is allocated (the zip directory of a ``torch.save`` file
before ``torch.load`` inflates an entry; the pickles of a legacy file before they are
unpickled; a packed file's table and shapes in :func:`core.deploy.packed_reader.parse_compressed`;
constructor arguments before a model is built).

Nothing here imports Streamlit.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import pickletools
import re
import struct
import time
import zipfile
from dataclasses import replace

import torch
from torch import nn

from core.common.formatting import fmt_bytes
from core.method.config import CompressionConfig, ConfigError
from core.method.engine import CompressionResult
from core.services import recorded
from core.services.choices import LoadedModel, model_inputs, torchvision_loaded
from core.services.recorded import config_summary
from core.services.repairs import check_level, level_from_settings
from core.workloads import torchvision_models as tv
from core.workloads.models import (
    CheckpointError,
    load_state_dict_into,
    sniff_format,
    state_dict_from_object,
)
from core.workloads.preprocess import Preprocess
from core.workloads.provenance import build_file_arch, check_file_arch
from core.common.formatting import printable

BUNDLE_FORMAT = "boundary-explorer/state_dict+masks/v1"
SETTINGS_FORMAT = "boundary-explorer/settings/v1"

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
#: A settings JSON: 1 MB (an export is 2-20 KB); the Export page's uploader has the same limit.
MAX_SETTINGS_MB = 1
MAX_SETTINGS_BYTES = MAX_SETTINGS_MB * 10**6
#: Characters of a file name shown in messages (the middle of longer names is elided).
MAX_SHOWN_NAME_CHARS = 80

_ZIP_DIRECTORY_ENTRY = b"PK\x01\x02"  # every entry of a zip's central directory starts with it
_SAVE_HINT = "Save the weights with torch.save(model.state_dict(), path) and upload that file."


# ---------------------------------------------------------------- uploads

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


def _check_size(data: object, name: str, max_bytes: int) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CheckpointError("The upload is not a file.")
    if len(data) == 0:
        raise CheckpointError(f"{name} is empty (0 bytes).")
    if len(data) > max_bytes:
        raise CheckpointError(f"{name} is {_mb(len(data))}; the limit is {_mb(max_bytes)}.")


def _bundle_input(stored: dict, name: str) -> Preprocess | None:
    """An exported bundle's recorded pre-processing (JSON text under ``input``), or None (older bundles)."""
    text = stored.get("input")
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    return Preprocess.from_dict(data, name)


def _bundle_fields(stored: object, name: str) -> tuple[str | None, dict, str | None]:
    """An exported bundle's architecture, its constructor arguments and its settings JSON (or Nones)."""
    if not (isinstance(stored, dict) and stored.get("format") == BUNDLE_FORMAT):
        return None, {}, None
    arch = stored.get("arch") if isinstance(stored.get("arch"), str) else None
    settings = stored.get("settings") if isinstance(stored.get("settings"), str) else None
    kwargs: object = {}
    if "arch_kwargs" in stored:
        text = stored["arch_kwargs"]
        try:
            kwargs = json.loads(text) if isinstance(text, str) else None
        except (ValueError, RecursionError):
            kwargs = None
        if not isinstance(kwargs, dict):
            raise CheckpointError(f"{name} is damaged: its architecture arguments are not a JSON object of "
                                  "names and numbers. Export the model again from the Export page.")
    return arch, kwargs, settings


def _check_tensors(state: dict[str, torch.Tensor], name: str) -> None:
    """Plain dense tensors only (a sparse or other layout could expand when used)."""
    for key, value in state.items():
        if value.layout != torch.strided:
            raise CheckpointError(f"{name}: tensor '{printable(key, 80)}' is not a dense tensor "
                                  f"({printable(value.layout, 40)}). {_SAVE_HINT}")


def _max_params(arch: str) -> int:
    """Uploads of registry models: :data:`MAX_UPLOAD_PARAMS`; of torchvision models: 100 M parameters."""
    return tv.MAX_TORCHVISION_PARAMS if tv.is_torchvision(arch) else MAX_UPLOAD_PARAMS


def _uploaded(digest: str, name: str, arch: str, model: nn.Module, kwargs: dict, preprocess: Preprocess | None,
              note: str) -> LoadedModel:
    description, _, preprocess = model_inputs(arch, kwargs, preprocess)
    if preprocess is not None:
        note += f"; input: {preprocess.describe()}"
    return torchvision_loaded(f"upload:{digest[:16]}" + (f"@{preprocess.tag()}" if preprocess else ""),
                              f"Uploaded: {name} ({description})", arch, model.eval(), kwargs, preprocess,
                              note, name)


def read_upload(data: bytes, filename: str, arch: str | None = None,
                max_bytes: int = MAX_UPLOAD_BYTES, preprocess: Preprocess | None = None) -> LoadedModel:
    """A :class:`LoadedModel` from an uploaded state_dict (or an exported bundle or packed file of this app).

    ``arch``: a registry name or ``torchvision:<name>``, or None to take it from an exported file.
    For torchvision architectures the number of classes (and a ViT's image size) is read from the
    state_dict, and the architecture may hold up to 100 M parameters. ``preprocess``: the input
    recipe of an image model (default: what the file records, else ImageNet's 224 px). Every
    problem (too large, empty, unreadable, a zip bomb, not a state_dict, wrong or oversized
    architecture, non-finite weights) raises :class:`CheckpointError` with a message meant
    for the user. ``max_bytes`` is inclusive: a file of exactly that size is read.
    """
    name = display_name(filename)
    _check_size(data, name, max_bytes)
    data = bytes(data)
    if is_packed(data):
        return _read_packed(data, name, arch, preprocess)
    stored = parse_checkpoint(data, name)
    bundle_arch, bundle_kwargs, settings = _bundle_fields(stored, name)
    chosen = arch or bundle_arch
    if chosen is None:
        raise CheckpointError(f"{name} does not say which architecture it is for. Pick its architecture "
                              "above the uploader and upload it again.")
    if preprocess is None and isinstance(stored, dict) and chosen == bundle_arch:
        preprocess = _bundle_input(stored, name)
    state = state_dict_from_object(stored, name)
    _check_tensors(state, name)
    notes: list[str] = []
    if tv.is_torchvision(chosen):
        extra = {k: v for k, v in bundle_kwargs.items() if k == "transform_input"} if chosen == bundle_arch else {}
        model, kwargs, notes = tv.from_state_dict(chosen, state, name, tv.MAX_TORCHVISION_PARAMS, extra)
    else:
        kwargs = check_file_arch(chosen, bundle_kwargs if chosen == bundle_arch else {}, name, MAX_UPLOAD_PARAMS)
        model = load_state_dict_into(build_file_arch(chosen, kwargs, name, MAX_UPLOAD_PARAMS), state, name)
        tv.check_finite(model, name)
    digest = hashlib.sha256(data).hexdigest()
    note = f"uploaded {name} ({fmt_bytes(len(data))}, sha256 {digest[:12]}…), loaded with weights_only=True"
    if notes:
        note += "; " + "; ".join(notes)
    if settings:
        note += "; exported by this app with settings " + _settings_summary(settings)
    loaded = _uploaded(digest, name, chosen, model, kwargs, preprocess, note)
    return replace(loaded, recorded=recorded.from_settings(settings, len(data)))


def is_packed(data: bytes) -> bool:
    """Whether ``data`` is a packed model file (:mod:`core.deploy.packed_layout`: safetensors with its header)."""
    from core.deploy.packed_validation import MAX_HEADER_BYTES, METADATA_KEY

    if sniff_format(data) != "safetensors":
        return False
    length = int.from_bytes(data[:8], "little")
    if length > MAX_HEADER_BYTES:
        return False
    try:
        header = json.loads(data[8:8 + length])
    except (ValueError, RecursionError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and METADATA_KEY in metadata


def _read_packed(data: bytes, name: str, arch: str | None, preprocess: Preprocess | None = None) -> LoadedModel:
    """A packed file (codes + scales per chunk), checked and decoded by :mod:`core.deploy.packed_reader` from
    memory (no temporary file). The table may describe up to 100 M values (torchvision models); a
    registry architecture is held to :data:`MAX_UPLOAD_PARAMS`, and the table must fit the model
    built from checked arguments before anything is decoded."""
    from core.deploy.packed_reader import parse_compressed

    packed = parse_compressed(data, name, tv.MAX_TORCHVISION_PARAMS)
    chosen = packed.arch or arch
    if chosen is None:
        raise CheckpointError(f"{name} records no architecture. Pick its architecture above the uploader and "
                              "upload it again.")
    limit = _max_params(chosen)
    kwargs = check_file_arch(chosen, packed.arch_kwargs, name, limit)
    model = packed.load(None if packed.arch else build_file_arch(chosen, kwargs, name, limit))
    model = model.float()  # the explorer works in fp32; the packed weights are exact fp32 values
    tv.check_finite(model, name)
    if preprocess is None and packed.input_spec is not None:
        preprocess = Preprocess.from_dict(packed.input_spec, name)
    digest = hashlib.sha256(data).hexdigest()
    note = (f"uploaded packed model {name} ({fmt_bytes(len(data))}, sha256 {digest[:12]}…), compressed with "
            + config_summary(packed.config))
    loaded = _uploaded(digest, name, chosen, model, kwargs, preprocess, note)
    layers = [(r.kept, math.prod(r.shape)) for r in packed.layers]
    return replace(loaded, recorded=recorded.from_packed(packed.config, packed.header, len(data), layers))


def packed_bytes(result: CompressionResult, loaded: LoadedModel) -> bytes:
    """The result as a packed file of :mod:`core.deploy.packed_writer` (codes + scales per chunk, bit-packed)."""
    from core.deploy.packed_writer import compressed_bytes

    return compressed_bytes(result, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs,
                            input_spec=None if loaded.preprocess is None else loaded.preprocess.to_dict())


def _settings_summary(text: str) -> str:
    try:
        return config_summary(read_settings(text))
    except ConfigError:
        return "(unreadable)"


# ---------------------------------------------------------------- exports

def read_settings(text: str | bytes, max_bytes: int = MAX_SETTINGS_BYTES) -> CompressionConfig:
    """The setting stored in a settings JSON (or a bare config object); :class:`ConfigError` if unusable.

    Files over ``max_bytes`` (1 MB) are refused before parsing; so is nesting too deep for
    Python's JSON parser (a RecursionError).
    """
    size = len(text) if isinstance(text, (bytes, bytearray)) else len(str(text).encode("utf-8", "replace"))
    if size > max_bytes:
        raise ConfigError(f"the settings file is {size:,} bytes, and settings files are at most {max_bytes:,} "
                          "(an export is a few kilobytes)")
    try:
        data = json.loads(text)
    except RecursionError as err:
        raise ConfigError("the settings file is nested too deeply to be a settings file") from err
    except ValueError as err:  # UnicodeDecodeError included
        raise ConfigError("the settings file is not valid JSON") from err
    return CompressionConfig.from_dict(data)


def read_settings_repair(text: str | bytes, max_bytes: int = MAX_SETTINGS_BYTES) -> str | None:
    """The repair level a settings JSON asks for, or None when it names none (a bare config).

    Backward compatible: a file from before the levels, with ``"bn_recalibrated": true``, gives
    ``"bn"`` (false: ``"none"``); a ``"repair"`` entry wins. :class:`ConfigError` for an unknown
    level or a file :func:`read_settings` refuses.
    """
    read_settings(text, max_bytes)  # the same checks (size, JSON, a usable config) first
    data = json.loads(text)
    try:
        return level_from_settings(data)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def settings_json(config: CompressionConfig, loaded: LoadedModel, result: CompressionResult | None = None,
                  bn_recalibrated: bool = False, repair: str | None = None) -> str:
    """The settings (and what they gave) as JSON, to reproduce or share a view.

    ``repair``: the Explore page's repair level (:data:`core.services.repairs.LEVELS`), written as
    ``"repair"``; ``"bn_recalibrated"`` stays for older readers (true for every level above
    ``"none"``, which all recalibrate BatchNorm). Without ``repair`` the file is as before.
    """
    if repair is not None:
        bn_recalibrated = check_level(repair) != "none"
    payload = {
        "format": SETTINGS_FORMAT,
        "model": {"key": loaded.key, "arch": loaded.arch, "label": loaded.label, "source": loaded.source,
                  "trained": loaded.trained, **loaded.provenance()},
        "config": config.to_dict(),
        "bn_recalibrated": bool(bn_recalibrated),
        **({"repair": repair} if repair is not None else {}),
        "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_version": torch.__version__,
    }
    if result is not None:
        payload["result"] = {
            "retention": result.retention, "compute_reduction": result.compute_reduction,
            "model_bytes_fp32": result.model_bytes_fp32, "model_bytes_compressed": result.model_bytes_compressed,
            "layers": result.stats[["name", "tau", "beta", "kept", "numel", "n_high", "n_low"]].to_dict("records"),
        }
    return json.dumps(payload, indent=2, default=float)


def export_bundle(result: CompressionResult, loaded: LoadedModel, model: nn.Module | None = None,
                  bn_recalibrated: bool = False) -> bytes:
    """``torch.save`` bytes of the compressed model's state_dict, its keep-masks and the settings.

    ``model``: the module to export (default ``result.model``; pass the BN-recalibrated copy
    to export that). The masks (the weight's state_dict key, ``"<layer>.weight"`` or an attention's
    ``"….in_proj_weight"`` → bool) can be re-applied with
    ``torch.nn.utils.prune.custom_from_mask``. :func:`read_upload` loads the bundle back.
    """
    module = result.model if model is None else model
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    weights = result.weights
    masks = {result._engine.parameter_name(name): (weights[name] != 0).cpu() for name in result.stats["name"]}
    payload = {
        "format": BUNDLE_FORMAT,
        "arch": loaded.arch,
        "arch_kwargs": json.dumps(loaded.arch_kwargs),
        **({"input": json.dumps(loaded.preprocess.to_dict())} if loaded.preprocess is not None else {}),
        "state_dict": state,
        "masks": masks,
        "settings": settings_json(result.config, loaded, result, bn_recalibrated),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()
