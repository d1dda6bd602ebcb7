"""Fidelity to the dense model, for images without labels: top-1 agreement and the mean KL divergence.

Without labels there is no accuracy; what can be measured is how far the compressed model's
outputs move from the dense model's on the same images:

* **top-1 agreement**: the share of images on which both models predict the same class, with its
  Wilson 95 % interval;
* **mean KL divergence** KL(p_dense ‖ p_compressed) of the softmax outputs, in nats, averaged over
  the images (0 when the outputs are identical).

Both models run in eval mode under ``torch.inference_mode``, in fp32; neither is modified.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.measure.accuracy import wilson_interval


@dataclass(frozen=True)
class Fidelity:
    """Agreement (fraction) and mean KL divergence (nats) of the compressed model to the dense one on ``n`` images."""

    agreement: float
    agreement_low: float
    agreement_high: float
    mean_kl: float
    n: int
    seconds: float


@torch.inference_mode()
def _logits(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)


def fidelity(dense: nn.Module, compressed: nn.Module, images: torch.Tensor, batch_size: int = 64,
             device: str | torch.device = "cpu") -> Fidelity:
    """Top-1 agreement and mean KL(p_dense ‖ p_compressed) on ``images`` (normalised, N×C×H×W; N ≥ 1)."""
    if len(images) == 0:
        raise ValueError("fidelity needs at least one image")
    start = time.perf_counter()
    device = torch.device(device)
    reference = _logits(dense, images, batch_size, device)
    output = _logits(compressed, images, batch_size, device)
    same = int((reference.argmax(1) == output.argmax(1)).sum())
    log_p = F.log_softmax(reference, dim=1)
    log_q = F.log_softmax(output, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1).clamp_min(0).mean().item()
    low, high = wilson_interval(same, len(images))
    return Fidelity(same / len(images), low, high, kl, len(images), time.perf_counter() - start)
