"""Safe uploads, and exports that load back.

* :func:`read_upload` turns uploaded bytes into a model of a built-in architecture:
  ``torch.load(weights_only=True)`` or safetensors, never unpickling objects; a size limit;
  a :class:`core.workloads.models.CheckpointError` that says what is wrong for every bad file.
* :func:`export_bundle` / :func:`settings_json` / :func:`packed_bytes` are what the app offers
  for download; an exported bundle is a ``torch.save`` dict of plain tensors and strings that
  :func:`read_upload` loads back (architecture recognised from the bundle). Settings are
  stored in the one serialised form, :meth:`CompressionConfig.to_dict`.

Nothing here imports Streamlit.
"""
from __future__ import annotations

import hashlib
import io
import json
import time

import torch
from torch import nn

from core.common.formatting import fmt_bytes
from core.method.config import CompressionConfig, ConfigError
from core.method.engine import CompressionResult
from core.services.choices import LoadedModel
from core.workloads.models import REGISTRY, CheckpointError, build, load_state_dict_into, state_dict_from_object

MAX_UPLOAD_BYTES = 200 * 1024 * 1024  # the app's limit for an uploaded checkpoint (200 MiB)
BUNDLE_FORMAT = "boundary-explorer/state_dict+masks/v1"
SETTINGS_FORMAT = "boundary-explorer/settings/v1"


# ---------------------------------------------------------------- uploads

def parse_checkpoint(data: bytes, filename: str) -> object:
    """The object stored in an uploaded file, read safely (no arbitrary unpickling)."""
    try:
        if filename.lower().endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            return load_safetensors(data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, not a checkpoint, or holds pickled objects
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{filename} is not a readable checkpoint ({type(err).__name__}: {reason[:200]}). "
            "Upload a state_dict saved with torch.save(model.state_dict(), path) or a .safetensors file; "
            "files that need arbitrary unpickling are refused.") from err


