"""Which models the explorer offers, loading them, safe uploads, and exports that load back.

* :func:`model_choices` lists the shipped checkpoints whose JSON card exists, the paper's
  synthetic MLP (random weights, seed 42) and, only when no trained checkpoint is shipped
  at all, an untrained ResNet-20 labelled as such.
* :func:`load_choice` builds the :class:`LoadedModel` for a choice key (``pretrained:NAME``,
  ``synthetic:mlp``, ``untrained:NAME``).
* :func:`read_upload` turns uploaded bytes into a model of a built-in architecture:
  ``torch.load(weights_only=True)`` or safetensors, never unpickling objects; a size limit;
  a :class:`core.models.CheckpointError` that says what is wrong for every bad file.
* :func:`export_bundle` / :func:`settings_json` are what the app offers for download; an
  exported bundle is a ``torch.save`` dict of plain tensors and strings that
  :func:`read_upload` loads back (architecture recognised from the bundle).

Nothing here imports Streamlit.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from core.engine import CompressionConfig, CompressionResult
from core.metrics import CIFAR_MEAN, CIFAR_STD
from core.models import (
    PRETRAINED,
    REGISTRY,
    CheckpointError,
    build,
    card_path,
    load_card,
    load_pretrained,
    load_state_dict_into,
    state_dict_from_object,
)

MAX_UPLOAD_BYTES = 200 * 1024 * 1024  # the app's limit for an uploaded checkpoint
SYNTHETIC_SEED = 42
BUNDLE_FORMAT = "boundary-explorer/state_dict+masks/v1"
SETTINGS_FORMAT = "boundary-explorer/settings/v1"
#: Shipped checkpoints in the order the picker offers them (the first one found is the default).
PREFERRED_ORDER: tuple[str, ...] = ("resnet20", "cifar_cnn", "resnet18")


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model picker."""

    key: str
    label: str
    arch: str
    trained: bool
    note: str = ""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the explorer. ``model`` may be shared between sessions: treat it as read-only."""

    key: str
    label: str
    arch: str
    model: nn.Module
    input_kind: str  # "cifar10" or "vector"
    trained: bool
    note: str = ""
    card: dict | None = None
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD
    source: str = ""  # where the weights came from (file name, checkpoint path, seed)
    arch_kwargs: dict = field(default_factory=dict)

    @property
    def in_dim(self) -> int:
        first = next(m for m in self.model.modules() if isinstance(m, nn.Linear))
        return first.in_features

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A fixed random input batch of the right shape (N(0, 1); images are already normalised)."""
        generator = torch.Generator().manual_seed(seed)
        shape = (batch, 3, 32, 32) if self.input_kind == "cifar10" else (batch, self.in_dim)
        return torch.randn(shape, generator=generator)


def shipped_checkpoints() -> list[str]:
    """Registry names whose checkpoint card exists, in :data:`PREFERRED_ORDER`."""
    order = [n for n in PREFERRED_ORDER if n in PRETRAINED] + [n for n in PRETRAINED if n not in PREFERRED_ORDER]
    return [name for name in order if card_path(name).is_file()]


def _accuracy_text(card: dict) -> str:
    accuracy = card.get("test_accuracy")
    if isinstance(accuracy, (int, float)) and math.isfinite(accuracy):
        return f"test accuracy {100 * accuracy:.2f} % on its card ({card.get('test_set', 'CIFAR-10 test set')})"
    return "no test accuracy on its card"


def model_choices() -> list[ModelChoice]:
    """The picker's entries: shipped checkpoints first (default = first), then the synthetic MLP."""
    choices = []
    for name in shipped_checkpoints():
        try:
            card = json.loads(card_path(name).read_text())
        except (OSError, ValueError):
            continue  # an unreadable card: not offered
        choices.append(ModelChoice(f"pretrained:{name}", f"{REGISTRY[name].description} — trained", name, True,
                                   _accuracy_text(card)))
    if not choices:
        choices.append(ModelChoice(
            "untrained:resnet20", "CIFAR ResNet-20 — UNTRAINED (random weights, seed 42)", "resnet20", False,
            "No trained checkpoint is shipped yet (assets/checkpoints/*.json missing): this ResNet-20 has random "
            "weights, so its CIFAR-10 accuracy is chance level (about 10 %). Train one with "
            "`python -m core.train resnet20`."))
    choices.append(ModelChoice(
        "synthetic:mlp", "Synthetic MLP of the paper (6 × 128, random weights, seed 42)", "mlp", False,
        "The paper's synthetic benchmark model: random weights, Gaussian inputs, no accuracy to measure; "
        "the output deviation from the dense model is shown instead."))
    return choices


