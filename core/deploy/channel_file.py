"""Files of a channel-pruned model that load back with no template: the packed file and the ``.pt`` bundle.

A channel-pruned model's tensors are smaller than its architecture's, so a file must say which
channels were kept. Both files record :meth:`core.method.channels.ChannelResult.record`
(``{"granularity": "channel", "tau_ch", "layer_tau_ch", "norm", "fold_bn", "kept": {group: [kept
channel indices]}}``) and the architecture; reading builds the dense architecture, traces it
with Torch-Pruning, keeps exactly the recorded channels (:meth:`ChannelPruner.apply_kept`)
and loads the file's weights into that smaller module.

* Packed file: the packed format of :mod:`core.deploy.packed_writer` unchanged (same table, same
  data), with one more header entry, ``"channels"``, covered by the header's SHA256 like every
  other entry. :func:`save_channel_compressed` writes it; :func:`load_compressed` reads any packed
  file (a channel file, or an ordinary one exactly as :func:`core.deploy.packed_reader.load_compressed`).
* ``.pt`` bundle: the app's bundle format (``torch.save`` dict of plain tensors and strings, read
  with ``weights_only=True``) with a ``"channels"`` entry (JSON text). :func:`channel_bundle_bytes`
  / :func:`load_channel_bundle`.

A file loaded into the wrong architecture (a group it names does not exist, a kept index is out
of range, or a tensor's shape differs) raises :class:`core.method.channels.ChannelError` or the
packed reader's error, with a sentence naming the file.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from core.deploy.packed_layout import METADATA_KEY, file_digest
from core.deploy.packed_reader import parse_compressed
from core.deploy.packed_validation import read_file_bytes
from core.deploy.packed_writer import compressed_bytes
from core.method.channels import ChannelConfig, ChannelError, ChannelPruner
from core.workloads.models import MAX_FILE_PARAMS, load_state_dict_into
from core.workloads.provenance import build_file_arch

BUNDLE_FORMAT = "boundary-explorer/state_dict+masks/v1"  # the app's bundle (core.services.uploads)
CHANNELS_KEY = "channels"


def check_record(record: object, label: str) -> dict:
    """The channel record of a file, checked for types (groups → lists of whole numbers)."""
    if not isinstance(record, Mapping) or record.get("granularity") != "channel" \
            or not isinstance(record.get("kept"), Mapping):
        raise ChannelError(f"{label} has a damaged channel record (it must name the kept channels per group)")
    for name, kept in record["kept"].items():
        if not isinstance(name, str) or not isinstance(kept, list) or \
                not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
            raise ChannelError(f"{label} has a damaged channel record (group {str(name)[:60]!r})")
    return dict(record)


def channel_model(dense: nn.Module, record: Mapping, label: str = "the file",
                  example_input: torch.Tensor | None = None) -> nn.Module:
    """The smaller module ``record`` describes, cut from ``dense`` (never modified); its weights are dense's kept ones."""
    record = check_record(record, label)
    config = ChannelConfig.from_dict({k: v for k, v in record.items() if k not in ("kept", "input_shape")})
    shape = record.get("input_shape")
    if example_input is None and isinstance(shape, list) and shape and len(shape) <= 4 \
            and all(isinstance(d, int) and 0 < d <= 4096 for d in shape):
        example_input = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    try:
        return ChannelPruner(dense, example_input).apply_kept(record["kept"], config).model
    except ChannelError as err:
        raise ChannelError(f"{label}: {err}") from err


def channel_template(arch: str, arch_kwargs: Mapping, record: Mapping, label: str = "the file",
                     max_params: int = MAX_FILE_PARAMS) -> nn.Module:
    """The smaller module of architecture ``arch`` that ``record`` describes (weights to be loaded)."""
    dense = build_file_arch(arch, dict(arch_kwargs), label, max_params)
    return channel_model(dense, record, label)


# ---------------------------------------------------------------- the packed file

def with_channels(packed: bytes, record: Mapping) -> bytes:
    """A packed file's bytes with ``record`` added to its header (SHA256 recomputed; table and data unchanged)."""
    from safetensors.torch import load, save

    length = int.from_bytes(packed[:8], "little")
    metadata = json.loads(packed[8:8 + length])["__metadata__"]
    header = json.loads(metadata[METADATA_KEY])
    tensors = load(packed)
    header[CHANNELS_KEY] = check_record(record, "the record")
    header["sha256"] = file_digest(header, tensors["table"].numpy().tobytes(), tensors["data"].numpy())
    return save(tensors, metadata={METADATA_KEY: json.dumps(header, separators=(",", ":"))})


def save_channel_compressed(result, record: Mapping, path: str | os.PathLike, arch: str | None = None,
                            arch_kwargs: Mapping | None = None, **kwargs) -> Path:
    """Write an engine result on the *smaller* model (``Engine(channel_result.model).apply(...)``) as a
    packed file recording ``record`` (:meth:`ChannelResult.record`); ``kwargs`` go to ``compressed_bytes``
    (``repaired=``, ``input_spec=``). Returns the path."""
    if arch is None:
        raise ValueError("a channel-pruned packed file needs arch= (the dense architecture it was cut from)")
    data = with_channels(compressed_bytes(result, arch, arch_kwargs, **kwargs), record)
    path = Path(path)
    path.write_bytes(data)
    return path


def load_compressed(path: str | os.PathLike, model_template: nn.Module | None = None) -> nn.Module:
    """Any packed model file, in eval mode: a channel-pruned one is rebuilt from its recorded architecture
    and kept channels with no template; any other exactly as :func:`core.deploy.packed_reader.load_compressed`."""
    label = Path(path).name
    packed = parse_compressed(read_file_bytes(path), label)
    record = packed.header.get(CHANNELS_KEY)
    if record is None or model_template is not None:
        return packed.load(model_template)
    if packed.arch is None:
        raise ChannelError(f"{label} records kept channels but no architecture: it cannot be rebuilt")
    return packed.load(channel_template(packed.arch, packed.arch_kwargs, record, label))


# ---------------------------------------------------------------- the .pt bundle

def channel_bundle_bytes(model: nn.Module, record: Mapping, arch: str, arch_kwargs: Mapping | None = None,
                         settings: str | None = None) -> bytes:
    """``torch.save`` bytes of the smaller model's state_dict, its architecture and its channel record."""
    payload = {
        "format": BUNDLE_FORMAT,
        "arch": arch,
        "arch_kwargs": json.dumps(dict(arch_kwargs or {})),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        CHANNELS_KEY: json.dumps(check_record(record, "the record")),
        **({"settings": settings} if settings is not None else {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_channel_bundle(source: str | os.PathLike | bytes, label: str | None = None) -> nn.Module:
    """The smaller model of a channel bundle (a path or its bytes), loaded with ``weights_only=True``."""
    data = Path(source).read_bytes() if not isinstance(source, (bytes, bytearray)) else bytes(source)
    label = label or (Path(source).name if not isinstance(source, (bytes, bytearray)) else "the bundle")
    stored = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(stored, dict) or stored.get("format") != BUNDLE_FORMAT or CHANNELS_KEY not in stored:
        raise ChannelError(f"{label} is not a channel-pruned bundle of this app (no channel record)")
    try:
        record = json.loads(stored[CHANNELS_KEY])
        kwargs = json.loads(stored.get("arch_kwargs") or "{}")
    except (TypeError, ValueError) as err:
        raise ChannelError(f"{label} has a damaged channel record") from err
    model = channel_template(stored["arch"], kwargs, record, label)
    return load_state_dict_into(model, stored["state_dict"], label).eval()
