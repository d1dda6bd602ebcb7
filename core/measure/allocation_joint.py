"""The joint check: candidate allocations at one budget, each run whole on the sensitivity's images, the best chosen.

The joint check (:func:`choose_jointly`). Measured on the shipped ResNet-20 and ResNet-18, the
sum of single-layer drops is a poor estimate once every layer is pruned: at 20 % retention of
ResNet-18 it predicted 1.8 points, the setting lost 42 (no BN recalibration); after BN
recalibration it ranks global magnitude's allocation below its own when the test set says
the opposite. So the allocation is one of a few candidates at the same budget (itself, global
magnitude's per-layer τ, and blends of the two), each run whole on the sensitivity's own
images (not the test images), and the most accurate there is chosen.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.common.steps import turn
from core.measure.accuracy import EvalData, calibration_images, has_batchnorm
from core.measure.allocation import (
    ALLOCATION_CACHE_VERSION,
    DEFAULT_STEP,
    Allocation,
    LayerOptions,
    ProgressCallback,
    Target,
    allocate,
    allocation_cache_dir,
    fixed_bytes,
    layer_options,
)
from core.measure.disk_cache import JsonCache, base_context, images_key, tensor_digest
from core.measure.sensitivity import Sensitivity, recipe_outputs, sensitivity_images
from core.method.engine import Engine
from core.workloads.data import CIFAR_MEAN, CIFAR_STD

BLENDS: tuple[float, ...] = (0.25, 0.5, 0.75)


def _allocation_for_kept(options: Sequence[LayerOptions], kept: dict[str, int], like: Allocation,
                         method: str) -> Allocation:
    """The allocation keeping (at most) ``kept[ℓ]`` weights per layer, every τ exact where reachable."""
    layer_tau, reached = {}, {}
    for o in options:
        exact = o.tau_for_kept(kept[o.name])
        if exact is None:  # rounding leaves no τ for that count: the fine-grid τ just below it
            index = int(np.argmax(o.kept <= kept[o.name])) if (o.kept <= kept[o.name]).any() else len(o.kept) - 1
            exact = float(o.taus[index]), int(o.kept[index])
        layer_tau[o.name], reached[o.name] = exact
    layer_drop = {o.name: o.drop_at(layer_tau[o.name]) for o in options}
    return Allocation(layer_tau=layer_tau, kept=reached, numel=like.numel,
                      cost=float(sum(o.cost_of_kept(reached[o.name]) for o in options)), budget=like.budget,
                      predicted_drop=float(sum(layer_drop.values())), target=like.target, layer_drop=layer_drop,
                      method=method)


def magnitude_kept(options: Sequence[LayerOptions], total: int) -> dict[str, int]:
    """Per-layer kept counts of global magnitude pruning keeping (at most) ``total`` weights."""
    magnitudes = torch.cat([o.sorted_abs for o in options]).sort().values
    if total <= 0:
        return {o.name: 0 for o in options}
    threshold = magnitudes[len(magnitudes) - total]
    kept = {o.name: o.numel - int(torch.searchsorted(o.sorted_abs, threshold.reshape(1), side="left"))
            for o in options}
    if sum(kept.values()) > total:  # ties at the threshold: keep only what is strictly above it
        kept = {o.name: o.numel - int(torch.searchsorted(o.sorted_abs, threshold.reshape(1), side="right"))
                for o in options}
    return kept


def _blend(a: dict[str, int], b: dict[str, int], alpha: float, total: int, numel: dict[str, int]) -> dict[str, int]:
    """``alpha·a + (1 − alpha)·b`` per layer, rounded by largest remainder to sum to ``total``."""
    ideal = {name: alpha * a[name] + (1 - alpha) * b[name] for name in a}
    kept = {name: min(int(math.floor(v)), numel[name]) for name, v in ideal.items()}
    for name in sorted(ideal, key=lambda n: ideal[n] - kept[n], reverse=True)[:max(0, total - sum(kept.values()))]:
        kept[name] = min(kept[name] + 1, numel[name])
    return kept


def candidate_allocations(sensitivity: Sensitivity, engine: Engine, target: Target,
                          step: float = DEFAULT_STEP) -> list[Allocation]:
    """The sensitivity allocation (:func:`per_layer_tau`), global magnitude's per-layer τ at the
    same number of weights, and blends of the two (:data:`BLENDS`: that share of each layer's
    kept count from the sensitivity allocation, the rest from magnitude), all at the same total;
    for a ``bytes`` target only those within the budget; for ``max_drop`` only the first."""
    cost = "bytes" if target.kind == "bytes" else "retention"
    options = layer_options(sensitivity, engine, cost, step)
    fixed = fixed_bytes(engine, sensitivity.layers) if target.kind == "bytes" else 0.0
    base = allocate(options, target, fixed)
    if target.kind == "max_drop":
        return [base]
    total = base.total_kept
    magnitude = magnitude_kept(options, total)
    numel = {o.name: o.numel for o in options}
    found = [base, _allocation_for_kept(options, magnitude, base, "magnitude")]
    found += [_allocation_for_kept(options, _blend(base.kept, magnitude, alpha, total, numel), base, f"blend {alpha:g}")
              for alpha in BLENDS]
    return [a for a in found if base.budget is None or a.cost <= base.budget + 1e-9]


def choose_jointly(
    model: nn.Module,
    sensitivity: Sensitivity,
    engine: Engine,
    target: Target,
    *,
    data: EvalData | None = None,
    calibration: torch.Tensor | None = None,
    model_id: str | None = None,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
    device: str | torch.device = "cpu",
    step: float = DEFAULT_STEP,
    use_cache: bool = True,
    cache_root: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
) -> Allocation:
    """The best of :func:`candidate_allocations`, judged *jointly* on the sensitivity's own images.

    Single-layer drops add up poorly once many layers are pruned (and after BN recalibration),
    so each candidate is run whole, every layer at its τ, on the images the sensitivity was
    measured on (never the test images, unless the sensitivity used them), at its precision and,
    for a model with BatchNorm, after BN recalibration on the sensitivity's calibration images:
    the highest accuracy wins, ties going to the lower mean loss. ``data`` must be what the
    sensitivity was measured from when it was given one. The returned allocation's
    ``candidates`` frame lists every candidate with its figures (``chosen`` marks the winner).
    """
    config = sensitivity.config
    if config is None:
        raise ValueError("the sensitivity does not carry its configuration; measure it with measure_sensitivity")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    found = candidate_allocations(sensitivity, engine, target, step)
    images, _, _ = sensitivity_images(config, data, mean, std)
    bn = has_batchnorm(model)
    if bn and calibration is None:
        calibration = calibration_images(config.calibration_size, config.calibration_seed, mean, std)
    context = {**base_context(ALLOCATION_CACHE_VERSION, model, model_id, device), "precision": sensitivity.precision,
               "images": images_key(images),
               "calibration": None if not bn else {"images": tensor_digest(calibration)}}
    cache = JsonCache((Path(cache_root) if cache_root is not None else allocation_cache_dir()) / "joint", context,
                      use_cache)
    if on_progress is not None:
        on_progress(0, len(found), "starting")
    rows = []
    for done, candidate in enumerate(found, start=1):
        key = {"config": candidate.config().to_dict()}
        values = cache.get(key)
        if values is None:
            with turn():  # one step: in a job, a turn on the compute queue (core.common.steps)
                predicted, log_probs = recipe_outputs(engine.apply(candidate.config()).model, images.images,
                                                      sensitivity.precision, calibration if bn else None, device)
            picked = log_probs[torch.arange(len(images)), images.labels]
            values = {"correct": int((predicted == images.labels).sum()), "loss": float(-picked.mean())}
            cache.put(key, values)
        rows.append({"candidate": candidate.method, "retention": candidate.retention, "kept": candidate.total_kept,
                     "accuracy": values["correct"] / len(images), "loss": values["loss"],
                     "predicted_drop": candidate.predicted_drop})
        if on_progress is not None:
            on_progress(done, len(found), candidate.method)
    frame = pd.DataFrame(rows)
    best = min(range(len(found)), key=lambda i: (-frame["accuracy"].iloc[i], frame["loss"].iloc[i]))
    frame["chosen"] = [i == best for i in range(len(found))]
    frame.attrs.update(images=sensitivity.images, bn_recalibrated=bn, precision=sensitivity.precision)
    return replace(found[best], candidates=frame)


def format_candidates(frame: pd.DataFrame) -> str:
    """The joint check's candidates as a printable table."""
    out = pd.DataFrame({
        "candidate": frame["candidate"], "retention_%": (100 * frame["retention"]).map("{:.2f}".format),
        "accuracy_%": (100 * frame["accuracy"]).map("{:.2f}".format), "loss": frame["loss"].map("{:.4f}".format),
        "sum_of_single_drops_pts": (100 * frame["predicted_drop"]).map("{:.2f}".format),
        "chosen": frame["chosen"].map({True: "◀", False: ""}),
    })
    return out.to_string(index=False)
