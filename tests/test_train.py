"""The training recipe's configuration (the training itself is exercised by the shipped checkpoints' cards)."""
from __future__ import annotations

import pytest
import torch

from core.common.hardware import native_bf16
from core.train import PRECISIONS, TrainConfig, main, resolve_precision


def test_precision_auto_is_bf16_exactly_where_the_hardware_has_it():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu.type) else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    for explicit in ("bf16", "fp32"):
        assert resolve_precision(explicit, cpu) == explicit


def test_bad_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig("resnet20", precision="fp8")
    assert TrainConfig("resnet20").precision in PRECISIONS


def test_cli_rejects_unknown_precision(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["resnet20", "--precision", "fp8"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