def read_upload(data: bytes, filename: str, arch: str | None = None,
                max_bytes: int = MAX_UPLOAD_BYTES) -> LoadedModel:
    """A :class:`LoadedModel` from an uploaded state_dict (or an exported bundle of this app).

    ``arch``: a registry name, or None to take it from an exported bundle. Every problem
    (too large, empty, unreadable, not a state_dict, wrong architecture, non-finite
    weights) raises :class:`CheckpointError` with a message meant for the user.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("the upload is not a file")
    if len(data) == 0:
        raise CheckpointError(f"{filename} is empty")
    if len(data) > max_bytes:
        raise CheckpointError(f"{filename} is {fmt_bytes(len(data))}; the limit is {fmt_bytes(max_bytes)}")
    if is_packed(bytes(data)):
        return _read_packed(bytes(data), filename, arch)
    stored = parse_checkpoint(bytes(data), filename)
    bundle_arch = None
    arch_kwargs: dict = {}
    settings = None
    if isinstance(stored, dict) and stored.get("format") == BUNDLE_FORMAT:
        bundle_arch = stored.get("arch") if isinstance(stored.get("arch"), str) else None
        settings = stored.get("settings") if isinstance(stored.get("settings"), str) else None
        if isinstance(stored.get("arch_kwargs"), str):
            try:
                arch_kwargs = dict(json.loads(stored["arch_kwargs"]))
            except (ValueError, TypeError):
                arch_kwargs = {}
    chosen = arch or bundle_arch
    if chosen is None:
        raise CheckpointError(f"{filename} does not say which architecture it is for: pick one "
                              f"({', '.join(REGISTRY)}) and upload it again")
    if chosen not in REGISTRY:
        raise CheckpointError(f"unknown architecture {chosen!r}; choose one of {', '.join(REGISTRY)}")
    state = state_dict_from_object(stored, filename)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{filename}: tensor '{bad[0]}' holds NaN or Inf values")
    model = build(chosen, **arch_kwargs)
    load_state_dict_into(model, state, filename)
    digest = hashlib.sha256(data).hexdigest()
    spec = REGISTRY[chosen]
    note = f"uploaded {filename} ({fmt_bytes(len(data))}, sha256 {digest[:12]}…), loaded with weights_only=True"
    if settings:
        note += "; exported by this app with settings " + _settings_summary(settings)
    return LoadedModel(f"upload:{digest[:16]}", f"Uploaded: {filename} ({spec.description})", chosen,
                       model.eval(), spec.input_kind, True, note, source=filename, arch_kwargs=arch_kwargs)


def is_packed(data: bytes) -> bool:
    """Whether ``data`` is a packed model file of :mod:`core.deploy.packing` (a safetensors file with its header)."""
    if len(data) < 8:
        return False
    length = int.from_bytes(data[:8], "little")
    if not 2 <= length <= min(len(data) - 8, 100 * 2 ** 20):
        return False
    try:
        header = json.loads(data[8:8 + length])
        from core.deploy.packing import METADATA_KEY

        return METADATA_KEY in (header.get("__metadata__") or {})
    except (ValueError, AttributeError, ImportError):
        return False


def _read_packed(data: bytes, filename: str, arch: str | None) -> LoadedModel:
    """A packed file (codes + scales per chunk), verified and decoded by :mod:`core.deploy.packing`."""
    import tempfile
    from pathlib import Path

    from core.deploy.packing import load_compressed, read_compressed

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(filename).name
        path.write_bytes(data)
        try:
            packed = read_compressed(path)
            chosen = packed.arch or arch
            if chosen is None:
                raise CheckpointError(f"{filename} records no architecture: pick one ({', '.join(REGISTRY)}) "
                                      "and upload it again")
            if chosen not in REGISTRY:
                raise CheckpointError(f"unknown architecture {chosen!r}; choose one of {', '.join(REGISTRY)}")
            kwargs = dict(packed.header.get("arch_kwargs") or {})
            model = load_compressed(path, None if packed.arch else build(chosen, **kwargs))
        except CheckpointError:
            raise
        except (ValueError, TypeError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{filename} could not be unpacked ({err})") from err
    model = model.float()  # the explorer works in fp32; the packed weights are exact fp32 values
    digest = hashlib.sha256(data).hexdigest()
    config = packed.header.get("config", {})
    spec = REGISTRY[chosen]
    note = (f"uploaded packed model {filename} ({fmt_bytes(len(data))}, sha256 {digest[:12]}…), compressed with "
            f"τ={config.get('tau')}" + ("" if config.get("theta") is None else
                                        f", θ={config.get('theta')} ({config.get('theta_mode')}), "
                                        f"{config.get('b_low')}/{config.get('b_high')} bit"))
    return LoadedModel(f"upload:{digest[:16]}", f"Uploaded: {filename} ({spec.description})", chosen, model.eval(),
                       spec.input_kind, True, note, source=filename, arch_kwargs=kwargs)


def packed_bytes(result: CompressionResult, loaded: LoadedModel) -> bytes:
    """The result as a packed file of :mod:`core.deploy.packing` (codes + scales per chunk, bit-packed)."""
    import tempfile
    from pathlib import Path

    from core.deploy.packing import save_compressed

    with tempfile.TemporaryDirectory() as folder:
        path = save_compressed(result, Path(folder) / "model.safetensors", arch=loaded.arch,
                               arch_kwargs=loaded.arch_kwargs)
        return path.read_bytes()


def _settings_summary(text: str) -> str:
    try:
        config = json.loads(text).get("config", {})
    except (ValueError, AttributeError):
        return "(unreadable)"
    parts = [f"τ={config.get('tau')}"]
    if config.get("theta") is not None:
        parts.append(f"θ={config.get('theta')} ({config.get('theta_mode')}), {config.get('b_low')}/{config.get('b_high')} bit")
    return ", ".join(parts)


# ---------------------------------------------------------------- exports

def read_settings(text: str | bytes) -> CompressionConfig:
    """The setting stored in a settings JSON (or a bare config object); :class:`ConfigError` if unusable."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
        raise ConfigError(f"the settings file is not valid JSON ({type(err).__name__})") from err
    return CompressionConfig.from_dict(data)


def settings_json(config: CompressionConfig, loaded: LoadedModel, result: CompressionResult | None = None,
                  bn_recalibrated: bool = False) -> str:
    """The settings (and what they gave) as JSON, to reproduce or share a view."""
    payload = {
        "format": SETTINGS_FORMAT,
        "model": {"key": loaded.key, "arch": loaded.arch, "label": loaded.label, "source": loaded.source,
                  "trained": loaded.trained},
        "config": config.to_dict(),
        "bn_recalibrated": bool(bn_recalibrated),
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
    to export that). The masks (``"<layer>.weight"`` → bool) can be re-applied with
    ``torch.nn.utils.prune.custom_from_mask``. :func:`read_upload` loads the bundle back.
    """
    module = result.model if model is None else model
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    weights = result.weights
    masks = {f"{name}.weight": (weights[name] != 0).cpu() for name in result.stats["name"]}
    payload = {
        "format": BUNDLE_FORMAT,
        "arch": loaded.arch,
        "arch_kwargs": json.dumps(loaded.arch_kwargs),
        "state_dict": state,
        "masks": masks,
        "settings": settings_json(result.config, loaded, result, bn_recalibrated),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()
