"""Automatic per-layer τ: spend a budget of weights (or bytes, or accuracy) where it costs least accuracy.

The allocation (:func:`allocate`). Each layer ℓ is offered every τ of a fine grid from 0 to
the largest measured τ (``step`` apart, plus the measured τ values). At each τ the layer's
kept weights are counted exactly from its sorted magnitudes (as the engine counts them), its
cost is those weights (``"retention"``) or their stored bytes (``"bytes"``, the engine's
storage format), and its estimated drop is the measured sensitivity drop, made non-negative
and non-decreasing in τ (:func:`core.measure.sensitivity.monotone_drops`) and interpolated
linearly in τ between the measured τ values (0 at τ = 0). Drops are taken as additive over
layers, which holds roughly for small drops.

The problem: choose τ_ℓ minimising Σ drop_ℓ(τ_ℓ) subject to Σ cost_ℓ(τ_ℓ) ≤ budget (or,
for a largest drop D, minimising Σ kept subject to Σ drop ≤ D). It is solved on each layer's
lower convex hull of (cost, drop), greedily in order of drop per unit of cost saved (the
Lagrangian solution path); the step that crosses the budget is then backed off inside that
layer to the exact kept count that meets it, so the total lands on the budget or, where ties
of |W| make a count unreachable, just under it.

The joint check (:func:`choose_jointly`). Measured on the shipped ResNet-20 and ResNet-18, the
sum of single-layer drops is a poor estimate once every layer is pruned: at 20 % retention of
ResNet-18 it predicted 1.8 points, the setting lost 42 (no BN recalibration); after BN
recalibration it ranks global magnitude's allocation below its own when the test set says
the opposite. So the allocation is one of a few candidates at the same budget (itself, global
magnitude's per-layer τ, and blends of the two), each run whole on the sensitivity's own
images (not the test images), and the most accurate there is chosen.

The check (:func:`compare_at_equal_retention`): the chosen setting, uniform τ at the same
retention (the τ whose kept count is closest to it) and global magnitude pruning of exactly
the same number of weights, each with and without BN recalibration, on the full test set in
fp32, every accuracy paired against the dense model's predictions on the same images.
Verified rows are cached on disk like the sensitivity.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.common import paths
from core.measure.accuracy import (
    CALIBRATION_RECIPE,
    EvalData,
    bn_recalibrate,
    calibration_images,
    eval_data,
    has_batchnorm,
    predict,
)
from core.measure.baselines import magnitude_baseline
from core.measure.paired import balanced_order, paired_interval
from core.measure.sensitivity import JsonCache, Sensitivity, model_key, monotone_drops
from core.measure.sweeps import tensor_digest
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.method.pruning import boundary, layer_weight
from core.method.quantization import layer_storage
from core.workloads.data import CIFAR_MEAN, CIFAR_STD

TARGET_KINDS: tuple[str, ...] = ("retention", "bytes", "max_drop")
ALLOCATION_CACHE_VERSION = 2
DEFAULT_STEP = 0.005
METHOD_LABELS: dict[str, str] = {"dense": "dense", "uniform": "uniform τ", "per_layer": "automatic per-layer τ",
                                 "global_magnitude": "global magnitude"}
COMPARISON_COLUMNS: tuple[str, ...] = (
    "method", "bn_recalibrated", "tau", "kept", "retention", "bytes", "accuracy", "n", "newly_wrong",
    "newly_right", "drop", "predicted_drop", "seconds", "cached")

ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Target:
    """What to meet: ``retention`` (a fraction in (0, 1] of the Conv/Linear weights), ``bytes``
    (the whole model's stored size, as the engine counts it) or ``max_drop`` (the largest
    estimated accuracy drop, a fraction: 0.01 = one point)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"the target must be one of {', '.join(TARGET_KINDS)}, got {self.kind!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float, np.integer, np.floating)):
            raise ValueError(f"the {self.kind} target must be a number, got {self.value!r}")
        value = float(self.value)
        if not math.isfinite(value):
            raise ValueError(f"the {self.kind} target must be finite, got {value}")
        if self.kind == "retention" and not 0 < value <= 1:
            raise ValueError(f"the target retention must be in (0, 1], got {value:g}")
        if self.kind == "bytes" and value <= 0:
            raise ValueError(f"the target size must be a positive number of bytes, got {value:g}")
        if self.kind == "max_drop" and not 0 <= value <= 1:
            raise ValueError(f"the largest drop must be in [0, 1] (a fraction; 0.01 = one point), got {value:g}")
        object.__setattr__(self, "value", value)

    def label(self) -> str:
        if self.kind == "retention":
            return f"retention ≤ {100 * self.value:.4g} %"
        if self.kind == "bytes":
            return f"stored size ≤ {self.value:,.0f} bytes"
        return f"estimated drop ≤ {100 * self.value:.3g} points"


