"""``python -m core.tune``: bad input exits with status 2 and one line; a small per-layer run writes settings.json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import core.tune as tune
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads.models import load_pretrained
from tests.tune_cli_refusals import assert_refused

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, words", [
    ([], "the sweep needs --out DIR"),
    (["--sensitivity", "--per-layer"], "not allowed with"),
    (["--sensitivity", "--model", "vgg99"], "unknown model 'vgg99'"),
    (["--sensitivity", "--taus", "0.2", "1.5"], "[0, 1]"),
    (["--sensitivity", "--taus", "abc"], "invalid float value"),
    (["--sensitivity", "--images", "0"], "n_images"),
    (["--per-layer", "--out", "x"], "exactly one of --target-retention"),
    (["--per-layer", "--target-retention", "0.3", "--max-drop", "1", "--out", "x"], "exactly one of"),
    (["--per-layer", "--target-retention", "1.5", "--out", "x"], "retention must be in (0, 1]"),
    (["--per-layer", "--target-bytes", "-3", "--out", "x"], "positive number of bytes"),
    (["--per-layer", "--max-drop", "-1", "--out", "x"], "largest drop"),
    (["--per-layer", "--target-retention", "0.3"], "--out DIR"),
    (["--per-layer", "--target-retention", "0.3", "--out", "x", "--verify-images", "0"], "--verify-images"),
    (["--per-layer", "--target-retention", "0.01", "--out", "x", "--taus", "0.05"], "below what the τ grid reaches"),
    (["--per-layer", "--target-bytes", "1000", "--out", "x", "--taus", "0.05"], "below what the τ grid reaches"),
    (["--sensitivity", "--calibration-size", "0"], "--calibration-size"),
])
def test_bad_input_exits_2_with_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_refused(argv, words, capsys)


def test_out_must_be_a_folder(capsys, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert tune.main(["--per-layer", "--target-retention", "0.3", "--out", str(not_a_folder)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_module_runs_as_a_command():
    done = subprocess.run([sys.executable, "-m", "core.tune", "--per-layer", "--model", "nope", "--out", "x",
                           "--target-retention", "0.3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["python -m core.tune: error: unknown model 'nope'; choose one of "
                                                "cifar_cnn, resnet20, resnet18"]


def test_every_mode_is_one_function():
    assert set(tune.MODES) == {"sensitivity", "per_layer", "setting", "sweep"}
    parser = tune.build_parser()
    for mode in ("sensitivity", "per_layer"):  # the sweep is the mode without a flag
        assert getattr(parser.parse_args([f"--{mode.replace('_', '-')}"]), mode) is True
        assert tune._mode(parser.parse_args([f"--{mode.replace('_', '-')}"])) == mode
    assert tune._mode(parser.parse_args(["--tau", "0"])) == "setting"  # τ = 0 is a setting too
    assert tune._mode(parser.parse_args([])) == "sweep"


SMALL = ["--model", "resnet20", "--taus", "0.1", "0.3", "--images", "50", "--precision", "fp32"]


def test_sensitivity_mode_prints_the_table_and_caches(tmp_path, capsys):
    argv = ["--sensitivity", *SMALL, "--cache-dir", str(tmp_path), "--csv", str(tmp_path / "s.csv")]
    assert tune.main(argv) == 0
    out = capsys.readouterr()
    assert "layers.2.2.conv2" in out.out and "τ=0.3" in out.out and "20 layers measured, 0 read" in out.out
    assert "sensitivity [40/40]" in out.err  # progress on stderr
    assert (tmp_path / "s.csv").is_file()
    assert tune.main(argv) == 0
    assert "0 layers measured, 20 read from the cache" in capsys.readouterr().out


def test_per_layer_writes_settings_that_from_dict_reproduces(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--per-layer", *SMALL, "--target-retention", "0.5", "--out", str(out), "--verify-images", "100",
            "--calibration-size", "64", "--cache-dir", str(tmp_path / "cache")]
    assert tune.main(argv) == 0
    printed = capsys.readouterr().out
    assert "automatic per-layer τ" in printed and "global magnitude" in printed and "uniform τ" in printed
    settings = json.loads((out / "settings.json").read_text())
    config = CompressionConfig.from_dict(json.load(open(out / "settings.json")))
    assert config.to_dict() == settings["config"]
    engine = Engine(load_pretrained("resnet20"))
    assert set(dict(config.layer_tau)) == set(engine.layer_names)
    result = engine.apply(config)
    measured = {(row["method"], row["bn_recalibrated"]): row for row in settings["measured"]}
    assert set(measured) == {(m, bn) for m in ("dense", "uniform", "per_layer", "global_magnitude")
                             for bn in (False, True)}
    per_layer = measured[("per_layer", False)]
    assert per_layer["kept"] == int(result.stats["kept"].sum())
    assert per_layer["retention"] == pytest.approx(result.retention)
    assert result.retention <= 0.5
    assert measured[("global_magnitude", True)]["kept"] == per_layer["kept"]
    assert 0 <= per_layer["accuracy"] <= 1 and settings["verification"]["images"] == "100 test images"
    assert settings["sensitivity"]["images"].startswith("50 class-balanced training images")
    assert (out / "comparison.csv").is_file() and (out / "sensitivity.csv").is_file()