def load_choice(key: str) -> LoadedModel:
    """The model for a picker key. Raises ``FileNotFoundError``/``CheckpointError`` with what to do."""
    kind, _, name = key.partition(":")
    if kind == "pretrained":
        card = load_card(name)
        model = load_pretrained(name)
        arch = card["arch"]
        return LoadedModel(key, f"{REGISTRY[arch].description} — trained", arch, model,
                           REGISTRY[arch].input_kind, True, _accuracy_text(card), card,
                           tuple(card.get("mean", CIFAR_MEAN)), tuple(card.get("std", CIFAR_STD)),
                           f"assets/checkpoints/{card['file']} (sha256 {card['sha256'][:12]}…)",
                           dict(card.get("arch_kwargs", {})))
    if kind in ("untrained", "synthetic") and name in REGISTRY:
        torch.manual_seed(SYNTHETIC_SEED)
        model = build(name).eval()
        choice = next((c for c in model_choices() if c.key == key), None)
        label = choice.label if choice else f"{REGISTRY[name].description} — untrained (random weights, seed 42)"
        note = choice.note if choice else "Random weights: accuracy is chance level."
        return LoadedModel(key, label, name, model, REGISTRY[name].input_kind, False, note,
                           source=f"torch.manual_seed({SYNTHETIC_SEED}); core.models.build({name!r})")
    raise ValueError(f"unknown model choice {key!r}")


# ---------------------------------------------------------------- uploads

def _human(n_bytes: int) -> str:
    return f"{n_bytes / 1024 ** 2:.1f} MB"


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
        raise CheckpointError(f"{filename} is {_human(len(data))}; the limit is {_human(max_bytes)}")
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
    note = f"uploaded {filename} ({_human(len(data))}, sha256 {digest[:12]}…), loaded with weights_only=True"
    if settings:
        note += "; exported by this app with settings " + _settings_summary(settings)
    return LoadedModel(f"upload:{digest[:16]}", f"Uploaded: {filename} ({spec.description})", chosen,
                       model.eval(), spec.input_kind, True, note, source=filename, arch_kwargs=arch_kwargs)


def is_packed(data: bytes) -> bool:
    """Whether ``data`` is a packed model file of :mod:`core.packing` (a safetensors file with its header)."""
    if len(data) < 8:
        return False
    length = int.from_bytes(data[:8], "little")
    if not 2 <= length <= min(len(data) - 8, 100 * 2 ** 20):
        return False
    try:
        header = json.loads(data[8:8 + length])
        from core.packing import METADATA_KEY

        return METADATA_KEY in (header.get("__metadata__") or {})
    except (ValueError, AttributeError, ImportError):
        return False


def _read_packed(data: bytes, filename: str, arch: str | None) -> LoadedModel:
    """A packed file (codes + scales per chunk), verified and decoded by :mod:`core.packing`."""
    import tempfile
    from pathlib import Path

    from core.packing import load_compressed, read_compressed

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
    note = (f"uploaded packed model {filename} ({_human(len(data))}, sha256 {digest[:12]}…), compressed with "
            f"τ={config.get('tau')}" + ("" if config.get("theta") is None else
                                        f", θ={config.get('theta')} ({config.get('theta_mode')}), "
                                        f"{config.get('b_low')}/{config.get('b_high')} bit"))
    return LoadedModel(f"upload:{digest[:16]}", f"Uploaded: {filename} ({spec.description})", chosen, model.eval(),
                       spec.input_kind, True, note, source=filename, arch_kwargs=kwargs)


def packed_bytes(result: CompressionResult, loaded: LoadedModel) -> bytes:
    """The result as a packed file of :mod:`core.packing` (codes + scales per chunk, bit-packed)."""
    import tempfile
    from pathlib import Path

    from core.packing import save_compressed

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

def config_to_dict(config: CompressionConfig) -> dict:
    data = asdict(config)
    data["layer_tau"] = dict(config.layer_tau)
    return data


def config_from_dict(data: dict) -> CompressionConfig:
    """The inverse of :func:`config_to_dict` (also accepts a whole settings JSON)."""
    if "config" in data and isinstance(data["config"], dict):
        data = data["config"]
    known = {"tau", "theta", "theta_mode", "b_low", "b_high", "layer_tau", "include_norm"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}")
    return CompressionConfig(**data)


def settings_json(config: CompressionConfig, loaded: LoadedModel, result: CompressionResult | None = None,
                  bn_recalibrated: bool = False) -> str:
    """The settings (and what they gave) as JSON, to reproduce or share a view."""
    payload = {
        "format": SETTINGS_FORMAT,
        "model": {"key": loaded.key, "arch": loaded.arch, "label": loaded.label, "source": loaded.source,
                  "trained": loaded.trained},
        "config": config_to_dict(config),
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
