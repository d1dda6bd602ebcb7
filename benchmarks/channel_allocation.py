"""Per-group channel counts for a MAC target, chosen after the repair, against uniform τ_ch (prints; no asserts).

    python benchmarks/channel_allocation.py --model resnet20 --target-macs 0.667
    python benchmarks/channel_allocation.py --model resnet18 --target-macs 0.5 --images 10000

1. Every shape of :mod:`core.measure.channel_allocation` (uniform τ_ch, equal share, streams at
   half, inner only, MAC-weighted) is cut to the target, repaired (least squares + BN) on
   ``--search-images`` augmented *training* images (16 positions) and scored on ``--score-images`` other,
   labelled training images; the lowest loss is chosen. Then ``--steps`` greedy moves of
   ``--move`` × the MAC bound between groups, each judged the same way
   (:mod:`core.measure.channel_greedy`); their result is chosen when it scores lower.
2. Every shape (and the greedy result) is then repaired on ``--repair-images`` training images (seed 0; ``--positions``) and run on
   ``--images`` class-balanced CIFAR-10 *test* images (10000: all), beside dense.

The issue's targets: ResNet-18 ≥ 2× fewer MACs within 1 point of dense; ResNet-20 ≥ 1.5× fewer
MACs within 1.5 points. The run's conditions are printed first.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd
import torch
from run_conditions import machine_conditions

from core.measure.accuracy import balanced_subset, eval_data, evaluate
from core.measure.allocation_repair import scoring_split
from core.measure.channel_allocation import (
    SHAPES,
    ChannelJudge,
    ChannelSearchConfig,
    choose_channels,
    shape_counts,
)
from core.measure.channel_greedy import refine
from core.measure.channel_repair import repair_channels
from core.measure.repair import RepairConfig
from core.method.channels import ChannelPruner
from core.services.choices import load_choice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--target-macs", type=float, default=None, help="default: ResNet-18 0.5, others 0.667")
    parser.add_argument("--search-images", type=int, default=256)
    parser.add_argument("--score-images", type=int, default=1000)
    parser.add_argument("--repair-images", type=int, default=512)
    parser.add_argument("--positions", type=int, default=RepairConfig.positions,
                        help="sampled output positions per image and layer of the verified repairs")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--images", type=int, default=10000, help="class-balanced test images (10000: all)")
    parser.add_argument("--criterion", default="loss", choices=("loss", "kl"))
    parser.add_argument("--steps", type=int, default=4, help="greedy MAC moves after the best shape (0: none)")
    parser.add_argument("--move", type=float, default=0.02, help="MACs moved per step, a fraction of the bound")
    args = parser.parse_args(argv)
    print("conditions:", machine_conditions(ROOT), f"torch threads {torch.get_num_threads()}", flush=True)
    print(" ".join(["python benchmarks/channel_allocation.py", *(argv if argv is not None else sys.argv[1:])]))
    target = args.target_macs if args.target_macs is not None else (0.5 if args.model == "resnet18" else 0.667)
    dense = load_choice(f"pretrained:{args.model}").model
    pruner = ChannelPruner(dense)
    search = ChannelSearchConfig(target, RepairConfig("reconstruct", n_images=args.search_images, n_holdout=0),
                                 args.score_images, args.criterion, args.steps, args.move)
    fit, score = scoring_split(args.search_images, args.score_images)
    start = time.perf_counter()
    judge = ChannelJudge(dense, pruner, fit, score, search)

    def show(done: int, total: int, label: str) -> None:
        print(f"  [{done}/{total}] {label}", file=sys.stderr, flush=True)

    choice, greedy = refine(judge, choose_channels(judge, tuple(args.shapes), progress=show), show)
    print(f"\nsearch ({time.perf_counter() - start:.0f} s): judged after reconstruction on {args.search_images} "
          f"training images, scored on {args.score_images} other training images ({args.criterion}); chosen: {choice.shape}")
    print(choice.candidates.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if greedy is not None:
        print(f"greedy after repair: {len(greedy.steps)} moves and fills tried, {int(greedy.steps['accepted'].sum())} kept, "
              f"{greedy.evaluations} repairs, {greedy.seconds:.0f} s")
        if len(greedy.steps):
            print(greedy.steps.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    counts_of = {row.shape: shape_counts(pruner, row.shape, target) for row in choice.candidates.itertuples()
                 if not row.note and row.shape in SHAPES}
    counts_of[choice.shape] = choice.counts
    full = eval_data("test")
    data = full if args.images >= len(full.labels) else balanced_subset(full, max(1, args.images // 10))
    dense_acc = evaluate(dense, data).accuracy
    verify = RepairConfig("reconstruct", n_images=args.repair_images, n_holdout=0, positions=args.positions)
    rows = [{"shape": "dense", "macs_ratio": 1.0, "accuracy_%": 100 * dense_acc, "Δ points": 0.0}]
    for shape, counts in counts_of.items():
        result = judge.result(counts)
        fixed = repair_channels(dense, result, config=verify)
        acc = evaluate(fixed.model, data).accuracy
        rows.append({"shape": shape + (" (chosen)" if shape == choice.shape else ""),
                     "macs_ratio": result.mac_ratio, "accuracy_%": 100 * acc, "Δ points": 100 * (acc - dense_acc),
                     "kept": ", ".join(f"{k}/{n}" for k, n in zip(result.groups[result.groups.prunable].kept,
                                                                   result.groups[result.groups.prunable].channels))})
        print(f"verified {shape}: {100 * acc:.2f} %", file=sys.stderr, flush=True)
    print(f"\nverified: reconstruction on {args.repair_images} training images ({args.positions} positions), "
          f"{len(data.labels)} test images, fp32")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
