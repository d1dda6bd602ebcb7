"""The Learn page's live demo: one convolution, dense vs zeroed weights vs removed channels, timed here and now.

Contract: :func:`channel_speed_demo` builds one Conv2d (random weights, seeded), keeps the same
fraction of its weights two ways, and times the three forward passes interleaved
(:func:`core.common.timing.time_interleaved`, one thread, a quiet moment on the shared compute
queue if one comes):

* **dense**: every weight;
* **zeros**: the boundary rule at that retention (the smallest |W| set to zero): same tensor
  shape, so PyTorch's dense kernel does exactly the same multiply-adds;
* **channels**: the same share of whole output channels kept (the filters with the largest L2
  norm) and sliced out: a smaller Conv2d, so the kernel does fewer multiply-adds.

Nothing is cached or hard-coded: every figure is measured on this machine when called.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from core.common.timing import time_interleaved
from core.services.compute_queue import COMPUTE


@dataclass(frozen=True)
class SpeedDemo:
    """The measured table (``variant``, ``weights kept``, ``MACs``, ``median ms``, ``speed-up``), the layer and input
    it was measured on, and whether nothing else ran meanwhile (``quiet``)."""

    table: pd.DataFrame
    layer: str
    input_shape: tuple[int, ...]
    rounds: int
    quiet: bool


def channel_speed_demo(kept: float = 0.5, channels: int = 256, size: int = 16, batch: int = 8,
                       budget_s: float = 0.5, seed: int = 0) -> SpeedDemo:
    """Time one ``channels``→``channels`` 3×3 conv on ``batch``×``channels``×``size``×``size``: dense, with a
    share ``kept`` of its weights kept as nonzeros, and with a share ``kept`` of its output channels kept."""
    if not 0.0 < kept <= 1.0:
        raise ValueError(f"kept must be in (0, 1]; got {kept}")
    if channels < 1 or size < 1 or batch < 1:
        raise ValueError(f"channels, size and batch must be positive; got {channels}, {size}, {batch}")
    generator = torch.Generator().manual_seed(seed)
    dense = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
    with torch.no_grad():
        dense.weight.copy_(torch.randn(dense.weight.shape, generator=generator) * 0.05)
        weight = dense.weight
        zeros = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
        n_keep = max(1, round(kept * weight.numel()))
        threshold = weight.abs().flatten().kthvalue(weight.numel() - n_keep + 1).values  # keep the n_keep largest |W|
        zeros.weight.copy_(torch.where(weight.abs() >= threshold, weight, torch.zeros(())))
        k = max(1, round(kept * channels))
        top = weight.flatten(1).norm(dim=1).topk(k).indices.sort().values
        sliced = nn.Conv2d(channels, k, 3, padding=1, bias=False).eval()
        sliced.weight.copy_(weight[top])
    x = torch.randn(batch, channels, size, size, generator=generator)
    models = {"dense": dense, "zeros": zeros, "channels": sliced}
    with torch.inference_mode(), COMPUTE.exclusive(timeout_s=1.0, threads=1) as ticket:
        timings = time_interleaved({name: (lambda m=m: m(x)) for name, m in models.items()}, warmup=2,
                                   min_rounds=5, max_rounds=200, budget_s=budget_s)
    positions = batch * size * size
    dense_ms = timings["dense"].median_ms
    labels = {"dense": "dense (every weight)", "zeros": "zeroed weights (boundary rule, same shape)",
              "channels": "removed channels (a smaller conv)"}
    rows = []
    for name, model in models.items():
        w = model.weight
        rows.append({"variant": labels[name], "weights kept": int((w != 0).sum()) / weight.numel(),
                     "MACs (counted)": positions * w.shape[0] * w.shape[1] * 9,
                     "median ms": timings[name].median_ms, "speed-up": dense_ms / timings[name].median_ms})
    return SpeedDemo(table=pd.DataFrame(rows), layer=f"Conv2d({channels}, {channels}, 3×3)",
                     input_shape=tuple(x.shape), rounds=min(t.rounds for t in timings.values()),
                     quiet=ticket.exclusive)
