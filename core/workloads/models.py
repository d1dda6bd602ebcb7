"""A registry of named architectures and safe checkpoint loading.

* ``mlp``       the paper's synthetic MLP: ``layers`` Linear layers with ReLU between them.
* ``cifar_cnn`` a compact VGG-style CNN (the paper's unspecified "CIFAR-10 CNN").
* ``resnet20``  the CIFAR ResNet-20 of He et al. (2016), option-A shortcuts, ~0.27M params.
* ``resnet18``  the CIFAR variant of ResNet-18 (3×3 stem, no max-pool), ~11.2M params.

Checkpoints are plain state_dicts, loaded with ``torch.load(weights_only=True)`` or
safetensors; nothing is ever unpickled. Each shipped checkpoint has a JSON card beside it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.common.formatting import printable
from core.common.paths import CHECKPOINT_DIR


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, or does not fit the architecture it is loaded into."""






# ---------------------------------------------------------------- architectures

class MLP(nn.Sequential):
    """``layers`` Linear layers: in_dim → hidden → … → hidden → out_dim, ReLU between."""

    def __init__(self, layers: int = 6, in_dim: int = 128, out_dim: int = 128, hidden: int = 128):
        if layers < 1:
            raise ValueError("an MLP needs at least one layer")
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        modules: list[nn.Module] = []
        for i in range(layers):
            modules.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                modules.append(nn.ReLU())
        super().__init__(*modules)


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class CifarCNN(nn.Module):
    """Compact VGG-style CNN: (2×conv w, pool, 2×conv 2w, pool, 2×conv 4w, pool; w = 32), global pool, Linear."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(3, w), *_conv_bn(w, w), nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w), *_conv_bn(4 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _ShortcutA(nn.Module):
    """Option-A shortcut of He et al.: stride-2 subsample and zero-pad the new channels."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            if shortcut == "A":
                self.shortcut = _ShortcutA(c_out - c_in)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3×3 stem, stages of BasicBlocks, global average pool, Linear."""

    def __init__(self, blocks: tuple[int, ...], widths: tuple[int, ...], shortcut: str, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        c_in = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(c_in, w, stride, shortcut))
                c_in = w
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet((3, 3, 3), (16, 32, 64), shortcut="A", num_classes=num_classes)


def resnet18(num_classes: int = 10) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), shortcut="B", num_classes=num_classes)


# ---------------------------------------------------------------- registry

#: Constructor arguments a *file* may pass to a builder, per architecture, with inclusive bounds.
#: A file (a packed header, an exported bundle, a checkpoint card) names an architecture and these
#: arguments; anything else, or anything out of range, is refused before a single tensor is built.
#: The ranges cover every model this project builds (the paper's MLPs up to 4096 wide, the
#: benchmark's ``mlp4096``; CNN widths up to 8× the default) and keep each count small enough that
#: building even the module *structure* is cheap; :data:`MAX_FILE_PARAMS` then bounds the total.
MLP_KWARG_BOUNDS = {"layers": (1, 64), "in_dim": (1, 4096), "out_dim": (1, 4096), "hidden": (1, 4096)}
CNN_KWARG_BOUNDS = {"num_classes": (1, 1000), "width": (1, 256)}
RESNET_KWARG_BOUNDS = {"num_classes": (1, 1000)}
#: The most parameters a model described by a file may have: 2**28 (1 GiB in fp32), above the
#: benchmark's mlp4096 (101 M) and 24× ResNet-18 (11.2 M). A hard ceiling for every file; the app's
#: uploads use the tighter :data:`core.services.uploads.MAX_UPLOAD_PARAMS`.
MAX_FILE_PARAMS = 1 << 28


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    input_kind: str  # "cifar10" (N×3×32×32 images) or "vector" (N×in_dim)
    kwarg_bounds: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # what a file may pass


REGISTRY: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", MLP, "the paper's synthetic 6-layer MLP (128 wide)", "vector", MLP_KWARG_BOUNDS),
    "cifar_cnn": ModelSpec("cifar_cnn", CifarCNN, "compact VGG-style CIFAR-10 CNN", "cifar10", CNN_KWARG_BOUNDS),
    "resnet20": ModelSpec("resnet20", resnet20, "CIFAR ResNet-20 (He et al. 2016)", "cifar10", RESNET_KWARG_BOUNDS),
    "resnet18": ModelSpec("resnet18", resnet18, "CIFAR ResNet-18", "cifar10", RESNET_KWARG_BOUNDS),
}
PRETRAINED: tuple[str, ...] = ("cifar_cnn", "resnet20", "resnet18")


def build(name: str, **kwargs) -> nn.Module:
    """The untrained ``nn.Module`` for a registry name (kwargs go to its builder).

    For code that chooses the arguments itself; arguments read from a file go through
    :func:`build_from_file`, which checks them first.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name].builder(**kwargs)


