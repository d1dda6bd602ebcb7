"""Automatic per-layer τ judged *after the repair the user picks*: candidates scored repaired, then greedy moves.

Why. After BN recalibration the sensitivity allocation ties global magnitude's; after layer-wise
reconstruction the allocation matters again (ResNet-20 at 30.8 % retention: uniform τ 84.89 %,
global magnitude's allocation 86.09 %, dense 87.63 %; ``docs/results.md``). What a layer can
lose depends on what the repair gives back, which single-layer sensitivities (every other layer
dense, no repair) cannot see. So every allocation here is judged whole, after the repair.

The judge (:class:`RepairJudge`). An allocation (kept weights per layer, each layer pruned by
its own τ) is applied by the engine, repaired with :func:`core.measure.repair.repair_setting`
on the *fitting* images, and run in fp32 on the *scoring* images, labelled training images
disjoint from the fitting ones (:func:`scoring_split`: one permutation of CIFAR-10's training
split, fitting images at its head, scoring images at its tail). The test split is never read.
Its figures: accuracy, mean cross-entropy ``loss = −mean log p(y|x)`` and
``kl = mean Σ_c p_dense(c|x) (log p_dense(c|x) − log p(c|x))``; the search minimises
``criterion`` (``loss`` or ``kl``). Each allocation is evaluated once (memoised).

The candidates (:func:`score_candidates`): the sensitivity allocation, global magnitude's
per-layer counts and their blends (:func:`core.measure.allocation_joint.candidate_allocations`),
each scored by the judge.

The greedy search (:func:`greedy_after_repair`), which looks at the whole repaired network. With
k_ℓ kept weights per layer (Σ k_ℓ = K, fixed) and S(k) the judge's criterion, it measures
for every layer the rate at which S worsens when Δ_ℓ⁻ = min(Δ, k_ℓ) weights are removed,
h_ℓ = (S(k − Δ_ℓ⁻ e_ℓ) − S(k)) / Δ_ℓ⁻, and improves when Δ_ℓ⁺ = min(Δ, n_ℓ − k_ℓ) are added,
g_ℓ = (S(k) − S(k + Δ_ℓ⁺ e_ℓ)) / Δ_ℓ⁺, with Δ = ``move`` · K, every S after the repair. Each
step takes m = min(Δ_d⁻, Δ_r⁺) weights from the donor d and gives them to the receiver r,
for the pair with the largest predicted gain m·(g_r − h_d) > 0, re-measures the repaired model
at the moved allocation and keeps the move only if S fell. Then d's and r's rates are measured
again (the others are kept: a move changes the rest of the network little). A step's total is
unchanged by construction: (k_d − m) + (k_r + m). Within a layer the largest |W| are kept (its
τ, :meth:`LayerOptions.tau_for_kept`); where ties of |W| forbid an exact count, the count just
under it, so the total may fall a few weights below K, never above.

Cost: 2·L + 5·steps repairs and scorings at most (L layers); progress is reported per
evaluation and each evaluation is one step of a job (:func:`core.common.steps.turn`: a turn on
the compute queue, a cancel point; the repair itself is cancelled between layers).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from core.common.steps import cancel_requested, checkpoint, turn
from core.measure.accuracy import EvalData
from core.measure.allocation import Allocation, LayerOptions, ProgressCallback
from core.measure.calibration import calibration_split
from core.measure.repair import (
    RepairCancelled,
    RepairConfig,
    RepairResult,
    repair_setting,
)
from core.measure.sensitivity import recipe_outputs
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult, Engine
from core.workloads.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    EXPECTED_COUNTS,
    load_jpeg_sample,
    normalize,
)

CRITERIA: tuple[str, ...] = ("loss", "kl")
#: the search's default repair: reconstruction fitted on 256 images (each judged allocation is one repair)
DEFAULT_REPAIR = RepairConfig(method="reconstruct", n_images=256, n_holdout=0)


@dataclass(frozen=True)
class SearchConfig:
    """How allocations are judged after repair and how far the greedy search goes.

    * ``repair``: the repair every allocation is judged after (its ``method``: none, bn, bias,
      reconstruct; ``n_images`` fitting images, ``seed``, ridge, positions). Its ``n_holdout``
      is not used (the judge's error table is not computed).
    * ``score_images``: labelled training images the repaired models are scored on (disjoint
      from the fitting images).
    * ``criterion``: what the search minimises, ``loss`` (cross-entropy) or ``kl`` (to dense).
    * ``steps``: greedy moves tried at most (0: the candidates only).
    * ``move``: Δ, the weights moved per step, as a fraction of the total kept count.
    """

    repair: RepairConfig = DEFAULT_REPAIR
    score_images: int = 1000
    criterion: str = "loss"
    steps: int = 6
    move: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.repair, RepairConfig):
            raise TypeError(f"repair must be a RepairConfig, got {type(self.repair).__name__}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        for name in ("score_images", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "score_images" else 0):
                raise ValueError(f"{name} must be a whole number ≥ {1 if name == 'score_images' else 0}, got {value!r}")
        if not (isinstance(self.move, (int, float)) and 0 < self.move < 1):
            raise ValueError(f"move must be a fraction in (0, 1), got {self.move!r}")
        if self.repair.n_images + self.score_images > EXPECTED_COUNTS["train"]:
            raise ValueError("the fitting and scoring images together exceed CIFAR-10's 50,000 training images")


@dataclass(frozen=True)
class Score:
    """An allocation judged after repair: on ``n`` scoring images, ``accuracy`` (fraction), mean
    cross-entropy ``loss`` and mean ``kl`` to the dense model; ``seconds`` repair + scoring."""

    accuracy: float
    loss: float
    kl: float
    n: int
    seconds: float

    def value(self, criterion: str) -> float:
        return float(getattr(self, criterion))


def score_model(model: nn.Module, data: EvalData, dense_log_probs: torch.Tensor, start: float) -> Score:
    """``model`` run in fp32 on labelled ``data``: accuracy, ``loss = −mean log p(y|x)`` and
    ``kl = mean Σ_c p_dense (log p_dense − log p)`` against ``dense_log_probs`` (the dense model's
    log-probabilities on the same images); ``seconds`` since ``start`` (a ``perf_counter`` value)."""
    predicted, log_probs = recipe_outputs(model, data.images, "fp32")
    labels = data.labels
    loss = float(-log_probs[torch.arange(len(labels)), labels].mean())
    kl = float((dense_log_probs.exp() * (dense_log_probs - log_probs)).sum(dim=1).mean())
    return Score(accuracy=float((predicted == labels).float().mean()), loss=loss, kl=kl, n=len(labels),
                 seconds=time.perf_counter() - start)


# ---------------------------------------------------------------- images

def scoring_split(n_fit: int, n_score: int, seed: int = 0, mean: Sequence[float] = CIFAR_MEAN,
                  std: Sequence[float] = CIFAR_STD) -> tuple[torch.Tensor, EvalData]:
    """(fitting images, labelled scoring images), disjoint, from CIFAR-10's *training* split only.

    The fitting images are :func:`core.measure.calibration.calibration_split`'s (augmented as in
    training; the first ``n_fit`` of a permutation fixed by ``seed``), so the repair they fit is
    the one ``python -m core.tune --repair`` writes; the scoring images are the last ``n_score``
    of the same permutation, un-augmented, with their labels.
    """
    total = EXPECTED_COUNTS["train"]
    if n_fit < 1 or n_score < 1 or n_fit + n_score > total:
        raise ValueError(f"need 1 ≤ n_fit, 1 ≤ n_score and n_fit + n_score ≤ {total}; got {n_fit}, {n_score}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    fit, _ = calibration_split(n_fit, 0, seed=seed, mean=mean, std=std)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    index = order[total - n_score:].sort().values
    raw = load_jpeg_sample("train", index)
    score = EvalData(normalize(raw.images, mean, std).contiguous(), raw.labels.clone(), "train")
    return fit, score


# ---------------------------------------------------------------- the judge

def kept_key(kept: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((name, int(k)) for name, k in kept.items()))


class RepairJudge:
    """Scores allocations after ``config.repair`` (see the module docstring); ``dense`` is never modified.

    ``options``: every pruned layer's :class:`LayerOptions` (its sorted magnitudes: the τ that
    keeps a count); ``fit``: the repair's fitting images; ``score``: labelled scoring images.
    """

    def __init__(self, dense: nn.Module, engine: Engine, options: Sequence[LayerOptions], fit: torch.Tensor,
                 score: EvalData, config: SearchConfig):
        self.dense, self.engine, self.config = dense, engine, config
        self.options = {o.name: o for o in options}
        self.fit, self.score_data = fit, score
        self.repair_config = dataclasses.replace(config.repair, n_holdout=0)
        self.memo: dict[tuple, Score] = {}
        self.evaluations = 0
        _, self.dense_log_probs = recipe_outputs(engine.apply(CompressionConfig()).model, score.images, "fp32")

    def config_for(self, kept: Mapping[str, int]) -> tuple[CompressionConfig, dict[str, int]]:
        """The per-layer τ keeping (at most) ``kept[ℓ]`` weights per layer, and the counts it reaches."""
        layer_tau, reached = {}, {}
        for name, count in kept.items():
            o = self.options[name]
            exact = o.tau_for_kept(int(count))
            if exact is None:  # float rounding leaves no τ for the count: the grid τ just under it
                fits = [i for i, k in enumerate(o.kept) if k <= count]
                index = fits[0] if fits else len(o.kept) - 1
                exact = float(o.taus[index]), int(o.kept[index])
            layer_tau[name], reached[name] = exact
        return CompressionConfig(layer_tau=layer_tau), reached

    def repaired(self, config: CompressionConfig) -> tuple[CompressionResult, RepairResult | None, nn.Module]:
        """(engine result, its repair or None for ``none``, the model to run) of ``config``."""
        result = self.engine.apply(config)
        if self.repair_config.method == "none":
            return result, None, result.model
        try:
            fixed = repair_setting(self.dense, self.engine, result, self.fit, self.repair_config,
                                   cancel=cancel_requested)
        except RepairCancelled:
            checkpoint()  # the job's own cancellation (core.common.steps.Cancelled), as every other step's
            raise
        return result, fixed, fixed.model

    def __call__(self, kept: Mapping[str, int]) -> Score:
        """The score of the allocation keeping ``kept[ℓ]`` weights per layer (one job step; memoised)."""
        key = kept_key(kept)
        if key in self.memo:
            return self.memo[key]
        with turn():
            start = time.perf_counter()
            config, _ = self.config_for(kept)
            _, _, model = self.repaired(config)
            score = score_model(model, self.score_data, self.dense_log_probs, start)
        self.evaluations += 1
        self.memo[key] = score
        return score


# ---------------------------------------------------------------- the candidates

def score_candidates(judge: RepairJudge, candidates: Sequence[Allocation],
                     on_progress: ProgressCallback | None = None) -> pd.DataFrame:
    """One row per candidate: ``candidate``, ``retention``, ``kept``, ``accuracy``, ``loss``, ``kl``, ``seconds``."""
    rows = []
    for done, candidate in enumerate(candidates, start=1):
        score = judge(candidate.kept)
        rows.append({"candidate": candidate.method, "retention": candidate.retention, "kept": candidate.total_kept,
                     "accuracy": score.accuracy, "loss": score.loss, "kl": score.kl, "seconds": score.seconds})
        if on_progress is not None:
            on_progress(done, len(candidates), candidate.method)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the greedy moves

def move_weights(kept: Mapping[str, int], donor: str, receiver: str, amount: int,
                 numel: Mapping[str, int]) -> dict[str, int]:
    """``kept`` with ``amount`` weights moved from ``donor`` to ``receiver`` (the total unchanged).

    ``ValueError`` when the donor has fewer than ``amount`` kept, the receiver fewer than
    ``amount`` pruned, or donor and receiver are the same layer.
    """
    if donor == receiver:
        raise ValueError(f"donor and receiver are the same layer ({donor!r})")
    if amount < 0 or kept[donor] < amount or numel[receiver] - kept[receiver] < amount:
        raise ValueError(f"cannot move {amount} weights from {donor!r} ({kept[donor]} kept) to {receiver!r} "
                         f"({numel[receiver] - kept[receiver]} pruned)")
    out = dict(kept)
    out[donor] -= amount
    out[receiver] += amount
    return out


@dataclass(frozen=True)
class Rates:
    """A layer's measured rates at one allocation: ``harm`` (criterion increase per weight removed,
    over ``give`` weights; ``inf`` when it has none) and ``gain`` (decrease per weight added, over
    ``take``; ``-inf`` when it is dense)."""

    give: int
    harm: float
    take: int
    gain: float


def best_move(rates: Mapping[str, Rates], tried: set[tuple[str, str]]) -> tuple[str, str, int, float] | None:
    """(donor, receiver, amount, predicted decrease m·(g_r − h_d)) of the best untried pair, None if none helps."""
    best = None
    for donor, d in rates.items():
        if d.give == 0:
            continue
        for receiver, r in rates.items():
            if receiver == donor or r.take == 0 or (donor, receiver) in tried:
                continue
            amount = min(d.give, r.take)
            predicted = amount * (r.gain - d.harm)
            if predicted > 0 and (best is None or predicted > best[3]):
                best = (donor, receiver, amount, predicted)
    return best


@dataclass(frozen=True)
class GreedyResult:
    """The search's end: ``kept`` per layer, its ``score``, one row per step in ``steps`` and ``seconds``."""

    kept: dict[str, int]
    score: Score
    steps: pd.DataFrame
    seconds: float
    evaluations: int
    start: dict[str, int] = field(default_factory=dict)


