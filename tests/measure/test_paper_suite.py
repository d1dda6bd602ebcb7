"""The paper's benchmark commands end to end (small settings), and core.measure.paper_suite's pieces."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.measure.paper_suite import CnnBenchmarkConfig, SyntheticBenchmarkConfig
from core.measure.paper_tables import CSV_COLUMNS, PAPER_RESULTS, compare_with_paper, summarize, summary_path
from core.workloads.models import card_path

REPO = Path(__file__).resolve().parents[2]
SYNTHETIC = REPO / "experiments" / "run_boundary_pruning_synthetic.py"
CNN = REPO / "experiments" / "run_boundary_pruning_cnn.py"
PLOT = REPO / "experiments" / "plot_results.py"
SHIPPED = [name for name in ("resnet20", "cifar_cnn") if card_path(name).is_file()]


def run(script: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The command as a user types it: a fresh process, run from the repository root."""
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=180)


def run_inline(script: Path, *args: str, capsys) -> tuple[int, str, str]:
    """The same command's ``main`` in this process (faster: no torch import); (exit code, stdout, stderr)."""
    import importlib

    module = importlib.import_module(f"experiments.{script.stem}")
    try:
        code = module.main(list(args))
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_ranges(df: pd.DataFrame) -> None:
    assert list(df.columns) == list(CSV_COLUMNS)
    assert ((df["retention"] >= 0) & (df["retention"] <= 1)).all()
    assert ((df["compute_reduction"] >= 0) & (df["compute_reduction"] <= 1)).all()
    assert (df["params_kept"] <= df["params_total"]).all() and (df["params_total"] > 0).all()
    assert np.allclose(df["retention"], df["params_kept"] / df["params_total"])
    for column in ("inference_time_s", "inference_time_dense_s", "peak_memory_mib", "model_bytes_fp32",
                   "model_bytes_compressed"):
        assert (df[column] > 0).all(), column
    assert (df["model_bytes_compressed"] <= df["model_bytes_fp32"]).all()
    # measured on disk every run; the packed file tracks the computed accounting within 5 %
    assert (df["file_bytes_packed"] < df["file_bytes_state_dict"]).all()
    assert np.allclose(df["file_bytes_packed"] / df["model_bytes_compressed"], 1, atol=0.05)


# ---------------------------------------------------------------- synthetic command

PAPER_SYNTHETIC_FLAGS = ["--layers", "6", "--in-dim", "128", "--out-dim", "128", "--threshold", "0.2",
                         "--batch-size", "64"]


