"""Per-group channel counts for a MAC target, chosen after the channel repair (issue 21's per-layer τ_ch).

Why. Uniform τ_ch (β = τ_ch · max_c s_c in every group) lets each group's score spread decide
how many of its channels go. Groups whose scores are spread wide lose most of their channels
first: on the shipped ResNet-20 at 0.665 × dense MACs it leaves one block 1 of its 16 inner
channels, and the repaired model 10 points below dense. How much a group can give up depends
on what the repair gives back, so every allocation here is judged whole, after the repair.

Shapes. A shape gives every prunable group g a weight w_g ≥ 0 (how readily it gives up
channels); at scale s the group keeps its ``k_g(s) = clamp(round(n_g · (1 − s · w_g)), 1, n_g)``
highest-scored channels (:meth:`ChannelPruner.masks_for_counts`), and s is the smallest
(bisection; counted MACs never grow with s) whose counted MACs are ≤ R × dense:

* ``uniform τ_ch``: the boundary rule itself, at the smallest τ_ch for the target;
* ``equal share``: w_g = 1, every group keeps the same share of its channels;
* ``streams at half``: w_g = ½ for a group written by several layers (a residual stream: the
  stem and every block's last conv write into it), 1 for the others (a block's inner channels);
* ``inner only``: w_g = 0 for those streams (kept whole), 1 for the others (skipped when the
  target cannot be reached so);
* ``MAC-weighted``: w_g ∝ the counted MACs one channel of g carries (dense MACs of its
  producers and consumers / n_g), scaled to a largest weight of 1.

The judge (:class:`ChannelJudge`): the smaller model of an allocation, repaired by
:func:`core.measure.channel_repair.repair_channels` on the *fitting* images, run in fp32 on
the *scoring* images, labelled training images disjoint from them
(:func:`core.measure.allocation_repair.scoring_split`); the search takes the lowest
``criterion`` (cross-entropy ``loss`` or ``kl`` to dense). The test split is never read here;
a caller verifies the choice on it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from core.common.steps import turn
from core.measure.accuracy import EvalData
from core.measure.allocation_repair import CRITERIA, Score, score_model
from core.measure.channel_repair import repair_channels
from core.measure.repair import RepairConfig
from core.measure.sensitivity import recipe_outputs
from core.method.channels import ChannelConfig, ChannelError, ChannelPruner, ChannelResult

SHAPES: tuple[str, ...] = ("uniform τ_ch", "equal share", "streams at half", "inner only", "MAC-weighted")
#: the search's repair: reconstruction on 256 training images (each judged allocation is one repair)
SEARCH_REPAIR = RepairConfig(method="reconstruct", n_images=256, n_holdout=0)
_BISECTION_STEPS = 40
KEEP_ALL = ChannelConfig()
TAU_TOLERANCE = 1e-3  # the τ_ch bisection stops when the bracket is this narrow


def smallest_tau_for_macs(pruner: ChannelPruner, ratio: float, base: ChannelConfig = KEEP_ALL,
                          tolerance: float = TAU_TOLERANCE) -> tuple[float, int]:
    """The smallest τ_ch (within ``tolerance``) whose counted MACs ≤ ``ratio`` × dense, and those MACs.

    Bisection on [0, 1]: counted MACs are non-increasing in τ_ch (a larger β removes a superset
    of channels in every group). :class:`ChannelError` when even τ_ch = 1 (one channel per
    prunable group) does not reach the ratio; it names the reachable ratio.
    """
    if not 0 < ratio <= 1:
        raise ChannelError(f"the MAC target must be in (0, 1] (a fraction of the dense MACs); got {ratio}")
    bound = ratio * pruner.macs_dense

    def macs(tau: float) -> int:
        return pruner.macs(ChannelConfig(tau=tau, layer_tau=base.layer_tau, norm=base.norm, fold_bn=base.fold_bn))

    if macs(0.0) <= bound:
        return 0.0, macs(0.0)
    top = macs(1.0)
    if top > bound:
        raise ChannelError(f"no τ_ch reaches {ratio:g} × dense MACs: at τ_ch = 1 (one channel per prunable group) "
                           f"the model still has {top / pruner.macs_dense:.3f} × dense (some groups cannot be pruned)")
    low, high = 0.0, 1.0
    while high - low > tolerance:
        mid = (low + high) / 2
        if macs(mid) <= bound:
            high = mid
        else:
            low = mid
    return high, macs(high)


@dataclass(frozen=True)
class ChannelSearchConfig:
    """``target_macs``: R, counted MACs ≤ R × dense; ``repair``: the repair each allocation is judged
    after; ``score_images``: labelled training images scored; ``criterion``: ``loss`` or ``kl``;
    ``steps``: greedy MAC moves tried after the best shape (0: the shapes only,
    :mod:`core.measure.channel_greedy`); ``move``: Δ, the MACs moved per step, as a fraction of the bound."""

    target_macs: float
    repair: RepairConfig = SEARCH_REPAIR
    score_images: int = 1000
    criterion: str = "loss"
    steps: int = 4
    move: float = 0.02

    def __post_init__(self) -> None:
        if not (isinstance(self.target_macs, (int, float)) and 0 < self.target_macs <= 1):
            raise ChannelError("the MAC target must be in (0, 1] (a fraction of the dense MACs); "
                               f"got {self.target_macs!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if not isinstance(self.repair, RepairConfig):
            raise TypeError(f"repair must be a RepairConfig, got {type(self.repair).__name__}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a whole number ≥ 0, got {self.steps!r}")
        if not (isinstance(self.move, (int, float)) and 0 < self.move < 1):
            raise ValueError(f"move must be a fraction in (0, 1), got {self.move!r}")


def shape_weights(pruner: ChannelPruner, shape: str) -> dict[str, float]:
    """Each prunable group's weight w_g under ``shape`` (see the module docstring)."""
    groups = [g for g in pruner.groups if g.prunable]
    if shape == "equal share":
        return {g.name: 1.0 for g in groups}
    if shape in ("streams at half", "inner only"):
        stream = 0.5 if shape == "streams at half" else 0.0
        return {g.name: (stream if len(g.producers) > 1 else 1.0) for g in groups}
    if shape == "MAC-weighted":
        dense = pruner.group_macs()
        per_channel = {g.name: dense[g.name] / g.channels for g in groups}
        top = max(per_channel.values(), default=1.0) or 1.0
        return {name: value / top for name, value in per_channel.items()}
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES[1:])}")


