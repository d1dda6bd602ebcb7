"""core.measure.sweeps on a small untrained model and synthetic data (no checkpoint needed)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

import core.measure.sweeps as sweep
import core.sweep as sweep_cli
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.measure.accuracy import EvalData, bn_recalibrate, evaluate
from core.method.pruning import prunable_layers
from core.measure.sweeps import QuantSetting, SweepConfig, run_sweep
from core.measure.baselines import magnitude_baseline
from core.measure.sweep_results import largest_tau_within, pareto_points, series_labels
from tests.conftest import SmallCNN, same_state, state_fingerprint


def small_model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN().eval()
    with torch.no_grad():  # non-trivial BN statistics, so recalibration has something to change
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def self_labelled(model: nn.Module, n: int = 120, seed: int = 1) -> EvalData:
    """Random images labelled with the dense model's own predictions: dense accuracy is exactly 1."""
    images = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        labels = model.eval()(images).argmax(1)
    return EvalData(images, labels, "fake")


def balanced_fake(n_per_class: int = 6, seed: int = 2) -> EvalData:
    labels = torch.arange(10).repeat(n_per_class)
    images = torch.randn(len(labels), 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return EvalData(images, labels, "fake")


def calibration(seed: int = 3) -> torch.Tensor:
    return torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


TAUS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> SmallCNN:
    return small_model()


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> pd.DataFrame:
    """One full sweep, shared by the tests that only read it."""
    model = small_model()
    config = SweepConfig(taus=TAUS, quant=(QuantSetting(0.3, 2, 8),))
    return run_sweep(model, config, data=self_labelled(model), calibration=calibration(),
                     cache_root=tmp_path_factory.mktemp("sweeps"))


def rows(frame, method, bn=False, quantized=False):
    selected = frame[(frame["method"] == method) & (frame["bn_recalibrated"] == bn)
                     & (frame["theta"].notna() == quantized)]
    return selected.sort_values("tau").reset_index(drop=True)


def test_frame_shape_and_dense_reference(frame):
    assert list(frame.columns) == list(sweep.COLUMNS)
    # dense ×2, and per τ: boundary, two baselines, one θ setting, each with and without BN recal
    assert len(frame) == 2 + len(TAUS) * 4 * 2
    dense = rows(frame, "dense")
    assert len(dense) == 1 and dense.loc[0, "accuracy"] == 1.0 and dense.loc[0, "retention"] == 1.0
    at_zero = rows(frame, "boundary").iloc[0]
    assert at_zero["tau"] == 0.0 and at_zero["retention"] == 1.0 and at_zero["accuracy"] == 1.0
    assert (frame["n"] == 120).all()
    assert ((frame["ci_low"] <= frame["accuracy"]) & (frame["accuracy"] <= frame["ci_high"])).all()
    assert not frame["cached"].any()


def test_retention_monotone_in_tau(frame, model):
    boundary = rows(frame, "boundary")
    assert list(boundary["tau"]) == list(TAUS)
    retention = boundary["retention"].to_numpy()
    assert all(a >= b for a, b in zip(retention, retention[1:]))
    assert retention[0] == 1.0 and retention[-1] < 0.05  # τ = 1 keeps only each layer's max
    # the sweep's retention is the engine's
    engine = Engine(model)
    for tau, value in zip(TAUS, retention):
        assert value == engine.apply(CompressionConfig(tau=tau)).retention
    # quantizing does not change what is kept
    assert rows(frame, "boundary", quantized=True)["retention"].tolist() == boundary["retention"].tolist()


def test_baselines_at_same_retention(frame, model):
    numel = sum(layer.weight.numel() for layer in prunable_layers(model))
    boundary = rows(frame, "boundary")["retention"]
    for method in ("global_magnitude", "layer_l1"):
        for bn in (False, True):
            baseline = rows(frame, method, bn)["retention"]
            assert len(baseline) == len(TAUS)
            assert (baseline - boundary).abs().max() <= 1 / numel


def test_global_magnitude_row_matches_independent_pruning(frame, model):
    """Zero the globally smallest |W| by hand and compare with the sweep's baseline accuracy."""
    data = self_labelled(model)
    layers = [layer.name for layer in prunable_layers(model)]
    weights = torch.cat([model.get_submodule(n).weight.detach().abs().flatten() for n in layers])
    baseline = rows(frame, "global_magnitude")
    for tau, retention, accuracy in zip(baseline["tau"], baseline["retention"], baseline["accuracy"]):
        n_prune = round((1 - retention) * weights.numel())
        pruned = small_model()
        if n_prune:
            threshold = weights.sort().values[n_prune - 1]
            assert (weights == threshold).sum() == 1  # no ties in a random init, so the cut is unique
            with torch.no_grad():
                for name in layers:
                    w = pruned.get_submodule(name).weight
                    w.mul_((w.abs() > threshold).to(w.dtype))
        assert evaluate(pruned, data).accuracy == accuracy, f"tau={tau}"


def test_layer_l1_prunes_the_same_fraction_in_every_layer(model):
    n_prune = 1000
    pruned, retention = magnitude_baseline(model, "layer_l1", n_prune)
    total = sum(layer.weight.numel() for layer in prunable_layers(model))
    assert retention == (total - n_prune) / total
    for layer in prunable_layers(pruned):
        w = layer.weight.detach()
        original = model.get_submodule(layer.name).weight.detach()
        zeroed = int((w == 0).sum())
        assert abs(zeroed - n_prune * w.numel() / total) < 1
        if zeroed:  # the zeroed weights are the layer's smallest
            assert original.abs()[w == 0].max() <= original.abs()[w != 0].min()
    assert not any(hasattr(m, "weight_mask") for m in pruned.modules())  # masks made permanent


def test_bn_rows_are_recalibrated_models(frame, model):
    data = self_labelled(model)
    expected = evaluate(bn_recalibrate(model, calibration()), data).accuracy
    assert rows(frame, "dense", bn=True).loc[0, "accuracy"] == expected
    assert rows(frame, "boundary", bn=True).loc[0, "accuracy"] == expected  # τ = 0 is the dense model
    assert expected < 1.0  # recalibrating on shifted data changes the running stats, hence predictions


def test_input_model_untouched(model, tmp_path):
    before = state_fingerprint(model)
    model.train()
    run_sweep(model, SweepConfig(taus=(0.2, 0.6), quant=(QuantSetting(0.5, 2, 4),)),
              data=self_labelled(small_model()), calibration=calibration(), cache_root=tmp_path)
    assert model.training
    assert same_state(model, before)
    assert not any(hasattr(m, "weight_orig") or m._forward_pre_hooks for m in model.modules())


def test_caching_returns_identical_numbers(model, tmp_path, monkeypatch):
    config = SweepConfig(taus=(0.0, 0.3, 0.6), per_class=3)
    data, calib = balanced_fake(), calibration()
    first = run_sweep(model, config, data=data, calibration=calib, cache_root=tmp_path)
    assert not first["cached"].any()

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a cached sweep must not evaluate the model")

    monkeypatch.setattr(sweep, "evaluate", no_evaluation)
    second = run_sweep(model, config, data=data, calibration=calib, cache_root=tmp_path)
    assert second["cached"].all()
    pd.testing.assert_frame_equal(first.drop(columns="cached"), second.drop(columns="cached"))
    monkeypatch.undo()

    # other weights, another subset size or other calibration data are other keys
    changed = small_model()
    with torch.no_grad():
        changed.fc.weight[0, 0] += 1e-3
    assert not run_sweep(changed, config, data=data, calibration=calib, cache_root=tmp_path)["cached"].any()
    other = SweepConfig(taus=(0.0, 0.3, 0.6), per_class=2)
    assert not run_sweep(model, other, data=data, calibration=calib, cache_root=tmp_path)["cached"].any()
    assert not run_sweep(model, config, data=data, calibration=calibration(seed=9), cache_root=tmp_path)["cached"].any()
    # a sweep over a superset of τ reuses the rows it has
    wider = run_sweep(model, SweepConfig(taus=(0.0, 0.3, 0.45, 0.6), per_class=3), data=data,
                      calibration=calib, cache_root=tmp_path)
    assert (wider["cached"] == (wider["tau"] != 0.45)).all()
    # use_cache=False recomputes
    assert not run_sweep(model, config, data=data, calibration=calib, cache_root=tmp_path,
                         use_cache=False)["cached"].any()


def test_per_class_subset(model, tmp_path):
    frame = run_sweep(model, SweepConfig(taus=(0.0,), per_class=4, bn_recalibration=False),
                      data=balanced_fake(6), cache_root=tmp_path)
    assert (frame["n"] == 40).all()
    assert not frame["bn_recalibrated"].any()


def test_progress_callback(model, tmp_path):
    calls = []
    frame = run_sweep(model, SweepConfig(taus=(0.1, 0.4)), data=self_labelled(model), calibration=calibration(),
                      cache_root=tmp_path, on_progress=lambda done, total, label: calls.append((done, total, label)))
    total = len(frame)
    assert [c[0] for c in calls] == list(range(total + 1))
    assert all(c[1] == total for c in calls)
    assert any("global_magnitude" in c[2] and "0.4" in c[2] for c in calls)


def test_model_without_batchnorm_has_no_bn_rows(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    frame = run_sweep(mlp, SweepConfig(taus=(0.0, 0.5)), data=self_labelled(mlp), cache_root=tmp_path)
    assert not frame["bn_recalibrated"].any()
    assert set(frame["method"]) == {"dense", "boundary", "global_magnitude", "layer_l1"}


def test_include_norm_prunes_the_same_parameters_in_every_method(model, tmp_path):
    data = self_labelled(model)
    plain = run_sweep(model, SweepConfig(taus=(0.6,), bn_recalibration=False), data=data, cache_root=tmp_path)
    paper = run_sweep(model, SweepConfig(taus=(0.6,), bn_recalibration=False, include_norm=True), data=data,
                      cache_root=tmp_path)
    assert not paper["cached"].any()  # another key
    numel = sum(layer.weight.numel() for layer in prunable_layers(model, include_norm=True))
    boundary = rows(paper, "boundary").loc[0, "retention"]
    assert boundary != rows(plain, "boundary").loc[0, "retention"]
    for method in ("global_magnitude", "layer_l1"):
        assert abs(rows(paper, method).loc[0, "retention"] - boundary) <= 1 / numel


def test_config_validation():
    assert SweepConfig(taus=(0.3, 0.1, 0.3)).taus == (0.1, 0.3)
    with pytest.raises(ValueError):
        SweepConfig(taus=(1.5,))
    with pytest.raises(ValueError):
        SweepConfig(taus=())
    with pytest.raises(ValueError):
        SweepConfig(baselines=("random",))
    with pytest.raises(ValueError):
        SweepConfig(per_class=0)
    with pytest.raises(ValueError):
        QuantSetting(0.3, b_low=8, b_high=4)
    with pytest.raises(ValueError):
        magnitude_baseline(small_model(), "global_magnitude", 10**9)


def hand_frame() -> pd.DataFrame:
    records = [("dense", 0.0, False, 1.0, 0.90), ("dense", 0.0, True, 1.0, 0.89)]
    for tau, ret, acc, acc_bn in [(0.0, 1.0, 0.90, 0.89), (0.1, 0.8, 0.895, 0.893), (0.2, 0.6, 0.87, 0.891),
                                  (0.3, 0.4, 0.886, 0.87), (0.4, 0.2, 0.5, 0.6)]:
        records += [("boundary", tau, False, ret, acc), ("boundary", tau, True, ret, acc_bn)]
    frame = pd.DataFrame(records, columns=["method", "tau", "bn_recalibrated", "retention", "accuracy"])
    frame["theta"] = math.nan
    return frame


def test_largest_tau_within():
    frame = hand_frame()
    assert largest_tau_within(frame, 1.0).tau == 0.1       # 0.895 ≥ 0.89; 0.87 and 0.886 are below
    assert largest_tau_within(frame, 1.5).tau == 0.3       # 0.886 ≥ 0.885 though τ = 0.2 is not
    assert largest_tau_within(frame, 1.5, contiguous=True).tau == 0.1
    assert largest_tau_within(frame, 3.5).tau == 0.3
    assert largest_tau_within(frame, 40).tau == 0.4
    choice = largest_tau_within(frame, 1.0, bn_recalibrated=True)   # reference stays the dense model, 0.90
    assert choice.tau == 0.2 and choice.retention == 0.6 and choice.dense_accuracy == 0.90
    assert choice.drop_points == pytest.approx(0.9)
    no_dense = frame[frame["method"] != "dense"].copy()  # then τ = 0 boundary pruning is the reference
    no_dense.loc[(no_dense["tau"] == 0) & ~no_dense["bn_recalibrated"], "accuracy"] = 0.88
    assert largest_tau_within(no_dense, 1.0).tau == 0.3
    assert largest_tau_within(no_dense, 1.0).dense_accuracy == 0.88
    assert largest_tau_within(frame[(frame["tau"] != 0.1)], 0.0).tau == 0.0
    with pytest.raises(ValueError):
        largest_tau_within(frame[frame["method"] != "dense"].query("tau > 0"), 1.0)


def test_largest_tau_within_answers_each_repair_level_from_its_own_rows():
    frame = hand_frame()
    frame["repair"] = frame["bn_recalibrated"].map({True: "bn", False: "none"})
    repaired = pd.DataFrame({"method": "boundary", "tau": [0.0, 0.1, 0.2, 0.3, 0.4], "bn_recalibrated": False,
                             "retention": [1.0, 0.8, 0.6, 0.4, 0.2], "accuracy": [0.90, 0.899, 0.897, 0.894, 0.7],
                             "theta": math.nan, "repair": "reconstruct", "size_ratio": [1.0, 1.2, 1.6, 2.4, 4.5]})
    frame = pd.concat([frame, repaired], ignore_index=True)
    assert largest_tau_within(frame, 1.0, contiguous=True).tau == 0.1  # plain rows only, as before
    assert largest_tau_within(frame, 1.0, bn_recalibrated=True).tau == 0.2
    choice = largest_tau_within(frame, 1.0, contiguous=True, level="reconstruct")
    assert (choice.tau, choice.level, choice.size_ratio, choice.dense_accuracy) == (0.3, "reconstruct", 2.4, 0.90)
    assert largest_tau_within(frame, 0.05, level="bias") is None  # no rows at that level: no answer
    labels = series_labels(frame)
    assert set(labels[frame["repair"] == "reconstruct"]) == {"boundary pruning + reconstruction"}
    assert set(labels[frame["repair"] == "none"]) == {"boundary pruning", "dense"}
    frame = frame.assign(size_ratio=frame["size_ratio"].fillna(2.0), b_low=pd.NA, b_high=pd.NA)
    series = set(pareto_points([frame])["series"])
    assert {"pruned (fp32) + reconstruction", "pruned (fp32) + BN recal", "pruned (fp32)", "dense"} <= series


def test_largest_tau_within_on_a_real_sweep(frame):
    dense = rows(frame, "dense").loc[0, "accuracy"]
    boundary = rows(frame, "boundary")
    choice = largest_tau_within(frame, 5.0)
    passing = boundary[boundary["accuracy"] >= dense - 0.05]
    assert choice.tau == passing["tau"].max()
    assert choice.accuracy == passing.set_index("tau").loc[choice.tau, "accuracy"]


def test_sweep_pretrained_keys_the_cache_by_checkpoint_sha(tmp_path, monkeypatch):
    import json

    from core.workloads import models

    monkeypatch.setattr(models, "CHECKPOINT_DIR", tmp_path)
    torch.manual_seed(0)
    weights = tmp_path / "cifar_cnn.pt"
    torch.save(models.build("cifar_cnn", width=4).state_dict(), weights)
    sha = models.sha256_file(weights)
    card = {"arch": "cifar_cnn", "arch_kwargs": {"width": 4}, "file": weights.name, "sha256": sha,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "test_accuracy": 0.1, "params": 0}
    (tmp_path / "cifar_cnn.json").write_text(json.dumps(card))
    config = SweepConfig(taus=(0.0, 0.4), per_class=2, bn_recalibration=False, baselines=())
    frame = sweep.sweep_pretrained("cifar_cnn", config, cache_root=tmp_path / "cache")
    assert len(frame) == 3 and (frame["n"] == 20).all()
    (context,) = (tmp_path / "cache").glob("*/context.json")
    stored = json.loads(context.read_text())
    assert stored["model"] == f"sha256:{sha}" and stored["data"]["mean"] == [0.5, 0.5, 0.5]
    assert sweep.sweep_pretrained("cifar_cnn", config, cache_root=tmp_path / "cache")["cached"].all()


def test_cli_untrained(tmp_path, capsys):
    pytest.importorskip("PIL")
    code = sweep_cli.main(["cifar_cnn", "--untrained", "--taus", "0", "0.5", "--per-class", "2", "--no-bn",
                       "--baselines", "global_magnitude", "--cache-dir", str(tmp_path), "--within", "1",
                       "--csv", str(tmp_path / "out.csv")])
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy on 20 CIFAR-10 test images" in out and "global_magnitude" in out
    table = pd.read_csv(tmp_path / "out.csv")
    assert len(table) == 1 + 2 * 2 and set(table["method"]) == {"dense", "boundary", "global_magnitude"}


def test_repaired_rows_match_the_repair_run_by_hand_and_come_back_from_the_cache(tmp_path):
    from core.measure.repair import repair_setting

    model = small_model()
    data, images = self_labelled(model), calibration()
    config = SweepConfig(taus=(0.0, 0.3), quant=(QuantSetting(0.3, 4, 8),), baselines=(),
                         repair_levels=("reconstruct", "bias"), repair_images=len(images))
    assert config.repair_levels == ("bias", "reconstruct")  # in level order
    first = run_sweep(model, config, data=data, calibration=images, repair_images=images, cache_root=tmp_path)
    repaired = first[first["repair"].isin(["bias", "reconstruct"])]
    # the θ setting's boundary rows (the weights a user would ship) at every τ and both levels
    assert len(repaired) == 2 * 2 and set(repaired["method"]) == {"boundary"} and repaired["theta"].eq(0.3).all()
    assert not repaired["bn_recalibrated"].any()
    assert set(first.loc[first["bn_recalibrated"], "repair"]) == {"bn"}
    assert set(first.loc[~first["bn_recalibrated"] & first["repair"].eq("none"), "method"]) == {"dense", "boundary"}

    engine = sweep.sweep_engine(model, config)
    for _, row in repaired.iterrows():
        setting = CompressionConfig(tau=row["tau"]) if pd.isna(row["theta"]) else CompressionConfig(
            tau=row["tau"], theta=row["theta"], b_low=4, b_high=8)
        result = engine.apply(setting)
        fixed = repair_setting(model, engine, result, images, config.repair_config(row["repair"]))
        assert row["accuracy"] == evaluate(fixed.model, data).accuracy
        assert row["retention"] == pytest.approx(result.retention)
    again = run_sweep(model, config, data=data, calibration=images, repair_images=images, cache_root=tmp_path)
    assert again["cached"].all()
    pd.testing.assert_frame_equal(again.drop(columns=["cached", "seconds"]), first.drop(columns=["cached", "seconds"]))
    # other repair images are another repair: nothing repaired is read back
    other = run_sweep(model, config, data=data, calibration=images, repair_images=images * 0.5, cache_root=tmp_path)
    assert not other.loc[other["repair"].isin(["bias", "reconstruct"]), "cached"].any()


def test_the_plan_costs_a_repaired_row_more_than_a_plain_one(tmp_path):
    model = small_model()
    config = SweepConfig(taus=(0.0, 0.3), baselines=(), repair_levels=("reconstruct",), repair_images=64)
    costs = sweep.sweep_plan(model, config, data=self_labelled(model), calibration=calibration(),
                             repair_images=calibration(), cache_root=tmp_path)
    labels = [row.label() for row in sweep.plan(config, True)]
    by_label = dict(zip(labels, costs))
    assert by_label["boundary τ=0.3 + reconstruction"] == 120 + sweep.REPAIR_COST_PER_IMAGE["reconstruct"] * 64
    assert by_label["boundary τ=0 + reconstruction"] > 0  # a repaired τ = 0 is not the dense model
    assert by_label["boundary τ=0"] == 0


def test_unknown_repair_level_is_refused():
    with pytest.raises(ValueError, match="unknown repair level"):
        SweepConfig(repair_levels=("bn",))
