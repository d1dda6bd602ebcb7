"""python -m core.tune --granularity channel: its files, --target-macs's bound, refusals (core.measure.tune_channels)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from core.deploy.channel_file import load_channel_bundle, load_compressed
from core.measure.tune_channels import smallest_tau_for_macs
from core.method.channels import ChannelConfig, ChannelError, ChannelPruner
from core.tune import main
from tests.method.channel_nets import res_mini


def test_target_macs_bisection_meets_the_bound_and_is_smallest():
    pruner = ChannelPruner(res_mini(), torch.randn(1, 3, 8, 8))
    for ratio in (0.8, 0.5, 0.3):
        tau, macs = smallest_tau_for_macs(pruner, ratio)
        assert macs <= ratio * pruner.macs_dense
        assert macs == pruner.macs(ChannelConfig(tau))
        assert pruner.macs(ChannelConfig(max(tau - 2e-3, 0))) > ratio * pruner.macs_dense or tau == 0
    with pytest.raises(ChannelError, match="no τ_ch reaches"):
        smallest_tau_for_macs(pruner, 1e-6)


def test_cli_writes_its_files_and_meets_the_mac_bound(tmp_path):
    out = tmp_path / "channel"
    code = main(["--granularity", "channel", "--model", "resnet20", "--target-macs", "0.9", "--repair", "none",
                 "--max-images", "50", "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"settings.json", "sweep.csv", "model.packed", "model.pt"}
    settings = json.loads((out / "settings.json").read_text())
    assert settings["granularity"] == "channel" and settings["channels"]["kept"]
    assert settings["result"]["macs"] <= 0.9 * settings["result"]["macs_dense"]
    rows = pd.read_csv(out / "sweep.csv")
    assert list(rows["repair"]) == ["none"] and (rows["mac_ratio"] <= 0.9).all()
    x = torch.randn(2, 3, 32, 32)
    packed, bundle = load_compressed(out / "model.packed"), load_channel_bundle(out / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(packed(x), bundle(x))


def test_cli_refuses_tau_with_target(tmp_path, capsys):
    code = main(["--granularity", "channel", "--model", "resnet20", "--tau", "0.3", "--target-macs", "0.5",
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "exactly one of --tau" in capsys.readouterr().err


def test_cli_exports_the_smaller_model_to_onnx_fp32_and_int8(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    out = tmp_path / "onnx"
    assert main(["--granularity", "channel", "--model", "resnet20", "--tau", "0.3", "--theta", "0.3",
                 "--repair", "none", "--max-images", "50", "--export", "onnx", "--out", str(out)]) == 0
    bundle = load_channel_bundle(out / "model.pt")  # the smaller model with its 4/8-bit weights
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = bundle(x).numpy()
    outputs = {}
    for name in ("model.onnx", "model.int8.onnx"):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        (outputs[name],) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert outputs[name].shape == expected.shape  # any batch size, the channel-pruned graph
    np.testing.assert_allclose(outputs["model.onnx"], expected, rtol=1e-3, atol=1e-3)
    # int8 activations move the logits, but the file is the same network: most top-1 classes agree
    agree = (outputs["model.int8.onnx"].argmax(1) == expected.argmax(1)).mean()
    assert agree >= 2 / 3
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size


def test_cli_allocation_writes_per_group_tau_that_reloads_to_the_same_channels(tmp_path):
    out = tmp_path / "equal"
    assert main(["--granularity", "channel", "--model", "resnet20", "--target-macs", "0.8", "--allocation",
                 "equal-share", "--repair", "none", "--max-images", "50", "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["allocation"] == "equal-share" and settings["layer_tau_ch"]
    assert settings["result"]["macs"] <= 0.8 * settings["result"]["macs_dense"]
    from core.workloads.models import load_pretrained

    again = ChannelPruner(load_pretrained("resnet20")).apply(ChannelConfig.from_dict(settings))
    assert again.record() == settings["channels"]
    prunable = again.groups[again.groups.prunable]
    shares = prunable.kept / prunable.channels
    assert shares.max() - shares.min() <= 1 / prunable.channels.min() + 1e-9  # the same share of every group


def test_cli_refuses_an_allocation_without_a_target(tmp_path, capsys):
    code = main(["--granularity", "channel", "--model", "resnet20", "--tau", "0.3", "--allocation", "inner-only",
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "--allocation chooses per-group counts" in capsys.readouterr().err