def counts_at(pruner: ChannelPruner, weights: Mapping[str, float], scale: float) -> dict[str, int]:
    """``k_g = clamp(round(n_g · (1 − scale · w_g)), 1, n_g)`` for every weighted group."""
    channels = {g.name: g.channels for g in pruner.groups}
    return {name: min(max(round(channels[name] * (1 - scale * w)), 1), channels[name]) for name, w in weights.items()}


def counts_for_target(pruner: ChannelPruner, weights: Mapping[str, float], ratio: float) -> dict[str, int] | None:
    """The counts at the smallest scale whose counted MACs are ≤ ``ratio`` × dense; None if no scale reaches it."""
    bound = ratio * pruner.macs_dense

    def macs(scale: float) -> int:
        return pruner.macs_of(pruner.masks_for_counts(counts_at(pruner, weights, scale)))

    top = 1.0 / max(min((w for w in weights.values() if w > 0), default=1.0), 1e-9)
    if macs(top) > bound:
        return None
    low, high = 0.0, top
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if macs(mid) > bound else (low, mid)
    return counts_at(pruner, weights, high)


def uniform_counts(pruner: ChannelPruner, ratio: float) -> dict[str, int]:
    """The kept counts of uniform τ_ch at the smallest τ_ch for ``ratio`` (the boundary rule)."""
    tau, _ = smallest_tau_for_macs(pruner, ratio)
    _, groups = pruner.removed(ChannelConfig(tau))  # the group table only: no model is built
    return {row.name: int(row.kept) for row in groups.itertuples() if row.prunable}


