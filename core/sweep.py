"""``python -m core.sweep``: accuracy vs τ of a shipped checkpoint, printed as a table (and CSV).

    python -m core.sweep resnet20 --taus 0 0.1 0.2 0.3 --per-class 100 --within 1

The sweep itself is :func:`core.measure.sweeps.run_sweep`; this is its command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from core.measure.sweeps import DEFAULT_TAUS, QuantSetting, SweepConfig, run_sweep, sweep_pretrained
from core.measure.baselines import BASELINES
from core.measure.sweep_results import format_table, largest_tau_within


def _parse_quant(text: str) -> QuantSetting:
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"expected THETA:B_LOW:B_HIGH[:MODE], got {text!r}")
    try:
        return QuantSetting(float(parts[0]), int(parts[1]), int(parts[2]), *(parts[3:] or []))
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.sweep",
                                     description="Accuracy vs τ for boundary pruning, with BN recalibration "
                                                 "and magnitude-pruning baselines at the same retention.")
    parser.add_argument("model", help="a shipped checkpoint (cifar_cnn, resnet20, resnet18)")
    parser.add_argument("--taus", type=float, nargs="+", default=list(DEFAULT_TAUS), help="τ values in [0, 1]")
    parser.add_argument("--quant", type=_parse_quant, nargs="*", default=[], metavar="THETA:B_LOW:B_HIGH[:MODE]",
                        help="θ/bit-width settings also evaluated at each τ, e.g. 0.3:4:8")
    parser.add_argument("--per-class", type=int, default=None,
                        help="evaluate on N images per class (default: the full 10,000-image test set)")
    parser.add_argument("--no-bn", action="store_true", help="skip BN-recalibrated rows")
    parser.add_argument("--calibration-size", type=int, default=2000, help="training images for BN recalibration")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=list(BASELINES),
                        help="magnitude baselines at the same retention")
    parser.add_argument("--include-norm", action="store_true",
                        help="also prune BatchNorm scales (the paper's pseudocode; collapses a trained CNN)")
    parser.add_argument("--untrained", action="store_true", help="sweep the untrained registry model (a smoke test)")
    parser.add_argument("--no-cache", action="store_true", help="recompute every row and store nothing")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where cached rows live")
    parser.add_argument("--within", type=float, default=None, metavar="POINTS",
                        help="also print the largest τ within POINTS accuracy points of dense")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    config = SweepConfig(taus=tuple(args.taus), quant=tuple(args.quant), bn_recalibration=not args.no_bn,
                         baselines=tuple(args.baselines), per_class=args.per_class,
                         calibration_size=args.calibration_size, include_norm=args.include_norm)

    def progress(done: int, total: int, label: str) -> None:
        print(f"\r[{done}/{total}] {label:<60}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    options = dict(use_cache=not args.no_cache, cache_root=args.cache_dir, on_progress=progress)
    if args.untrained:
        from core.workloads.models import build

        torch.manual_seed(0)
        frame = run_sweep(build(args.model).eval(), config, **options)
        header = f"{args.model} (untrained, seed 0)"
    else:
        from core.workloads.models import load_card

        try:
            card = load_card(args.model)
        except FileNotFoundError as err:
            parser.error(str(err))
        frame = sweep_pretrained(args.model, config, **options)
        header = f"{args.model} ({card['file']}, sha256 {card['sha256'][:12]}…)"
    n = int(frame["n"].iloc[0])
    print(f"{header}; accuracy on {n} CIFAR-10 test images (JPEG copy)"
          + (f", {args.per_class} per class" if args.per_class else "")
          + ("" if args.no_bn else f"; BN recalibration on {args.calibration_size} training images"))
    print(format_table(frame))
    if args.within is not None:
        for bn in sorted(set(frame["bn_recalibrated"])):
            choice = largest_tau_within(frame, args.within, bn_recalibrated=bn)
            what = "with BN recal" if bn else "without BN recal"
            print(f"largest τ within {args.within:g} points of dense ({what}): "
                  + ("none" if choice is None else
                     f"τ={choice.tau:g} (retention {100 * choice.retention:.2f}%, accuracy {100 * choice.accuracy:.2f}%)"))
    if args.csv is not None:
        frame.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