# ---------------------------------------------------------------- the layers' options

@dataclass
class LayerOptions:
    """One layer's choices: ascending ``taus`` (from 0) with ``kept`` weights, ``cost`` and estimated ``drop``."""

    name: str
    numel: int
    taus: np.ndarray
    kept: np.ndarray
    cost: np.ndarray
    drop: np.ndarray
    sorted_abs: torch.Tensor = field(repr=False)
    max_abs: torch.Tensor = field(repr=False)
    cost_of_kept: Callable[[int], float] = field(repr=False)
    measured_taus: np.ndarray = field(repr=False, default=None)
    measured_drops: np.ndarray = field(repr=False, default=None)

    def count_below(self, tau: float) -> int:
        """#{|W| < τ·max|W|}, exactly as the engine counts it."""
        threshold = boundary(self.max_abs, tau).reshape(1).to(self.sorted_abs.dtype)
        return int(torch.searchsorted(self.sorted_abs, threshold, side="left"))

    def kept_at(self, tau: float) -> int:
        return self.numel - self.count_below(tau)

    def drop_at(self, tau: float) -> float:
        return float(np.interp(tau, self.measured_taus, self.measured_drops))

    def tau_for_kept(self, kept: int) -> tuple[float, int] | None:
        """A τ keeping exactly ``kept`` weights or, where ties of |W| forbid that count, the
        largest reachable count below it: ``(τ, kept at τ)``; ``None`` if float rounding of
        τ·max|W| leaves no τ for that count (then keep a grid τ)."""
        kept = max(0, min(int(kept), self.numel))
        if kept >= self.numel or float(self.max_abs) == 0.0:
            return 0.0, self.numel
        values = self.sorted_abs
        p = self.numel - kept  # prune the p smallest: a threshold in (s[p-1], s[p]]
        while p < self.numel and bool(values[p - 1] == values[p]):
            p += 1  # ties: every weight equal to s[p-1] goes with it
        if p >= self.numel:
            return (1.0, self.kept_at(1.0)) if self.count_below(1.0) == self.numel - 1 else None
        lo, hi, top = float(values[p - 1]), float(values[p]), float(self.max_abs)
        ulp = float(np.spacing(np.float32(hi)))
        for threshold in ((lo + hi) / 2, hi, hi - ulp / 2, hi - ulp, lo + ulp):
            tau = min(max(threshold / top, 0.0), 1.0)
            if self.count_below(tau) == p:
                return tau, self.numel - p
        return None


def _cost_function(kind: str, numel: int, dense_bits: int) -> Callable[[int], float]:
    if kind == "bytes":
        return lambda kept: float(layer_storage(numel, 1, int(kept), 0, None, None, dense_bits=dense_bits).total)
    return lambda kept: float(kept)