def shape_counts(pruner: ChannelPruner, shape: str, ratio: float) -> dict[str, int] | None:
    """The kept counts of ``shape`` (one of :data:`SHAPES`) for ``ratio`` × dense MACs; None if it cannot reach it."""
    if shape == "uniform τ_ch":
        return uniform_counts(pruner, ratio)
    return counts_for_target(pruner, shape_weights(pruner, shape), ratio)


def config_for_counts(pruner: ChannelPruner, counts: Mapping[str, int]) -> ChannelConfig:
    """The boundary rule's own form of an allocation: per group, τ_g = s_(k) / max_c s_c (s_(k) the k-th highest
    score), set on the group's first producer, so that β_g = τ_g · max s keeps exactly its top ``counts[g]`` channels
    (more only where scores tie). What a settings file records and Explore loads."""
    scores = pruner.scores()
    layer_tau = {}
    for group in pruner.groups:
        if group.name not in counts or not group.prunable:
            continue
        s = torch.sort(scores[group.name], descending=True).values
        k = min(max(int(counts[group.name]), 1), group.channels)
        top = float(s[0])
        layer_tau[group.producers[0]] = min(max(float(s[k - 1]) / top, 0.0), 1.0) if top > 0 else 0.0
    return ChannelConfig(layer_tau=layer_tau)


class ChannelJudge:
    """Scores channel allocations after the repair (see the module docstring); ``dense`` is never modified."""

    def __init__(self, dense: nn.Module, pruner: ChannelPruner, fit: torch.Tensor, score: EvalData,
                 config: ChannelSearchConfig):
        self.dense, self.pruner, self.fit, self.score_data, self.config = dense, pruner, fit, score, config
        self.memo: dict[tuple, Score] = {}
        _, self.dense_log_probs = recipe_outputs(dense, score.images, "fp32")

    def result(self, counts: Mapping[str, int]) -> ChannelResult:
        return self.pruner.apply(config_for_counts(self.pruner, counts))

    def __call__(self, counts: Mapping[str, int]) -> Score:
        key = tuple(sorted(counts.items()))
        if key not in self.memo:
            with turn():
                start = time.perf_counter()
                fixed = repair_channels(self.dense, self.result(counts), self.fit, self.config.repair)
                self.memo[key] = score_model(fixed.model, self.score_data, self.dense_log_probs, start)
        return self.memo[key]


@dataclass(frozen=True)
class ChannelChoice:
    """The chosen shape and its counts; ``candidates``: one row per shape (shape, MACs × dense,
    accuracy/loss/kl on the scoring images, seconds); ``seconds``: the whole search."""

    shape: str
    counts: dict[str, int]
    candidates: pd.DataFrame
    seconds: float


def choose_channels(judge: ChannelJudge, shapes: tuple[str, ...] = SHAPES,
                    progress: Callable[[int, int, str], None] | None = None) -> ChannelChoice:
    """Every shape's counts for the target, judged after the repair; the lowest criterion wins."""
    start = time.perf_counter()
    pruner, ratio = judge.pruner, judge.config.target_macs
    rows, best = [], None
    for i, shape in enumerate(shapes):
        counts = shape_counts(pruner, shape, ratio)
        if progress is not None:
            progress(i, len(shapes), shape)
        if counts is None:
            rows.append({"shape": shape, "macs_ratio": float("nan"), "note": "cannot reach the target"})
            continue
        score = judge(counts)
        macs = pruner.macs_of(pruner.masks_for_counts(counts)) / pruner.macs_dense
        rows.append({"shape": shape, "macs_ratio": macs, "accuracy": score.accuracy, "loss": score.loss,
                     "kl": score.kl, "seconds": score.seconds, "note": ""})
        if best is None or score.value(judge.config.criterion) < best[2].value(judge.config.criterion):
            best = (shape, counts, score)
    if progress is not None:
        progress(len(shapes), len(shapes), "done")
    if best is None:
        raise ChannelError(f"no allocation reaches {ratio:g} × dense MACs")
    return ChannelChoice(best[0], dict(best[1]), pd.DataFrame(rows), time.perf_counter() - start)
