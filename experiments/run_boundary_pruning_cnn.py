#!/usr/bin/env python3
"""The paper's CIFAR-10 benchmark (section 4): boundary pruning of a trained CNN, accuracy on the test set.

    python experiments/run_boundary_pruning_cnn.py \\
      --dataset cifar10 --threshold 0.2 --batch-size 64 --runs 5 --output real_pruning_results.csv

Writes one CSV row per run (columns: core.measure.paper_tables.CSV_COLUMNS) and a mean ± std summary
beside it (<stem>_summary.csv), and prints the summary next to the paper's quoted figures.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.measure.paper_suite import BenchmarkError, CnnBenchmarkConfig, preflight_cnn, run_cnn  # noqa: E402
from core.measure.paper_tables import compare_with_paper, summarize, summary_path  # noqa: E402
from core.workloads.models import PRETRAINED, CheckpointError, load_card  # noqa: E402
from experiments._cli import (  # noqa: E402
    CliError, OneLineParser, add_execution_paths_flag, add_quantization_flags, check_outputs, fail, positive_int,
    print_tables, progress_bar, unit_float, write_csv,
)

DEFAULTS = CnnBenchmarkConfig()


def shipped_models_text() -> str:
    """Each CIFAR-10 checkpoint with the test accuracy on its card, or what to do when it is not shipped."""
    parts = []
    for name in PRETRAINED:
        try:
            accuracy = load_card(name).get("test_accuracy")
        except (FileNotFoundError, CheckpointError, ValueError):
            parts.append(f"{name} (not shipped: python -m core.train {name})")
            continue
        parts.append(f"{name} ({100 * accuracy:.2f} %% on the JPEG test set)" if isinstance(accuracy, float)
                     else name)
    return "; ".join(parts)


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="run_boundary_pruning_cnn.py", allow_abbrev=False,
        description="The paper's CIFAR-10 benchmark: a trained checkpoint (assets/checkpoints) is "
                    "boundary-pruned at τ (keep |W| ≥ τ·max|W| per Conv/Linear layer), timed on test "
                    "batches and scored on the real CIFAR-10 test set. One CSV row per run, plus a "
                    "mean ± std summary beside the CSV.",
        epilog="Exit codes: 0 done; 2 bad flag, unwritable output, missing checkpoint or data (nothing is "
               "run); 1 failure during the run.")
    parser.add_argument("--dataset", choices=["cifar10"], default=DEFAULTS.dataset,
                        help="data set of the benchmark; the paper's is the only one (default: %(default)s)")
    parser.add_argument("--model", choices=PRETRAINED, default=DEFAULTS.model,
                        help="trained checkpoint to prune (assets/checkpoints): " + shipped_models_text()
                             + " (default: %(default)s)")
    parser.add_argument("--threshold", type=unit_float, default=DEFAULTS.threshold, metavar="TAU",
                        help="boundary fraction τ in [0, 1]: per layer, weights with |W| < τ·max|W| are zeroed "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size,
                        help="images per timed batch; also the unit of --max-batches (default: %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=DEFAULTS.runs,
                        help="runs; each re-applies the pruning and times new test batches drawn with its "
                             "seed (default: %(default)s)")
    parser.add_argument("--output", default="real_pruning_results.csv", metavar="CSV",
                        help="CSV file for the per-run rows; the summary goes to <stem>_summary.csv beside it "
                             "(default: %(default)s)")
    add_quantization_flags(parser, DEFAULTS)
    parser.add_argument("--bn-recalibrate", action="store_true",
                        help="after pruning, re-estimate the BatchNorm running statistics on "
                             "--calibration-images training images (drawn with the run's seed); no weight "
                             "changes, no retraining")
    parser.add_argument("--include-norm", action="store_true",
                        help="also prune BatchNorm scales, as the paper's pseudocode does "
                             "(hasattr(layer, 'weight')); collapses a trained CNN's accuracy")
    parser.add_argument("--data-root", default=None,
                        help="folder with the CIFAR-10 JPEG archives cifar10-{train,test}.tar.gz and SHA256SUMS "
                             "(default: $BOUNDARY_CIFAR10_DIR, else ../shared/data/cifar10)")
    parser.add_argument("--device", default=DEFAULTS.device,
                        help="torch device for inference and accuracy: cpu or cuda (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="random seed of run 1; run r uses seed + r − 1 (timing batches, BN calibration "
                             "sample) (default: %(default)s, the paper's)")
    parser.add_argument("--max-batches", type=positive_int, default=None,
                        help="for quick runs: score accuracy on a class-balanced subset of about "
                             "MAX_BATCHES × batch-size test images instead of all 10,000 (the CSV's dataset "
                             "column says so)")
    parser.add_argument("--timing-batches", type=positive_int, default=DEFAULTS.timing_batches,
                        help="test batches timed per run and model, after warm-up; inference_time_s is their "
                             "mean (default: %(default)s)")
    parser.add_argument("--calibration-images", type=positive_int, default=DEFAULTS.calibration_images,
                        help="training images for --bn-recalibrate (default: %(default)s)")
    add_execution_paths_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = CnnBenchmarkConfig(
            dataset=args.dataset, model=args.model, threshold=args.threshold, batch_size=args.batch_size,
            runs=args.runs, theta=args.theta, theta_mode=args.theta_mode, bits=tuple(args.bits),
            bn_recalibrate=args.bn_recalibrate, include_norm=args.include_norm, data_root=args.data_root,
            device=args.device, seed=args.seed, max_batches=args.max_batches,
            timing_batches=args.timing_batches, calibration_images=args.calibration_images, execution_paths=args.execution_paths)
        preflight_cnn(config)
        output = check_outputs(args.output, summary_path(args.output))
    except (ValueError, BenchmarkError, CliError) as err:
        return fail(parser.prog, str(err), 2)
    update, close = progress_bar(config.model)
    try:
        df = run_cnn(config, on_progress=update)
    except (BenchmarkError, RuntimeError, OSError, ValueError) as err:
        close()
        return fail(parser.prog, f"{type(err).__name__}: {err}", 1)
    close()
    summary = summarize(df)
    write_csv(df, output)
    write_csv(summary, summary_path(output))
    print_tables(f"CIFAR-10 benchmark, {config.model_label}, τ = {config.threshold}, {config.runs} run(s)",
                 summary, compare_with_paper(df, "cnn"), df.attrs.get("notes", []))
    print(f"\nwrote {output} ({len(df)} rows) and {summary_path(output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
