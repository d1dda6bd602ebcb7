"""Every classification architecture of ``torchvision.models``, built only from bounded arguments.

A torchvision model is named ``torchvision:<name>`` in files and on the command line
(``torchvision:resnet50``); its constructor arguments are at most

* ``num_classes``: a whole number from 1 to :data:`MAX_NUM_CLASSES`, read from the weights (the
  first dimension of the classifier's weight, see :func:`classifier_key`);
* ``image_size``: the ViTs only (``vit_*``), a multiple of the patch size from 16 to
  :data:`MAX_VIT_IMAGE_SIZE`, read from the length of ``encoder.pos_embedding``;
* ``transform_input``: GoogLeNet and Inception-v3 only, true or false (torchvision's pretrained
  weights expect true; a plain state_dict does not say, so it defaults to false as in torchvision).

GoogLeNet and Inception-v3 are always built without their auxiliary training heads (they do not
take part in inference); their keys are dropped from a state_dict that has them, and said so.

Weights come from one of two places, both read without unpickling objects
(:func:`core.workloads.models.read_state_dict`, ``weights_only=True`` or safetensors):

* the user's state_dict (:func:`from_state_dict`): the number of classes (and a ViT's image size)
  is inferred from it; the architecture must hold at most ``max_params`` parameters, counted on
  the ``meta`` device before a single weight is allocated (:func:`check_kwargs`);
* torchvision's own pretrained weights, from the local torch hub cache only
  (:func:`load_pretrained`): ``torch.hub.get_dir()/checkpoints/<file of the weights' URL>``,
  its SHA256 prefix (in the file name) checked. Nothing is downloaded: a missing file is one
  :class:`CheckpointError` naming the file, the folder and the URL to fetch it from elsewhere.

Limits: :data:`MAX_TORCHVISION_PARAMS` (100 M) for every model built here; models above it
(VGGs, ViT-L/H, ConvNeXt-L, …) are refused with a sentence, not built.
"""
from __future__ import annotations

import functools
import hashlib
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from core.common.formatting import printable
from core.workloads.models import CheckpointError, count_params, load_state_dict_into, read_state_dict

PREFIX = "torchvision:"
#: The most parameters a torchvision model built here may have (uploads, the cache, the command line).
MAX_TORCHVISION_PARAMS = 100_000_000
MAX_NUM_CLASSES = 100_000
MAX_VIT_IMAGE_SIZE = 1024
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
#: Smallest square input each architecture runs on (32 px where not listed); ``maxvit_t`` runs at 224 only.
MIN_INPUT: dict[str, int] = {"alexnet": 63, "inception_v3": 75, "maxvit_t": 224}
_AUX_MODELS = ("googlenet", "inception_v3")
_AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")
#: torch factory functions that allocate parameters and buffers: sent to the ``meta`` device while
#: counting parameters. Others (``arange``, ``tensor``) stay real: RegNet computes its widths with them.
_ALLOCATORS = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
                         torch.empty_strided, torch.empty_permuted})


class _MetaAllocations(TorchFunctionMode):
    """Allocations of parameters and buffers go to the ``meta`` device (thread-local; nothing is stored)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALLOCATORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


# ---------------------------------------------------------------- names

@functools.lru_cache(maxsize=1)
def architectures() -> tuple[str, ...]:
    """Every classification architecture of ``torchvision.models`` (``list_models(module=torchvision.models)``)."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def is_torchvision(arch: object) -> bool:
    """Whether a file's architecture name is ``torchvision:<name>`` (the name itself is checked elsewhere)."""
    return isinstance(arch, str) and arch.startswith(PREFIX)


def arch_name(name: str) -> str:
    """``torchvision:<name>`` for a torchvision architecture name."""
    return PREFIX + name


