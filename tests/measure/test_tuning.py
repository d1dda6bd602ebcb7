"""The sweep behind ``python -m core.tune`` (default mode): models, data, rows and the choice."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from core.deploy.packed_reader import parse_compressed
from core.measure import tuning
from core.method.config import CompressionConfig
from core.workloads import torchvision_models as tv
from core.workloads.data import DataError
from core.workloads.models import CheckpointError


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "sq.safetensors"
    save_file({k: v.contiguous() for k, v in tv.build("mobilenet_v3_small", {"num_classes": 3}).state_dict().items()},
              str(path))
    return path


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (root / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_torchvision_model_from_a_file_with_the_user_s_input(weights_file):
    tuned = tuning.load_model("torchvision:mobilenet_v3_small", str(weights_file), 32, (0.5,) * 3, (0.25,) * 3)
    assert tuned.arch == "torchvision:mobilenet_v3_small" and tuned.arch_kwargs == {"num_classes": 3}
    assert tuned.preprocess.image_size == 32 and tuned.input_spec["mean"] == [0.5] * 3
    default = tuning.load_model("torchvision:mobilenet_v3_small", str(weights_file))
    assert default.preprocess.image_size == 224


def test_unknown_models_and_missing_weights_are_sentences(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown model 'mlp'"):
        tuning.load_model("mlp")
    with pytest.raises(CheckpointError, match="does not exist"):
        tuning.load_model("resnet20", str(tmp_path / "none.pt"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="not in the local torch hub cache"):
        tuning.load_model("torchvision:mobilenet_v3_small", "pretrained")


def test_folder_data_and_a_balanced_subset(weights_file, image_root):
    tuned = tuning.load_model("torchvision:mobilenet_v3_small", str(weights_file), 32)
    data = tuning.load_data(str(image_root), tuned)
    assert len(data) == 12 and data.labelled and sorted(data.labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    subset = tuning.load_data(str(image_root), tuned, n_images=6)
    assert sorted(subset.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(CheckpointError, match="3 outputs, CIFAR-10 has 10 classes"):
        tuning.load_data("cifar10", tuned, n_images=10)
    with pytest.raises(DataError, match="is not a folder"):
        tuning.load_data(str(image_root / "missing"), tuned)


def test_unlabelled_folders_measure_agreement_with_dense(weights_file, image_root):
    tuned = tuning.load_model("torchvision:mobilenet_v3_small", str(weights_file), 32)
    data = tuning.load_data(str(image_root / "a"), tuned)
    assert not data.labelled and "agreement" in data.description


def test_rows_choice_and_packed_file(weights_file, image_root):
    tuned = tuning.load_model("torchvision:mobilenet_v3_small", str(weights_file), 32)
    data = tuning.load_data(str(image_root), tuned)
    configs = tuning.settings([0.3, 0.1], [0.3], 4, 8)
    assert [c.tau for c in configs] == [0.1, 0.3] and all(c.quantized for c in configs)
    calls = []
    frame = tuning.run_tuning_sweep(tuned, data, configs, data.images, on_progress=lambda *a: calls.append(a))
    assert list(frame.columns) == list(tuning.COLUMNS) and len(frame) == 5 and calls[-1][:2] == (5, 5)
    dense = frame.iloc[0]
    assert dense["tau"] == 0 and math.isnan(dense["theta"]) and not dense["bn_recalibrated"] and dense["delta"] == 0
    assert (frame["accuracy_dense"] == dense["accuracy"]).all()
    assert frame["packed_bytes"].iloc[1] < dense["packed_bytes"]
    assert (frame["delta_low"] <= frame["delta"]).all() and (frame["delta"] <= frame["delta_high"]).all()
    choice = tuning.choose(frame, 100.0, False, 0.3)
    assert choice.config == CompressionConfig(tau=0.3, theta=0.3) and not choice.bn_recalibrated
    assert tuning.choose(frame, 100.0, False, None) is None  # no pruning-only rows were swept
    packed = parse_compressed(tuning.pack_choice(tuned, choice, None))
    assert packed.arch == "torchvision:mobilenet_v3_small" and packed.config == choice.config
    assert "retention_%" in tuning.format_sweep(frame)
    assert isinstance(frame, pd.DataFrame)


def test_repair_calibration_never_takes_the_evaluation_set(weights_file, image_root):
    tuned = tuning.load_model("torchvision:mobilenet_v3_small", str(weights_file), 40)
    images, text = tuning.repair_calibration("cifar10", tuned, 6, seed=1)
    assert images.shape == (6, 3, 40, 40) and "6 augmented CIFAR-10 training images (seed 1)" == text
    images, text = tuning.repair_calibration(str(image_root), tuned, 5)
    assert images.shape == (5, 3, 40, 40) and str(image_root) in text
    with pytest.raises(ValueError, match="1 to 4096 calibration images"):
        tuning.repair_calibration("cifar10", tuned, tuning.MAX_REPAIR_IMAGES + 1)


def test_one_setting_at_every_repair_level_packs_the_last(weights_file, image_root):
    from core.measure.repair import RepairConfig

    tuned = tuning.load_model("torchvision:mobilenet_v3_small", str(weights_file), 32)
    data = tuning.load_data(str(image_root), tuned)
    calibration, _ = tuning.repair_calibration("cifar10", tuned, 16)
    config = CompressionConfig(tau=0.1, theta=0.3, b_low=4, b_high=8)
    estimates = []
    run = tuning.evaluate_setting(tuned, data, config, RepairConfig("bias", n_images=16, n_holdout=0, batch_size=8),
                                  calibration, on_estimate=lambda method, s: estimates.append((method, s)))
    assert run.frame["repair"].tolist() == ["none", "none", "bn", "bias"] and list(run.frame.columns) == list(
        tuning.COLUMNS)
    assert [m for m, _ in estimates] == ["bn", "bias"] and all(s > 0 for _, s in estimates)
    assert run.repaired.method == "bias" and len(run.packed) == run.frame.iloc[-1]["packed_bytes"]
    packed = parse_compressed(run.packed)
    assert packed.repair["method"] == "bias" and packed.arch == "torchvision:mobilenet_v3_small"
    model = packed.load()
    reference = run.repaired.model.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())
    with pytest.raises(ValueError, match="calibration images"):
        tuning.evaluate_setting(tuned, data, config, RepairConfig("bn"), None)
