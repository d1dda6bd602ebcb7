"""core.measure.sensitivity on a small untrained model and synthetic data (no checkpoint, no CIFAR-10)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import core.measure.sensitivity as sens
from core.measure.accuracy import EvalData
from core.measure.sensitivity import SensitivityConfig, measure_sensitivity, monotone_drops
from core.method.config import CompressionConfig
from core.method.engine import Engine
from tests.conftest import SmallCNN, same_state, state_fingerprint


def small_model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN().eval()


def fake_data(model: nn.Module, n: int = 200, seed: int = 1) -> EvalData:
    """Random images; labels: the dense model's prediction, except every fifth image (so both
    newly wrong and newly right images can occur)."""
    images = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        labels = model(images).argmax(1)
    labels[::5] = (labels[::5] + 1) % 10
    return EvalData(images, labels, "fake")


FAST = dict(precision="fp32", n_images=100)


def test_every_layer_and_tau_is_measured_against_dense(tmp_path):
    model = small_model()
    data = fake_data(model)
    config = SensitivityConfig(taus=(0.3, 0.1, 0.6), **FAST)
    result = measure_sensitivity(model, config, data=data, cache_root=tmp_path)
    engine = Engine(model)
    assert result.taus == (0.1, 0.3, 0.6)
    assert result.layers == tuple(engine.layer_names) == ("conv1", "conv2", "fc")
    assert len(result.frame) == 9 and result.n == 100
    assert result.shares().sum() == pytest.approx(1.0)
    assert list(result.drops().index) == list(result.layers) and list(result.drops().columns) == [0.1, 0.3, 0.6]
    frame = result.frame
    assert ((frame["newly_wrong"] - frame["newly_right"]) / frame["n"] == frame["drop"]).all()
    assert (frame["drop_low"] <= frame["drop"]).all() and (frame["drop"] <= frame["drop_high"]).all()
    # the kept counts are the engine's for that layer alone at that τ
    for _, row in frame.iterrows():
        stats = engine.apply(CompressionConfig(layer_tau={row["layer"]: row["tau"]})).stats.set_index("name")
        assert row["kept"] == stats.loc[row["layer"], "kept"]
    # a heavily pruned conv layer of a random net changes predictions
    assert frame.loc[(frame["layer"] == "conv1") & (frame["tau"] == 0.6), ["newly_wrong", "newly_right"]].sum(axis=1).item() > 0
    # the dense accuracy is that of the model on those images
    images, _, _ = sens.sensitivity_images(config, data)
    with torch.no_grad():
        expected = (model(images.images).argmax(1) == images.labels).float().mean().item()
    assert result.dense_accuracy == pytest.approx(expected, abs=0.02)


def test_drop_is_the_paired_count_of_one_cell(tmp_path):
    model = small_model()
    data = fake_data(model)
    result = measure_sensitivity(model, SensitivityConfig(taus=(0.5,), **FAST), data=data, cache_root=tmp_path)
    images, _, _ = sens.sensitivity_images(SensitivityConfig(taus=(0.5,), **FAST), data)
    pruned = Engine(model).apply(CompressionConfig(layer_tau={"conv2": 0.5})).model
    with torch.no_grad():
        dense_right = model(images.images).argmax(1) == images.labels
        right = pruned(images.images).argmax(1) == images.labels
    row = result.frame.set_index("layer").loc["conv2"]
    assert row["newly_wrong"] == int((dense_right & ~right).sum())
    assert row["newly_right"] == int((~dense_right & right).sum())


def test_images_are_a_class_balanced_prefix():
    labels = torch.arange(10).repeat(30)
    data = EvalData(torch.randn(300, 3, 8, 8), labels, "fake")
    images, population, text = sens.sensitivity_images(SensitivityConfig(n_images=50), data)
    assert population == 300 and len(images) == 50 and "50" in text
    assert torch.bincount(images.labels, minlength=10).tolist() == [5] * 10
    with pytest.raises(ValueError, match="asked for 500"):
        sens.sensitivity_images(SensitivityConfig(n_images=500), data)


def test_second_run_reads_the_cache_and_runs_no_model(tmp_path, monkeypatch):
    model = small_model()
    data = fake_data(model)
    config = SensitivityConfig(taus=(0.1, 0.4), **FAST)
    calls = []
    first = measure_sensitivity(model, config, data=data, cache_root=tmp_path,
                                on_progress=lambda d, t, label: calls.append((d, t)))
    assert first.computed == 3 and first.cached == 0
    assert calls[0] == (0, 6) and calls[-1] == (6, 6) and len(calls) == 7

    def no_model(*args, **kwargs):
        raise AssertionError("a cached run must not run the model")

    monkeypatch.setattr(sens._Runner, "cell", no_model)
    monkeypatch.setattr(sens, "Engine", no_model)  # nor build an engine
    calls.clear()
    second = measure_sensitivity(model, config, data=data, cache_root=tmp_path,
                                 on_progress=lambda d, t, label: calls.append((d, t)))
    assert second.computed == 0 and second.cached == 3
    assert calls[0] == (0, 6) and calls[-1] == (6, 6)
    assert second.frame.equals(first.frame)
    # another grid, other images or another model are other cache entries
    monkeypatch.undo()
    assert measure_sensitivity(model, SensitivityConfig(taus=(0.1, 0.5), **FAST), data=data,
                               cache_root=tmp_path).computed == 3
    assert measure_sensitivity(model, SensitivityConfig(taus=(0.1, 0.4), precision="fp32", n_images=90), data=data,
                               cache_root=tmp_path).computed == 3
    assert measure_sensitivity(small_model(seed=3), config, data=data, cache_root=tmp_path).computed == 3
    assert measure_sensitivity(model, config, data=data, cache_root=tmp_path, use_cache=False).computed == 3


def test_model_is_not_modified_and_bn_recipe_runs(tmp_path):
    model = small_model()
    before = state_fingerprint(model)
    data = fake_data(model)
    calibration = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    result = measure_sensitivity(model, SensitivityConfig(taus=(0.2,), bn_recalibration=True, **FAST), data=data,
                                 calibration=calibration, cache_root=tmp_path)
    assert result.bn_recalibration and len(result.frame) == 3
    assert same_state(model, before)
    plain = measure_sensitivity(model, SensitivityConfig(taus=(0.2,), **FAST), data=data, cache_root=tmp_path)
    assert not plain.bn_recalibration and plain.computed == 3  # another recipe, another cache entry


def test_layers_can_be_restricted_and_unknown_ones_refused(tmp_path):
    model = small_model()
    data = fake_data(model)
    result = measure_sensitivity(model, SensitivityConfig(taus=(0.2,), layers=("fc",), **FAST), data=data,
                                 cache_root=tmp_path)
    assert result.layers == ("fc",) and result.shares()["fc"] == 1.0
    with pytest.raises(ValueError, match="no prunable layer named 'nope'"):
        measure_sensitivity(model, SensitivityConfig(taus=(0.2,), layers=("nope",), **FAST), data=data,
                            cache_root=tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(taus=()), "at least one τ"), (dict(taus=(0.0, 0.2)), r"\(0, 1\]"), (dict(taus=(1.5,)), r"\[0, 1\]"),
    (dict(n_images=0), "n_images"), (dict(source="val"), "source"), (dict(precision="fp16"), "precision"),
])
def test_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SensitivityConfig(**kwargs)


def test_monotone_drops_is_a_running_maximum_from_zero():
    assert monotone_drops([-0.01, 0.02, 0.01, 0.05]).tolist() == [0.0, 0.02, 0.02, 0.05]
    assert np.all(np.diff(monotone_drops(np.random.default_rng(0).normal(size=20))) >= 0)


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(sens, "native_bf16", lambda device_type="cpu": False)
    assert sens.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(sens, "native_bf16", lambda device_type="cpu": True)
    assert sens.resolve_precision("auto") == "bf16"
    assert sens.resolve_precision("fp32") == "fp32"
