"""Accuracy against counted MACs and measured latency, for weight and channel granularity, with and without repair.

:func:`run_tradeoff` measures a small grid on one model (the Tune page's granularity chart and
``python -m core.measure.granularity_tradeoff``):

* ``dense``: the model as loaded (τ = 0), the reference of every ratio;
* ``weight``: boundary pruning of single weights at each of ``weight_taus``
  (:class:`core.method.engine.Engine`, β = τ · max|W| per layer);
* ``channel``: boundary pruning of whole channels at each of ``channel_taus`` (τ_ch,
  :class:`core.method.channels.ChannelPruner`, β = τ_ch · max_c s_c per coupled group);

each at every level of ``repairs``: ``"none"``, ``"bn"`` (BatchNorm statistics re-estimated on
training images) and ``"reconstruct"`` (least-squares re-solve of the layers, then BatchNorm:
:func:`core.measure.repair.repair_setting` for weights, :func:`core.measure.channel_repair.repair_channels`
for channels). Every repair fits on ``repair_images`` CIFAR-10 *training* images; no gradient step.

What each row's figures are:

* ``accuracy`` (with ``ci_low``/``ci_high``, the Wilson 95 % interval): measured on a fixed class-balanced
  subset of the test set (``per_class`` images of every class, drawn with ``subset_seed``);
* ``macs``: **counted** multiply-accumulates per image of every Conv/Linear as a dense kernel runs them.
  Unstructured pruning leaves every kernel its full shape (dense kernels multiply the zeros), so a
  weight row's ``macs`` *are* the dense model's; a channel row's are the smaller model's.
  ``nonzero_macs`` counts only the products with a non-zero weight (what a sparse kernel *could* skip;
  no maintained CPU runtime does): a second counted figure, labelled as such;
* ``latency_ms``: **measured** median wall time of one forward pass of ``batch`` images in torch eager
  (:func:`core.measure.latency.measure_latency`), interleaved with the dense model in the same run
  (``dense_ms``), so ``latency_ratio = latency_ms / dense_ms`` is a ratio within one run. A repair does
  not change a model's shapes, so the repaired rows of one (granularity, τ) share that setting's one
  measurement.

Contract: the model is never modified (the engine and the pruner work on their own snapshots; repairs
return new modules). Every row is cached on disk (:class:`core.measure.disk_cache.JsonCache`, under
``cache_dir()/"tradeoff"``), keyed by the model, the evaluation subset, the repair images, the batch,
the torch threads and the row's setting; a later call reads it back without running the model
(``cached`` column; ``seconds`` is the time the row took when computed). Every computed row is one
:func:`core.common.steps.turn` (in a job: a turn on the compute queue; a cancel stops it within a layer
or a repair step); ``on_progress(done, total, label)`` before the first row and after every row,
``on_rows(frame)`` after every row; :func:`tradeoff_plan` gives every row's cost beforehand.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.common import paths
from core.common.steps import cancel_requested, checkpoint, turn
from core.measure.accuracy import EvalData, balanced_subset, eval_data, evaluate, wilson_interval
from core.measure.disk_cache import JsonCache, base_context, calibration_key, images_key
from core.measure.latency import measure_latency
from core.measure.repair import SOLVER
from core.method.channel_config import ChannelConfig, ChannelResult
from core.workloads.data import CIFAR_MEAN, CIFAR_STD

TRADEOFF_CACHE_VERSION = 1
GRANULARITIES: tuple[str, ...] = ("dense", "weight", "channel")
REPAIRS: tuple[str, ...] = ("none", "bn", "reconstruct")
COLUMNS: tuple[str, ...] = (
    "granularity", "tau", "repair", "accuracy", "n", "ci_low", "ci_high", "macs", "macs_dense", "mac_ratio",
    "nonzero_macs", "nonzero_mac_ratio", "params", "latency_ms", "dense_ms", "latency_ratio", "batch",
    "seconds", "cached",
)
#: a repair's cost in images through the model, per fitting image (for the time estimate; revised when measured)
REPAIR_COST_PER_IMAGE: dict[str, float] = {"none": 0.0, "bn": 1.0, "reconstruct": 10.0}

ProgressCallback = Callable[[int, int, str], None]
ChannelApply = Callable[[ChannelConfig], ChannelResult]


@dataclass(frozen=True)
class TradeoffConfig:
    """The grid one tradeoff measures.

    * ``weight_taus`` / ``channel_taus``: τ (weights) and τ_ch (channels) in (0, 1]; sorted, duplicates
      dropped (τ = 0 is the dense row, always measured).
    * ``repairs``: levels of :data:`REPAIRS` to evaluate every pruned setting at (``"none"`` first).
    * ``per_class``: test images per class of the fixed accuracy subset (seed ``subset_seed``).
    * ``batch``: images per timed forward pass; ``latency_budget_s``: seconds each timing may take
      (at least ``latency_runs`` interleaved runs of each model).
    * ``repair_images`` / ``repair_seed``: the CIFAR-10 training images every repair fits on.
    """

    weight_taus: tuple[float, ...] = (0.1, 0.2, 0.3)
    channel_taus: tuple[float, ...] = (0.5, 0.6, 0.7)  # below 0.4 the shipped ResNets lose no channel
    repairs: tuple[str, ...] = ("none", "bn", "reconstruct")
    per_class: int = 50
    subset_seed: int = 0
    batch: int = 64
    latency_budget_s: float = 1.0
    latency_runs: int = 5
    repair_images: int = 256
    repair_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight_taus", "channel_taus"):
            values = tuple(getattr(self, name))
            bad = [t for t in values if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1]
            if bad:
                raise ValueError(f"{name} must be numbers in (0, 1]; got {bad[0]!r}")
            object.__setattr__(self, name, tuple(sorted({float(t) for t in values})))
        unknown = [r for r in self.repairs if r not in REPAIRS]
        if unknown or not self.repairs:
            raise ValueError(f"repairs must be some of {', '.join(REPAIRS)}; got {unknown[0] if unknown else 'none'!r}")
        object.__setattr__(self, "repairs", tuple(r for r in REPAIRS if r in self.repairs))
        for name in ("per_class", "batch", "latency_runs", "repair_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number; got {value!r}")
        if not self.latency_budget_s > 0:
            raise ValueError(f"latency_budget_s must be positive; got {self.latency_budget_s!r}")

    def rows(self) -> list[tuple[str, float, str]]:
        """(granularity, τ, repair) of every row, in the order they are measured and reported."""
        out = [("dense", 0.0, "none")]
        for granularity, taus in (("weight", self.weight_taus), ("channel", self.channel_taus)):
            out += [(granularity, tau, repair) for tau in taus for repair in self.repairs]
        return out


def tradeoff_cache_dir() -> Path:
    """Where rows are cached: ``core.common.paths.cache_dir()/"tradeoff"``."""
    return paths.cache_dir() / "tradeoff"


def nonzero_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs with a non-zero weight, all MACs) per sample of every Conv/Linear of ``model`` (counted).

    A Conv/Linear does ``positions × numel(W)`` multiply-accumulates per sample (positions: output
    pixels, 1 for a Linear on a vector), so the products with a non-zero weight are ``positions × nnz(W)``.
    """
    from core.method.channel_slicing import layer_shapes

    shapes = layer_shapes(model, example[:1])
    modules = dict(model.named_modules())
    nonzero = total = 0
    for name, (positions, _) in shapes.items():
        weight = modules[name].weight
        nonzero += positions * int(torch.count_nonzero(weight))
        total += positions * weight.numel()
    return nonzero, total


