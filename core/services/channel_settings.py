"""What a settings JSON records at channel granularity, and reading it back (no Streamlit).

A settings file (:func:`core.services.uploads.settings_json`) says which granularity it was made at:

* ``"granularity": "weight"`` (or no ``granularity`` entry: every file written before channel pruning)
  is the weight-level setting in ``"config"``, as always;
* ``"granularity": "channel"`` adds τ_ch and the channel score (:meth:`ChannelConfig.to_dict`: ``tau_ch``,
  ``layer_tau_ch``, ``norm``, ``fold_bn``), the kept channels (``"channels"``: :meth:`ChannelResult.record`,
  per coupled group the kept indices, as a packed file of the smaller model records them) and what that
  gave (``"channel_result"``: counted MACs and parameters). Its ``"config"`` is the weight-level setting
  applied inside the kept channels (τ = 0: none, in the Explore page's channel mode).

:func:`channel_setting` reads the channel part back: None for a weight-granularity file, a
:class:`ChannelConfig` for a channel one, and :class:`ConfigError` (one sentence) for anything else.
"""
from __future__ import annotations

from collections.abc import Mapping

from core.method.channel_config import ChannelConfig, ChannelError, ChannelResult
from core.method.config import ConfigError

GRANULARITIES: tuple[str, ...] = ("weight", "channel")


def channel_entries(result: ChannelResult) -> dict:
    """The entries a channel-granularity settings file adds (JSON-ready)."""
    return {**result.config.to_dict(), "channels": result.record(),
            "channel_result": {"macs": result.macs, "macs_dense": result.macs_dense, "mac_ratio": result.mac_ratio,
                               "params": result.params, "params_dense": result.params_dense}}


def granularity(data: Mapping) -> str:
    """The granularity a settings record names: ``"weight"`` when it names none (files from before channels)."""
    value = data.get("granularity", "weight") if isinstance(data, Mapping) else "weight"
    if value not in GRANULARITIES:
        raise ConfigError(f"'granularity' must be one of {', '.join(GRANULARITIES)}; got {value!r}")
    return value


def channel_setting(data: Mapping) -> ChannelConfig | None:
    """The channel setting of a settings record, or None for a weight-granularity one; :class:`ConfigError`
    for an unknown granularity or a channel entry out of range (the message names it)."""
    if granularity(data) != "channel":
        return None
    try:
        return ChannelConfig.from_dict(data)
    except ChannelError as err:
        raise ConfigError(f"the channel setting is not usable: {err}") from err
