"""``python -m core.tune --tau T [--repair M]``: one setting at every repair level, its three files, its errors;
``--repair`` in the sweep; Ctrl-C writes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import core.tune as tune
from core.deploy.packed_reader import load_compressed, parse_compressed
from core.measure import tuning
from core.method.config import CompressionConfig
from tests.tune_cli_refusals import assert_refused

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "resnet20", "--data", "cifar10", "--images", "40", "--repair-images", "64"]


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_one_setting_at_every_repair_level_writes_the_three_files(tmp_path, capsys):
    out = tmp_path / "repaired"
    assert tune.main([*FAST, "--tau", "0.3", "--repair", "reconstruct", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "τ = 0.3: retention" in printed and "95%_interval" in printed and "repair_s" in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.packed", "settings.json", "sweep.csv"]
    frame = pd.read_csv(out / "sweep.csv")
    assert frame["repair"].tolist() == ["none", "none", "bn", "bias", "reconstruct"]  # dense, then each level
    assert frame.iloc[0]["tau"] == 0 and (frame.iloc[1:]["tau"] == 0.3).all() and (frame["n"] == 40).all()
    assert (frame.iloc[2:]["repair_seconds"] > 0).all() and frame.iloc[1]["repair_seconds"] == 0
    for level in ("none", "bn", "bias", "reconstruct"):
        assert any(line.split()[1] == level for line in printed.splitlines()[3:] if len(line.split()) > 1)
    settings = json.loads((out / "settings.json").read_text())
    assert CompressionConfig.from_dict(settings) == CompressionConfig(tau=0.3)
    repair = settings["repair"]
    assert (repair["method"], repair["n_images"], repair["ridge"], repair["seed"]) == ("reconstruct", 64, 1e-3, 0)
    assert "CIFAR-10 training images" in repair["calibration"]
    assert settings["measured"]["repair"] == "reconstruct" and [r["repair"] for r in settings["levels"]] == [
        "none", "bn", "bias", "reconstruct"]
    # model.packed carries the reconstruction, at the size the table says, loadable without a template
    data = (out / "model.packed").read_bytes()
    assert len(data) == frame.iloc[-1]["packed_bytes"]
    packed = parse_compressed(data)
    assert packed.repair["method"] == "reconstruct" and packed.repair["n_images"] == 64
    assert packed.config == CompressionConfig(tau=0.3)
    model = load_compressed(out / "model.packed")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_a_quantized_setting_repaired_keeps_its_bit_widths(tmp_path, capsys):
    out = tmp_path / "q"
    assert tune.main([*FAST, "--tau", "0.2", "--theta", "0.3", "--bits", "4", "8", "--repair", "bias",
                      "--out", str(out)]) == 0
    frame = pd.read_csv(out / "sweep.csv")
    assert frame["repair"].tolist() == ["none", "none", "bn", "bias"]
    assert (frame.iloc[1:]["theta"] == 0.3).all() and (frame.iloc[1:]["b_low"] == 4).all()
    packed = parse_compressed((out / "model.packed").read_bytes())
    assert packed.config == CompressionConfig(tau=0.2, theta=0.3, b_low=4, b_high=8)
    assert packed.repair["method"] == "bias"
    assert {(r.b_low, r.b_high) for r in packed.layers} == {(4, 8)}
    # the packed sizes differ by the header's repair record only (its numbers' digits vary)
    sizes = frame.iloc[1:]["packed_bytes"]
    assert 0 < sizes.max() - sizes.min() < 300


def test_without_repair_one_setting_is_one_row(tmp_path, capsys):
    out = tmp_path / "plain"
    assert tune.main([*FAST, "--tau", "0.1", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "sweep.csv")
    assert frame["repair"].tolist() == ["none", "none"]
    assert parse_compressed((out / "model.packed").read_bytes()).repair is None
    assert json.loads((out / "settings.json").read_text())["repair"]["method"] == "none"


@pytest.mark.parametrize("argv, words", [
    (["--tau", "0.2"], "--tau needs --out DIR"),
    (["--tau", "1.5", "--out", "x"], "tau must be in [0, 1]"),
    (["--tau", "0.2", "--sensitivity"], "--tau (one setting) is not allowed with --sensitivity"),
    (["--tau", "0.2", "--per-layer", "--out", "x"], "not allowed with --per-layer"),
    (["--tau", "0.2", "--thetas", "0.3", "--out", "x"], "--thetas belongs to the sweep"),
    (["--tau", "0.2", "--max-drop", "1", "--out", "x"], "--max-drop chooses among the sweep's settings"),
    (["--tau", "0.2", "--bn-recalibrate", "--out", "x"], "use --repair bn"),
    (["--tau", "0.2", "--bits", "8", "4", "--theta", "0.3", "--out", "x"], "b_low ≤ b_high"),
    (["--tau", "0.2", "--repair", "retrain", "--out", "x"], "argument --repair: invalid choice: 'retrain'"),
    (["--tau", "0.2", "--repair", "bn", "--repair-images", "0", "--out", "x"], "--repair-images must be in [1, 4096]"),
    (["--tau", "0.2", "--repair-images", "5000", "--out", "x"], "--repair-images must be in [1, 4096], got 5000"),
    (["--tau", "0.2", "--repair-ridge", "0", "--out", "x"], "--repair-ridge must be a finite number > 0"),
    (["--tau", "0.2", "--repair-ridge", "nan", "--out", "x"], "--repair-ridge must be a finite number > 0"),
    (["--tau", "0.2", "--repair-seed", "-1", "--out", "x"], "--repair-seed must be ≥ 0"),
    (["--tau", "0.2", "--repair-images", "many", "--out", "x"], "invalid int value: 'many'"),
    (["--tau", "0.2", "--repair", "bn", "--data", ".", "--out", "x"], "needs --calibration-data cifar10|DIR"),
    (["--tau", "0.2", "--repair", "bn", "--data", ".", "--calibration-data", ".", "--out", "x"],
     "must not be fitted on the images it is evaluated on"),
    (["--out", "x", "--max-drop", "1", "--theta", "0.3"], "--theta goes with --tau"),
    (["--out", "x", "--max-drop", "1", "--repair", "bias", "--repair-ridge", "-1"], "--repair-ridge"),
])
def test_bad_input_exits_2_with_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_refused(argv, words, capsys)
    assert not (tmp_path / "x").exists()


def test_the_single_setting_mode_runs_as_a_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "core.tune", "--tau", "0.2", "--repair", "reconstruct",
                           "--repair-images", "9999", "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["python -m core.tune: error: --repair-images must be in [1, 4096], "
                                                "got 9999"]


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_during_the_repair_writes_nothing(tmp_path, capsys, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:  # a folder from an earlier run keeps exactly what it had
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(tuning, "repair_setting", interrupt)
    assert tune.main([*FAST, "--tau", "0.3", "--repair", "bias", "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == "python -m core.tune: interrupted; no output files were written"
    assert (sorted(p.name for p in out.iterdir()) == ["notes.txt"]) if existing else not out.exists()


def test_ctrl_c_while_writing_leaves_no_partial_set(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    moves = []
    real_replace = os.replace

    def replace_then_interrupt(src, dst):
        if ".core-tune-" in str(src):  # the command's own moves into --out (not a cache's)
            moves.append(dst)
            if len(moves) == 2:  # the first file is in place, the second is being moved
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    assert tune.main([*FAST, "--tau", "0.3", "--out", str(out)]) == 130
    assert not out.exists() and len(moves) == 2


def test_a_long_repair_is_announced_with_its_estimate(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tuning, "estimate_setting_seconds", lambda *args, **kwargs: 45.0)
    assert tune.main([*FAST, "--tau", "0.3", "--repair", "bn", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "repair 'bn' on 64 augmented CIFAR-10 training images (seed 0): estimated 45 s" in err


def test_the_sweep_adds_a_repaired_row_for_every_tau(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert tune.main([*FAST, "--taus", "0.1", "0.3", "--max-drop", "100", "--repair", "bn", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "repair 'bn' at 2 settings on 64 augmented CIFAR-10 training images (seed 0): estimated" in captured.err
    assert "largest τ within 100 points of dense, after repair 'bn': τ = 0.3" in captured.out
    frame = pd.read_csv(out / "sweep.csv")
    assert list(zip(frame["tau"], frame["repair"])) == [(0, "none"), (0.1, "none"), (0.1, "bn"), (0.3, "none"),
                                                        (0.3, "bn")]
    settings = json.loads((out / "settings.json").read_text())
    # the repair buys no larger τ than 0.3 without it: the chosen file is the unrepaired one
    assert settings["repair"]["method"] == "bn" and settings["repair"]["chosen"] is False
    assert CompressionConfig.from_dict(settings).tau == 0.3
    assert parse_compressed((out / "model.packed").read_bytes()).repair is None


def test_the_sweep_answers_the_largest_tau_for_every_level_up_to_the_repair(tmp_path, capsys):
    out = tmp_path / "levels"
    assert tune.main([*FAST, "--taus", "0.1", "0.3", "--max-drop", "2", "--repair", "bias", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    frame = pd.read_csv(out / "sweep.csv")
    assert list(zip(frame["tau"], frame["repair"])) == [(0, "none"), (0.1, "none"), (0.1, "bn"), (0.1, "bias"),
                                                        (0.3, "none"), (0.3, "bn"), (0.3, "bias")]
    settings = json.loads((out / "settings.json").read_text())
    answers = {entry["level"]: entry for entry in settings["largest_tau_within"]}
    assert list(answers) == ["none", "bn", "bias"]
    dense = frame.loc[0, "accuracy"]
    for level, entry in answers.items():
        rows = frame[(frame["repair"] == level) & (frame["tau"] > 0)].sort_values("tau")
        passing = rows[rows["accuracy"] >= dense - 0.02 - 1e-12]
        what = "without BN recalibration" if level == "none" else f"after repair '{level}'"
        if passing.empty:  # each level is answered from its own rows, and says so when none passes
            assert entry["config"] is None and f"within 2 points of dense, {what}: none of the swept τ" in captured.out
        else:
            best = passing.iloc[-1]
            assert entry["config"]["tau"] == best["tau"] and entry["measured"]["accuracy"] == best["accuracy"]
            assert f"within 2 points of dense, {what}: τ = {best['tau']:g}" in captured.out
    found = [level for level, entry in answers.items() if entry["config"] is not None]
    assert settings["repair"]["chosen_level"] == (None if not found else settings["measured"]["repair"])
    assert not found or settings["measured"]["repair"] in found