def short_name(arch: str, label: str = "the file") -> str:
    """The torchvision name of ``arch`` (``resnet50`` for ``torchvision:resnet50`` or ``resnet50``), checked."""
    name = arch[len(PREFIX):] if is_torchvision(arch) else arch
    if name not in architectures():
        raise CheckpointError(f"{label} names the torchvision architecture {printable(repr(name), 60)}, which "
                              "torchvision.models does not have; run `python -c \"import torchvision; "
                              "print(torchvision.models.list_models(module=torchvision.models))\"` for the list.")
    return name


@functools.lru_cache(maxsize=None)
def default_params(name: str) -> int:
    """Parameters of ``name`` with its default arguments (1000 classes), counted on the meta device."""
    return count_params(meta_model(name, {}))


@functools.lru_cache(maxsize=4)
def architectures_within(max_params: int = MAX_TORCHVISION_PARAMS) -> tuple[str, ...]:
    """The architectures whose default weights (1000 classes) have at most ``max_params`` parameters.

    Read from torchvision's weight metadata (``meta["num_params"]``, instant) for the picker; every
    model is counted again on the meta device, with its own arguments, before it is built.
    """
    import torchvision

    return tuple(name for name in architectures()
                 if torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"] <= max_params)


# ---------------------------------------------------------------- building

def _patch_size(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def check_kwargs(name: str, kwargs: object, label: str = "the file",
                 max_params: int = MAX_TORCHVISION_PARAMS) -> dict:
    """The constructor arguments for torchvision architecture ``name``, checked; nothing is allocated.

    Accepts ``num_classes`` (all), ``image_size`` (ViTs) and ``transform_input`` (GoogLeNet,
    Inception-v3), each within its range; then counts the parameters on the ``meta`` device and
    refuses more than ``max_params``. Raises :class:`CheckpointError` naming the argument.
    """
    name = short_name(name, label)
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{label} describes torchvision {name} with arguments that are not a mapping of "
                              f"names to values ({type(kwargs).__name__}).")
    allowed = ["num_classes"] + (["image_size"] if name.startswith("vit_") else []) + (
        ["transform_input"] if name in _AUX_MODELS else [])
    checked: dict = {}
    for key, value in kwargs.items():
        if key not in allowed:
            raise CheckpointError(f"{label} passes the argument {printable(repr(key), 60)} to torchvision {name}, "
                                  f"which accepts only: {', '.join(allowed)}.")
        if key == "transform_input":
            if not isinstance(value, bool):
                raise CheckpointError(f"{label} sets transform_input of torchvision {name} to "
                                      f"{printable(repr(value), 40)}; it must be true or false.")
        else:
            low, high = (1, MAX_NUM_CLASSES) if key == "num_classes" else (16, MAX_VIT_IMAGE_SIZE)
            whole = isinstance(value, int) and not isinstance(value, bool)
            if not whole or not low <= value <= high or (key == "image_size" and value % _patch_size(name)):
                extra = f", a multiple of {_patch_size(name)}" if key == "image_size" else ""
                raise CheckpointError(f"{label} sets the torchvision {name} argument '{key}' to "
                                      f"{printable(repr(value), 40)}; it must be a whole number from {low} to "
                                      f"{high}{extra}.")
        checked[key] = value
    params = count_params(meta_model(name, checked))
    if params > max_params:
        raise CheckpointError(f"{label} describes a torchvision {name} of {params:,} parameters; this app loads "
                              f"models of at most {max_params:,}.")
    return checked


def _constructor_args(name: str, kwargs: Mapping) -> dict:
    args = dict(kwargs)
    if name in _AUX_MODELS:  # no auxiliary heads; torchvision's slow scipy initialisation is skipped
        args.update(aux_logits=False, init_weights=False)
    return args


def meta_model(name: str, kwargs: Mapping) -> nn.Module:
    """The module's structure with its parameters on the ``meta`` device (shapes only, no memory)."""
    import torchvision

    with warnings.catch_warnings(), _MetaAllocations():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None, **_constructor_args(name, kwargs))


def build(name: str, kwargs: Mapping | None = None, label: str = "the file",
          max_params: int = MAX_TORCHVISION_PARAMS) -> nn.Module:
    """A randomly initialised torchvision model in eval mode, after :func:`check_kwargs`."""
    name = short_name(name, label)
    return _construct(name, check_kwargs(name, dict(kwargs or {}), label, max_params))


