#!/usr/bin/env python3
"""Markdown tables of the benchmark CSVs beside the paper's quoted figures (for docs/results.md).

    python experiments/results_tables.py --synthetic results/synthetic_pruning_results.csv \\
      --cnn results/real_pruning_results.csv results/real_pruning_results_resnet20.csv

Prints, per CSV, the paper's table (quoted from spec/paper.md, section 5) beside our mean ± std,
and a per-run table. Nothing is typed in by hand: every figure comes from the CSVs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pandas as pd  # noqa: E402

from core.measure.paper_tables import (  # noqa: E402
    CSV_COLUMNS,
    REALIZED_COLUMNS,
    compare_with_paper,
    format_value,
    summarize,
)


def markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def per_run(df: pd.DataFrame) -> pd.DataFrame:
    columns = ["run", "seed", "retention", "inference_time_s", "inference_time_dense_s", "peak_memory_mib",
               "accuracy", "accuracy_dense"]
    columns = [c for c in columns if not df[c].isna().all()]
    out = df[columns].copy()
    for column in columns[2:]:
        out[column] = [format_value(column, v) for v in df[column]]
    return out


def layer_table(name: str, tau: float, trained: bool = True) -> pd.DataFrame:
    """Per-layer boundary pruning at ``tau`` with the paper's ``include_norm`` (BatchNorm scales too).

    ``mean(abs W)/max(abs W)`` is 0.5 for weights uniform on [−a, a] (random init); the smaller it is,
    the more of a layer τ·max|W| cuts away. ``min(abs W)/max(abs W)`` is the smallest τ that zeroes
    anything in the layer.
    """
    import torch

    from core.method.config import CompressionConfig
    from core.method.engine import Engine
    from core.workloads.models import build, load_pretrained

    if trained:
        model = load_pretrained(name)
    else:
        torch.manual_seed(42)
        model = build(name)
    engine = Engine(model, palette=(8,))
    stats = engine.apply(CompressionConfig(tau=tau, include_norm=True)).stats
    rows = []
    for row in stats.itertuples(index=False):
        magnitudes = engine.sorted_magnitudes(row.name)
        rows.append({"layer": row.name, "type": row.type, "weights": row.numel,
                     "mean(abs W)/max(abs W)": f"{float(magnitudes.mean()) / row.max_abs:.3f}",
                     "min(abs W)/max(abs W)": f"{float(magnitudes[0]) / row.max_abs:.3f}",
                     "kept": row.kept, "retention": f"{100 * row.retention:.1f} %",
                     "zeroed": row.numel - row.kept})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=Path, nargs="*", default=[], help="synthetic benchmark CSV(s)")
    parser.add_argument("--cnn", type=Path, nargs="*", default=[], help="CNN benchmark CSV(s)")
    parser.add_argument("--layers", nargs="*", default=[], metavar="MODEL",
                        help="per-layer table of boundary pruning at --tau for these shipped checkpoints, "
                             "BatchNorm scales included (the paper's pseudocode), plus the same architecture "
                             "randomly initialised (seed 42)")
    parser.add_argument("--tau", type=float, default=0.2, help="τ of the per-layer tables (default: 0.2)")
    args = parser.parse_args(argv)
    for kind, paths in (("synthetic", args.synthetic), ("cnn", args.cnn)):
        for path in paths:
            df = pd.read_csv(path)
            if [c for c in df.columns if c not in REALIZED_COLUMNS] != [c for c in CSV_COLUMNS
                                                                         if c not in REALIZED_COLUMNS]:
                parser.error(f"{path} is not a benchmark CSV")
            first = df.iloc[0]
            print(f"### {path.name}: {first['model']}, {first['dataset']}, τ = {first['tau']:g}, "
                  f"{len(df)} runs, {first['device']}, torch {first['torch_version']}\n")
            print(markdown(compare_with_paper(df, kind)) + "\n")
            print(markdown(per_run(df)) + "\n")
            extra = summarize(df)
            extra = extra[extra["metric"].isin(["params_total", "params_kept", "model_bytes_fp32",
                                                "model_bytes_compressed", *REALIZED_COLUMNS])]
            print(markdown(extra[["label", "mean ± std"]].rename(columns={"label": "metric"})) + "\n")
    for name in args.layers:
        for trained in (True, False):
            table = layer_table(name, args.tau, trained)
            what = "trained checkpoint" if trained else "random init (seed 42)"
            print(f"### {name}, {what}: per layer at τ = {args.tau:g}, BatchNorm scales included\n")
            print(markdown(table) + "\n")
            for kind, part in table.groupby(table["type"].str.startswith("BatchNorm")):
                label = "BatchNorm scales" if kind else "Conv/Linear weights"
                print(f"- {label}: {part['zeroed'].sum():,} of {part['weights'].sum():,} zeroed "
                      f"({100 * part['zeroed'].sum() / part['weights'].sum():.1f} %)")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
