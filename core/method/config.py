"""One setting of the sliders, and its one serialised form.

:meth:`CompressionConfig.to_dict` is what every file stores (the settings JSON, the packed
file's header, the ``.pt`` bundle); :meth:`CompressionConfig.from_dict` reads it back, as
well as the shapes written before it existed (``layer_tau`` as a list of pairs in the packed
header, a whole settings JSON with the config under ``"config"``). Every field is
type-checked: a file never gets a setting the sliders could not have.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from core.method.pruning import check_tau
from core.method.quantization import SUPPORTED_BITS, check_bits

THETA_MODES: tuple[str, ...] = ("relative", "absolute", "fraction")
FIELDS: tuple[str, ...] = ("tau", "theta", "theta_mode", "b_low", "b_high", "layer_tau", "include_norm")


class ConfigError(ValueError):
    """A serialised setting that cannot be applied; the message names the field and the value."""


@dataclass(frozen=True)
class CompressionConfig:
    """One setting of the sliders.

    * ``tau`` ∈ [0, 1]: β = τ · max|W| per layer; ``layer_tau`` overrides τ per layer name.
    * ``theta``: None = no quantization (pruning only). ``theta_mode``:
      ``relative`` (θ · max|W| per layer, the default), ``absolute`` (the paper's θ) or
      ``fraction`` (the fraction θ ∈ [0, 1] of each layer's kept weights, largest first,
      in high precision).
    * ``b_low`` ≤ ``b_high``: bit-widths from the engine's palette.
    * ``include_norm``: the paper's pseudocode, which also prunes normalisation scales.
    """

    tau: float = 0.0
    theta: float | None = None
    theta_mode: str = "relative"
    b_low: int = 4
    b_high: int = 8
    layer_tau: tuple[tuple[str, float], ...] = ()
    include_norm: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", check_tau(self.tau))
        overrides = self.layer_tau.items() if isinstance(self.layer_tau, Mapping) else self.layer_tau
        checked = tuple(sorted((str(name), check_tau(value, f"tau for layer '{name}'")) for name, value in overrides))
        object.__setattr__(self, "layer_tau", checked)
        if not isinstance(self.include_norm, bool):
            raise TypeError(f"include_norm must be true or false, got {type(self.include_norm).__name__}")
        if self.theta_mode not in THETA_MODES:
            raise ValueError(f"theta_mode must be one of {THETA_MODES}, got {self.theta_mode!r}")
        if self.theta is not None:
            if isinstance(self.theta, bool) or not isinstance(self.theta, numbers.Real):
                raise TypeError(f"theta must be a number or None, got {type(self.theta).__name__}")
            theta = float(self.theta)
            if math.isnan(theta) or math.isinf(theta) or theta < 0:
                raise ValueError(f"theta must be a finite number ≥ 0, got {theta}")
            if self.theta_mode == "fraction" and theta > 1:
                raise ValueError(f"theta in 'fraction' mode must be in [0, 1], got {theta}")
            object.__setattr__(self, "theta", theta)
            check_bits(self.b_low, SUPPORTED_BITS, "b_low")
            check_bits(self.b_high, SUPPORTED_BITS, "b_high")
            if self.b_low > self.b_high:
                raise ValueError(f"b_low ({self.b_low}) must not exceed b_high ({self.b_high})")

    @property
    def quantized(self) -> bool:
        return self.theta is not None

    def tau_for(self, layer: str) -> float:
        return dict(self.layer_tau).get(layer, self.tau)

    def to_dict(self) -> dict:
        """The JSON-ready form every file stores: the fields by name, ``layer_tau`` as ``{layer: τ}``."""
        return {"tau": self.tau, "theta": self.theta, "theta_mode": self.theta_mode, "b_low": self.b_low,
                "b_high": self.b_high, "layer_tau": dict(self.layer_tau), "include_norm": self.include_norm}

    @classmethod
    def from_dict(cls, data: Mapping) -> "CompressionConfig":
        """The inverse of :meth:`to_dict`; raises :class:`ConfigError` naming the first bad field.

        Also reads a whole settings JSON (the config under ``"config"``) and the packed
        header's older ``layer_tau`` shape, a list of ``[layer, τ]`` pairs. Missing fields
        take their defaults; unknown fields are refused rather than ignored.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a setting must be a JSON object, got {type(data).__name__}")
        if isinstance(data.get("config"), Mapping):
            data = data["config"]
        unknown = sorted(str(key) for key in data if key not in FIELDS)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; the settings are {', '.join(FIELDS)}")
        values = dict(data)
        if "tau" in values:
            values["tau"] = _real("tau", values["tau"])
        if values.get("theta") is not None:
            values["theta"] = _real("theta", values["theta"])
        for name in ("b_low", "b_high"):
            if name in values and (isinstance(values[name], bool) or not isinstance(values[name], int)):
                raise ConfigError(f"{name} must be a whole number of bits, got {values[name]!r}")
        if "theta_mode" in values and not isinstance(values["theta_mode"], str):
            raise ConfigError(f"theta_mode must be one of {', '.join(THETA_MODES)}, got {values['theta_mode']!r}")
        if "include_norm" in values and not isinstance(values["include_norm"], bool):
            raise ConfigError(f"include_norm must be true or false, got {values['include_norm']!r}")
        if "layer_tau" in values:
            values["layer_tau"] = _layer_tau(values["layer_tau"])
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from err


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return float(value)


def _layer_tau(value: object) -> tuple[tuple[str, float], ...]:
    """``{layer: τ}`` (the current shape) or ``[[layer, τ], ...]`` (the packed header's older shape)."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise ConfigError("layer_tau must map layer names to τ values, "
                          f"for example {{\"layer1.0.conv1\": 0.2}}; got {type(value).__name__}")
    checked = []
    for name, tau in pairs:
        if not isinstance(name, str):
            raise ConfigError(f"layer_tau keys must be layer names, got {name!r}")
        checked.append((name, _real(f"tau for layer '{name}'", tau)))
    return tuple(checked)
