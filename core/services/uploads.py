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

A hostile file must cost the server no more than its size: the bytes are read by
:mod:`core.services.safe_files` (its limits are checked before anything of the size a file
declares is allocated: the zip directory of a ``torch.save`` file before ``torch.load`` inflates an
entry; the pickles of a legacy file before they are unpickled); a packed file's table and shapes
are checked in :func:`core.deploy.packed_reader.parse_compressed`, constructor arguments before a
model is built.

Nothing here imports Streamlit.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from core.common.formatting import fmt_bytes, printable
from core.deploy.channel_file import CHANNELS_KEY, channel_template, load_channel_bundle
from core.method.channel_config import ChannelConfig, ChannelError, ChannelResult
from core.method.config import CompressionConfig, ConfigError
from core.method.engine import CompressionResult
from core.services import recorded
from core.services.channel_settings import channel_entries, channel_setting
from core.services.choices import LoadedModel, model_inputs, torchvision_loaded
from core.services.recorded import config_summary
from core.services.repairs import check_level, level_from_settings
from core.services.safe_files import (  # noqa: F401 (the limits and the reader, importable from here as before)
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_MB,
    MAX_UPLOAD_PARAMS,
    check_size,
    check_tensors,
    display_name,
    parse_checkpoint,
)
from core.workloads import torchvision_models as tv
from core.workloads.models import (
    CheckpointError,
    load_state_dict_into,
    sniff_format,
    state_dict_from_object,
)
from core.workloads.preprocess import Preprocess
from core.workloads.provenance import build_file_arch, check_file_arch

BUNDLE_FORMAT = "boundary-explorer/state_dict+masks/v1"
SETTINGS_FORMAT = "boundary-explorer/settings/v1"

#: A settings JSON: 1 MB (an export is 2-20 KB); the Export page's uploader has the same limit.
MAX_SETTINGS_MB = 1
MAX_SETTINGS_BYTES = MAX_SETTINGS_MB * 10**6


# ---------------------------------------------------------------- uploads

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
    check_size(data, name, max_bytes)
    data = bytes(data)
    if is_packed(data):
        return _read_packed(data, name, arch, preprocess)
    stored = parse_checkpoint(data, name)
    bundle_arch, bundle_kwargs, settings = _bundle_fields(stored, name)
    if bundle_arch is not None and CHANNELS_KEY in stored:  # a channel-pruned bundle: the smaller model
        return _read_channel_bundle(data, stored, name, arch, bundle_arch, bundle_kwargs, settings, preprocess)
    chosen = arch or bundle_arch
    if chosen is None:
        raise CheckpointError(f"{name} does not say which architecture it is for. Pick its architecture "
                              "above the uploader and upload it again.")
    if preprocess is None and isinstance(stored, dict) and chosen == bundle_arch:
        preprocess = _bundle_input(stored, name)
    state = state_dict_from_object(stored, name)
    check_tensors(state, name)
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
    channels = packed.header.get(CHANNELS_KEY)
    if channels is not None:  # channel-pruned: the smaller module its kept channels describe, then its weights
        with _channel_errors(name, chosen):
            model = packed.load(channel_template(chosen, kwargs, channels, name, limit))
    else:
        model = packed.load(None if packed.arch else build_file_arch(chosen, kwargs, name, limit))
    model = model.float()  # the explorer works in fp32; the packed weights are exact fp32 values
    tv.check_finite(model, name)
    if preprocess is None and packed.input_spec is not None:
        preprocess = Preprocess.from_dict(packed.input_spec, name)
    digest = hashlib.sha256(data).hexdigest()
    note = (f"uploaded packed model {name} ({fmt_bytes(len(data))}, sha256 {digest[:12]}…), compressed with "
            + config_summary(packed.config) + (f"; {_channels_note(channels)}" if channels is not None else ""))
    loaded = _uploaded(digest, name, chosen, model, kwargs, preprocess, note)
    layers = [(r.kept, math.prod(r.shape)) for r in packed.layers]
    return replace(loaded, recorded=recorded.from_packed(packed.config, packed.header, len(data), layers),
                   channels=dict(channels) if channels is not None else None)


@contextmanager
def _channel_errors(name: str, arch: str):
    """A channel file that does not fit ``arch`` (a group it names is missing, an index or a shape differs):
    one sentence of this app, never a traceback."""
    try:
        yield
    except CheckpointError:
        raise
    except (ChannelError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{name} is a channel-pruned model that cannot be rebuilt as {arch}: "
                              f"{printable(err, 240)}. Upload it with the architecture it was exported from.") from err


