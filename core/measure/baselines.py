"""Magnitude-pruning baselines at a given number of pruned weights, for comparisons at equal retention.

Boundary pruning spends its retention budget per layer (β_ℓ = τ · max|W_ℓ|); these spend the
same budget by plain |W| ranking, either over the whole model or per layer in proportion to
its size. Both run through ``torch.nn.utils.prune`` on a deep copy, so the loaded model is
never touched.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from core.method.pruning import prunable_layers

BASELINES: tuple[str, ...] = ("global_magnitude", "layer_l1")


def _largest_remainder(numels: Sequence[int], n_prune: int) -> list[int]:
    """Per-layer prune counts ≈ (n_prune/N)·n_i, summing exactly to ``n_prune``."""
    total = sum(numels)
    if total == 0:
        return [0] * len(numels)
    ideal = [n_prune * n / total for n in numels]
    counts = [math.floor(x) for x in ideal]
    left = n_prune - sum(counts)
    order = sorted(range(len(numels)), key=lambda i: (ideal[i] - counts[i], numels[i]), reverse=True)
    for i in order:
        if left == 0:
            break
        if counts[i] < numels[i]:
            counts[i] += 1
            left -= 1
    return counts


def magnitude_baseline(model: nn.Module, method: str, n_prune: int, include_norm: bool = False) -> tuple[nn.Module, float]:
    """A pruned deep copy of ``model`` and its measured retention.

    ``method="global_magnitude"``: ``prune.global_unstructured`` (L1) removing exactly
    ``n_prune`` weights over all Conv/Linear layers; ``"layer_l1"``: ``prune.l1_unstructured``
    per layer, the counts apportioned by largest remainder (same total). The masks are made
    permanent with ``prune.remove``; ``model`` itself is not modified.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose from {BASELINES}")
    with torch.no_grad():
        pruned = copy.deepcopy(model)
    layers = prunable_layers(pruned, include_norm=include_norm)
    numels = [layer.weight.numel() for layer in layers]
    if not 0 <= n_prune <= sum(numels):
        raise ValueError(f"cannot prune {n_prune} of {sum(numels)} weights")
    if method == "global_magnitude":
        prune.global_unstructured([(layer.module, layer.param) for layer in layers],
                                  pruning_method=prune.L1Unstructured, amount=int(n_prune))
    else:
        for layer, count in zip(layers, _largest_remainder(numels, n_prune)):
            prune.l1_unstructured(layer.module, layer.param, amount=int(count))
    kept = sum(int(getattr(layer.module, f"{layer.param}_mask").sum()) for layer in layers)
    for layer in layers:
        prune.remove(layer.module, layer.param)
    return pruned.eval(), kept / sum(numels)