def check_arch_kwargs(name: object, kwargs: object, label: str = "the file",
                      max_params: int = MAX_FILE_PARAMS) -> dict[str, int]:
    """The constructor arguments a file gives for registry architecture ``name``, checked; nothing is built.

    Each argument must be one the architecture accepts from files (:attr:`ModelSpec.kwarg_bounds`),
    a whole number within its range; then the model they describe, laid out on PyTorch's
    ``meta`` device (no memory), must have at most ``max_params`` parameters. Raises
    :class:`CheckpointError` naming the argument and its allowed range.
    """
    if not isinstance(name, str) or name not in REGISTRY:
        raise CheckpointError(f"{label} is for an unknown architecture {printable(repr(name), 60)}; "
                              f"this app builds {', '.join(REGISTRY)}.")
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{label} describes the {name} architecture with arguments that are not "
                              f"a mapping of names to numbers ({type(kwargs).__name__}).")
    bounds = REGISTRY[name].kwarg_bounds
    checked: dict[str, int] = {}
    for key, value in kwargs.items():
        if key not in bounds:
            allowed = ", ".join(bounds) or "none"
            raise CheckpointError(f"{label} passes the argument {printable(repr(key), 60)} to the {name} "
                                  f"architecture, which accepts only: {allowed}.")
        low, high = bounds[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CheckpointError(f"{label} sets the {name} argument '{key}' to {printable(repr(value), 40)}; "
                                  f"it must be a whole number from {low} to {high}.")
        checked[key] = value
    params = count_params(meta_model(name, checked))
    if params > max_params:
        raise CheckpointError(f"{label} describes a {name} model of {params:,} parameters; "
                              f"this app loads models of at most {max_params:,}.")
    return checked


def meta_model(name: str, kwargs: Mapping[str, int]) -> nn.Module:
    """The module's structure on PyTorch's ``meta`` device: shapes and dtypes, no memory for values."""
    with torch.device("meta"):
        return build(name, **kwargs)


def build_from_file(name: object, kwargs: object, label: str = "the file",
                    max_params: int = MAX_FILE_PARAMS) -> nn.Module:
    """:func:`build` with architecture and arguments read from a file, after :func:`check_arch_kwargs`."""
    checked = check_arch_kwargs(name, kwargs, label, max_params)
    return build(name, **checked)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- checkpoints

def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


TORCH_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6: a zip archive
PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # legacy torch.save: pickles


def sniff_format(data: bytes) -> str:
    """What a checkpoint's bytes are, from their content (never from a file name).

    ``"safetensors"`` (an 8-byte little-endian header length that fits in the file, then a JSON
    object), ``"torch"`` (a zip archive, ``PK\\x03\\x04``), ``"torch-legacy"`` (a pickle stream,
    ``\\x80`` and a protocol number) or ``"unknown"``. Safetensors is tested first: its length
    prefix may itself begin with ``\\x80\\x02`` (a 640-byte header), while the 9th byte of a zip or
    legacy file is never a ``{`` whose length prefix fits.
    """
    if len(data) >= 10 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8:
        return "safetensors"
    if data[:4] == TORCH_ZIP_MAGIC:
        return "torch"
    if data[:2] in PICKLE_PROTOCOLS:
        return "torch-legacy"
    return "unknown"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a plain state_dict from a safetensors or ``torch.save`` file (told apart by content), safely."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if sniff_format(data) == "safetensors":
            from safetensors.torch import load

            state = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or holds pickled objects
        raise CheckpointError(f"{path.name} is not a readable state_dict ({type(err).__name__}: "
                              f"{printable(err)})") from err
    return state_dict_from_object(state, path.name)


def state_dict_from_object(state: object, label: str = "checkpoint") -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{label} does not hold a state_dict (a mapping of names to tensors).")
    return dict(state)


def load_state_dict_into(model: nn.Module, state: dict[str, torch.Tensor], label: str = "checkpoint") -> nn.Module:
    """Copy ``state`` into ``model`` (upcasting to the model's dtype); a clear error names the first mismatch."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise CheckpointError(f"{label} does not fit this architecture: key '{key}' is missing.")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{label} does not fit this architecture: '{key}' has shape {tuple(state[key].shape)}, "
                f"expected {tuple(value.shape)}."
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise CheckpointError(f"{label} does not fit this architecture: "
                              f"unexpected key '{printable(extra[0], 80)}'.")
    converted = OrderedDict((k, v.to(own[k].dtype)) for k, v in state.items())
    # The module's own version metadata: the keys and shapes were just checked against its current layout
    # (modules such as torchvision's MNASNet refuse a state_dict without a version).
    converted._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(converted)
    return model


def state_dict_digest(model: nn.Module) -> str:
    """SHA256 over the names, dtypes, shapes and bytes of ``model.state_dict()``."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        data = value.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        if data.numel():
            digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def card_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"{name}.json"


def load_card(name: str) -> dict:
    """The JSON card of a shipped checkpoint (arch, params, mean, std, test_accuracy, sha256, …)."""
    path = card_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no trained checkpoint card for {name!r} at {path}")
    return json.loads(path.read_text())


def checkpoint_file(name: str) -> Path:
    return CHECKPOINT_DIR / load_card(name)["file"]


def load_pretrained(name: str) -> nn.Module:
    """The trained model for a registry name, in eval mode, fp32, checksum verified."""
    card = load_card(name)
    path = CHECKPOINT_DIR / card["file"]
    if sha256_file(path) != card["sha256"]:
        raise CheckpointError(f"{path} does not match the SHA256 in its card: the file is altered or truncated")
    model = build_from_file(card["arch"], card.get("arch_kwargs", {}), f"the card of {name}")
    load_state_dict_into(model, read_state_dict(path), path.name)
    return model.eval()
