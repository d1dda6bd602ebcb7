"""A small CSV in the shape ``benchmarks/repair.py --csv`` writes, for the Learn page's tests.

The columns are the benchmark's, in its order (``test_the_benchmark_writes_what_the_story_reads``
checks them against a real run); the figures are made up, distinct, and easy to find on the page.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

#: the benchmark's columns: the dense row's, then each measured row's (benchmarks/repair.py, emit())
COLUMNS = ("model", "pruning", "tau", "retention", "method", "accuracy", "dense", "seconds", "cpu_s", "est_s",
           "error_s", "n_images", "logit_err_before", "logit_err_after")
DENSE = 0.8817
#: (pruning, τ, retention, {method: accuracy}), one measured row per method
ROWS = (
    ("boundary", 0.1, 0.4015, {"none": 0.8123, "bn": 0.8702, "bias": 0.8711, "reconstruct": 0.8755}),
    ("boundary", 0.2, 0.1123, {"none": 0.1000, "bn": 0.6543, "bias": 0.7012, "reconstruct": 0.8021}),
    ("global_magnitude", 0.2, 0.1123, {"none": 0.5011, "bn": 0.8111, "bias": 0.8122, "reconstruct": 0.8233}),
)
SECONDS = {"none": 0.01, "bn": 1.5, "bias": 6.0, "reconstruct": 42.0}


def write_repair_csv(path: Path, model: str = "resnet18") -> Path:
    rows = [{"model": model, "pruning": "dense", "tau": 0.0, "retention": 1.0, "method": "-", "accuracy": DENSE}]
    for pruning, tau, retention, accuracies in ROWS:
        for method, accuracy in accuracies.items():
            rows.append({"model": model, "pruning": pruning, "tau": tau, "retention": retention, "dense": DENSE,
                         "method": method, "accuracy": accuracy, "seconds": SECONDS[method],
                         "cpu_s": 2 * SECONDS[method],
                         "est_s": SECONDS[method], "error_s": 0.5, "n_images": 512, "logit_err_before": 0.9,
                         "logit_err_after": 0.1})
    frame = pd.DataFrame(rows)[list(COLUMNS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path
