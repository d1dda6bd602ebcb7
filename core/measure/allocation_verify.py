"""The verification: a per-layer τ against uniform τ and global magnitude at the same retention, on the test set.

The check (:func:`compare_at_equal_retention`): the chosen setting, uniform τ at the same
retention (the τ whose kept count is closest to it) and global magnitude pruning of exactly
the same number of weights, each with and without BN recalibration, on the full test set in
fp32, every accuracy paired against the dense model's predictions on the same images.
Verified rows are cached on disk like the sensitivity.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from core.common.steps import interruptible, turn
from core.measure.accuracy import EvalData, bn_recalibrate, calibration_images, eval_data, has_batchnorm, predict
from core.measure.allocation import ALLOCATION_CACHE_VERSION, Allocation, ProgressCallback, allocation_cache_dir, fixed_bytes
from core.measure.baselines import magnitude_baseline
from core.measure.disk_cache import JsonCache, base_context, calibration_key, images_key
from core.measure.paired import balanced_order, paired_interval
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.method.pruning import boundary, layer_weight
from core.method.quantization import layer_storage
from core.workloads.data import CIFAR_MEAN, CIFAR_STD

METHOD_LABELS: dict[str, str] = {"dense": "dense", "uniform": "uniform τ", "per_layer": "automatic per-layer τ",
                                 "global_magnitude": "global magnitude"}
COMPARISON_COLUMNS: tuple[str, ...] = (
    "method", "bn_recalibrated", "tau", "kept", "retention", "bytes", "accuracy", "n", "newly_wrong",
    "newly_right", "drop", "predicted_drop", "seconds", "cached")


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
    """Predictions of ``model`` (a private one: it is changed to channels_last and, in a job, hooked)."""
    run = model
    if any(isinstance(m, nn.Conv2d) for m in model.modules()) and torch.device(device).type == "cpu":
        with torch.no_grad():
            run = model.to(memory_format=torch.channels_last)
    with interruptible(run):
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
    context = {**base_context(ALLOCATION_CACHE_VERSION, model, model_id, device),
               "data": images_key(data),
               "calibration": calibration_key(calibration, calibration_size, calibration_seed, mean, std) if bn else None,
               "layers": layers}
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
            with turn():  # one step: in a job, a turn on the compute queue (core.common.steps)
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
