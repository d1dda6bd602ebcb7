"""``python -m core.tune --export onnx``: refused outside the one-setting mode, with one line (status 2)."""
from __future__ import annotations

from core.tune import main


def test_export_needs_one_setting(capsys):
    assert main(["--model", "resnet20", "--export", "onnx", "--out", "/nonexistent-never-written"]) == 2
    err = capsys.readouterr().err
    assert "--export onnx exports one setting: give --tau" in err and err.count("\n") == 1


def test_export_names_its_format(capsys):
    try:
        main(["--model", "resnet20", "--tau", "0.2", "--export", "tflite", "--out", "/nonexistent-never-written"])
    except SystemExit as stop:
        assert stop.code == 2
    assert "onnx" in capsys.readouterr().err
