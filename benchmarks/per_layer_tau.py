"""Automatic per-layer τ against uniform τ and global magnitude pruning at equal retention (prints; no asserts).

    python benchmarks/per_layer_tau.py --model resnet20 --retention 0.3
    python benchmarks/per_layer_tau.py --model resnet18 --retention 0.2

1. The per-layer sensitivity (:mod:`core.measure.sensitivity`, defaults: 6 τ values, 1,000
   class-balanced training images, bf16 where native) is measured twice: once into an empty
   cache (the first-run time) and once more (the cached-run time).
2. The per-layer τ for the retention (:mod:`core.measure.allocation`: the allocation from the
   summed single-layer drops, or with the joint check the best of it, global magnitude's
   per-layer τ and their blends on the sensitivity's images) is verified on the full
   test set in fp32 against uniform τ and global magnitude pruning of exactly as many weights,
   each with and without BN recalibration (2,000 augmented training images).
3. The table, and per-layer τ minus each baseline on the same images with a paired 95 %
   interval; the issue's target is ≥ 1 point over both, with BN recalibration.

``--cache-dir`` keeps the caches (default: a fresh temporary folder, so step 1 is a first run).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.measure.allocation import Target, per_layer_tau  # noqa: E402
from core.measure.allocation_joint import choose_jointly, format_candidates  # noqa: E402
from core.measure.allocation_verify import METHOD_LABELS, compare_at_equal_retention, format_comparison  # noqa: E402
from core.measure.sensitivity import DEFAULT_IMAGES, DEFAULT_TAUS, SensitivityConfig, measure_sensitivity  # noqa: E402
from core.method.engine import Engine  # noqa: E402
from core.workloads.models import PRETRAINED, load_card, load_pretrained  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", choices=PRETRAINED)
    parser.add_argument("--retention", type=float, default=0.3, help="target retention in (0, 1]")
    parser.add_argument("--taus", type=float, nargs="+", default=list(DEFAULT_TAUS))
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES)
    parser.add_argument("--source", choices=("train", "test"), default="train")
    parser.add_argument("--bn-sensitivity", action="store_true", help="BN recalibration inside the sensitivity")
    parser.add_argument("--additive-only", action="store_true",
                        help="the allocation from summed single-layer drops, without the joint check")
    parser.add_argument("--calibration-size", type=int, default=2000)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    root = args.cache_dir or Path(tempfile.mkdtemp(prefix="per_layer_tau_"))
    card = load_card(args.model)
    model = load_pretrained(args.model)
    model_id = f"sha256:{card['sha256']}"
    config = SensitivityConfig(taus=tuple(args.taus), n_images=args.images, source=args.source,
                               bn_recalibration=args.bn_sensitivity, calibration_size=args.calibration_size)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model}, {torch.get_num_threads()} torch threads, load average {load:.1f} at the start; cache {root}")

    engine = Engine(model)
    timings = []
    for run in ("first run", "cached run"):
        start = time.perf_counter()
        sensitivity = measure_sensitivity(model, config, model_id=model_id, mean=card["mean"], std=card["std"],
                                          engine=engine, cache_root=root / "sensitivity")
        timings.append((run, time.perf_counter() - start, sensitivity.computed, sensitivity.cached))
    cells = len(sensitivity.layers) * len(sensitivity.taus)
    print(f"sensitivity: {len(sensitivity.layers)} layers × {len(sensitivity.taus)} τ = {cells} cells on "
          f"{sensitivity.images}, {sensitivity.precision}"
          + (", BN recalibrated" if sensitivity.bn_recalibration else ""))
    for run, seconds, computed, cached in timings:
        print(f"  {run:<10} {seconds:7.1f} s  ({computed} layers measured, {cached} read from the cache)")

    target = Target("retention", args.retention)
    start = time.perf_counter()
    if args.additive_only:
        allocation = per_layer_tau(sensitivity, engine, target)
    else:
        allocation = choose_jointly(model, sensitivity, engine, target, model_id=model_id, mean=card["mean"],
                                    std=card["std"], cache_root=root / "allocation")
        print(f"\njoint check ({time.perf_counter() - start:.0f} s): candidates at the same budget, each run whole "
              f"on the sensitivity's images" + (", BN recalibrated" if allocation.candidates.attrs["bn_recalibrated"]
                                                else "") + ":")
        print(format_candidates(allocation.candidates))
    start = time.perf_counter()
    comparison = compare_at_equal_retention(model, allocation, engine=engine, calibration_size=args.calibration_size,
                                            model_id=model_id, mean=card["mean"], std=card["std"],
                                            cache_root=root / "allocation")
    print(f"\nequal retention {100 * allocation.retention:.2f} % ({allocation.total_kept:,} of {allocation.numel:,} "
          f"weights), verified on {comparison.images} in fp32 ({time.perf_counter() - start:.0f} s); "
          f"uniform τ = {comparison.uniform_tau:.4f}; per-layer τ from '{allocation.method}', summed single-layer drops "
          f"{100 * allocation.predicted_drop:.2f} points")
    print(format_comparison(comparison.frame))
    print("\nper-layer τ minus baseline, same images (paired 95 % interval):")
    for bn in (False, True):
        if ("per_layer", bn) not in comparison.predictions:
            continue
        for other in ("uniform", "global_magnitude"):
            delta, low, high = comparison.difference("per_layer", other, bn)
            print(f"  {'with' if bn else 'without'} BN recal, vs {METHOD_LABELS[other]:<16} {100 * delta:+6.2f} points "
                  f"({100 * low:+.2f} … {100 * high:+.2f})")
    print("\nper-layer τ: " + ", ".join(f"{name} {tau:.3f}" for name, tau in allocation.layer_tau.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
