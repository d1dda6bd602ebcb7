"""Progressive paired accuracy for the explorer, shared by every session of the server process.

* :class:`EvaluationSet`: labelled images and their balanced order (:func:`core.measure.paired.balanced_order`);
  one per data set and normalisation, decoded once: the CIFAR-10 test set (:func:`cifar_test_set`)
  or the user's labelled images (:func:`image_set`, keyed by the images' digest).
* Dense predictions are computed once per (model, data set, precision) and shared by all
  sessions; each setting's predictions are kept per (model, data set, setting, repair
  variant, precision), so a revisited setting resumes where it stopped, or is instant. The
  variant (``bn``) is False (no repair), True (BN recalibration) or any hashable key of a
  repair (:meth:`core.services.session_repairs.SessionRepairs.variant`).
* :func:`refine` extends one setting's predictions by one batch, sized so that a batch takes
  about :data:`BATCH_TARGET_S` (a new slider move interrupts the page between batches).

Estimates run in bf16 where the CPU has native bf16 (AMX / AVX-512-BF16): its predictions
agreed with fp32 on ≥ 99.5 % of the test set (``python benchmarks/progressive_accuracy.py``
prints the measured agreement); the full-test figure the page reports is always fp32.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from collections.abc import Hashable
from typing import Callable

import torch
from torch import nn

from core.common.hardware import native_bf16
from core.common.lru import LRUCache
from core.measure.accuracy import eval_data, predict
from core.measure.paired import PairedEstimate, PredictionStore, balanced_order, paired_estimate
from core.method.config import CompressionConfig

BATCH_TARGET_S = 0.08  # seconds of inference per refinement step: how long a slider move may wait
#: every step's size is a multiple of this (the first step is one of it), so the batches a model sees
#: come from a handful of shapes. oneDNN keeps the compiled kernels of each input shape it ran in a
#: process-wide cache of 1,024 entries (about 25 per shape for ResNet-20); steps of any size filled it
#: and it held about 65 MiB after the users of ``benchmarks/load_test.py --users 30`` had left
#: (measured by running the same test with ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``: +6 % instead of +14 %).
FIRST_BATCH = 16
MAX_BATCH = 1024
#: pixels of input per forward pass inside a step (128 images at 32×32; 2 at 224×224): the step's
#: images go through the model in chunks this size, so the activations of a 1,000-image step of
#: ResNet-20 (32 MiB per layer output in bf16) never sit in memory at once; measured with the
#: load test, the allocator kept hundreds of MiB of such transient buffers after the users left.
PREDICT_PIXELS = 128 * 32 * 32
ORDER_SEED = 0


@dataclass(frozen=True)
class EvaluationSet:
    """Normalised images with labels, and the fixed balanced order in which estimates visit them."""

    key: str
    images: torch.Tensor
    labels: torch.Tensor
    order: torch.Tensor
    labels_in_order: torch.Tensor

    @property
    def population(self) -> int:
        return len(self.order)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        return self.images[self.order[start:stop]]


@functools.lru_cache(maxsize=4)
def cifar_test_set(mean: tuple[float, ...], std: tuple[float, ...]) -> EvaluationSet:
    """The CIFAR-10 test set (JPEG copy) normalised with ``mean``/``std``, in balanced order."""
    data = eval_data("test", mean, std)
    order = balanced_order(data.labels, seed=ORDER_SEED)
    return EvaluationSet(f"cifar10-test:{mean}:{std}", data.images, data.labels, order, data.labels[order])


def estimate_precision(device: str) -> str:
    return "bf16" if native_bf16(torch.device(device).type) else "fp32"


_IMAGE_SETS = LRUCache(4)  # ImageSet.key -> EvaluationSet (the tensors are the ImageSet's, not copies)


def image_set(images) -> EvaluationSet:
    """The user's labelled images (a :class:`core.workloads.image_folder.ImageSet` whose labels are the
    model's outputs) as an evaluation set; its key is derived from the images' digest."""
    if images.labels is None:
        raise ValueError("an evaluation set needs labelled images")

    def make() -> EvaluationSet:
        order = balanced_order(images.labels, seed=ORDER_SEED)
        return EvaluationSet(images.key, images.images, images.labels, order, images.labels[order])

    return _IMAGE_SETS.get_or_create(images.key, make)


_DENSE = LRUCache(16)  # (model key, set key, precision, device) -> PredictionStore
_SETTINGS = LRUCache(4096)  # (model key, set key, config, bn, precision, device) -> PredictionStore (20 KB each)


def clear() -> None:
    _DENSE.clear()
    _SETTINGS.clear()
    _IMAGE_SETS.clear()
    cifar_test_set.cache_clear()


def stores(model_key: str, data: EvaluationSet, config: CompressionConfig, bn: bool | Hashable,
           device: str) -> tuple[PredictionStore, PredictionStore, str]:
    """The dense and the setting's prediction stores (shared process-wide), and the precision used."""
    precision = estimate_precision(device)
    dense = _DENSE.get_or_create((model_key, data.key, precision, device), lambda: PredictionStore(data.population))
    setting = _SETTINGS.get_or_create((model_key, data.key, config, bn, precision, device),
                                      lambda: PredictionStore(data.population))
    return dense, setting, precision


def current(model_key: str, data: EvaluationSet, config: CompressionConfig, bn: bool | Hashable,
            device: str) -> PairedEstimate | None:
    """What is known for this setting now, without computing anything (None before the first batch)."""
    dense, setting, precision = stores(model_key, data, config, bn, device)
    if min(dense.done, setting.done) == 0:
        return None
    return paired_estimate(data.labels_in_order, dense, setting, precision)


def _next_stop(store: PredictionStore) -> int:
    if store.done == 0 or store.seconds <= 0:
        return FIRST_BATCH
    per_image = store.seconds / store.done
    size = min(MAX_BATCH, max(FIRST_BATCH, BATCH_TARGET_S / per_image))
    return store.done + FIRST_BATCH * round(size / FIRST_BATCH)


def refine(model_key: str, data: EvaluationSet, config: CompressionConfig, bn: bool | Hashable, device: str,
           dense_model: nn.Module, model: Callable[[], nn.Module]) -> PairedEstimate:
    """One refinement step: the dense predictions, then this setting's, for the next batch.

    ``model`` is called only when the setting needs more predictions (building a
    BN-recalibrated copy or a repaired model is itself work). Callers run this inside a queued job.
    """
    dense, setting, precision = stores(model_key, data, config, bn, device)
    stop = _next_stop(setting)

    def run(m: nn.Module):
        def forward(a: int, b: int):
            images = data.batch(a, b)
            pixels = max(1, images[0, 0].numel()) if images.ndim >= 3 and len(images) else 1
            chunk = max(1, min(b - a, PREDICT_PIXELS // pixels))
            return predict(m, images, batch_size=chunk, device=device, precision=precision)
        return forward

    dense.extend_to(stop, run(dense_model))
    if setting.done < min(stop, dense.done):
        setting.extend_to(min(stop, dense.done), run(model()))
    return paired_estimate(data.labels_in_order, dense, setting, precision)
