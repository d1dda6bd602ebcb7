"""Accuracy on the real CIFAR-10 test set, a quick estimate with its confidence interval,
and BatchNorm recalibration.

* :func:`eval_data` decodes a split once and keeps it normalised in memory (per process,
  keyed by split, normalisation and data root).
* :func:`evaluate` is the full-test figure: ``torch.inference_mode``, large batches,
  ``channels_last`` for conv nets on CPU.
* :func:`quick_accuracy` runs a fixed, class-balanced subset and reports the Wilson 95%
  interval, for live slider feedback.
* :func:`bn_recalibrate` re-estimates BatchNorm running statistics on a class-mixed sample
  of training images (cumulative average, ``momentum=None``) in a *copy* of the model,
  leaving every weight untouched: a no-retraining accuracy repair after pruning.
"""
from __future__ import annotations

import copy
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from core.common.steps import checkpoint, interruptible
from core.workloads.data import (CIFAR_MEAN, CIFAR_STD, CLASSES, EXPECTED_COUNTS, augment, load_cifar10,
                                 load_jpeg_sample, normalize)

Z_95 = 1.959963984540054
# How calibration images are drawn; part of every cache key that depends on them.
CALIBRATION_RECIPE = "train-split, random crop (pad 4) + horizontal flip, as in training"


@dataclass(frozen=True)
class EvalData:
    """Normalised images (float32 N×3×32×32) and int64 labels of one split."""

    images: torch.Tensor
    labels: torch.Tensor
    split: str

    def __len__(self) -> int:
        return int(self.labels.numel())


@lru_cache(maxsize=8)
def _eval_data(split: str, mean: tuple[float, ...], std: tuple[float, ...], root: str | None) -> EvalData:
    raw = load_cifar10(split, root=root)
    return EvalData(normalize(raw.images, mean, std).contiguous(), raw.labels, split)


def eval_data(split: str = "test", mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD,
              root: str | os.PathLike | None = None) -> EvalData:
    """The split, normalised ``(x/255 − mean)/std``; decoded once per process (treat as read-only)."""
    return _eval_data(split, tuple(float(m) for m in mean), tuple(float(s) for s in std),
                      None if root is None else str(root))


@dataclass(frozen=True)
class AccuracyReport:
    """Top-1 accuracy (fraction) over ``n`` images, per-class accuracy in CLASSES order."""

    accuracy: float
    per_class: tuple[float, ...]
    n: int
    seconds: float


def _uses_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000, device: str | torch.device = "cpu",
            precision: str = "fp32") -> torch.Tensor:
    """Predicted class per image (the model is run in eval mode; its mode is restored).

    ``precision="bf16"`` runs under bf16 autocast (faster where the hardware has native bf16;
    used only for estimates whose agreement with fp32 was measured, never for a reported
    full-test figure).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    channels_last = _uses_conv(model) and device.type == "cpu"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    try:
        predictions = []
        with autocast:
            for start in range(0, len(images), batch_size):
                checkpoint()  # a job running this may stop between batches (core.common.steps)
                x = images[start:start + batch_size].to(device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                predictions.append(model(x).argmax(1).cpu())
        return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int64)
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, data: EvalData, batch_size: int = 1000, device: str | torch.device = "cpu") -> AccuracyReport:
    """Accuracy and per-class accuracy of ``model`` on every image of ``data``."""
    start = time.perf_counter()
    run = model
    on_cpu = torch.device(device).type == "cpu"
    if not on_cpu:
        run = copy.deepcopy(model).to(device)  # never move the caller's model
    elif _uses_conv(model):
        run = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with interruptible(run) if run is not model else nullcontext():  # a private copy: stop within a layer
        predictions = predict(run, data.images, batch_size, device)
    correct = predictions == data.labels
    per_class = tuple(
        int(correct[data.labels == c].sum()) / int((data.labels == c).sum()) if (data.labels == c).any()
        else float("nan")
        for c in range(len(CLASSES))
    )
    return AccuracyReport(int(correct.sum()) / max(len(data), 1), per_class, len(data), time.perf_counter() - start)


@dataclass(frozen=True)
class QuickEstimate:
    """Accuracy on a class-balanced subset with its Wilson 95% confidence interval."""

    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    seconds: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``correct / n``."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def balanced_subset(data: EvalData, per_class: int, seed: int = 0) -> EvalData:
    """A fixed subset with ``per_class`` images of every class (same seed → same images)."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(len(CLASSES)):
        members = torch.nonzero(data.labels == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"class {CLASSES[c]} has only {len(members)} images, asked for {per_class}")
        picks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    index = torch.cat(picks).sort().values
    return EvalData(data.images[index].contiguous(), data.labels[index], f"{data.split}[{per_class}/class]")


def quick_accuracy(model: nn.Module, subset: EvalData, device: str | torch.device = "cpu") -> QuickEstimate:
    """Accuracy on a (balanced) subset with its Wilson 95% interval."""
    start = time.perf_counter()
    predictions = predict(model, subset.images, batch_size=len(subset) or 1, device=device)
    correct = int((predictions == subset.labels).sum())
    low, high = wilson_interval(correct, len(subset))
    return QuickEstimate(correct / max(len(subset), 1), low, high, len(subset), time.perf_counter() - start)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def bn_recalibrate(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running mean/var are re-estimated on ``images``.

    The statistics are the cumulative average over the batches (``momentum=None``), as
    in a fresh estimate; weights, biases and every other parameter are left as they are.
    The input model is not modified; a model without BatchNorm is returned as a copy.
    """
    calibrated = copy.deepcopy(model)
    norms = [m for m in calibrated.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return calibrated.eval()
    saved_momentum = {}
    for module in norms:
        saved_momentum[module] = module.momentum
        module.reset_running_stats()
        module.momentum = None
    calibrated.train()
    device = next(calibrated.parameters()).device
    with interruptible(calibrated):  # a job running this may stop within a layer (core.common.steps)
        for start in range(0, len(images), batch_size):
            calibrated(images[start:start + batch_size].to(device))
    for module, momentum in saved_momentum.items():
        module.momentum = momentum
    return calibrated.eval()


def calibration_images(n_images: int = 2000, seed: int = 42, mean: tuple[float, ...] = CIFAR_MEAN,
                       std: tuple[float, ...] = CIFAR_STD, root: str | os.PathLike | None = None) -> torch.Tensor:
    """A random, class-mixed sample of ``n_images`` normalised *training* images (fixed by ``seed``).

    The images get the training augmentation (random crop of the 4-pixel padded image, random
    flip): BatchNorm statistics must match the activations the network was trained under.
    Measured on the shipped ResNet-20: recalibrating the *dense* model on un-augmented images
    costs about 5 points of accuracy, on augmented ones it keeps the dense accuracy.
    """
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(EXPECTED_COUNTS["train"], generator=generator)[:n_images]
    train = load_jpeg_sample("train", index, root=None if root is None else str(root))
    return normalize(augment(train.images, generator), mean, std).contiguous()