class _Runner:
    """Builds the pruned models, repairs and timings only when a row is not in the cache."""

    def __init__(self, model: nn.Module, config: TradeoffConfig, data: EvalData, repair_images: torch.Tensor | None,
                 mean: tuple[float, ...], std: tuple[float, ...], apply_channels: ChannelApply | None):
        self.model, self.config, self.data = model, config, data
        self.mean, self.std = mean, std
        self._repair_images = repair_images
        self._apply_channels = apply_channels
        self._engine = None
        self._current: tuple[str, float] | None = None
        self._built: tuple[nn.Module, object, dict] | None = None
        self.example = data.images[:1]

    @property
    def repair_images(self) -> torch.Tensor:
        if self._repair_images is None:
            from core.measure.calibration import calibration_split

            self._repair_images, _ = calibration_split(self.config.repair_images, 0, seed=self.config.repair_seed,
                                                       mean=self.mean, std=self.std)
        return self._repair_images

    def apply_channels(self, config: ChannelConfig) -> ChannelResult:
        if self._apply_channels is None:
            from core.method.channels import ChannelPruner

            pruner = ChannelPruner(self.model, example_input=self.example)
            self._apply_channels = pruner.apply
        return self._apply_channels(config)

    def build(self, granularity: str, tau: float) -> tuple[nn.Module, object, dict]:
        """(pruned model, engine or channel result, counted figures) of a setting; memoised for its repairs."""
        if self._current == (granularity, tau):
            return self._built
        if granularity == "channel":
            result = self.apply_channels(ChannelConfig(tau=tau))
            model, source = result.model, result
            counted = {"macs": result.macs, "macs_dense": result.macs_dense, "params": result.params}
        else:
            if granularity == "dense":
                with torch.no_grad():
                    model, source = copy.deepcopy(self.model).eval(), None
            else:
                from core.method.config import CompressionConfig
                from core.method.engine import Engine

                if self._engine is None:
                    self._engine = Engine(self.model)
                source = self._engine.apply(CompressionConfig(tau=tau))
                model = source.model
            counted = {"params": sum(p.numel() for p in model.parameters())}
        nonzero, total = nonzero_macs(model, self.example)  # on the copy: the loaded model gets no hooks
        if granularity != "channel":  # same shapes as the dense model: dense kernels multiply the zeros too
            counted["macs"] = counted["macs_dense"] = total
        counted["nonzero_macs"] = nonzero
        self._current, self._built = (granularity, tau), (model, source, counted)
        return self._built

    def repaired(self, granularity: str, model: nn.Module, source, level: str) -> nn.Module:
        if level == "none":
            return model
        from core.measure.repair import RepairCancelled, RepairConfig

        options = RepairConfig(method=level, n_images=self.config.repair_images, n_holdout=0,
                               seed=self.config.repair_seed)
        try:
            if granularity == "channel":
                from core.measure.channel_repair import repair_channels

                return repair_channels(self.model, source, self.repair_images, options, cancel=cancel_requested).model
            from core.measure.repair import repair_setting

            return repair_setting(self.model, self._engine, source, self.repair_images, options,
                                  cancel=cancel_requested).model
        except RepairCancelled:
            checkpoint()  # the job's own cancellation (core.common.steps.Cancelled)
            raise

    def latency(self, model: nn.Module) -> dict:
        """Torch-eager latency of ``model`` against the dense model, interleaved in one run (ms, median)."""
        example = torch.randn(self.config.batch, *self.data.images.shape[1:], generator=torch.Generator().manual_seed(0))
        dense = copy.deepcopy(self.model).eval()  # timed as the pruned models are: a private copy
        report = measure_latency(dense, model, example, warmup=1, min_runs=self.config.latency_runs,
                                 max_runs=max(self.config.latency_runs, 50), budget_s=self.config.latency_budget_s)
        return {"latency_ms": report.compressed_ms, "dense_ms": report.dense_ms,
                "latency_ratio": report.compressed_ms / report.dense_ms if report.dense_ms > 0 else float("nan")}

    def compute(self, granularity: str, tau: float, level: str, timing: dict | None) -> tuple[dict, dict]:
        """The row's values and its setting's timing (measured here unless ``timing`` is given): one step."""
        with turn():
            start = time.perf_counter()
            model, source, counted = self.build(granularity, tau)
            fixed = self.repaired(granularity, model, source, level)
            report = evaluate(fixed, self.data)
            correct = round(report.accuracy * report.n)
            low, high = wilson_interval(correct, report.n)
            if timing is None:
                checkpoint()
                timing = self.latency(fixed)
            nonzero = nonzero_macs(fixed, self.example)[0] if level != "none" else counted["nonzero_macs"]
            values = {"accuracy": report.accuracy, "n": report.n, "ci_low": low, "ci_high": high,
                      "macs": int(counted["macs"]), "macs_dense": int(counted["macs_dense"]),
                      "nonzero_macs": int(nonzero), "params": int(counted["params"]),
                      "seconds": time.perf_counter() - start}
            return values, timing