def layer_options(sensitivity: Sensitivity, engine: Engine, cost: str = "retention",
                  step: float = DEFAULT_STEP, metric: str = "drop") -> list[LayerOptions]:
    """Every measured layer's options on a fine τ grid (``cost``: ``"retention"`` counts weights, ``"bytes"`` bytes)."""
    if cost not in ("retention", "bytes"):
        raise ValueError(f"cost must be retention or bytes, got {cost!r}")
    if not 0 < step <= 1:
        raise ValueError("step must be in (0, 1]")
    drops = sensitivity.drops(metric)
    measured = np.array([0.0] + list(sensitivity.taus))
    top = float(measured[-1])
    fine = np.union1d(np.round(np.arange(0.0, top + step / 2, step), 10), measured)
    fine = fine[fine <= top + 1e-12]
    options = []
    for name in sensitivity.layers:
        sorted_abs = engine.sorted_magnitudes(name)
        numel = int(sorted_abs.numel())
        max_abs = sorted_abs[-1] if numel else sorted_abs.new_zeros(())
        measured_drops = monotone_drops([0.0] + [float(d) for d in drops.loc[name]])
        layer = LayerOptions(name=name, numel=numel, taus=fine, kept=np.zeros(0), cost=np.zeros(0),
                             drop=np.zeros(0), sorted_abs=sorted_abs, max_abs=max_abs,
                             cost_of_kept=_cost_function(cost, numel, torch.finfo(sorted_abs.dtype).bits),
                             measured_taus=measured, measured_drops=measured_drops)
        layer.kept = np.array([layer.kept_at(float(t)) for t in fine], dtype=np.int64)
        layer.cost = np.array([layer.cost_of_kept(k) for k in layer.kept], dtype=float)
        layer.drop = np.interp(fine, measured, measured_drops)
        options.append(layer)
    return options


# ---------------------------------------------------------------- the allocation

@dataclass(frozen=True)
class Allocation:
    """The chosen per-layer τ and what it costs: ``kept``/``numel`` weights, ``cost`` in the
    target's unit (weights or layer bytes), ``predicted_drop`` (sum of the layers' estimated drops)."""

    layer_tau: dict[str, float]
    kept: dict[str, int]
    numel: int
    cost: float
    budget: float | None
    predicted_drop: float
    target: Target
    layer_drop: dict[str, float] = field(default_factory=dict)
    method: str = "sensitivity"
    candidates: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def total_kept(self) -> int:
        return int(sum(self.kept.values()))

    @property
    def retention(self) -> float:
        return self.total_kept / self.numel if self.numel else 1.0

    def config(self, tau: float = 0.0) -> CompressionConfig:
        """The setting: every measured layer with its own τ (``tau`` for any other layer)."""
        return CompressionConfig(tau=tau, layer_tau=dict(self.layer_tau))