@pytest.fixture(scope="module")
def synthetic_csv(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "nested" / "synthetic_pruning_results.csv"
    result = run(SYNTHETIC, *PAPER_SYNTHETIC_FLAGS, "--runs", "2", "--n-batches", "3", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "Parameter retention" in result.stdout and "paper (quoted)" in result.stdout
    return out


def test_synthetic_command_writes_the_exact_columns_in_valid_ranges(synthetic_csv):
    df = pd.read_csv(synthetic_csv)
    check_ranges(df)
    assert list(df["run"]) == [1, 2] and list(df["seed"]) == [42, 43]
    assert df["accuracy"].isna().all() and df["accuracy_dense"].isna().all()
    assert df["theta"].isna().all() and df["b_low"].isna().all()  # no quantization asked for
    assert (df["params_total"] == 6 * 128 * 128).all()
    # uniform init: |W| ~ U[0, a], so τ = 0.2 keeps 1 − τ of the weights, up to sampling noise
    assert np.allclose(df["retention"], 0.8, atol=0.01)
    summary = pd.read_csv(summary_path(synthetic_csv))
    row = summary[summary["metric"] == "retention"].iloc[0]
    assert row["mean"] == pytest.approx(df["retention"].mean())
    assert row["std"] == pytest.approx(df["retention"].std(ddof=1))
    assert "accuracy" not in set(summary["metric"])
    assert df[["latency_dense_s", "latency_sparse_s", "latency_int8_s", "latency_auto_s"]].isna().all().all()


def test_synthetic_same_seed_same_retention_other_seed_differs(synthetic_csv, tmp_path, capsys):
    again, other = tmp_path / "again.csv", tmp_path / "other.csv"
    flags = [*PAPER_SYNTHETIC_FLAGS, "--runs", "1", "--n-batches", "2"]
    assert run_inline(SYNTHETIC, *flags, "--output", str(again), capsys=capsys)[0] == 0
    assert run_inline(SYNTHETIC, *flags, "--seed", "7", "--output", str(other), capsys=capsys)[0] == 0
    first, rerun, moved = (pd.read_csv(p).iloc[0] for p in (synthetic_csv, again, other))
    assert rerun["params_kept"] == first["params_kept"] and rerun["retention"] == first["retention"]
    assert moved["seed"] == 7 and moved["params_kept"] != first["params_kept"]


@pytest.mark.parametrize("make_output", [
    lambda tmp: tmp / "a_file.txt" / "out.csv",  # parent is a file
    lambda tmp: tmp,  # a directory
])
def test_unwritable_output_is_exit_2_one_line_and_no_csv(tmp_path, make_output, capsys):
    (tmp_path / "a_file.txt").write_text("x")
    output = make_output(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_inline(SYNTHETIC, "--runs", "1", "--output", str(output), capsys=capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "error" in err and "Traceback" not in err
    assert out == ""  # nothing ran
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_unwritable_output_as_a_process(tmp_path):
    (tmp_path / "a_file.txt").write_text("x")
    result = run(CNN, "--runs", "1", "--output", str(tmp_path / "a_file.txt" / "real.csv"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stdout == ""


@pytest.mark.parametrize("script,flags", [
    (SYNTHETIC, ["--runs", "0"]), (SYNTHETIC, ["--threshold", "1.5"]), (SYNTHETIC, ["--bits", "8", "4"]),
    (SYNTHETIC, ["--no-such-flag"]), (CNN, ["--dataset", "mnist"]), (CNN, ["--model", "vgg99"]),
    (CNN, ["--max-batches", "0"]),
])
def test_bad_flag_is_exit_2_one_line(tmp_path, script, flags, capsys):
    code, out, err = run_inline(script, *flags, "--output", str(tmp_path / "out.csv"), capsys=capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "error" in err and out == ""
    assert not (tmp_path / "out.csv").exists()


def test_help_explains_every_flag(capsys):
    for script, flags in ((SYNTHETIC, ["--layers", "--in-dim", "--out-dim", "--threshold", "--runs", "--batch-size",
                                       "--output", "--seed", "--theta", "--bits", "--device"]),
                          (CNN, ["--dataset", "--threshold", "--batch-size", "--runs", "--output", "--model", "--theta",
                                 "--bits", "--bn-recalibrate", "--data-root", "--device", "--seed", "--max-batches"])):
        code, out, _ = run_inline(script, "--help", capsys=capsys)
        assert code == 0
        for flag in flags:
            assert flag in out, (script.name, flag)


# ---------------------------------------------------------------- CNN command

@pytest.mark.skipif(not SHIPPED, reason="no trained CIFAR-10 checkpoint shipped yet (assets/checkpoints/*.json)")
def test_cnn_command_end_to_end_and_same_seed_same_accuracy(tmp_path, capsys):
    model = SHIPPED[0]
    flags = ["--dataset", "cifar10", "--threshold", "0.2", "--batch-size", "64", "--runs", "1", "--model", model,
             "--max-batches", "4", "--timing-batches", "2", "--bn-recalibrate", "--calibration-images", "200"]
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    result = run(CNN, *flags, "--execution-paths", "--output", str(first))
    assert result.returncode == 0, result.stderr
    assert "Latency, auto path" in result.stdout
    assert "subset of 250" in result.stdout  # the quick run says its accuracy is not the full-test figure
    assert run_inline(CNN, *flags, "--output", str(second), capsys=capsys)[0] == 0
    a, b = pd.read_csv(first), pd.read_csv(second)
    check_ranges(a)
    paths = ["latency_dense_s", "latency_sparse_s", "latency_int8_s", "latency_auto_s"]
    assert (a[paths] > 0).all().all() and b[paths].isna().all().all()  # measured only when asked
    assert a["file_bytes_packed"].iloc[0] == b["file_bytes_packed"].iloc[0]  # same setting, same file
    assert a["dataset"].iloc[0] == "cifar10 (test subset: 250/10000 images)"
    assert a["model"].iloc[0] == f"{model} (BN recalibrated)"
    for column in ("accuracy", "accuracy_dense"):
        assert ((a[column] >= 0) & (a[column] <= 1)).all()
    assert a["accuracy_dense"].iloc[0] > 0.5  # a trained model, scored on real test images
    for column in ("retention", "params_kept", "accuracy", "accuracy_dense"):
        assert a[column].iloc[0] == b[column].iloc[0], column


def test_cnn_missing_checkpoint_or_data_is_exit_2(tmp_path, capsys):
    code, out, err = run_inline(CNN, "--model", "resnet20", "--data-root", str(tmp_path / "nowhere"), "--output",
                                str(tmp_path / "out.csv"), capsys=capsys)
    assert code == 2 and out == "" and err.strip().count("\n") == 0
    assert ("no trained checkpoint" in err) or ("archive not found" in err)
    assert not (tmp_path / "out.csv").exists()


# ---------------------------------------------------------------- plots

def test_plot_results_writes_html(synthetic_csv, tmp_path):
    sweep = pd.DataFrame({
        "method": ["dense", "boundary", "boundary", "global_magnitude"], "tau": [0.0, 0.2, 0.2, 0.2],
        "theta": [math.nan] * 4, "bn_recalibrated": [False, False, True, False],
        "retention": [1.0, 0.4, 0.4, 0.4], "accuracy": [0.9, 0.5, 0.8, 0.6]})
    sweep.to_csv(tmp_path / "sweep.csv", index=False)
    out = tmp_path / "figs"
    result = run(PLOT, "--synthetic", str(synthetic_csv), "--sweep", f"resnet20={tmp_path / 'sweep.csv'}",
                 "--no-curves", "--no-png", "--out", str(out))
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert {"accuracy_vs_retention.html", "synthetic_pruning_results_time_memory.html"} <= names
    assert "global magnitude pruning" in (out / "accuracy_vs_retention.html").read_text()


# ---------------------------------------------------------------- core.measure.paper_suite pieces

def test_summarize_is_mean_and_sample_std_per_configuration():
    df = pd.DataFrame({c: [None] * 4 for c in CSV_COLUMNS})
    df["run"], df["model"], df["tau"], df["device"] = [1, 2, 1, 2], ["a", "a", "b", "b"], 0.2, "cpu"
    df["retention"] = [0.5, 0.7, 0.1, 0.1]
    df["accuracy"] = [np.nan, np.nan, 0.2, 0.4]
    summary = summarize(df)
    a = summary[(summary["model"] == "a") & (summary["metric"] == "retention")].iloc[0]
    assert a["mean"] == pytest.approx(0.6) and a["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert a["mean ± std"] == "60.00 ± 14.14 %"
    assert set(summary[summary["model"] == "a"]["metric"]) == {"retention"}  # empty metrics left out
    b = summary[(summary["model"] == "b") & (summary["metric"] == "accuracy")].iloc[0]
    assert b["mean"] == pytest.approx(0.3) and b["runs"] == 2


def test_paper_results_are_labelled_quotes():
    assert "paper" in PAPER_RESULTS["source"]
    assert PAPER_RESULTS["synthetic"]["quoted"]["retention"] == "80.0 %"
    assert PAPER_RESULTS["cnn"]["quoted"]["accuracy"] == "10.09 %"
    for key in ("synthetic", "cnn"):
        for metric, value in PAPER_RESULTS[key]["values"].items():
            quoted = float(PAPER_RESULTS[key]["quoted"][metric].split()[0])
            assert value == pytest.approx(quoted / 100 if metric in ("retention", "accuracy") else quoted)
    df = pd.DataFrame({c: [None] for c in CSV_COLUMNS})
    df["run"], df["retention"] = [1], [0.8]
    table = compare_with_paper(df, "synthetic")
    assert list(table.columns) == ["metric", "paper (quoted)", "ours (mean ± std)"]
    assert table.iloc[0]["paper (quoted)"] == "80.0 %" and table.iloc[0]["ours (mean ± std)"].startswith("80.00 %")


@pytest.mark.parametrize("make", [
    lambda: SyntheticBenchmarkConfig(threshold=-0.1), lambda: SyntheticBenchmarkConfig(bits=(8, 4)),
    lambda: SyntheticBenchmarkConfig(layers=0), lambda: CnnBenchmarkConfig(model="mlp"),
    lambda: CnnBenchmarkConfig(dataset="mnist"), lambda: CnnBenchmarkConfig(max_batches=0),
    lambda: CnnBenchmarkConfig(theta=0.5, theta_mode="fraction", bits=(4, 3)),
])
def test_configs_reject_bad_settings(make):
    with pytest.raises(ValueError):
        make()


def test_max_batches_subset_size_is_class_balanced():
    assert CnnBenchmarkConfig().eval_images == 10_000
    assert CnnBenchmarkConfig(max_batches=4, batch_size=64).eval_images == 250
    assert CnnBenchmarkConfig(max_batches=1000).eval_images == 10_000