def _construct(name: str, checked: Mapping) -> nn.Module:
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None, **_constructor_args(name, checked)).eval()


# ---------------------------------------------------------------- reading a state_dict

@functools.lru_cache(maxsize=None)
def classifier_key(name: str) -> str:
    """The state_dict key of the weight whose first dimension is the number of classes.

    Found by comparing the shapes of two meta models (1000 and 7 classes): the last Linear for
    most architectures, the final 1×1 convolution for SqueezeNet.
    """
    a = meta_model(name, {"num_classes": 1000}).state_dict()
    b = meta_model(name, {"num_classes": 7}).state_dict()
    keys = [k for k in a if k.endswith("weight") and a[k].shape != b[k].shape and b[k].shape[0] == 7]
    if len(keys) != 1:
        raise RuntimeError(f"cannot tell the classifier of torchvision {name}: {keys}")
    return keys[0]


def _fix_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's published DenseNet files name ``norm.1`` what the module calls ``norm1``."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                         r"([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
    fixed = {}
    for key, value in state.items():
        match = pattern.match(key)
        fixed[match.group(1) + match.group(2) if match else key] = value
    return fixed


def prepare_state(name: str, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state_dict as the module names its tensors, and notes on what was changed.

    A ``module.`` prefix on every key (saved from ``nn.DataParallel``) is removed; DenseNet's old key
    names are renamed; GoogLeNet's and Inception-v3's auxiliary heads are dropped.
    """
    state = dict(state)
    notes = []
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
        notes.append("the 'module.' prefix of every key (nn.DataParallel) was removed")
    if name.startswith("densenet"):
        state = _fix_densenet_keys(state)
    if name in _AUX_MODELS:
        aux = [k for k in state if k.startswith(_AUX_PREFIXES)]
        for key in aux:
            del state[key]
        if aux:
            notes.append(f"the auxiliary training heads ({len(aux)} tensors) were left out: they take no part "
                         "in inference")
    return state, notes


def infer_kwargs(name: str, state: Mapping[str, torch.Tensor], label: str = "the file") -> dict:
    """The constructor arguments a state_dict implies: ``num_classes`` (and a ViT's ``image_size``)."""
    key = classifier_key(name)
    if key not in state:
        raise CheckpointError(f"{label} does not fit torchvision {name}: its classifier weight '{key}' is missing.")
    weight = state[key]
    if weight.dim() < 1 or weight.shape[0] < 1:
        raise CheckpointError(f"{label} does not fit torchvision {name}: '{key}' has shape {tuple(weight.shape)}.")
    kwargs: dict = {"num_classes": int(weight.shape[0])}
    if name.startswith("vit_") and "encoder.pos_embedding" in state:
        tokens = state["encoder.pos_embedding"].shape[1] - 1 if state["encoder.pos_embedding"].dim() == 3 else 0
        side = math.isqrt(max(tokens, 0))
        if side * side != tokens or side == 0:
            raise CheckpointError(f"{label} does not fit torchvision {name}: its position embedding holds "
                                  f"{tokens} patches, not a square number.")
        kwargs["image_size"] = side * _patch_size(name)
    return kwargs


def check_finite(model: nn.Module, label: str) -> None:
    """Refuse NaN or infinite values in any floating-point tensor of the model."""
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{label}: tensor '{printable(key, 80)}' holds NaN or infinite values.")


def from_state_dict(name: str, state: Mapping[str, torch.Tensor], label: str = "the file",
                    max_params: int = MAX_TORCHVISION_PARAMS,
                    extra_kwargs: Mapping | None = None) -> tuple[nn.Module, dict, list[str]]:
    """``(model, kwargs, notes)``: torchvision ``name`` holding ``state`` (eval mode, fp32).

    The arguments are inferred from the state_dict (:func:`infer_kwargs`) plus ``extra_kwargs``
    (``transform_input``); the architecture is bounded by ``max_params`` before it is built; every
    key and shape must fit (:func:`core.workloads.models.load_state_dict_into`) and every value be finite.
    """
    name = short_name(name, label)
    state, notes = prepare_state(name, state)
    checked = check_kwargs(name, {**infer_kwargs(name, state, label), **dict(extra_kwargs or {})}, label, max_params)
    model = _construct(name, checked)
    load_state_dict_into(model, state, label)
    check_finite(model, label)
    return model.float().eval(), checked, notes


def read_weights_file(name: str, path: str | Path, max_params: int = MAX_TORCHVISION_PARAMS
                      ) -> tuple[nn.Module, dict, list[str]]:
    """:func:`from_state_dict` with the state_dict read from a ``.pt``/``.pth``/``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file.")
    return from_state_dict(name, read_state_dict(path), path.name, max_params)


# ---------------------------------------------------------------- pretrained weights, from the local cache only

@dataclass(frozen=True)
class Pretrained:
    """torchvision's default weights of one architecture: where they live, and what they expect."""

    name: str
    weights: object  # the torchvision WeightsEnum member

    @property
    def label(self) -> str:
        return f"{type(self.weights).__name__}.{self.weights.name}"

    @property
    def url(self) -> str:
        return self.weights.url

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def path(self) -> Path:
        return hub_checkpoint_dir() / self.filename

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.weights.meta.get("categories") or ())

    @property
    def kwargs(self) -> dict:
        """The constructor arguments these weights need."""
        kwargs: dict = {"num_classes": len(self.categories) or 1000}
        if self.name in _AUX_MODELS:
            kwargs["transform_input"] = True
        if self.name.startswith("vit_"):
            kwargs["image_size"] = int(self.weights.meta["min_size"][0])
        return kwargs

    def transforms(self):
        """The weights' own pre-processing (``ImageClassification``: resize, centre crop, normalise)."""
        return self.weights.transforms()


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint folder: ``torch.hub.get_dir()/checkpoints`` ($TORCH_HOME moves it)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def pretrained(name: str) -> Pretrained:
    """torchvision's default weights for ``name`` (``get_model_weights(name).DEFAULT``)."""
    import torchvision

    name = short_name(name, "the request")
    return Pretrained(name, torchvision.models.get_model_weights(name).DEFAULT)


def _hash_prefix(filename: str) -> str | None:
    """The SHA256 prefix torch hub file names carry (``resnet18-f37072fd.pth``), if any."""
    match = re.search(r"-([0-9a-f]{8,64})\.", filename)
    return match.group(1) if match else None


def load_pretrained(name: str, max_params: int = MAX_TORCHVISION_PARAMS) -> tuple[nn.Module, dict, Pretrained]:
    """``(model, kwargs, info)``: torchvision ``name`` with its default pretrained weights, from the local cache.

    Never downloads. Raises :class:`CheckpointError` when the file is not in the cache (the
    message names the file, the folder and where to get it), or when its SHA256 does not start
    with the prefix in its name (altered or cut short).
    """
    info = pretrained(name)
    path = info.path
    if not path.is_file():
        raise CheckpointError(
            f"The pretrained weights of torchvision {info.name} ({info.label}) are not in the local torch hub "
            f"cache: expected the file {info.filename} in {path.parent}. This app does not download; fetch "
            f"{info.url} on a machine with internet access and put the file there (or set $TORCH_HOME to the "
            "folder above hub/checkpoints), or upload your own state_dict instead.")
    prefix = _hash_prefix(info.filename)
    if prefix is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        if not digest.hexdigest().startswith(prefix):
            raise CheckpointError(f"{path} does not match the SHA256 prefix {prefix} in its name: the file is "
                                  f"altered or cut short. Delete it and fetch {info.url} again.")
    checked = check_kwargs(info.name, info.kwargs, path.name, max_params)
    state, _ = prepare_state(info.name, read_state_dict(path))
    model = _construct(info.name, checked)
    load_state_dict_into(model, state, path.name)
    check_finite(model, path.name)
    return model.eval(), checked, info