def _hull(cost: np.ndarray, drop: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of (cost, drop), from the largest cost (τ = 0) down.

    Points are visited in order of decreasing cost; the hull is where the drop per unit of
    cost saved only grows. Points not cheaper than the last hull point are skipped.
    """
    order = [0]
    for i in range(1, len(cost)):
        if cost[i] >= cost[order[-1]]:
            if drop[i] < drop[order[-1]] and cost[i] == cost[order[-1]]:
                order[-1] = i
            continue
        while len(order) >= 2:
            a, b = order[-2], order[-1]
            # slope a→b vs a→i (drop added per cost saved); b leaves the hull if a→i is no steeper
            if (drop[b] - drop[a]) * (cost[a] - cost[i]) >= (drop[i] - drop[a]) * (cost[a] - cost[b]):
                order.pop()
            else:
                break
        order.append(i)
    return order


def allocate(options: Sequence[LayerOptions], target: Target, fixed_cost: float = 0.0) -> Allocation:
    """Per-layer τ meeting ``target`` with the least estimated drop (see the module docstring).

    ``fixed_cost``: what the target counts besides the layers' cost (for ``bytes``: every
    parameter and buffer that is not a pruned weight). Raises ``ValueError`` when the grid
    cannot reach the target.
    """
    if not options:
        raise ValueError("no layer to allocate")
    numel = sum(o.numel for o in options)
    choice = [0] * len(options)  # index into each layer's fine grid; 0 = τ = 0
    segments = []  # (ratio, -saved, layer, from index, to index)
    for li, o in enumerate(options):
        hull = _hull(o.cost, o.drop)
        for a, b in zip(hull, hull[1:]):
            saved = o.cost[a] - o.cost[b]
            added = o.drop[b] - o.drop[a]
            segments.append((added / saved, -saved, li, a, b))
    segments.sort()
    total_cost = float(sum(o.cost[0] for o in options))
    total_drop = 0.0
    budget = None
    if target.kind == "retention":
        budget = math.floor(target.value * numel + 1e-9)
    elif target.kind == "bytes":
        budget = target.value - fixed_cost
    if budget is not None:
        smallest = sum(float(o.cost[-1]) for o in options)
        if smallest > budget + 1e-9:
            reach = (f"{100 * smallest / numel:.2f} % retention" if target.kind == "retention"
                     else f"{smallest + fixed_cost:,.0f} bytes")
            raise ValueError(f"the τ grid cannot reach {target.label()}: at its largest τ every layer together "
                             f"keeps {reach}; measure larger τ values")
        marginal = None
        for ratio, _, li, a, b in segments:
            if total_cost <= budget:
                break
            o = options[li]
            total_cost += o.cost[b] - o.cost[a]
            total_drop += o.drop[b] - o.drop[a]
            choice[li] = b
            marginal = (li, a, b)
        layer_tau = {o.name: float(o.taus[choice[i]]) for i, o in enumerate(options)}
        kept = {o.name: int(o.kept[choice[i]]) for i, o in enumerate(options)}
        if marginal is not None and total_cost < budget:
            # back the last step off to the exact count that meets the budget
            li, a, b = marginal
            o = options[li]
            slack = budget - total_cost
            low, high = int(o.kept[b]), int(o.kept[a])
            while low < high:  # the largest kept in [kept_b, kept_a] whose extra cost fits the slack
                mid = (low + high + 1) // 2
                if o.cost_of_kept(mid) - o.cost[b] <= slack + 1e-9:
                    low = mid
                else:
                    high = mid - 1
            exact = o.tau_for_kept(low)
            if exact is not None and exact[1] >= kept[o.name] \
                    and o.cost_of_kept(exact[1]) - o.cost[b] <= slack + 1e-9:
                tau, reached = exact
                total_cost += o.cost_of_kept(reached) - o.cost[b]
                total_drop += o.drop_at(tau) - o.drop[b]
                layer_tau[o.name], kept[o.name] = tau, reached
    else:  # the largest drop: save as much as the drop allows
        limit = target.value + 1e-12
        closed: set[int] = set()
        for ratio, _, li, a, b in segments:
            o = options[li]
            if li in closed or choice[li] != a:
                continue
            if total_drop + o.drop[b] - o.drop[a] <= limit:
                total_cost += o.cost[b] - o.cost[a]
                total_drop += o.drop[b] - o.drop[a]
                choice[li] = b
                continue
            # the cheapest point between the two hull points whose drop still fits; the layer stops here
            fits = [i for i in range(a + 1, b) if total_drop + o.drop[i] - o.drop[a] <= limit and o.cost[i] < o.cost[a]]
            if fits:
                best = min(fits, key=lambda i: (o.cost[i], o.drop[i]))
                total_cost += o.cost[best] - o.cost[a]
                total_drop += o.drop[best] - o.drop[a]
                choice[li] = best
            closed.add(li)
        layer_tau = {o.name: float(o.taus[choice[i]]) for i, o in enumerate(options)}
        kept = {o.name: int(o.kept[choice[i]]) for i, o in enumerate(options)}
    layer_drop = {o.name: o.drop_at(layer_tau[o.name]) for o in options}
    return Allocation(layer_tau=layer_tau, kept=kept, numel=numel, cost=float(total_cost), budget=budget,
                      predicted_drop=float(sum(layer_drop.values())), target=target, layer_drop=layer_drop)


def fixed_bytes(engine: Engine, layers: Sequence[str]) -> float:
    """Stored bytes of everything but ``layers``' weights (what a ``bytes`` target counts besides them)."""
    result = engine.apply(CompressionConfig())
    stats = result.stats.set_index("name")
    return float(result.model_bytes_compressed - stats.loc[list(layers), "compressed_bytes"].sum())


