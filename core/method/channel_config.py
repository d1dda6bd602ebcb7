"""Channel pruning's setting and result types: :class:`ChannelConfig`, :class:`ChannelGroup`, :class:`ChannelResult`.

The rule they describe is :mod:`core.method.channels`'s (β = τ_ch · max_c s_c per coupled group).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

NORMS: tuple[str, ...] = ("l2", "l1")


class ChannelError(ValueError):
    """A model or a setting that channel pruning cannot serve; the message names the module or value."""


# ---------------------------------------------------------------- the setting

@dataclass(frozen=True)
class ChannelConfig:
    """A channel-granularity setting.

    * ``tau``: τ_ch ∈ [0, 1]; β = τ_ch · max_c s_c per group; 0 keeps every channel.
    * ``layer_tau``: per-layer overrides ``{layer name: τ}``; a layer's τ applies to the group
      its output channels belong to (stored as sorted pairs; a dict is accepted).
    * ``norm``: ``"l2"`` (default) or ``"l1"``, the norm of a channel's producing weights.
    * ``fold_bn``: score the weights with the following BatchNorm's scale γ/σ folded in (default).
    """

    tau: float = 0.0
    layer_tau: tuple[tuple[str, float], ...] = ()
    norm: str = "l2"
    fold_bn: bool = True

    def __post_init__(self) -> None:
        _check_tau("tau", self.tau)
        pairs = self.layer_tau.items() if isinstance(self.layer_tau, Mapping) else self.layer_tau
        clean = []
        for item in pairs:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                raise ChannelError(f"layer_tau must map layer names to τ values; got {item!r}")
            _check_tau(f"layer_tau['{item[0]}']", item[1])
            clean.append((item[0], float(item[1])))
        object.__setattr__(self, "layer_tau", tuple(sorted(clean)))
        object.__setattr__(self, "tau", float(self.tau))
        if not isinstance(self.fold_bn, bool):
            raise ChannelError(f"fold_bn must be True or False; got {self.fold_bn!r}")
        if self.norm not in NORMS:
            raise ChannelError(f"norm must be one of {', '.join(NORMS)}; got {self.norm!r}")

    def to_dict(self) -> dict:
        return {"granularity": "channel", "tau_ch": self.tau, "layer_tau_ch": dict(self.layer_tau), "norm": self.norm,
                "fold_bn": self.fold_bn}

    @classmethod
    def from_dict(cls, data: Mapping) -> ChannelConfig:
        if not isinstance(data, Mapping) or data.get("granularity") != "channel":
            raise ChannelError("not a channel-granularity setting (granularity must be 'channel')")
        return cls(tau=data.get("tau_ch", 0.0), layer_tau=dict(data.get("layer_tau_ch") or {}),
                   norm=data.get("norm", "l2"), fold_bn=bool(data.get("fold_bn", True)))


def _check_tau(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ChannelError(f"{name} must be a number in [0, 1]; got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ChannelError(f"{name} must be in [0, 1]; got {value}")


@dataclass(frozen=True)
class ChannelGroup:
    """A coupled group: ``producers`` write its channels (their rows score them), ``members`` every
    module touched; ``scores`` s_c; ``reason`` why it is not pruned ('' when it is)."""

    name: str
    channels: int
    producers: tuple[str, ...]
    members: tuple[str, ...]
    scores: torch.Tensor
    reason: str = ""

    @property
    def prunable(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class ChannelResult:
    """A channel-pruned model and what was kept.

    * ``model``: the smaller, ordinary ``nn.Module`` (eval mode; a new object).
    * ``kept``: per group name, the kept channel indices (sorted; what a file records).
    * ``groups``: one row per group: ``name``, ``channels``, ``kept``, ``tau``, ``beta``,
      ``max_score``, ``prunable``, ``note`` (why not pruned, or "kept 1: τ_ch would remove every channel").
    * ``layers``: one row per Conv/Linear: ``name``, ``group``, ``out_channels``, ``kept_out``,
      ``in_channels``, ``kept_in``, ``macs``, ``macs_dense``.
    * ``macs`` / ``macs_dense``, ``params`` / ``params_dense``: counted (MACs per input sample).
    * ``kept_out`` / ``kept_in``: per module whose output / input channels were cut, the kept indices.
    * ``shared``: True when the uncut tensors are the pruner's own (``apply(..., share=True)``, the live
      view): read-only, modify a ``copy.deepcopy`` of ``model`` instead.

    ``groups`` and ``layers`` are built on first use (a slider move that only needs the model skips them).
    """

    model: nn.Module
    config: ChannelConfig
    kept: dict[str, list[int]]
    group_rows: list[dict] = field(repr=False)
    layer_rows: list[dict] = field(repr=False)
    macs: int
    macs_dense: int
    params: int
    params_dense: int
    kept_out: dict[str, torch.Tensor] = field(repr=False)
    kept_in: dict[str, torch.Tensor] = field(repr=False)
    seconds: float = 0.0
    shared: bool = False
    input_shape: tuple[int, ...] = ()  # one sample's shape, as traced (a file records it: the rebuild traces the same)

    @functools.cached_property
    def groups(self) -> pd.DataFrame:
        return pd.DataFrame(self.group_rows)

    @functools.cached_property
    def layers(self) -> pd.DataFrame:
        return pd.DataFrame(self.layer_rows)

    @property
    def mac_ratio(self) -> float:
        """Counted MACs of the smaller model / the dense model's."""
        return self.macs / self.macs_dense if self.macs_dense else 1.0

    def record(self) -> dict:
        """What a file stores to rebuild the smaller model from the dense architecture (JSON-ready)."""
        return {**self.config.to_dict(), "input_shape": list(self.input_shape),
                "kept": {k: list(v) for k, v in self.kept.items()}}
