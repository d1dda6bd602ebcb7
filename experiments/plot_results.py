#!/usr/bin/env python3
"""Figures of the benchmark suite: plotly HTML (and PNG through kaleido) from the CSVs.

    python experiments/plot_results.py \\
      --synthetic results/synthetic_pruning_results.csv \\
      --cnn results/real_pruning_results.csv results/real_pruning_results_bnrecal.csv \\
      --sweep resnet20=results/sweep_resnet20.csv \\
      --curve-models cifar_cnn resnet20 --out results/figures --docs docs/figures

Figures (each as ``<name>.html`` and ``<name>.png`` in ``--out``):

* ``retention_vs_tau``: ρ(τ) of boundary pruning, computed with the engine for the
  randomly initialised MLP (seed 42), for each ``--curve-models`` architecture randomly
  initialised and (when its checkpoint is shipped) trained; the line 1 − τ; the paper's
  quoted points.
* ``accuracy_vs_retention``: from τ sweeps (``core.measure.sweeps``: a ``--sweep`` CSV written by
  ``python -m core.measure.sweeps MODEL --csv FILE``, or computed here with ``--sweep-model``):
  boundary pruning with and without BN recalibration and global magnitude pruning at the
  same retention, with the benchmark runs (``--cnn``) and the paper's quoted point.
* ``<csv stem>_time_memory``: inference time (pruned and dense) and peak memory per run of
  each benchmark CSV, with the paper's quoted figures as dashed lines.

``--docs`` copies the PNGs there (for the README). PNG export needs kaleido and a
Chrome/Chromium; without them the HTML is still written and a note says why no PNG.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

from core.measure.paper_suite import DEFAULT_CURVE_TAUS, retention_curve  # noqa: E402
from core.measure.paper_tables import CSV_COLUMNS, REALIZED_COLUMNS, PAPER_RESULTS  # noqa: E402
from experiments._cli import CliError, OneLineParser, fail  # noqa: E402

SWEEP_COLUMNS = ("method", "tau", "bn_recalibrated", "retention", "accuracy")
METHOD_NAMES = {"boundary": "boundary pruning", "global_magnitude": "global magnitude pruning",
                "layer_l1": "layer-wise L1 pruning", "dense": "dense"}
PAPER_STYLE = dict(symbol="x", size=12, color="black")


# ---------------------------------------------------------------- data

def read_benchmark(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    missing = [c for c in CSV_COLUMNS if c not in df.columns and c not in REALIZED_COLUMNS]
    if missing:
        raise CliError(f"{path} is not a benchmark CSV (column {missing[0]!r} is missing)")
    df.attrs["source"] = path.name
    return df


def read_sweep(spec: str) -> tuple[str, pd.DataFrame]:
    """``LABEL=PATH`` or ``PATH`` (label = file stem) → (label, sweep frame)."""
    label, _, path = spec.rpartition("=")
    path = Path(path)
    label = label or path.stem
    if not path.is_file():
        raise CliError(f"sweep CSV not found: {path}")
    df = pd.read_csv(path)
    missing = [c for c in SWEEP_COLUMNS if c not in df.columns]
    if missing:
        raise CliError(f"{path} is not a τ-sweep CSV of core.measure.sweeps (column {missing[0]!r} is missing)")
    df["bn_recalibrated"] = df["bn_recalibrated"].astype(str).str.lower().isin(("true", "1"))
    return label, df


def compute_sweep(model: str, per_class: int | None, out: Path) -> tuple[str, pd.DataFrame]:
    """Run ``core.measure.sweeps.sweep_pretrained`` (rows are cached on disk) and keep its CSV in ``out``."""
    from core.measure.sweeps import SweepConfig, sweep_pretrained

    def progress(done: int, total: int, label: str) -> None:
        print(f"\r  sweep {model} [{done}/{total}] {label:<50}", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    frame = sweep_pretrained(model, SweepConfig(per_class=per_class, baselines=("global_magnitude",)),
                             on_progress=progress)
    frame.to_csv(out / f"sweep_{model}.csv", index=False)
    return model, frame


def retention_curves(models: list[str], seed: int = 42) -> pd.DataFrame:
    """ρ(τ) for the random-init MLP and, per architecture, random init and the shipped checkpoint."""
    import torch

    from core.workloads.models import build, card_path, load_pretrained

    frames = []

    def add(label: str, model) -> None:
        curve = retention_curve(model, DEFAULT_CURVE_TAUS)
        curve["model"] = label
        frames.append(curve)

    torch.manual_seed(seed)
    add("MLP 6×128, random init (seed 42)", build("mlp"))
    for name in models:
        torch.manual_seed(seed)
        add(f"{name}, random init (seed 42)", build(name))
        if card_path(name).is_file():
            add(f"{name}, trained checkpoint", load_pretrained(name))
        else:
            print(f"note: no trained checkpoint for {name} yet; its trained curve is left out")
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- figures

def fig_retention_vs_tau(curves: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    taus = sorted(curves["tau"].unique())
    fig.add_trace(go.Scatter(x=taus, y=[1 - t for t in taus], mode="lines", name="1 − τ (|W| uniform on [0, max])",
                             line=dict(dash="dot", color="grey")))
    symbols = iter(["circle", "square-open", "diamond-open", "triangle-up-open", "star-open", "x-thin-open"] * 4)
    for label, part in curves.groupby("model", sort=False):
        trained = "trained" in label
        fig.add_trace(go.Scatter(x=part["tau"], y=part["retention"], mode="lines+markers", name=label,
                                 line=dict(dash="solid" if trained else "dash", width=2.5 if trained else 1.5),
                                 marker=dict(symbol="circle" if trained else next(symbols), size=7 if trained else 9)))
    for key, name in (("synthetic", "paper (quoted): synthetic MLP"), ("cnn", "paper (quoted): CIFAR-10 CNN")):
        fig.add_trace(go.Scatter(x=[0.2], y=[PAPER_RESULTS[key]["values"]["retention"]], mode="markers",
                                 name=name, marker=dict(PAPER_STYLE, symbol="x" if key == "cnn" else "cross")))
    fig.update_layout(title="Boundary pruning: retention ρ vs τ (random init vs trained)",
                      xaxis_title="τ (boundary = τ · max|W| per layer)", yaxis_title="retention ρ (kept / total weights)",
                      yaxis_tickformat=".0%", template="plotly_white", legend=dict(font=dict(size=10)))
    return fig


def fig_accuracy_vs_retention(sweeps: list[tuple[str, pd.DataFrame]], benchmarks: list[pd.DataFrame]) -> go.Figure:
    cols = max(1, len(sweeps))
    fig = make_subplots(rows=1, cols=cols, subplot_titles=[label for label, _ in sweeps] or ["benchmark runs"],
                        shared_yaxes=True)
    colors = {("boundary", False): "#1f77b4", ("boundary", True): "#2ca02c",
              ("global_magnitude", False): "#d62728", ("global_magnitude", True): "#ff7f0e",
              ("layer_l1", False): "#9467bd", ("layer_l1", True): "#8c564b"}
    shown = set()
    for i, (label, frame) in enumerate(sweeps, start=1):
        plain = frame[frame["theta"].isna()] if "theta" in frame.columns else frame
        for (method, bn), part in plain.groupby(["method", "bn_recalibrated"], sort=False):
            if method == "dense":
                if not bn:
                    value = float(part["accuracy"].iloc[0])
                    fig.add_hline(y=value, line=dict(dash="dot", color="grey"), row=1, col=i,
                                  annotation_text=f"dense {value:.1%}", annotation_position="bottom left")
                continue
            part = part.sort_values("tau")
            name = METHOD_NAMES.get(method, method) + (" + BN recalibration" if bn else "")
            fig.add_trace(go.Scatter(
                x=part["retention"], y=part["accuracy"], mode="lines+markers", name=name, legendgroup=name,
                showlegend=name not in shown, line=dict(color=colors.get((method, bn)), dash="dash" if bn else "solid"),
                customdata=part["tau"], hovertemplate="τ=%{customdata}<br>ρ=%{x:.1%}<br>acc=%{y:.2%}"), row=1, col=i)
            shown.add(name)
        marks = iter(["diamond", "square", "triangle-up", "star", "hexagon", "pentagon"] * 4)
        for df in benchmarks:
            base = df["model"].astype(str).str.split(" ").str[0]
            part = df[base == label] if label in set(base) else df.iloc[0:0]
            for model, runs in part.groupby("model", sort=False):
                name = f"benchmark: {model}, τ={runs['tau'].iloc[0]:g}"
                fig.add_trace(go.Scatter(x=runs["retention"], y=runs["accuracy"], mode="markers", name=name,
                                         marker=dict(size=12, symbol=next(marks), line=dict(width=1, color="white"))),
                              row=1, col=i)
    for col in range(1, cols + 1):
        fig.add_trace(go.Scatter(x=[PAPER_RESULTS["cnn"]["values"]["retention"]],
                                 y=[PAPER_RESULTS["cnn"]["values"]["accuracy"]], mode="markers",
                                 name="paper (quoted): 31.95 % retention, 10.09 % accuracy", marker=PAPER_STYLE,
                                 showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text="retention ρ", tickformat=".0%", autorange="reversed", row=1, col=col)
    fig.update_yaxes(title_text="CIFAR-10 test accuracy", tickformat=".0%", row=1, col=1)
    fig.update_layout(title="Accuracy vs retention (no retraining)", template="plotly_white",
                      legend=dict(font=dict(size=10)), width=max(900, 520 * cols))
    return fig


def fig_time_memory(df: pd.DataFrame, benchmark: str) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Inference time per batch", "Peak memory (process RSS)"))
    for model, part in df.groupby("model", sort=False):
        suffix = f" ({model})" if df["model"].nunique() > 1 else ""
        fig.add_trace(go.Scatter(x=part["run"], y=part["inference_time_s"] * 1e3, mode="lines+markers",
                                 name=f"pruned{suffix}"), row=1, col=1)
        fig.add_trace(go.Scatter(x=part["run"], y=part["inference_time_dense_s"] * 1e3, mode="lines+markers",
                                 name=f"dense{suffix}", line=dict(dash="dash")), row=1, col=1)
        fig.add_trace(go.Bar(x=part["run"], y=part["peak_memory_mib"], name=f"peak memory{suffix}"), row=1, col=2)
    paper = PAPER_RESULTS[benchmark]["values"]
    fig.add_hline(y=paper["inference_time_s"] * 1e3, line=dict(dash="dot", color="black"), row=1, col=1,
                  annotation_text=f"paper (quoted): {PAPER_RESULTS[benchmark]['quoted']['inference_time_s']}")
    fig.add_hline(y=paper["peak_memory_mib"], line=dict(dash="dot", color="black"), row=1, col=2,
                  annotation_text=f"paper (quoted): {PAPER_RESULTS[benchmark]['quoted']['peak_memory_mib']}")
    first = df.iloc[0]
    fig.update_xaxes(title_text="run", dtick=1)
    fig.update_yaxes(title_text="ms (mean of the timed batches)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="MiB", rangemode="tozero", row=1, col=2)
    fig.update_layout(title=f"{df.attrs.get('source', benchmark)}: {first['model']}, τ={first['tau']:g}, "
                            f"{first['device']}, torch {first['torch_version']}",
                      template="plotly_white", width=1000, height=450)
    return fig


# ---------------------------------------------------------------- writing

class Writer:
    """Writes HTML always and PNG while kaleido works (one note if it does not)."""

    def __init__(self, out: Path, docs: Path | None, png: bool):
        self.out, self.docs, self.png = out, docs, png
        self.written: list[Path] = []

    def save(self, fig: go.Figure, name: str) -> None:
        html = self.out / f"{name}.html"
        fig.write_html(html, include_plotlyjs=True)
        self.written.append(html)
        if not self.png:
            return
        png = self.out / f"{name}.png"
        try:
            fig.write_image(png, width=fig.layout.width or 900, height=fig.layout.height or 550, scale=2)
        except Exception as err:  # kaleido missing, or no Chrome/Chromium to drive
            self.png = False
            print(f"note: PNG export skipped ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                  f"install kaleido and Chrome/Chromium for PNGs — the HTML figures are written")
            return
        self.written.append(png)
        if self.docs is not None:
            self.docs.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, self.docs / png.name)
            self.written.append(self.docs / png.name)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="plot_results.py", allow_abbrev=False,
                           description="Plotly figures (HTML + PNG) of the benchmark CSVs and τ sweeps.")
    parser.add_argument("--synthetic", type=Path, nargs="*", default=[], metavar="CSV",
                        help="CSV(s) of run_boundary_pruning_synthetic.py: time and memory per run")
    parser.add_argument("--cnn", type=Path, nargs="*", default=[], metavar="CSV",
                        help="CSV(s) of run_boundary_pruning_cnn.py: time and memory per run, and their "
                             "accuracy/retention points on the sweep figure")
    parser.add_argument("--sweep", nargs="*", default=[], metavar="[MODEL=]CSV",
                        help="τ-sweep CSV(s) written by `python -m core.measure.sweeps MODEL --csv FILE` "
                             "(columns method, tau, bn_recalibrated, retention, accuracy, …)")
    parser.add_argument("--sweep-model", nargs="*", default=[], metavar="MODEL",
                        help="run the τ sweep here with core.measure.sweeps (cached on disk) for these shipped checkpoints")
    parser.add_argument("--sweep-per-class", type=int, default=None, metavar="N",
                        help="with --sweep-model: score N test images per class instead of all 10,000")
    parser.add_argument("--curve-models", nargs="*", default=["cifar_cnn", "resnet20"], metavar="MODEL",
                        help="architectures for the retention-vs-τ figure (random init, and trained when "
                             "shipped) (default: cifar_cnn resnet20)")
    parser.add_argument("--no-curves", action="store_true", help="skip the retention-vs-τ figure")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "figures",
                        help="folder for the figures (default: results/figures, git-ignored)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="also copy the PNGs here (e.g. docs/figures for the README)")
    parser.add_argument("--no-png", action="store_true", help="write HTML only")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for path in args.synthetic + args.cnn:
            if not path.is_file():
                raise CliError(f"benchmark CSV not found: {path}")
        synthetic = [read_benchmark(p) for p in args.synthetic]
        cnn = [read_benchmark(p) for p in args.cnn]
        sweeps = [read_sweep(spec) for spec in args.sweep]
        args.out.mkdir(parents=True, exist_ok=True)
    except (CliError, OSError, ValueError) as err:
        return fail(parser.prog, str(err), 2)
    for model in args.sweep_model:
        sweeps.append(compute_sweep(model, args.sweep_per_class, args.out))
    writer = Writer(args.out, args.docs, png=not args.no_png)
    if not args.no_curves:
        curves = retention_curves(args.curve_models)
        curves.to_csv(args.out / "retention_vs_tau.csv", index=False)
        writer.save(fig_retention_vs_tau(curves), "retention_vs_tau")
    if sweeps:
        writer.save(fig_accuracy_vs_retention(sweeps, cnn), "accuracy_vs_retention")
    elif cnn:
        print("note: no τ sweep given (--sweep CSV from `python -m core.measure.sweeps MODEL --csv FILE`, or "
              "--sweep-model MODEL); the accuracy-vs-retention figure is left out")
    for df in synthetic:
        writer.save(fig_time_memory(df, "synthetic"), f"{Path(df.attrs['source']).stem}_time_memory")
    for df in cnn:
        writer.save(fig_time_memory(df, "cnn"), f"{Path(df.attrs['source']).stem}_time_memory")
    for path in writer.written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