def per_layer_tau(sensitivity: Sensitivity, engine: Engine, target: Target,
                  step: float = DEFAULT_STEP, metric: str = "drop") -> Allocation:
    """:func:`allocate` from a sensitivity measurement, costs counted in the target's unit."""
    cost = "bytes" if target.kind == "bytes" else "retention"
    options = layer_options(sensitivity, engine, cost, step, metric)
    fixed = fixed_bytes(engine, sensitivity.layers) if target.kind == "bytes" else 0.0
    return allocate(options, target, fixed)


# ---------------------------------------------------------------- a joint check among candidates

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
    from core.measure.sensitivity import recipe_outputs, sensitivity_images

    config = sensitivity.config
    if config is None:
        raise ValueError("the sensitivity does not carry its configuration; measure it with measure_sensitivity")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    found = candidate_allocations(sensitivity, engine, target, step)
    images, _, _ = sensitivity_images(config, data, mean, std)
    bn = has_batchnorm(model)
    if bn and calibration is None:
        calibration = calibration_images(config.calibration_size, config.calibration_seed, mean, std)
    context = {"version": ALLOCATION_CACHE_VERSION, "torch": torch.__version__, "device": torch.device(device).type,
               "model": model_key(model, model_id), "precision": sensitivity.precision,
               "images": {"images": tensor_digest(images.images), "labels": tensor_digest(images.labels)},
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


def smallest_reachable(engine: Engine, layers: Sequence[str], largest_tau: float) -> tuple[float, int]:
    """(retention, stored bytes) with every layer of ``layers`` at ``largest_tau``: the least a grid reaches."""
    result = engine.apply(CompressionConfig(layer_tau={name: largest_tau for name in layers}))
    stats = result.stats.set_index("name").loc[list(layers)]
    return float(stats["kept"].sum() / stats["numel"].sum()), int(result.model_bytes_compressed)


def uniform_tau_for_kept(engine: Engine, layers: Sequence[str], kept: int, iterations: int = 60) -> float:
    """The uniform τ whose kept count over ``layers`` is closest to ``kept`` (bisection; retention falls with τ)."""
    sorted_abs = [engine.sorted_magnitudes(name) for name in layers]

    def count(tau: float) -> int:
        total = 0
        for values in sorted_abs:
            if values.numel():
                threshold = boundary(values[-1], tau).reshape(1).to(values.dtype)
                total += values.numel() - int(torch.searchsorted(values, threshold, side="left"))
        return total

    low, high = 0.0, 1.0  # count(low) ≥ kept ≥ count(high) once bracketed
    if count(high) >= kept:
        return high
    for _ in range(iterations):
        mid = (low + high) / 2
        if count(mid) >= kept:
            low = mid
        else:
            high = mid
    return low if abs(count(low) - kept) <= abs(count(high) - kept) else high


# ---------------------------------------------------------------- verification

def allocation_cache_dir() -> Path:
    """Default location of cached verification rows: ``core.common.paths.cache_dir()/"allocation"``."""
    return paths.cache_dir() / "allocation"


@dataclass
class Comparison:
    """The verified table (:data:`COMPARISON_COLUMNS`, one row per method and BN flag) and the
    predictions behind it (``predictions[(method, bn)]``, on ``labels``' images)."""

    frame: pd.DataFrame
    labels: torch.Tensor
    predictions: dict[tuple[str, bool], torch.Tensor]
    config: CompressionConfig
    uniform_tau: float
    images: str

    def difference(self, a: str, b: str, bn: bool) -> tuple[float, float, float]:
        """Accuracy of method ``a`` minus method ``b`` (same BN flag) on the same images, with a paired
        95 % interval that treats the images as a sample of the distribution they come from."""
        pa, pb = self.predictions[(a, bn)], self.predictions[(b, bn)]
        right_a, right_b = pa == self.labels, pb == self.labels
        gained, lost, n = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum()), len(self.labels)
        low, high = paired_interval(gained, lost, n, population=10 ** 12)
        return (gained - lost) / n, low, high


