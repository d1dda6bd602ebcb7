"""Shared plumbing of the benchmark CLIs: one-line errors, output checks, progress bar, writing.

Exit codes: 0 success; 2 a bad flag, an unusable output path or a missing precondition
(checkpoint, data, device), reported on one line before any work starts; 1 a failure
during the run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from core.method.config import THETA_MODES
from core.method.quantization import SUPPORTED_BITS


class CliError(Exception):
    """A problem to report on one line (no traceback) with exit code ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_quantization_flags(parser: argparse.ArgumentParser, defaults) -> None:
    """The shared --theta / --theta-mode / --bits flags of both benchmark commands (``defaults``: their config)."""
    parser.add_argument("--theta", type=nonneg_float, default=None,
                        help="quantization threshold θ: kept weights with |W| ≥ θ use the HIGH bit-width, the "
                             "rest LOW (see --theta-mode). Default: no quantization (pruning only)")
    parser.add_argument("--theta-mode", choices=THETA_MODES, default=defaults.theta_mode,
                        help="how θ is read: relative = θ·max|W| per layer, absolute = the paper's θ in weight "
                             "units, fraction = that fraction of each layer's kept weights in HIGH "
                             "(default: %(default)s)")
    parser.add_argument("--bits", type=int, nargs=2, default=list(defaults.bits), metavar=("LOW", "HIGH"),
                        help=f"the two bit-widths of the on-the-fly quantization, from "
                             f"{', '.join(map(str, SUPPORTED_BITS))} (default: 4 8; used only with --theta)")


def add_execution_paths_flag(parser: argparse.ArgumentParser) -> None:
    """The shared ``--execution-paths`` flag of both benchmark commands."""
    parser.add_argument("--execution-paths", action="store_true",
                        help="also time one batch through each execution path of core.deploy.runtime (dense, sparse "
                             "CSR, weight-only int8, auto = fastest kernel per layer measured here): columns "
                             "latency_{dense,sparse,int8,auto}_s. The packed and fp32 file sizes on disk are "
                             "measured in every run")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not (value >= 0.0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
    return value


def _check_writable_file(path: Path) -> None:
    if path.exists() and path.is_dir():
        raise CliError(f"output path {path} is a directory; give a file name such as {path / 'results.csv'}")
    parent = path.parent
    ancestor = parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CliError(f"cannot write {path}: {ancestor} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CliError(f"cannot write to {parent}: {err.strerror or err}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise CliError(f"cannot overwrite {path}: permission denied")


def check_outputs(output: str | os.PathLike, summary: Path) -> Path:
    """Check before any work that the CSV and its summary can be written; return the CSV path."""
    path = Path(output)
    for target in (path, summary):
        _check_writable_file(target)
    return path


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """Write atomically: a failed run never leaves a partial CSV behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


def progress_bar(description: str) -> tuple[Callable[[int, int, str], None], Callable[[], None]]:
    """A tqdm bar driven by ``on_progress(done, total, label)``; returns (callback, close)."""
    from tqdm import tqdm

    bar = tqdm(total=1, desc=description, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(done: int, total: int, label: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(label, refresh=False)
        bar.refresh()

    return update, bar.close


def print_tables(title: str, summary: pd.DataFrame, comparison: pd.DataFrame, notes: list[str]) -> None:
    columns = [c for c in ("model", "label", "mean ± std") if c in summary.columns]
    many = summary["model"].nunique() > 1 if "model" in summary.columns else False
    if not many:
        columns = [c for c in columns if c != "model"]
    print(f"\n{title} (mean ± std over runs)")
    print(summary[columns].rename(columns={"label": "metric"}).to_string(index=False))
    if not comparison.empty:
        print("\nThe paper's published figures (quoted from the paper, section 5) beside ours")
        print(comparison.to_string(index=False))
    for note in notes:
        print(f"note: {note}")


def fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code
