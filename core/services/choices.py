"""Which models the explorer offers, and loading one.

* :func:`model_choices` lists the shipped checkpoints whose JSON card exists, the paper's
  synthetic MLP (random weights, seed 42) and, only when no trained checkpoint is shipped
  at all, an untrained ResNet-20 labelled as such.
* :func:`load_choice` builds the :class:`LoadedModel` for a choice key (``pretrained:NAME``,
  ``synthetic:mlp``, ``untrained:NAME``).
* :func:`load_torchvision_pretrained` loads a torchvision architecture with its pretrained
  weights from the local torch hub cache (an uploaded state_dict goes through
  :func:`core.services.uploads.read_upload` with ``arch="torchvision:<name>"``).

Nothing here imports Streamlit.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from core.workloads import torchvision_models as tv
from core.workloads.data import CIFAR_MEAN, CIFAR_STD, CLASSES
from core.workloads.preprocess import Preprocess
from core.workloads.provenance import describe
from core.services.recorded import RecordedSetting
from core.workloads.models import (
    PRETRAINED,
    REGISTRY,
    build,
    card_path,
    load_card,
    load_pretrained,
)

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
    input_kind: str  # "cifar10" (3×32×32, CIFAR-10 classes), "image" (3×S×S, S = image_size) or "vector"
    trained: bool
    note: str = ""
    card: dict | None = None
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD
    source: str = ""  # where the weights came from (file name, checkpoint path, seed)
    arch_kwargs: dict = field(default_factory=dict)
    #: how images become this model's input (None: the registry's CIFAR-10 recipe, 32 px with ``mean``/``std``)
    preprocess: Preprocess | None = None
    categories: tuple[str, ...] = ()  # the name of each output, where known (pretrained weights, CIFAR-10)
    #: for an uploaded export of this app: the setting it records (the page shows it as loaded)
    recorded: RecordedSetting | None = None
    #: for a model rebuilt from a channel-pruned file: its channel record (the dense architecture's kept channels per
    #: group, :meth:`core.method.channel_config.ChannelResult.record`); exports of it write the record again
    channels: dict | None = None

    @property
    def in_dim(self) -> int:
        first = next(m for m in self.model.modules() if isinstance(m, nn.Linear))
        return first.in_features

    @property
    def image_size(self) -> int:
        """The side of the square input image (32 for the CIFAR-10 models)."""
        return self.preprocess.image_size if self.preprocess is not None else 32

    def input_preprocess(self) -> Preprocess:
        """How images become this model's input: its own recipe, or CIFAR-10's 32 px with its mean and std."""
        if self.preprocess is not None:
            return self.preprocess
        return Preprocess.for_size(32, self.mean, self.std, "the CIFAR-10 recipe of the model")

    def provenance(self) -> dict:
        """Where the model came from, as files record it: ``arch``, ``arch_kwargs`` and, if any, ``input``."""
        record = {"arch": self.arch, "arch_kwargs": dict(self.arch_kwargs)}
        if self.preprocess is not None:
            record["input"] = self.preprocess.to_dict()
        return record

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A fixed random input batch of the right shape (N(0, 1); images are already normalised)."""
        generator = torch.Generator().manual_seed(seed)
        if self.input_kind == "vector":
            shape: tuple[int, ...] = (batch, self.in_dim)
        else:
            shape = (batch, 3, self.image_size, self.image_size)
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
                           source=f"torch.manual_seed({SYNTHETIC_SEED}); core.workloads.models.build({name!r})")
    raise ValueError(f"unknown model choice {key!r}")


# ---------------------------------------------------------------- torchvision models

def model_inputs(arch: str, kwargs: dict, preprocess: Preprocess | None) -> tuple[str, str, Preprocess | None]:
    """``(description, input_kind, preprocess)`` of a model of architecture ``arch``.

    Registry models keep their CIFAR-10 recipe (``preprocess`` None). A torchvision model takes
    ``preprocess`` (default: ImageNet's 224 px); it is evaluated on CIFAR-10 (``input_kind``
    ``"cifar10"``) when it is CIFAR-sized: 10 classes at 32 px.
    """
    if not tv.is_torchvision(arch):
        spec = REGISTRY[arch]
        return spec.description, spec.input_kind, None
    preprocess = preprocess or Preprocess(source="ImageNet defaults")
    cifar_sized = kwargs.get("num_classes") == 10 and preprocess.image_size == 32
    return describe(arch, kwargs), ("cifar10" if cifar_sized else "image"), preprocess


def torchvision_loaded(key: str, label: str, arch: str, model: nn.Module, kwargs: dict, preprocess: Preprocess | None,
                       note: str, source: str, categories: tuple[str, ...] = ()) -> LoadedModel:
    """The :class:`LoadedModel` of a trained torchvision (or registry) model with its pre-processing."""
    _, kind, preprocess = model_inputs(arch, kwargs, preprocess)
    if kind == "cifar10" and not categories:
        categories = CLASSES
    mean = preprocess.mean if preprocess is not None else CIFAR_MEAN
    std = preprocess.std if preprocess is not None else CIFAR_STD
    return LoadedModel(key, label, arch, model, kind, True, note, None, tuple(mean), tuple(std), source,
                       dict(kwargs), preprocess, tuple(categories))


def load_torchvision_pretrained(name: str, preprocess: Preprocess | None = None) -> LoadedModel:
    """torchvision ``name`` with its default pretrained weights from the local torch hub cache.

    ``preprocess``: None for the weights' own ``transforms()``. Raises ``CheckpointError`` (naming
    the file and where to put it) when the weights are not in the cache; never downloads.
    """
    model, kwargs, info = tv.load_pretrained(name)
    preprocess = preprocess or Preprocess.from_weights(info.transforms(), f"the transforms() of {info.label}")
    arch = tv.arch_name(info.name)
    note = (f"torchvision's pretrained {info.label} ({len(info.categories) or kwargs['num_classes']:,} classes), read "
            f"from the local torch hub cache with weights_only=True; input: {preprocess.describe()}")
    return torchvision_loaded(f"{arch}:pretrained@{preprocess.tag()}", f"torchvision {info.name} — pretrained "
                              f"({info.label})", arch, model, kwargs, preprocess, note, str(info.path), info.categories)
