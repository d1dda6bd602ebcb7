"""Greedy moves of counted MACs between channel groups, each re-measured after the repair (issue 21).

The shapes of :mod:`core.measure.channel_allocation` fix how the groups share the cut by one
rule. This search then moves MACs between groups and keeps a move only when the *repaired*
model scores better, as :func:`core.measure.allocation_repair.greedy_after_repair` moves
weights between layers, here with MACs as the currency, since the MAC target is the budget.

With the bound B = R × dense counted MACs and the step Δ = ``move`` × B:

* rates: for every prunable group g, re-measured after the repair,
  ``harm_g`` = (criterion with g giving up the fewest channels that free ≥ Δ MACs − now) / MACs freed,
  ``gain_g`` = (now − criterion with g taking the most channels that cost ≤ Δ MACs) / MACs spent;
  a group at one channel cannot give, a whole group cannot take;
* a move d → r: d gives its channels, then r takes as many (at most its take) as keep the
  counted MACs ≤ B; its predicted change is ``gain_r · spent − harm_d · freed``;
* each step re-measures the best predicted untried move, keeps it when the criterion falls
  (then re-measures d's and r's rates and forgets the rejected pairs), else marks the pair tried;
* fill: a donor often frees more than its receiver may spend, so the moves leave MACs under B
  unspent. At the end the groups with the highest positive gain rates (at most ``FILL_TRIES``) each
  take in turn the most channels the room ``B − MACs`` allows; a fill is kept when the criterion falls.

Counted MACs are exact at every step (:meth:`ChannelPruner.macs_of`), so the result meets the
bound. The judge scores training images only; the test split is never read here.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pandas as pd

from core.measure.allocation_repair import Score
from core.measure.channel_allocation import ChannelChoice, ChannelJudge

FILL_TRIES = 2
STEP_COLUMNS = ["step", "donor", "receiver", "given", "taken", "predicted", "before", "after", "accuracy", "accepted"]


@dataclass(frozen=True)
class GroupRates:
    """One group's measured rates: ``give`` channels freeing ``freed`` MACs cost ``harm`` per MAC
    (``inf`` when it cannot give); ``take`` channels costing ``spent`` MACs gain ``gain`` per MAC
    (``-inf`` when it cannot take)."""

    give: int
    freed: int
    harm: float
    take: int
    spent: int
    gain: float


@dataclass(frozen=True)
class ChannelGreedyResult:
    """Where the search ended: ``counts`` per group, its ``score``, one row per step tried, time and repairs."""

    counts: dict[str, int]
    score: Score
    steps: pd.DataFrame
    seconds: float
    evaluations: int


class _Budget:
    """Counted MACs of per-group counts, and the channel steps that free or spend about Δ of them."""

    def __init__(self, judge: ChannelJudge):
        self.pruner = judge.pruner
        self.bound = judge.config.target_macs * self.pruner.macs_dense
        self.channels = {g.name: g.channels for g in self.pruner.groups if g.prunable}

    def macs(self, counts: Mapping[str, int]) -> int:
        return self.pruner.macs_of(self.pruner.masks_for_counts(counts))

    def give(self, counts: dict[str, int], name: str, delta: float) -> tuple[int, int]:
        """(channels, MACs freed): the fewest channels of ``name`` freeing ≥ ``delta`` (all but one at most)."""
        now, most = self.macs(counts), counts[name] - 1
        for k in range(1, most + 1):
            freed = now - self.macs({**counts, name: counts[name] - k})
            if freed >= delta or k == most:
                return k, freed
        return 0, 0

    def take(self, counts: dict[str, int], name: str, limit: float) -> tuple[int, int]:
        """(channels, MACs spent): the most channels ``name`` can add spending ≤ ``limit`` MACs."""
        now, best = self.macs(counts), (0, 0)
        for k in range(1, self.channels[name] - counts[name] + 1):
            spent = self.macs({**counts, name: counts[name] + k}) - now
            if spent > limit:
                break
            best = (k, spent)
        return best


def greedy_channels(judge: ChannelJudge, start: Mapping[str, int], steps: int = 4, move: float = 0.02,
                    progress: Callable[[int, int, str], None] | None = None) -> ChannelGreedyResult:
    """Greedy MAC moves between groups from ``start`` (counts that meet the judge's target), judged after repair."""
    if steps < 0 or not 0 < move < 1:
        raise ValueError(f"steps must be ≥ 0 and move in (0, 1); got steps={steps!r}, move={move!r}")
    began, evaluated = time.perf_counter(), len(judge.memo)
    criterion = judge.config.criterion
    budget = _Budget(judge)
    delta = move * budget.bound
    counts = {name: int(k) for name, k in start.items() if name in budget.channels}
    total, done = 2 * len(counts) + 5 * steps + FILL_TRIES, [0]

    def tick(label: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(min(done[0], total), total, label)

    current = judge(counts)
    base = current.value(criterion)

    def rates_of(name: str) -> GroupRates:
        give, freed = budget.give(counts, name, delta)
        take, spent = budget.take(counts, name, delta)
        harm = gain = None
        if give:
            harm = (judge({**counts, name: counts[name] - give}).value(criterion) - base) / freed
            tick(f"{name} −{give}")
        if take:
            gain = (base - judge({**counts, name: counts[name] + take}).value(criterion)) / spent
            tick(f"{name} +{take}")
        return GroupRates(give, freed, math.inf if harm is None else harm, take, spent,
                          -math.inf if gain is None else gain)

    rates = {name: rates_of(name) for name in counts}
    rows, tried = [], set()

    def trial_score(trial: dict[str, int], label: str, row: dict) -> tuple[Score, bool]:
        """``trial`` judged after the repair, its row (``row`` + before/after/accuracy) recorded; accepted?"""
        score = judge(trial)
        tick(label)
        accepted = score.value(criterion) < base
        rows.append({**row, "before": base, "after": score.value(criterion), "accuracy": score.accuracy,
                     "accepted": accepted})
        return score, accepted

    for step in range(1, steps + 1):
        move_ = _best_move(rates, tried)
        if move_ is None:
            break
        donor, receiver, predicted = move_
        trial = {**counts, donor: counts[donor] - rates[donor].give}
        room = budget.bound - budget.macs(trial)
        taken, _ = budget.take(trial, receiver, min(room, rates[receiver].spent))
        if taken == 0:
            tried.add((donor, receiver))
            continue
        trial[receiver] += taken
        score, accepted = trial_score(trial, f"step {step}: {donor} → {receiver}", {
            "step": step, "donor": donor, "receiver": receiver, "given": rates[donor].give, "taken": taken,
            "predicted": predicted})
        if not accepted:
            tried.add((donor, receiver))
            continue
        counts, current, base, tried = trial, score, score.value(criterion), set()
        rates[donor], rates[receiver] = rates_of(donor), rates_of(receiver)
    fillers = sorted((name for name, r in rates.items() if r.gain > 0), key=lambda name: -rates[name].gain)
    for receiver in fillers[:FILL_TRIES]:
        taken, spent = budget.take(counts, receiver, budget.bound - budget.macs(counts))
        if taken == 0:
            continue
        trial = {**counts, receiver: counts[receiver] + taken}
        score, accepted = trial_score(trial, f"fill: {receiver} +{taken}", {
            "step": "fill", "donor": "(unspent)", "receiver": receiver, "given": 0, "taken": taken,
            "predicted": rates[receiver].gain * spent})
        if accepted:
            counts, current, base = trial, score, score.value(criterion)
    return ChannelGreedyResult(counts=counts, score=current, steps=pd.DataFrame(rows, columns=STEP_COLUMNS),
                               seconds=time.perf_counter() - began, evaluations=len(judge.memo) - evaluated)


def _best_move(rates: Mapping[str, GroupRates], tried: set[tuple[str, str]]) -> tuple[str, str, float] | None:
    """(donor, receiver, predicted decrease) of the best untried pair; None when no pair is predicted to help."""
    best = None
    for donor, d in rates.items():
        if d.give == 0:
            continue
        for receiver, r in rates.items():
            if receiver == donor or r.take == 0 or (donor, receiver) in tried:
                continue
            predicted = r.gain * min(r.spent, d.freed) - d.harm * d.freed
            if predicted > 0 and (best is None or predicted > best[2]):
                best = (donor, receiver, predicted)
    return best


def refine(judge: ChannelJudge, choice: ChannelChoice,
           progress: Callable[[int, int, str], None] | None = None) -> tuple[ChannelChoice, ChannelGreedyResult | None]:
    """``choice`` followed by ``judge.config.steps`` greedy moves from its counts (none: ``choice`` as it is).

    When the moves lower the criterion the result is chosen, as ``greedy after repair (from SHAPE)``,
    and joins the candidates table as one more row; otherwise ``choice`` stays chosen.
    """
    config = judge.config
    if config.steps == 0:
        return choice, None
    greedy = greedy_channels(judge, choice.counts, config.steps, config.move, progress)
    if greedy.counts == choice.counts or greedy.score.value(config.criterion) >= judge(choice.counts).value(
            config.criterion):
        return choice, greedy
    pruner = judge.pruner
    name = f"greedy after repair (from {choice.shape})"
    row = {"shape": name, "macs_ratio": pruner.macs_of(pruner.masks_for_counts(greedy.counts)) / pruner.macs_dense,
           "accuracy": greedy.score.accuracy, "loss": greedy.score.loss, "kl": greedy.score.kl,
           "seconds": greedy.seconds, "note": ""}
    frame = pd.concat([choice.candidates, pd.DataFrame([row])], ignore_index=True)
    return ChannelChoice(name, dict(greedy.counts), frame, choice.seconds + greedy.seconds), greedy