def greedy_after_repair(judge: RepairJudge, start: Mapping[str, int],
                        on_progress: ProgressCallback | None = None) -> GreedyResult:
    """Greedy moves of Δ weights between layers at constant total, each re-measured after repair (module docstring)."""
    config = judge.config
    criterion = config.criterion
    began, evaluations = time.perf_counter(), judge.evaluations
    numel = {name: o.numel for name, o in judge.options.items()}
    kept = {name: int(k) for name, k in start.items()}
    delta = max(1, round(config.move * sum(kept.values())))
    layers = list(kept)
    total = 2 * len(layers) + 5 * config.steps
    done = [0]

    def progress(label: str) -> None:
        done[0] += 1
        if on_progress is not None:
            on_progress(min(done[0], total), total, label)

    current = judge(kept)
    base = current.value(criterion)

    def rates_of(name: str) -> Rates:
        give, take = min(delta, kept[name]), min(delta, numel[name] - kept[name])
        harm, gain = math.inf, -math.inf
        if give:
            harm = (judge({**kept, name: kept[name] - give}).value(criterion) - base) / give
            progress(f"{name} −{give}")
        if take:
            gain = (base - judge({**kept, name: kept[name] + take}).value(criterion)) / take
            progress(f"{name} +{take}")
        return Rates(give, harm, take, gain)

    rates = {name: rates_of(name) for name in layers}
    rows, tried = [], set()
    for step in range(1, config.steps + 1):
        move = best_move(rates, tried)
        if move is None:
            break
        donor, receiver, amount, predicted = move
        trial = move_weights(kept, donor, receiver, amount, numel)
        score = judge(trial)
        progress(f"step {step}: {donor} → {receiver}")
        accepted = score.value(criterion) < base
        rows.append({"step": step, "donor": donor, "receiver": receiver, "moved": amount,
                     "predicted": predicted, "before": base, "after": score.value(criterion),
                     "accuracy": score.accuracy, "accepted": accepted})
        if not accepted:
            tried.add((donor, receiver))
            continue
        kept, current, base, tried = trial, score, score.value(criterion), set()
        rates[donor], rates[receiver] = rates_of(donor), rates_of(receiver)
    frame = pd.DataFrame(rows, columns=["step", "donor", "receiver", "moved", "predicted", "before", "after",
                                        "accuracy", "accepted"])
    return GreedyResult(kept=kept, score=current, steps=frame, seconds=time.perf_counter() - began,
                        evaluations=judge.evaluations - evaluations, start=dict(start))


