"""``python -m core.tune`` without --sensitivity/--per-layer: the sweep, its files and its bad-input lines."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import core.tune as tune
from core.deploy.packed_reader import load_compressed
from core.method.config import CompressionConfig
from core.services.uploads import read_upload
from core.workloads import torchvision_models as tv
from tests.tune_cli_refusals import assert_refused

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A CIFAR-sized torchvision model file (3 classes) and a labelled folder of 12 tiny images."""
    base = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    torch.save(tv.build("mobilenet_v3_small", {"num_classes": 3}).state_dict(), base / "weights.pt")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (base / "val" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(base / "val" / name / f"{i}.jpg")
    return base


def test_a_torchvision_sweep_writes_settings_packed_model_and_csv(user_files, tmp_path, capsys):
    out = tmp_path / "tuned"
    code = tune.main(["--model", "torchvision:mobilenet_v3_small", "--weights", str(user_files / "weights.pt"),
                      "--data", str(user_files / "val"), "--image-size", "32", "--max-drop", "100",
                      "--taus", "0.05", "0.1", "--thetas", "0.3", "--bn-recalibrate", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "largest τ within 100 points of dense, without BN recalibration: τ = 0.1" in printed
    assert "with BN recalibration" in printed and "95%_interval" in printed
    settings = json.loads((out / "settings.json").read_text())
    config = CompressionConfig.from_dict(settings)
    assert config.tau == 0.1 and config.theta == 0.3
    assert settings["model"]["arch"] == "torchvision:mobilenet_v3_small" and settings["model"]["arch_kwargs"] == {
        "num_classes": 3}
    assert 0 <= settings["measured"]["accuracy"] <= 1 and settings["measured"]["images"] == 12
    frame = pd.read_csv(out / "sweep.csv")
    assert {"tau", "theta", "retention", "accuracy", "accuracy_dense", "delta", "delta_low", "delta_high",
            "packed_bytes", "bn_recalibrated"} <= set(frame.columns)
    assert len(frame) == 5 and frame.iloc[0]["tau"] == 0 and pd.isna(frame.iloc[0]["theta"])
    model = load_compressed(out / "model.packed")  # no template: the file says torchvision:mobilenet_v3_small
    assert model.classifier[3].out_features == 3
    uploaded = read_upload((out / "model.packed").read_bytes(), "model.packed")  # the app's upload
    assert uploaded.arch == "torchvision:mobilenet_v3_small" and uploaded.image_size == 32


def test_a_registry_sweep_on_a_balanced_subset_of_cifar10(tmp_path, capsys):
    out = tmp_path / "r20"
    assert tune.main(["--model", "resnet20", "--data", "cifar10", "--max-drop", "1.0", "--images", "40",
                      "--taus", "0.02", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "sweep.csv")
    assert (frame["n"] == 40).all() and not frame["bn_recalibrated"].any()
    assert "CIFAR-10 test set (JPEG copy), 40 images" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--max-drop", "1"], "the sweep needs --out DIR"),
    (["--out", "x"], "the sweep needs --max-drop POINTS"),
    (["--out", "x", "--max-drop", "-1"], "a number ≥ 0"),
    (["--out", "x", "--max-drop", "1", "--data", "no/such/folder"], "is neither cifar10 nor a folder"),
    (["--out", "x", "--max-drop", "1", "--images", "0"], "--images must be ≥ 1"),
    (["--out", "x", "--max-drop", "1", "--std", "1", "0", "1"], "three positive numbers"),
    (["--out", "x", "--max-drop", "1", "--mean", "1", "2"], "expected 3 arguments"),
    (["--out", "x", "--max-drop", "1", "--bits", "8", "4"], "b_low ≤ b_high"),
    (["--out", "x", "--max-drop", "1", "--image-size", "4"], "--image-size must be in [8, 1024]"),
    (["--out", "x", "--max-drop", "1", "--model", "torchvision:nope"], "torchvision.models does not have"),
    (["--out", "x", "--max-drop", "1", "--model", "resnet20", "--weights", "missing.pt"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_refused(argv, words, capsys)


def test_missing_pretrained_weights_exit_2_naming_the_file(tmp_path):
    done = subprocess.run([sys.executable, "-m", "core.tune", "--model", "torchvision:resnet18", "--max-drop", "1",
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"TORCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "resnet18-f37072fd.pth" in lines[0] and str(tmp_path) in lines[0]
