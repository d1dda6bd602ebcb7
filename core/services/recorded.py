"""What an uploaded export of this app says about itself: the setting it was made with, and its measured size.

A packed file or a ``.pt`` bundle holds *compressed* weights. Compressing them again with the
setting they record would not give them back (a 4-bit value can fall under β; a repaired
weight's magnitude moved), so the Explore page shows such an upload *as loaded*
(:data:`AS_LOADED`: every weight kept, none requantized) while its sliders stand at the recorded
setting, and compresses again only when the user moves one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from core.method.config import CompressionConfig, ConfigError

#: the identity setting for compressed weights (an upload shown as loaded): a boundary so small that only the
#: exact zeros the file stores fall under it (β = 10⁻³⁰·max|W|), so they count as pruned; nothing is requantized
AS_LOADED = CompressionConfig(tau=1e-30)


@dataclass(frozen=True, kw_only=True)
class RecordedSetting:
    """The setting an export records. ``repair``: the repair its weights already carry (a level name or
    ``"none"``); ``file_bytes``: the uploaded file's size, measured; ``kind``: ``"packed file"`` or ``"bundle"``."""

    config: CompressionConfig
    repair: str
    file_bytes: int
    kind: str
    #: kept / all weights of the pruned layers as the export recorded them (its masks), when it says
    retention: float | None = None

    def describe(self) -> str:
        """One line: the setting, the repair and the file's size."""
        repaired = "" if self.repair == "none" else f", repaired ({self.repair}) before export"
        return f"{config_summary(self.config)}{repaired}; {self.kind} of {self.file_bytes:,} bytes"


def config_summary(config: CompressionConfig) -> str:
    """``τ=…, θ=… (mode), b_low/b_high bit`` for notes."""
    parts = [f"τ={config.tau:g}"]
    if config.quantized:
        parts.append(f"θ={config.theta:g} ({config.theta_mode}), {config.b_low}/{config.b_high} bit")
    return ", ".join(parts)


def from_packed(config: CompressionConfig, header: dict, file_bytes: int,
                kept_and_sizes: list[tuple[int, int]] = ()) -> RecordedSetting:
    """A packed file's setting: its config, the ``repair`` entry of its header (absent: no repair) and the
    retention of its masks (``kept_and_sizes``: each packed layer's kept count and size)."""
    repair = header.get("repair") if isinstance(header, dict) else None
    method = repair.get("method") if isinstance(repair, dict) else None
    total = sum(size for _, size in kept_and_sizes)
    return RecordedSetting(config=config, repair=str(method) if method else "none", file_bytes=file_bytes,
                           kind="packed file", retention=sum(k for k, _ in kept_and_sizes) / total if total else None)


def from_settings(text: str | None, file_bytes: int) -> RecordedSetting | None:
    """A bundle's setting from the settings JSON it carries; None when it has none or it is unreadable."""
    if not text:
        return None
    try:
        data = json.loads(text)
        config = CompressionConfig.from_dict(data)
    except (ValueError, RecursionError, ConfigError, TypeError):
        return None
    repair = data.get("repair") if isinstance(data, dict) else None
    if not isinstance(repair, str):
        repair = "bn" if isinstance(data, dict) and data.get("bn_recalibrated") else "none"
    result = data.get("result") if isinstance(data, dict) else None
    retention = result.get("retention") if isinstance(result, dict) else None
    return RecordedSetting(config=config, repair=repair, file_bytes=file_bytes, kind="bundle",
                           retention=float(retention) if isinstance(retention, (int, float)) else None)


def settings_for_other_model(text: str | bytes, arch: str, arch_kwargs: dict) -> str | None:
    """Why a settings JSON does not apply to a model of ``arch`` (``arch_kwargs``), or None when it does.

    A file from this app names the model it was exported for (``model.arch`` and its
    ``arch_kwargs``); per-layer τ and every figure in it belong to that architecture. A bare
    config (no ``model``) applies to any model.
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None  # not JSON: the settings reader says so
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("arch"), str):
        return None
    theirs = model["arch"]
    their_kwargs = model.get("arch_kwargs")
    if theirs != arch:
        return f"it was exported for a {theirs} model, and the model loaded here is a {arch}"
    ours = json.loads(json.dumps(dict(arch_kwargs), default=str))  # as a file holds them (tuples as lists)
    if isinstance(their_kwargs, dict) and their_kwargs != ours:
        return (f"it was exported for a {theirs} built with {their_kwargs}, and the model loaded here is built "
                f"with {dict(arch_kwargs)}")
    return None


def _rounded(value: object, digits: int = 9) -> object:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def same_setting(a: CompressionConfig, b: CompressionConfig) -> bool:
    """Whether two settings are the same up to float noise (a slider's 0.1 + 25 · 0.01 is 0.35000000000000003,
    and the slider sends back 0.35)."""
    return _rounded(a.to_dict()) == _rounded(b.to_dict())