def _channels_note(record: object) -> str:
    kept = record.get("kept") if isinstance(record, dict) else None
    if not isinstance(kept, dict):
        return "channel-pruned"
    total = sum(len(v) for v in kept.values() if isinstance(v, list))
    return f"channel-pruned (τ_ch {record.get('tau_ch')}, {total:,} channels kept in {len(kept)} groups)"


def _read_channel_bundle(data: bytes, stored: dict, name: str, arch: str | None, bundle_arch: str,
                         bundle_kwargs: dict, settings: str | None, preprocess: Preprocess | None) -> LoadedModel:
    """A channel-pruned ``.pt`` bundle (:func:`core.deploy.channel_file.load_channel_bundle`): rebuilt from its
    recorded architecture and kept channels, no template; an explicitly chosen other architecture is refused."""
    if arch is not None and arch != bundle_arch:
        raise CheckpointError(f"{name} is a channel-pruned {bundle_arch}, not a {arch}: its kept channels describe "
                              f"that architecture only. Pick {bundle_arch} (or let the file say) and upload it again.")
    with _channel_errors(name, bundle_arch):
        model = load_channel_bundle(data, name)
    tv.check_finite(model, name)
    digest = hashlib.sha256(data).hexdigest()
    try:
        record = json.loads(stored[CHANNELS_KEY])
    except (TypeError, ValueError, RecursionError):
        record = None
    if preprocess is None:
        preprocess = _bundle_input(stored, name)
    note = (f"uploaded {name} ({fmt_bytes(len(data))}, sha256 {digest[:12]}…), loaded with weights_only=True; "
            + _channels_note(record))
    if settings:
        note += "; exported by this app with settings " + _settings_summary(settings)
    loaded = _uploaded(digest, name, bundle_arch, model, bundle_kwargs, preprocess, note)
    return replace(loaded, recorded=recorded.from_settings(settings, len(data)),
                   channels=record if isinstance(record, dict) else None)


def packed_bytes(result: CompressionResult, loaded: LoadedModel) -> bytes:
    """The result as a packed file of :mod:`core.deploy.packed_writer` (codes + scales per chunk, bit-packed)."""
    from core.deploy.packed_writer import compressed_bytes

    return with_record(compressed_bytes(result, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs,
                                        input_spec=None if loaded.preprocess is None else loaded.preprocess.to_dict()),
                       loaded)


def with_record(packed: bytes, loaded: LoadedModel) -> bytes:
    """``packed`` with ``loaded``'s channel record in its header when it was rebuilt from a channel-pruned file
    (so the file loads back as that smaller model, with no template); else ``packed`` unchanged."""
    if loaded.channels is None:
        return packed
    from core.deploy.channel_file import with_channels

    return with_channels(packed, loaded.channels)


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


def read_settings_channels(text: str | bytes, max_bytes: int = MAX_SETTINGS_BYTES) -> ChannelConfig | None:
    """The channel setting a settings JSON records (``"granularity": "channel"``), or None for a weight-granularity
    file (every file from before channel pruning); :class:`ConfigError` for a file :func:`read_settings` refuses or
    an unusable channel entry."""
    read_settings(text, max_bytes)  # the same checks (size, JSON, a usable config) first
    return channel_setting(json.loads(text))


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
                  bn_recalibrated: bool = False, repair: str | None = None, channels: ChannelResult | None = None) -> str:
    """The settings (and what they gave) as JSON, to reproduce or share a view.

    ``repair``: the Explore page's repair level (:data:`core.services.repairs.LEVELS`), written as
    ``"repair"``; ``"bn_recalibrated"`` stays for older readers (true for every level above
    ``"none"``, which all recalibrate BatchNorm). Without ``repair`` the file is as before.
    ``"granularity"`` is ``"weight"``, or with ``channels`` (the channel-pruned view) ``"channel"`` plus τ_ch,
    the score, the kept channels and the counted MACs (:func:`core.services.channel_settings.channel_entries`).
    """
    if repair is not None:
        bn_recalibrated = check_level(repair) != "none"
    payload = {
        "format": SETTINGS_FORMAT,
        "model": {"key": loaded.key, "arch": loaded.arch, "label": loaded.label, "source": loaded.source,
                  "trained": loaded.trained, **loaded.provenance()},
        "config": config.to_dict(),
        "granularity": "weight",
        **(channel_entries(channels) if channels is not None else {}),
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
        # a model rebuilt from a channel-pruned file: its kept channels again, so the upload rebuilds it (no template)
        **({CHANNELS_KEY: json.dumps(loaded.channels)} if loaded.channels is not None else {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()
