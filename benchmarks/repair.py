"""Accuracy repair without retraining: full-test accuracy after none / bn / bias / reconstruct, and its cost.

    python benchmarks/repair.py                                        # everything (an hour or more on 2 cores)
    python benchmarks/repair.py --models resnet18 --taus 0.2 0.15 --methods bn reconstruct --baselines boundary
    python benchmarks/repair.py --models resnet20 --taus 0.2 --quant none     # ResNet-20 at ~31 % retention
    python benchmarks/repair.py --models resnet18 --taus --quant bn reconstruct  # only the quantized case

For each shipped checkpoint (``resnet18``, ``resnet20``) and each τ: boundary pruning
(``Engine``, β = τ·max|W| per layer) and global magnitude pruning at the same number of
pruned weights (:func:`core.measure.baselines.magnitude_baseline`), then each repair of
:func:`core.measure.repair.repair` on the same calibration images (``--n-images`` augmented
*training* images, seed 0; ``--n-holdout`` more for the per-layer error table), and the
accuracy on the CIFAR-10 test set (all 10,000 images unless ``--test-images``). ``seconds``
is the repair's wall time (the held-out error table not included: ``error_s``), ``cpu_s``
the process CPU time over the same span (both threads), and ``est_s`` what
:func:`core.measure.repair.estimate_seconds` predicted before it started. The quantized case
(``--quant``; ResNet-18 by default at ``--quant-tau`` 0.2, θ = ``--quant-theta`` relative,
b_low/b_high ``--quant-bits``) repairs the engine's quantized model with each weight's
bit-width fixed by the engine (:func:`core.measure.repair.bit_widths`).

Nothing here asserts; the table is printed, and written as CSV with ``--csv``. Evaluating
ResNet-18 on 10,000 images takes 60–100 s on a 2-core CPU, so each row costs that plus its repair.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from core.measure.accuracy import EvalData, balanced_subset, eval_data, evaluate  # noqa: E402
from core.measure.baselines import magnitude_baseline  # noqa: E402
from core.measure.calibration import calibration_split  # noqa: E402
from core.measure.repair import METHODS, RepairConfig, bit_widths, estimate_seconds, repair  # noqa: E402
from core.method.config import CompressionConfig  # noqa: E402
from core.method.engine import Engine  # noqa: E402
from core.workloads.models import load_pretrained  # noqa: E402

DEFAULT_TAUS = {"resnet18": (0.3, 0.2, 0.15, 0.1), "resnet20": (0.3, 0.2, 0.1, 0.05)}
BASELINES = ("boundary", "global_magnitude")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet20"], choices=sorted(DEFAULT_TAUS))
    parser.add_argument("--taus", nargs="*", type=float, default=None,
                        help="τ values (default per model: ResNet-18 0.3 0.2 0.15 0.1 ≈ 5–40 %% kept, "
                             "ResNet-20 0.3 0.2 0.1 0.05 ≈ 16–70 %%); give none to skip the pruning-only table")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=BASELINES)
    parser.add_argument("--quant", nargs="*", default=None, choices=METHODS,
                        help="repairs for the quantized case (default: the --methods, on resnet18 when it is "
                             "among --models); give none to skip it")
    parser.add_argument("--quant-tau", type=float, default=0.2)
    parser.add_argument("--quant-theta", type=float, default=0.3)
    parser.add_argument("--quant-bits", nargs=2, type=int, default=[4, 8], metavar=("B_LOW", "B_HIGH"))
    parser.add_argument("--n-images", type=int, default=512, help="calibration images that fit the repair")
    parser.add_argument("--n-holdout", type=int, default=128, help="held-out images for the per-layer errors")
    parser.add_argument("--ridge", type=float, default=RepairConfig.ridge)
    parser.add_argument("--positions", type=int, default=RepairConfig.positions)
    parser.add_argument("--test-images", type=int, default=10_000, help="a class-balanced subset of N test images (default: all 10,000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--errors", action="store_true", help="print each repair's per-layer error table")
    parser.add_argument("--csv", type=Path, default=None)
    return parser.parse_args(argv)


def measure(dense, pruned, fit, held, test: EvalData, method: str, args, quant=None) -> dict:
    config = RepairConfig(method, n_images=args.n_images, n_holdout=args.n_holdout, ridge=args.ridge,
                          positions=args.positions)
    estimate = estimate_seconds(pruned, config, masks={n: b != 0 for n, b in quant.items()} if quant else None,
                                quantized=quant is not None and method == "reconstruct")
    cpu = time.process_time()
    fixed = repair(dense, pruned, fit, config, holdout=held, quant=quant)
    cpu = time.process_time() - cpu
    accuracy = evaluate(fixed.model, test).accuracy
    errors = fixed.errors
    if args.errors:
        print(errors.to_string(index=False), flush=True)
    return {"method": method, "accuracy": accuracy, "seconds": fixed.seconds, "cpu_s": cpu, "est_s": estimate,
            "error_s": fixed.error_seconds, "n_images": fixed.n_images,
            "logit_err_before": errors["err_before"].iloc[-1], "logit_err_after": errors["err_after"].iloc[-1]}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    test = eval_data("test")
    if args.test_images < len(test):  # the test split is sorted by class: take a class-balanced subset
        test = balanced_subset(test, args.test_images // 10)
    fit, held = calibration_split(args.n_images, args.n_holdout, seed=0)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; calibration: {len(fit)} training images (+{len(held)} held out); "
          f"test: {len(test)} images", flush=True)
    for arch in args.models:
        dense = load_pretrained(arch)
        engine = Engine(dense)
        dense_acc = evaluate(dense, test).accuracy
        emit({"model": arch, "pruning": "dense", "tau": 0.0, "retention": 1.0, "method": "-", "accuracy": dense_acc})
        taus = DEFAULT_TAUS[arch] if args.taus is None else args.taus
        for tau in taus:
            result = engine.apply(CompressionConfig(tau=tau))
            n_prune = int(result.stats["numel"].sum() - result.stats["kept"].sum())
            for baseline in args.baselines:
                if baseline == "boundary":
                    pruned, retention = result.model, result.retention
                else:
                    pruned, retention = magnitude_baseline(dense, baseline, n_prune)
                for method in args.methods:
                    row = measure(dense, pruned, fit, held, test, method, args)
                    emit({"model": arch, "pruning": baseline, "tau": tau, "retention": retention,
                          "dense": dense_acc, **row})
        quant_methods = args.methods if args.quant is None else args.quant
        if arch == "resnet18" and quant_methods:
            b_low, b_high = args.quant_bits
            config = CompressionConfig(tau=args.quant_tau, theta=args.quant_theta, b_low=b_low, b_high=b_high)
            result = engine.apply(config)
            bits = bit_widths(engine, result)
            for method in quant_methods:
                row = measure(dense, result.model, fit, held, test, method, args, quant=bits)
                emit({"model": arch, "pruning": f"boundary+{b_low}/{b_high}bit θ={args.quant_theta}",
                      "tau": args.quant_tau, "retention": result.retention, "dense": dense_acc, **row})
    table = pd.DataFrame(rows)
    print()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.csv is not None:
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
