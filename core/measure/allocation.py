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

Two refinements live beside it: the joint check among candidate allocations
(:mod:`core.measure.allocation_joint`) and the verification on the test set at equal retention
(:mod:`core.measure.allocation_verify`); both cache their rows under :func:`allocation_cache_dir`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.common import paths
from core.measure.sensitivity import Sensitivity, monotone_drops
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.method.pruning import boundary
from core.method.quantization import layer_storage

TARGET_KINDS: tuple[str, ...] = ("retention", "bytes", "max_drop")
ALLOCATION_CACHE_VERSION = 2
DEFAULT_STEP = 0.005

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


def smallest_reachable(engine: Engine, layers: Sequence[str], largest_tau: float) -> tuple[float, int]:
    """(retention, stored bytes) with every layer of ``layers`` at ``largest_tau``: the least a grid reaches."""
    result = engine.apply(CompressionConfig(layer_tau={name: largest_tau for name in layers}))
    stats = result.stats.set_index("name").loc[list(layers)]
    return float(stats["kept"].sum() / stats["numel"].sum()), int(result.model_bytes_compressed)


def allocation_cache_dir() -> Path:
    """Default location of cached verification rows (and, under ``joint/``, the joint check's):
    ``core.common.paths.cache_dir()/"allocation"``."""
    return paths.cache_dir() / "allocation"
