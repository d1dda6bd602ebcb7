#!/usr/bin/env python3
"""The paper's synthetic benchmark (section 4): boundary pruning of a randomly initialised MLP.

    python experiments/run_boundary_pruning_synthetic.py \\
      --layers 6 --in-dim 128 --out-dim 128 --threshold 0.2 --runs 5 --batch-size 64 \\
      --output synthetic_pruning_results.csv

Writes one CSV row per run (columns: core.measure.paper_tables.CSV_COLUMNS) and a mean ± std summary
beside it (<stem>_summary.csv), and prints the summary next to the paper's quoted figures.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.measure.paper_suite import (  # noqa: E402
    BenchmarkError, SyntheticBenchmarkConfig, preflight_synthetic, run_synthetic,
)
from core.measure.paper_tables import compare_with_paper, summarize, summary_path  # noqa: E402
from experiments._cli import (  # noqa: E402
    CliError, OneLineParser, add_execution_paths_flag, add_quantization_flags, check_outputs, fail, positive_int,
    print_tables, progress_bar, unit_float, write_csv,
)

DEFAULTS = SyntheticBenchmarkConfig()


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="run_boundary_pruning_synthetic.py", allow_abbrev=False,
        description="The paper's synthetic benchmark: a randomly initialised MLP (PyTorch's default "
                    "Kaiming-uniform init, seed + run − 1 per run) is boundary-pruned at τ "
                    "(keep |W| ≥ τ·max|W| per layer) and timed on N(0, 1) batches. One CSV row per run, "
                    "plus a mean ± std summary beside the CSV.",
        epilog="Exit codes: 0 done; 2 bad flag or unwritable output (nothing is run); 1 failure during the run.")
    parser.add_argument("--layers", type=positive_int, default=DEFAULTS.layers,
                        help="number of Linear layers of the MLP (ReLU between them) (default: %(default)s)")
    parser.add_argument("--in-dim", type=positive_int, default=DEFAULTS.in_dim,
                        help="input width of the MLP (default: %(default)s)")
    parser.add_argument("--out-dim", type=positive_int, default=DEFAULTS.out_dim,
                        help="output width of the MLP (default: %(default)s)")
    parser.add_argument("--hidden", type=positive_int, default=DEFAULTS.hidden,
                        help="width of the hidden layers (default: %(default)s)")
    parser.add_argument("--threshold", type=unit_float, default=DEFAULTS.threshold, metavar="TAU",
                        help="boundary fraction τ in [0, 1]: per layer, weights with |W| < τ·max|W| are zeroed "
                             "(default: %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=DEFAULTS.runs,
                        help="independent runs, each with a freshly initialised MLP (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size,
                        help="samples per timed batch (default: %(default)s)")
    parser.add_argument("--output", default="synthetic_pruning_results.csv", metavar="CSV",
                        help="CSV file for the per-run rows; the summary goes to <stem>_summary.csv beside it "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="random seed of run 1; run r uses seed + r − 1, for both the weights and the "
                             "inputs (default: %(default)s, the paper's)")
    add_quantization_flags(parser, DEFAULTS)
    parser.add_argument("--device", default=DEFAULTS.device,
                        help="torch device for the timed inference: cpu or cuda (default: %(default)s)")
    parser.add_argument("--n-batches", type=positive_int, default=DEFAULTS.n_batches,
                        help="batches timed per run and model, after warm-up; inference_time_s is their mean "
                             "(default: %(default)s)")
    add_execution_paths_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = SyntheticBenchmarkConfig(
            layers=args.layers, in_dim=args.in_dim, out_dim=args.out_dim, hidden=args.hidden,
            threshold=args.threshold, runs=args.runs, batch_size=args.batch_size, seed=args.seed,
            theta=args.theta, theta_mode=args.theta_mode, bits=tuple(args.bits), device=args.device,
            n_batches=args.n_batches, execution_paths=args.execution_paths)
        preflight_synthetic(config)
        output = check_outputs(args.output, summary_path(args.output))
    except (ValueError, BenchmarkError, CliError) as err:
        return fail(parser.prog, str(err), 2)
    update, close = progress_bar("synthetic MLP")
    try:
        df = run_synthetic(config, on_progress=update)
    except (BenchmarkError, RuntimeError, OSError, ValueError) as err:
        close()
        return fail(parser.prog, f"{type(err).__name__}: {err}", 1)
    close()
    summary = summarize(df)
    write_csv(df, output)
    write_csv(summary, summary_path(output))
    print_tables(f"Synthetic MLP benchmark, τ = {config.threshold}, {config.runs} run(s)", summary,
                 compare_with_paper(df, "synthetic"), df.attrs.get("notes", []))
    print(f"\nwrote {output} ({len(df)} rows) and {summary_path(output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
