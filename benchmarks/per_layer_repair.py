"""Per-layer τ chosen after reconstruction against uniform τ and global magnitude, all reconstructed (prints; no asserts).

    python benchmarks/per_layer_repair.py --model resnet20 --retentions 0.25 0.30 0.35

For each retention (:func:`core.measure.tune_per_layer_repair.run_per_layer_repaired`, the same
work as ``python -m core.tune --per-layer --target-retention R --repair reconstruct``):

1. the candidates (sensitivity allocation, global magnitude's per-layer counts, blends) are each
   reconstructed on ``--search-images`` augmented training images and scored on
   ``--score-images`` other, labelled training images; the greedy search moves weights between
   layers from the best of them (``--steps`` moves of ``--move`` × the kept count), each move
   re-measured after reconstruction;
2. the choice, the best candidate before the greedy moves, the sensitivity allocation, uniform τ
   and global magnitude pruning of as many weights are each reconstructed on ``--repair-images``
   training images (seed 0) and run on the full CIFAR-10 test set in fp32.

The issue's targets (ResNet-20, ≤ 30 % retention): per-layer τ + reconstruction ≥ 86.63 %
(within 1 point of dense 87.63 %), and ≥ 0.5 point over global magnitude + reconstruction.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from run_conditions import machine_conditions

from core.measure.allocation import Target
from core.measure.allocation_repair import SearchConfig
from core.measure.repair import RepairConfig
from core.measure.sensitivity import SensitivityConfig
from core.measure.tune_per_layer_repair import run_per_layer_repaired
from core.tune import _progress  # the command's progress lines on stderr

ROWS = ("uniform τ", "global magnitude", "sensitivity allocation", "best candidate", "per-layer τ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.25, 0.30, 0.35])
    parser.add_argument("--method", default="reconstruct", choices=("bn", "bias", "reconstruct"))
    parser.add_argument("--search-images", type=int, default=256, help="fitting images of the search's repairs")
    parser.add_argument("--repair-images", type=int, default=512, help="fitting images of the verified repairs")
    parser.add_argument("--positions", type=int, default=RepairConfig.positions,
                        help="output positions sampled per image and conv layer, in every repair (0: all)")
    parser.add_argument("--score-images", type=int, default=1000, help="labelled training images that score")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--move", type=float, default=0.02)
    parser.add_argument("--criterion", default="loss", choices=("loss", "kl"))
    parser.add_argument("--verify-images", type=int, default=None, help="default: all 10,000 test images")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parent.parent
    conditions = machine_conditions(root)
    print(f"conditions: {conditions}; torch threads {torch.get_num_threads()}; torch {torch.__version__}")
    print(" ".join(["python benchmarks/per_layer_repair.py", *(argv if argv is not None else sys.argv[1:])]))
    search = SearchConfig(repair=RepairConfig(args.method, n_images=args.search_images, n_holdout=0,
                                              positions=args.positions),
                          score_images=args.score_images, criterion=args.criterion, steps=args.steps, move=args.move)
    verify = RepairConfig(args.method, n_images=args.repair_images, n_holdout=0, positions=args.positions)
    table = []
    for retention in args.retentions:
        start = time.perf_counter()
        run = run_per_layer_repaired(args.model, SensitivityConfig(), Target("retention", retention), search,
                                     verify_images=args.verify_images, verify_repair=verify, progress=_progress)
        seconds = time.perf_counter() - start
        print(run.report())
        print(f"retention {retention:g}: {seconds:.0f} s in all (search {run.choice.seconds:.0f} s, "
              f"{run.choice.judge.evaluations} repaired evaluations)", flush=True)
        frame = run.verification.frame.set_index("method")
        delta, low, high = run.verification.difference("per-layer τ", "global magnitude")
        table.append({"retention_%": f"{100 * frame.loc['per-layer τ', 'retention']:.2f}",
                      "dense": f"{100 * frame.loc['dense', 'accuracy']:.2f}",
                      **{row: (f"{100 * frame.loc[row, 'accuracy']:.2f}" if row in frame.index else "–") for row in ROWS},
                      "chosen": run.choice.allocation.method,
                      "per-layer − magnitude (95 %)": f"{100 * delta:+.2f} ({100 * low:+.2f} … {100 * high:+.2f})",
                      "search_s": f"{run.choice.seconds:.0f}"})
    import pandas as pd

    print(f"\naccuracy (%) after '{args.method}' on {args.repair_images} training images ({args.positions} positions "
          "per image), full test set, fp32; "
          f"search: '{args.method}' on {args.search_images} images, scored on {args.score_images} other training "
          f"images ({args.criterion}), {args.steps} greedy steps of {args.move:g} × kept")
    print(pd.DataFrame(table).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