def test_images(n: int | None = None, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> EvalData:
    """The CIFAR-10 test set (``n=None``) or its first ``n`` images in a class-balanced order, normalised."""
    data = eval_data("test", tuple(float(m) for m in mean), tuple(float(s) for s in std))
    if n is None or n >= len(data):
        return data
    if n < 1:
        raise ValueError(f"the number of test images must be ≥ 1, got {n}")
    index = balanced_order(data.labels)[:n].sort().values
    return EvalData(data.images[index].contiguous(), data.labels[index], "test")


def _predict_fp32(model: nn.Module, images: torch.Tensor, device) -> torch.Tensor:
    run = model
    if any(isinstance(m, nn.Conv2d) for m in model.modules()) and torch.device(device).type == "cpu":
        with torch.no_grad():
            run = model.to(memory_format=torch.channels_last)
    return predict(run, images, batch_size=1000, device=device, precision="fp32")


def compare_at_equal_retention(
    model: nn.Module,
    allocation: Allocation,
    *,
    engine: Engine | None = None,
    data: EvalData | None = None,
    calibration: torch.Tensor | None = None,
    calibration_size: int = 2000,
    calibration_seed: int = 42,
    bn_recalibration: bool = True,
    model_id: str | None = None,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
    device: str | torch.device = "cpu",
    use_cache: bool = True,
    cache_root: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
) -> Comparison:
    """The automatic per-layer τ against uniform τ and global magnitude at the same retention.

    ``data``: the verification images (default: the full CIFAR-10 test set); every model runs
    in fp32 and, with ``bn_recalibration`` (and BatchNorm in the model), also after
    :func:`bn_recalibrate` on ``calibration`` (default: ``calibration_size`` augmented training
    images). ``drop`` is the dense model's accuracy minus the row's, from paired counts on the
    same images; ``bytes`` the stored size in the engine's format (for global magnitude, of its
    per-layer kept counts in that format). ``model`` is never modified.
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    engine = engine if engine is not None else Engine(model)
    layers = list(allocation.layer_tau)
    data = data if data is not None else eval_data("test", mean, std)
    bn = bn_recalibration and has_batchnorm(model)
    images = f"{len(data):,} {data.split} images"
    config = allocation.config()
    kept = allocation.total_kept
    uniform = uniform_tau_for_kept(engine, layers, kept)
    n_total = allocation.numel
    calibration_key = None
    if bn:
        calibration_key = ({"images": tensor_digest(calibration)} if calibration is not None else
                           {"split": "train", "n": calibration_size, "seed": calibration_seed,
                            "recipe": CALIBRATION_RECIPE, "mean": list(mean), "std": list(std)})
    context = {"version": ALLOCATION_CACHE_VERSION, "torch": torch.__version__, "device": torch.device(device).type,
               "model": model_key(model, model_id),
               "data": {"images": tensor_digest(data.images), "labels": tensor_digest(data.labels)},
               "calibration": calibration_key, "layers": layers}
    root = Path(cache_root) if cache_root is not None else allocation_cache_dir()
    cache = JsonCache(root, context, use_cache)
    plan = [("dense", None), ("uniform", CompressionConfig(layer_tau={n: uniform for n in layers})),
            ("per_layer", config), ("global_magnitude", n_total - kept)]
    rows = [(method, setting, flag) for method, setting in plan for flag in ((False, True) if bn else (False,))]
    calib = {"images": calibration}

    def calibration_set() -> torch.Tensor:
        if calib["images"] is None:
            calib["images"] = calibration_images(calibration_size, calibration_seed, mean, std)
        return calib["images"]

    if on_progress is not None:
        on_progress(0, len(rows), "starting")
    records, predictions = [], {}
    for done, (method, setting, flag) in enumerate(rows, start=1):
        key = {"method": method, "bn": flag,
               "setting": (setting.to_dict() if isinstance(setting, CompressionConfig) else setting)}
        stored = cache.get(key)
        cached = stored is not None
        if stored is None:
            start = time.perf_counter()
            if method == "global_magnitude":
                pruned, _ = magnitude_baseline(model, "global_magnitude", int(setting))
                counts = {name: int(torch.count_nonzero(layer_weight(pruned, name))) for name in layers}
                kept_here = sum(counts.values())
                size = int(fixed_bytes(engine, layers) + sum(
                    layer_storage(engine.sorted_magnitudes(name).numel(), 1, count, 0, None, None,
                                  dense_bits=torch.finfo(engine.sorted_magnitudes(name).dtype).bits).total
                    for name, count in counts.items()))
            else:
                result = engine.apply(setting if setting is not None else CompressionConfig())
                pruned = result.model
                stats = result.stats.set_index("name")
                kept_here = int(stats.loc[layers, "kept"].sum())
                size = int(result.model_bytes_compressed)
            if flag:
                pruned = bn_recalibrate(pruned, calibration_set())
            predicted = _predict_fp32(pruned, data.images, device)
            stored = {"kept": kept_here, "bytes": size, "predictions": predicted.tolist(),
                      "seconds": time.perf_counter() - start}
            cache.put(key, stored)
        predicted = torch.tensor(stored["predictions"], dtype=torch.int64)
        predictions[(method, flag)] = predicted
        if on_progress is not None:
            on_progress(done, len(rows), METHOD_LABELS[method] + (" + BN recal" if flag else ""))
        records.append({"method": method, "bn_recalibrated": flag,
                        "tau": uniform if method == "uniform" else (0.0 if method == "dense" else float("nan")),
                        "kept": stored["kept"], "retention": stored["kept"] / n_total,
                        "bytes": stored["bytes"] if stored["bytes"] is not None else pd.NA,
                        "seconds": stored["seconds"], "cached": cached})
    dense_right = predictions[("dense", False)] == data.labels
    n = len(data)
    for record in records:
        right = predictions[(record["method"], record["bn_recalibrated"])] == data.labels
        record.update(accuracy=int(right.sum()) / n, n=n, newly_wrong=int((dense_right & ~right).sum()),
                      newly_right=int((~dense_right & right).sum()))
        record["drop"] = (record["newly_wrong"] - record["newly_right"]) / n
        record["predicted_drop"] = allocation.predicted_drop if record["method"] == "per_layer" else float("nan")
    frame = pd.DataFrame.from_records(records, columns=list(COMPARISON_COLUMNS))
    frame["bytes"] = frame["bytes"].astype("Int64")
    return Comparison(frame=frame, labels=data.labels, predictions=predictions, config=config,
                      uniform_tau=uniform, images=images)


def format_comparison(frame: pd.DataFrame) -> str:
    """The comparison as a printable table (percentages, bytes with thousands separators)."""
    out = pd.DataFrame({
        "method": frame["method"].map(METHOD_LABELS),
        "BN recal": frame["bn_recalibrated"].map({True: "yes", False: "no"}),
        "retention_%": (100 * frame["retention"]).map("{:.2f}".format),
        "kept": frame["kept"].map("{:,}".format),
        "bytes": frame["bytes"].map(lambda b: "" if pd.isna(b) else f"{int(b):,}"),
        "accuracy_%": (100 * frame["accuracy"]).map("{:.2f}".format),
        "drop_pts": (100 * frame["drop"]).map("{:+.2f}".format),
        "newly_wrong": frame["newly_wrong"], "newly_right": frame["newly_right"],
        "uniform_tau": frame["tau"].map(lambda t: "" if pd.isna(t) or t == 0 else f"{t:.4f}"),
    })
    return out.to_string(index=False)


def format_candidates(frame: pd.DataFrame) -> str:
    """The joint check's candidates as a printable table."""
    out = pd.DataFrame({
        "candidate": frame["candidate"], "retention_%": (100 * frame["retention"]).map("{:.2f}".format),
        "accuracy_%": (100 * frame["accuracy"]).map("{:.2f}".format), "loss": frame["loss"].map("{:.4f}".format),
        "sum_of_single_drops_pts": (100 * frame["predicted_drop"]).map("{:.2f}".format),
        "chosen": frame["chosen"].map({True: "◀", False: ""}),
    })
    return out.to_string(index=False)