def _context(model: nn.Module, config: TradeoffConfig, data: EvalData | None, model_id: str | None,
             repair_images: torch.Tensor | None, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    if data is None:
        from core.workloads.data import verify_archive

        data_key = {"source": "cifar10-jpeg", "split": "test", "sha256": verify_archive("test")[1],
                    "mean": list(mean), "std": list(std)}
    else:
        data_key = images_key(data)
    return {**base_context(TRADEOFF_CACHE_VERSION, model, model_id, "cpu"), "data": data_key,
            "per_class": config.per_class, "subset_seed": config.subset_seed,
            "repair_images": calibration_key(repair_images, config.repair_images, config.repair_seed, mean, std),
            "batch": config.batch, "threads": torch.get_num_threads(), "repair_solver": SOLVER}


def _cache(model, config, data, model_id, repair_images, mean, std, use_cache, cache_root) -> JsonCache:
    return JsonCache(tradeoff_cache_dir() if cache_root is None else Path(cache_root),
                     _context(model, config, data, model_id, repair_images, mean, std), use_cache)


def _row_key(granularity: str, tau: float, repair: str) -> dict:
    return {"granularity": granularity, "tau": tau, "repair": repair}


def _timing_key(granularity: str, tau: float) -> dict:
    return {"latency": granularity, "tau": tau}


def run_tradeoff(
    model: nn.Module,
    config: TradeoffConfig = TradeoffConfig(),
    *,
    data: EvalData | None = None,
    repair_images: torch.Tensor | None = None,
    model_id: str | None = None,
    mean: Iterable[float] = CIFAR_MEAN,
    std: Iterable[float] = CIFAR_STD,
    apply_channels: ChannelApply | None = None,
    use_cache: bool = True,
    cache_root: str | os.PathLike | None = None,
    on_progress: ProgressCallback | None = None,
    on_rows: Callable[[pd.DataFrame], None] | None = None,
) -> pd.DataFrame:
    """Accuracy, counted MACs and measured latency of every row of ``config`` (see the module docstring).

    ``data``: the evaluation images as given (default: the CIFAR-10 test set normalised with
    ``mean``/``std``, subset to ``config.per_class`` per class); ``repair_images``: the repairs' fitting
    images (default: ``config.repair_images`` CIFAR-10 training images). ``apply_channels``: a
    :meth:`ChannelPruner.apply` to reuse (e.g. the session's shared pruner; default: one is traced on
    ``data``'s first image). ``model_id``: a stable name of the weights for the cache key (default: a
    digest of the state_dict). Raises :class:`core.method.channel_config.ChannelError` when the model
    cannot be channel-pruned. Returns one row per setting with the columns :data:`COLUMNS`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"run_tradeoff needs a torch.nn.Module, got {type(model).__name__}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    subset = data if data is not None else balanced_subset(eval_data("test", mean, std), config.per_class,
                                                           config.subset_seed)
    cache = _cache(model, config, data, model_id, repair_images, mean, std, use_cache, cache_root)
    runner = _Runner(model, config, subset, repair_images, mean, std, apply_channels)
    rows = config.rows()
    if on_progress is not None:
        on_progress(0, len(rows), "starting")
    records: list[dict] = []
    timings: dict[tuple[str, float], dict] = {}
    for done, (granularity, tau, repair) in enumerate(rows, start=1):
        values = cache.get(_row_key(granularity, tau, repair))
        timing = timings.get((granularity, tau)) or cache.get(_timing_key(granularity, tau))
        cached = values is not None and timing is not None
        if not cached:
            values, timing = runner.compute(granularity, tau, repair, timing)
            cache.put(_row_key(granularity, tau, repair), values)
            cache.put(_timing_key(granularity, tau), timing)
        timings[(granularity, tau)] = timing
        records.append({"granularity": granularity, "tau": tau, "repair": repair, **values, **timing,
                        "batch": config.batch, "cached": cached})
        if on_progress is not None:
            on_progress(done, len(rows), f"{granularity} τ={tau:g} repair {repair}")
        if on_rows is not None:
            on_rows(_frame(records))
    return _frame(records)


def _frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records)
    frame["mac_ratio"] = frame["macs"] / frame["macs_dense"]
    frame["nonzero_mac_ratio"] = frame["nonzero_macs"] / frame["macs_dense"]
    return frame[list(COLUMNS)]


def tradeoff_plan(model: nn.Module, config: TradeoffConfig = TradeoffConfig(), *, data: EvalData | None = None,
                  repair_images: torch.Tensor | None = None, model_id: str | None = None,
                  mean: Iterable[float] = CIFAR_MEAN, std: Iterable[float] = CIFAR_STD, use_cache: bool = True,
                  cache_root: str | os.PathLike | None = None) -> tuple[float, ...]:
    """Every row's relative cost in images through the model (0 when cached), in :func:`run_tradeoff`'s order.

    A row costs its evaluated images, plus its repair's fitting images (:data:`REPAIR_COST_PER_IMAGE`
    each), plus, for the first row of a setting, the timed passes (2 × ``latency_runs`` × ``batch``).
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    cache = _cache(model, config, data, model_id, repair_images, mean, std, use_cache, cache_root)
    images = len(data) if data is not None else 10 * config.per_class
    fitting = len(repair_images) if repair_images is not None else config.repair_images
    timed: set[tuple[str, float]] = set()
    costs = []
    for granularity, tau, repair in config.rows():
        if cache.get(_row_key(granularity, tau, repair)) is not None and \
                cache.get(_timing_key(granularity, tau)) is not None:
            costs.append(0.0)
            continue
        cost = images + REPAIR_COST_PER_IMAGE[repair] * fitting
        if (granularity, tau) not in timed and cache.get(_timing_key(granularity, tau)) is None:
            cost += 2 * config.latency_runs * config.batch
        timed.add((granularity, tau))
        costs.append(float(cost))
    return tuple(costs)


