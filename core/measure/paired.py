"""Paired accuracy: the compressed model against the dense one on the same images, refined batch by batch.

Why paired. On the same image each pair of predictions is *still right*, *still wrong*,
*newly wrong* (dense right, compressed wrong) or *newly right*. The accuracy difference is
Δ = (newly_right − newly_wrong) / n, and its variance comes only from the discordant images,
which are few for a sensible setting: the interval on Δ is several times narrower than an
interval on the compressed model's accuracy alone, at the same n.

The interval: d_i ∈ {−1, 0, +1}, Δ = mean(d). Its standard error is s/√n with s² the sample
variance of d, computed with one pseudo-observation of each sign added (so that an
early run with no discordant image yet does not claim a zero-width interval), times the
finite-population correction √((N − n)/(N − 1)): the images are drawn without replacement
from a test set of N, so once every image is seen the figure is exact and the interval
closes. The 95 % interval is Δ ± 1.96·se.

The order: :func:`balanced_order` is a fixed permutation of the whole set in which every
prefix is as class-balanced as it can be (classes taken in turn, each class's images in a
seeded random order), so a prefix of n images is a class-balanced sample and refining
means extending the prefix.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch

Z_95 = 1.959963984540054


def balanced_order(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Indices of all images, classes interleaved in turn, each class shuffled with ``seed`` (int64)."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels).tolist()
    queues = []
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        queues.append(members[torch.randperm(len(members), generator=generator)])
    longest = max((len(q) for q in queues), default=0)
    # position k of class c goes to slot k·C + c; slots left empty by short classes are dropped
    slots = torch.full((longest * len(queues),), -1, dtype=torch.int64)
    for c, queue in enumerate(queues):
        slots[torch.arange(len(queue)) * len(queues) + c] = queue
    return slots[slots >= 0]


def paired_interval(newly_right: int, newly_wrong: int, n: int, population: int,
                    z: float = Z_95) -> tuple[float, float]:
    """The ``z`` interval of Δ = (newly_right − newly_wrong) / n (see the module docstring)."""
    if n <= 0:
        return -1.0, 1.0
    delta = (newly_right - newly_wrong) / n
    if n >= population:
        return delta, delta
    right, wrong, m = newly_right + 1, newly_wrong + 1, n + 2  # one pseudo-observation of each sign
    mean = (right - wrong) / m
    variance = ((right + wrong) / m - mean * mean) * m / (m - 1)
    fpc = math.sqrt((population - n) / (population - 1)) if population > 1 else 0.0
    half = z * math.sqrt(max(variance, 0.0) / n) * fpc
    return max(-1.0, delta - half), min(1.0, delta + half)


@dataclass(frozen=True, kw_only=True)
class PairedEstimate:
    """Compressed vs dense on the first ``n`` of ``population`` images of the balanced order.

    Fractions in [0, 1]; ``delta`` = accuracy − dense accuracy, with its paired 95 % interval.
    """

    n: int
    population: int
    correct: int
    dense_correct: int
    newly_wrong: int
    newly_right: int
    seconds: float = 0.0
    precision: str = "fp32"

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def dense_accuracy(self) -> float:
        return self.dense_correct / self.n if self.n else float("nan")

    @property
    def delta(self) -> float:
        return (self.newly_right - self.newly_wrong) / self.n if self.n else float("nan")

    @property
    def delta_interval(self) -> tuple[float, float]:
        return paired_interval(self.newly_right, self.newly_wrong, self.n, self.population)

    @property
    def delta_half_width(self) -> float:
        low, high = self.delta_interval
        return (high - low) / 2

    @property
    def complete(self) -> bool:
        return self.n >= self.population


class PredictionStore:
    """Predicted classes of one model on one data set, in the balanced order, filled from the front.

    ``predictions[k]`` is the prediction for image ``order[k]``; the first ``done`` are known.
    Extending is serialised per store (two sessions never compute the same batch twice);
    reading a prefix is safe from any thread.
    """

    def __init__(self, population: int):
        self.predictions = torch.full((population,), -1, dtype=torch.int16)
        self.done = 0
        self.seconds = 0.0
        self.lock = threading.Lock()

    @property
    def population(self) -> int:
        return len(self.predictions)

    @property
    def complete(self) -> bool:
        return self.done >= self.population

    def extend_to(self, stop: int, predict_range) -> None:
        """Make the first ``stop`` predictions known, calling ``predict_range(start, stop) -> tensor``."""
        stop = min(stop, self.population)
        with self.lock:
            if self.done >= stop:
                return
            start = time.perf_counter()
            self.predictions[self.done:stop] = predict_range(self.done, stop).to(torch.int16)
            self.seconds += time.perf_counter() - start
            self.done = stop

    def nbytes(self) -> int:
        return self.predictions.numel() * self.predictions.element_size()


def paired_estimate(labels_in_order: torch.Tensor, dense: PredictionStore, compressed: PredictionStore,
                    precision: str = "fp32") -> PairedEstimate:
    """The estimate over the prefix both stores know (labels already permuted into the balanced order)."""
    n = min(dense.done, compressed.done)
    truth = labels_in_order[:n]
    dense_right = dense.predictions[:n].long() == truth
    right = compressed.predictions[:n].long() == truth
    return PairedEstimate(
        n=n, population=compressed.population, correct=int(right.sum()), dense_correct=int(dense_right.sum()),
        newly_wrong=int((dense_right & ~right).sum()), newly_right=int((~dense_right & right).sum()),
        seconds=compressed.seconds, precision=precision)
