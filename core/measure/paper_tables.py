"""The paper's benchmark tables: the CSV columns, the paper's quoted figures, and summaries beside them.

:func:`summarize` turns a benchmark CSV (one row per run) into mean ± std per metric;
:func:`compare_with_paper` puts that beside the paper's own table, quoted verbatim.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from core.common.formatting import fmt_kib, fmt_mib, fmt_pct, fmt_seconds, is_missing

CSV_COLUMNS: tuple[str, ...] = (
    "run", "model", "dataset", "tau", "theta", "b_low", "b_high",
    "params_total", "params_kept", "retention", "compute_reduction",
    "inference_time_s", "inference_time_dense_s", "peak_memory_mib",
    "model_bytes_fp32", "model_bytes_compressed", "accuracy", "accuracy_dense",
    "seed", "device", "torch_version",
    "file_bytes_packed", "file_bytes_state_dict",
    "latency_dense_s", "latency_sparse_s", "latency_int8_s", "latency_auto_s",
)

#: The realized-savings columns (measured file sizes, per-path latency), added after the first
#: published CSVs: readers accept CSVs without them.
REALIZED_COLUMNS: tuple[str, ...] = CSV_COLUMNS[CSV_COLUMNS.index("file_bytes_packed"):]

#: Summarised metrics, in display order.
METRICS: tuple[str, ...] = (
    "retention", "compute_reduction", "params_total", "params_kept",
    "inference_time_s", "inference_time_dense_s", "peak_memory_mib",
    "model_bytes_fp32", "model_bytes_compressed", "accuracy", "accuracy_dense",
    "file_bytes_packed", "file_bytes_state_dict",
    "latency_dense_s", "latency_sparse_s", "latency_int8_s", "latency_auto_s",
)

#: The configuration columns a summary is grouped by.
GROUP_COLUMNS: tuple[str, ...] = ("model", "dataset", "tau", "theta", "b_low", "b_high", "device")

# The paper's published tables, quoted verbatim from spec/paper.md section 5 (paper's figures,
# not ours). The paper does not say which CNN it used nor whether its accuracy figure includes
# the pruned BatchNorm layers of its pseudocode.
PAPER_RESULTS: dict[str, dict] = {
    "source": "the paper (spec/paper.md, section 5): Python 3.9, PyTorch 2.0, memory_profiler 0.57, "
              "Mac Studio (32 GB RAM), seed 42, 5 runs",
    "synthetic": {
        "title": "5.1 Synthetic Gaussian Benchmark (6-layer MLP, in/out 128, τ = 0.2)",
        "values": {"retention": 0.800, "inference_time_s": 0.0064, "peak_memory_mib": 143.5},
        "quoted": {"retention": "80.0 %", "inference_time_s": "0.0064 s", "peak_memory_mib": "143.5 MiB"},
    },
    "cnn": {
        "title": "5.2 CIFAR-10 CNN Benchmark (τ = 0.2)",
        "values": {"retention": 0.3195, "inference_time_s": 0.5305, "peak_memory_mib": 395.65,
                   "accuracy": 0.1009},
        "quoted": {"retention": "31.95 %", "inference_time_s": "0.5305 s", "peak_memory_mib": "395.65 MiB",
                   "accuracy": "10.09 %"},
    },
}

METRIC_LABELS: dict[str, str] = {
    "retention": "Parameter retention",
    "compute_reduction": "Compute reduction (MACs)",
    "params_total": "Prunable weights",
    "params_kept": "Weights kept",
    "inference_time_s": "Mean inference time (pruned, 1 batch)",
    "inference_time_dense_s": "Mean inference time (dense, 1 batch)",
    "peak_memory_mib": "Peak memory (process RSS)",
    "model_bytes_fp32": "Model size fp32",
    "model_bytes_compressed": "Model size compressed",
    "accuracy": "Accuracy (pruned)",
    "accuracy_dense": "Accuracy (dense)",
    "file_bytes_packed": "Packed file on disk",
    "file_bytes_state_dict": "fp32 state_dict file on disk",
    "latency_dense_s": "Latency, dense path (1 batch)",
    "latency_sparse_s": "Latency, sparse path (1 batch)",
    "latency_int8_s": "Latency, int8 path (1 batch)",
    "latency_auto_s": "Latency, auto path (1 batch)",
}

PERCENT_METRICS = ("retention", "compute_reduction", "accuracy", "accuracy_dense")


def format_value(metric: str, value: float) -> str:
    """A display string for one metric value (fractions as %, seconds, MiB, counts, bytes)."""
    if is_missing(value):
        return "–"
    if metric in PERCENT_METRICS:
        return fmt_pct(value, 2)
    if metric.endswith("_s"):
        return fmt_seconds(value)
    if metric.endswith("_mib"):
        return fmt_mib(value)
    if metric.startswith(("model_bytes", "file_bytes")):
        return fmt_kib(value)
    return f"{value:,.0f}"


def _mean_std_text(metric: str, mean: float, std: float, n: int) -> str:
    if n <= 1 or math.isnan(std):
        return format_value(metric, mean) + (" (1 run)" if n == 1 else "")
    if metric in PERCENT_METRICS:
        return f"{100 * mean:.2f} ± {100 * std:.2f} %"
    if metric.endswith("_s"):
        if mean >= 0.01:
            return f"{mean:.4f} ± {std:.4f} s"
        return f"{mean * 1e3:.3f} ± {std * 1e3:.3f} ms"
    if metric.endswith("_mib"):
        return f"{mean:.1f} ± {std:.1f} MiB"
    if metric.startswith(("model_bytes", "file_bytes")):
        return f"{mean / 1024:.1f} ± {std / 1024:.1f} KiB"
    return f"{mean:,.0f} ± {std:,.0f}"


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std (sample std, ddof = 1) over runs of every metric, per configuration.

    Long format: the configuration columns of :data:`GROUP_COLUMNS` present in ``df``,
    then ``metric``, ``label``, ``mean``, ``std``, ``runs`` and ``mean ± std`` (text).
    Metrics that are empty in every run (accuracy of the synthetic benchmark) are left out.
    """
    missing = [c for c in ("run",) + METRICS if c not in df.columns and c not in REALIZED_COLUMNS]
    if missing:
        raise ValueError(f"not a benchmark table: column {missing[0]!r} is missing")
    groups = [c for c in GROUP_COLUMNS if c in df.columns]
    rows = []
    for key, part in df.groupby(groups, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for metric in METRICS:
            if metric not in part.columns:
                continue
            values = pd.to_numeric(part[metric], errors="coerce").dropna()
            if values.empty:
                continue
            mean, std, n = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan"), len(values)
            rows.append({**dict(zip(groups, key)), "metric": metric, "label": METRIC_LABELS[metric],
                         "mean": mean, "std": std, "runs": n, "mean ± std": _mean_std_text(metric, mean, std, n)})
    return pd.DataFrame(rows, columns=groups + ["metric", "label", "mean", "std", "runs", "mean ± std"])


def compare_with_paper(df: pd.DataFrame, benchmark: str) -> pd.DataFrame:
    """The paper's quoted table (``benchmark``: ``synthetic`` or ``cnn``) beside our mean ± std."""
    if benchmark not in ("synthetic", "cnn"):
        raise ValueError("benchmark must be 'synthetic' or 'cnn'")
    paper = PAPER_RESULTS[benchmark]
    summary = summarize(df)
    rows = []
    for metric in ("retention", "compute_reduction", "inference_time_s", "inference_time_dense_s",
                   "peak_memory_mib", "accuracy", "accuracy_dense", *REALIZED_COLUMNS):
        ours = summary[summary["metric"] == metric]
        quoted = paper["quoted"].get(metric)
        if ours.empty and quoted is None:
            continue
        rows.append({"metric": METRIC_LABELS[metric], "paper (quoted)": quoted or "–",
                     "ours (mean ± std)": "; ".join(ours["mean ± std"]) if not ours.empty else "–"})
    return pd.DataFrame(rows, columns=["metric", "paper (quoted)", "ours (mean ± std)"])


def summary_path(output: str | Path) -> Path:
    """Where the summary of ``output`` goes: ``<stem>_summary.csv`` beside it."""
    output = Path(output)
    return output.with_name(f"{output.stem}_summary.csv")
