"""A torchvision architecture at its smallest test size, for tests that run every one of them."""
from __future__ import annotations

import torch
from torch import nn

from core.workloads import torchvision_models as tv


def small_torchvision(name: str) -> tuple[nn.Module, int, dict]:
    """``name`` with 10 classes and seeded random weights, the smallest square input it runs on (px), and the
    constructor arguments it was built with.

    32 px where the architecture allows it (its ``MIN_INPUT`` otherwise); the ViTs are built for 32 px.
    """
    torch.manual_seed(0)
    kwargs = {"num_classes": 10}
    size = tv.MIN_INPUT.get(name, 32)
    if name.startswith("vit_"):
        kwargs["image_size"] = size = 32
    return tv.build(name, kwargs), size, kwargs