def pareto_points(frame: pd.DataFrame, x: str) -> pd.DataFrame:
    """The rows of ``frame`` no other row beats: none with ``x`` ≤ theirs and a higher accuracy (sorted by ``x``)."""
    ordered = frame.sort_values([x, "accuracy"], ascending=[True, False])
    best, keep = -np.inf, []
    for index, row in ordered.iterrows():
        if row["accuracy"] > best:
            keep.append(index)
            best = row["accuracy"]
    return ordered.loc[keep]


def main(argv: list[str] | None = None) -> int:
    """``python -m core.measure.granularity_tradeoff resnet20 --batch 64``: the table on a shipped checkpoint."""
    from core.workloads.models import PRETRAINED, load_card, load_pretrained

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(PRETRAINED))
    parser.add_argument("--weight-taus", type=float, nargs="+", default=list(TradeoffConfig.weight_taus))
    parser.add_argument("--channel-taus", type=float, nargs="+", default=list(TradeoffConfig.channel_taus))
    parser.add_argument("--repairs", nargs="+", default=list(REPAIRS), choices=REPAIRS)
    parser.add_argument("--per-class", type=int, default=TradeoffConfig.per_class)
    parser.add_argument("--batch", type=int, default=TradeoffConfig.batch)
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args(argv)
    config = TradeoffConfig(weight_taus=tuple(args.weight_taus), channel_taus=tuple(args.channel_taus),
                            repairs=tuple(args.repairs), per_class=args.per_class, batch=args.batch)
    card = load_card(args.model)
    frame = run_tradeoff(load_pretrained(args.model), config, model_id=f"sha256:{card['sha256']}", mean=card["mean"],
                         std=card["std"], use_cache=not args.no_cache,
                         on_progress=lambda d, t, label: print(f"[{d}/{t}] {label}", flush=True))
    print(f"{args.model}: {10 * config.per_class} class-balanced test images; torch eager, batch {config.batch}, "
          f"{torch.get_num_threads()} threads; MACs counted (weight rows: dense kernels, = dense)")
    print(frame[["granularity", "tau", "repair", "accuracy", "mac_ratio", "nonzero_mac_ratio", "latency_ms",
                 "dense_ms", "latency_ratio", "cached"]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
