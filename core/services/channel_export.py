"""The Export page's files in Explore's channel mode: the channel-pruned model, packed and as a ``.pt`` bundle.

:func:`channel_export_files` is the one call behind the page's downloads when the Explore page is
at channel granularity. Both files are written by the functions ``python -m core.tune --granularity
channel`` uses (:mod:`core.measure.tune_channels`):

* the packed file: :func:`core.deploy.packed_writer.compressed_bytes` of the smaller model, with
  its kept channels added to the header by :func:`core.deploy.channel_file.with_channels`, so
  :func:`core.deploy.channel_file.load_compressed` (and the sidebar's upload) rebuilds it with no
  template;
* the bundle: :func:`core.deploy.channel_file.channel_bundle_bytes` (read back with
  :func:`core.deploy.channel_file.load_channel_bundle`).

As on the Explore page, channel mode is pure channel pruning: the weight-level τ and θ are not
applied inside the kept channels (the packed file's setting is τ = 0, unquantized). When the
Explore page's channel repair of this setting has run (any session's, cached process-wide by
:meth:`core.services.channel_session.ChannelSession.cached_repair`), the files hold the repaired
model and the packed header records the repair; a repair chosen but not run is not run here (the
result says so). The loaded model, the shared pruner and the repair are only read.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from core.common.lru import LRUCache
from core.deploy.channel_file import channel_bundle_bytes, with_channels
from core.deploy.packed_writer import compressed_bytes
from core.method.channel_config import ChannelResult
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.services.session import ExploreSession
from core.services.uploads import settings_json

#: the weight-level setting inside the kept channels: none (Explore's channel mode applies no τ/θ there)
INSIDE = CompressionConfig()
_FILES = LRUCache(4)  # (model key, ChannelConfig, repair level carried) -> (the repair, ChannelFiles)


@dataclass(frozen=True)
class ChannelFiles:
    """The channel-pruned model's files and what they carry.

    * ``packed``: the packed file's bytes; ``bundle``: the ``.pt`` bundle's bytes.
    * ``level``: the channel repair the files carry (``"none"``: the smaller model as cut);
      ``requested``: the level asked for (differs from ``level`` when that repair has not run yet).
    * ``record``: the channel record both files store (:meth:`ChannelResult.record`, in the dense
      architecture's channel indices).
    """

    packed: bytes
    bundle: bytes
    level: str
    requested: str
    record: dict
    seconds: float = 0.0  # the carried repair's wall time (measured when it ran)
    n_images: int = 0  # the calibration images it was fitted on


def dense_record(result: ChannelResult, loaded_channels: Mapping | None) -> dict:
    """``result``'s channel record in the dense architecture's indices.

    A model rebuilt from a channel-pruned file (``loaded_channels``: its record) is already smaller: its
    channel ``i`` of a group is the dense architecture's ``loaded_channels["kept"][group][i]``.
    """
    record = result.record()
    if not loaded_channels:
        return record
    before = loaded_channels.get("kept") or {}
    kept = {name: list(channels) for name, channels in before.items()}
    for name, channels in record["kept"].items():
        kept[name] = [before[name][i] for i in channels] if name in before else list(channels)
    return {**record, "kept": kept}


def channel_export_files(session: ExploreSession, result: ChannelResult, level: str = "none") -> ChannelFiles:
    """The packed file and ``.pt`` bundle of ``result`` (Explore's channel-pruned model of ``session``).

    ``level``: the Explore page's channel repair level; its repaired model goes into the files when
    that repair has run for ``result.config``, else the files hold ``result.model`` as cut (see
    :class:`ChannelFiles`). Cached per (model, setting, carried repair).
    """
    channels, loaded = session.channels, session.loaded
    requested = channels.applied_level(level)
    repaired = channels.cached_repair(result.config, requested)
    carried = requested if repaired is not None else "none"
    key = (session.key, result.config, carried)
    source, found = _FILES.get(key, (None, None))
    if found is not None and source is repaired:  # the same repair (None: none) as when the files were made
        return found if found.requested == requested else replace(found, requested=requested)
    record = dense_record(result, loaded.channels)
    input_spec = None if loaded.preprocess is None else loaded.preprocess.to_dict()
    packed = compressed_bytes(Engine(result.model).apply(INSIDE), loaded.arch, loaded.arch_kwargs,
                              input_spec=input_spec, repaired=repaired)
    settings = settings_json(INSIDE, loaded, repair=carried, channels=result)
    model = result.model if repaired is None else repaired.model
    files = ChannelFiles(packed=with_channels(packed, record),
                         bundle=channel_bundle_bytes(model, record, loaded.arch, loaded.arch_kwargs, settings=settings),
                         level=carried, requested=requested, record=record,
                         seconds=0.0 if repaired is None else float(repaired.seconds),
                         n_images=0 if repaired is None else int(repaired.n_images))
    _FILES.put(key, (repaired, files))
    return files


def clear_caches() -> None:
    """Forget the cached files (tests)."""
    _FILES.clear()