# ---------------------------------------------------------------- the choice

def allocation_of(judge: RepairJudge, kept: Mapping[str, int], like: Allocation, method: str) -> Allocation:
    """The :class:`Allocation` keeping (at most) ``kept[ℓ]`` per layer, with ``like``'s target and budget."""
    config, reached = judge.config_for(kept)
    layer_tau = dict(config.layer_tau)
    layer_drop = {name: judge.options[name].drop_at(tau) for name, tau in layer_tau.items()}
    return Allocation(layer_tau=layer_tau, kept=reached, numel=like.numel,
                      cost=float(sum(reached.values())), budget=like.budget,
                      predicted_drop=float(sum(layer_drop.values())), target=like.target, layer_drop=layer_drop,
                      method=method)


@dataclass(frozen=True)
class RepairedChoice:
    """The choice after repair: the ``allocation`` chosen (its ``candidates`` frame lists every
    candidate and the greedy result, ``chosen`` marks it), every ``candidates`` allocation,
    the ``greedy`` search and the ``judge`` (which can repair the chosen setting again)."""

    allocation: Allocation
    candidates: tuple[Allocation, ...]
    greedy: GreedyResult | None
    judge: RepairJudge
    seconds: float


def choose_after_repair(judge: RepairJudge, candidates: Sequence[Allocation],
                        on_progress: ProgressCallback | None = None,
                        on_greedy_progress: ProgressCallback | None = None) -> RepairedChoice:
    """The best of ``candidates`` (same total) and of the greedy search started from it, all judged after repair.

    Lowest ``judge.config.criterion`` wins (ties: higher accuracy). The greedy search
    (``judge.config.steps`` > 0) starts from the best candidate; its result joins the table as
    ``greedy after repair`` when it moved anything.
    """
    if not candidates:
        raise ValueError("no candidate allocation to judge")
    began = time.perf_counter()
    criterion = judge.config.criterion
    frame = score_candidates(judge, candidates, on_progress)
    order = sorted(range(len(candidates)), key=lambda i: (frame[criterion].iloc[i], -frame["accuracy"].iloc[i]))
    best = candidates[order[0]]
    greedy, chosen = None, best
    if judge.config.steps > 0:
        greedy = greedy_after_repair(judge, best.kept, on_greedy_progress)
        if greedy.kept != best.kept and greedy.score.value(criterion) < frame[criterion].iloc[order[0]]:
            chosen = allocation_of(judge, greedy.kept, best, f"greedy after repair (from {best.method})")
            score = greedy.score
            frame = pd.concat([frame, pd.DataFrame([{
                "candidate": chosen.method, "retention": chosen.retention, "kept": chosen.total_kept,
                "accuracy": score.accuracy, "loss": score.loss, "kl": score.kl, "seconds": greedy.seconds}])],
                ignore_index=True)
    frame["chosen"] = frame["candidate"] == chosen.method
    frame.attrs.update(images=f"{judge.score_data.labels.numel():,} training images (not the fitting images)",
                       repair=judge.repair_config.method, criterion=criterion, fit_images=len(judge.fit))
    return RepairedChoice(allocation=dataclasses.replace(chosen, candidates=frame), candidates=tuple(candidates),
                          greedy=greedy, judge=judge, seconds=time.perf_counter() - began)


def format_choice(frame: pd.DataFrame) -> str:
    """The candidates judged after repair as a printable table."""
    out = pd.DataFrame({
        "candidate": frame["candidate"], "retention_%": (100 * frame["retention"]).map("{:.2f}".format),
        "accuracy_%": (100 * frame["accuracy"]).map("{:.2f}".format), "loss": frame["loss"].map("{:.4f}".format),
        "kl": frame["kl"].map("{:.4f}".format), "seconds": frame["seconds"].map("{:.1f}".format),
        "chosen": frame["chosen"].map({True: "◀", False: ""}),
    })
    return out.to_string(index=False)
