import math

import pytest
import torch
from torch import nn

import core.deploy.runtime as runtime
from core.common.timing import Timing
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads.models import build
from core.deploy.kernels import Int8Linear, SparseConv2d, SparseLinear, make_kernel
from core.deploy.runtime import build_runtime
from tests.conftest import same_state, state_fingerprint
from tests.deploy.conftest import close

# ---------------------------------------------------------------- build_runtime

def small_result(arch: str, config: CompressionConfig, **kwargs):
    torch.manual_seed(0)
    model = build(arch, **kwargs)
    return model, Engine(model).apply(config)


@pytest.mark.parametrize("arch, kwargs, shape", [
    ("mlp", dict(layers=3, in_dim=32, hidden=48, out_dim=10), (4, 32)),
    ("resnet20", {}, (2, 3, 8, 8)),  # any size ≥ 4×4 runs: global pooling
    ("cifar_cnn", dict(width=8), (2, 3, 16, 16)),
])
@pytest.mark.parametrize("config", [CompressionConfig(tau=0.4), CompressionConfig(tau=0.3, theta=0.2, b_low=4, b_high=8)])
def test_every_path_matches_dense(arch, kwargs, shape, config):
    model, result = small_result(arch, config, **kwargs)
    before = state_fingerprint(result.model)
    x = torch.randn(*shape)
    with torch.no_grad():
        reference = result.model(x)
    for path, where_faster in [("dense", True), ("sparse", False), ("int8", False), ("sparse", True), ("auto", True)]:
        module = build_runtime(result, path, batch_size=shape[0], example_input=x, where_faster=where_faster,
                               budget_s=0.0, min_rounds=2)
        with torch.no_grad():
            assert close(module(x), reference), (path, where_faster)
        report = module.runtime_report
        assert len(report) == len(result.stats)
        if path == "sparse" and not where_faster:
            assert (report["chosen"] == "sparse").all()  # every layer here has a sparse kernel
    assert same_state(result.model, before)
    assert not any(isinstance(m, (SparseLinear, SparseConv2d, Int8Linear)) for m in result.model.modules())


def test_int8_path_on_a_single_chunk_result():
    # τ ≥ θ: every kept weight is in the 8-bit chunk, so every Linear is exactly int8
    model, result = small_result("mlp", CompressionConfig(tau=0.2, theta=0.1, b_low=4, b_high=8),
                                 layers=3, in_dim=32, hidden=48, out_dim=10)
    module = build_runtime(result, "int8", where_faster=False)
    assert (module.runtime_report["chosen"] == "int8").all()
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert close(module(x), result.model(x))
    mixed = Engine(model).apply(CompressionConfig(tau=0.1, theta=0.4, b_low=4, b_high=8))
    report = build_runtime(mixed, "int8", where_faster=False).runtime_report
    assert (report["chosen"] == "dense").all() and report["why_not"].str.contains("int8").all()


def fake_timer(table: dict[str, float], calls: list):
    def time_interleaved(functions, device, **kwargs):
        calls.append(sorted(functions))
        for fn in functions.values():
            fn()  # the kernel must run
        return {k: Timing(samples_s=(table[k.split("_")[0]] + (0.5 if k == "int8_fused" else 0.0),)) for k in functions}
    return time_interleaved


@pytest.mark.parametrize("times, expected", [
    ({"dense": 3.0, "sparse": 1.0, "int8": 2.0}, "sparse"),
    ({"dense": 1.0, "sparse": 3.0, "int8": 2.0}, "dense"),
    ({"dense": 3.0, "sparse": 2.0, "int8": 1.0}, "int8"),
])
def test_auto_picks_the_measured_fastest(times, expected, monkeypatch):
    runtime.clear_timing_cache()
    calls = []
    monkeypatch.setattr(runtime, "time_interleaved", fake_timer(times, calls))
    _, result = small_result("mlp", CompressionConfig(tau=0.2, theta=0.1), layers=2, in_dim=16, hidden=8, out_dim=4)
    module = build_runtime(result, "auto", batch_size=4, example_input=torch.randn(1, 16))
    assert (module.runtime_report["chosen"] == expected).all()
    assert calls and all({k.split("_")[0] for k in c} == {"dense", "int8", "sparse"} for c in calls)
    assert (module.runtime_report["int8_impl"] == "dequant").all()  # the faster int8 implementation
    sparse_only = build_runtime(result, "sparse", batch_size=8, example_input=torch.randn(1, 16))
    assert (sparse_only.runtime_report["chosen"] == ("sparse" if times["sparse"] < times["dense"] else "dense")).all()
    runtime.clear_timing_cache()


def test_auto_never_picks_a_path_it_measured_slower():
    _, result = small_result("resnet20", CompressionConfig(tau=0.5))
    x = torch.randn(2, 3, 8, 8)
    module = build_runtime(result, "auto", batch_size=2, example_input=x, budget_s=0.0, min_rounds=3)
    report = module.runtime_report
    for _, row in report.iterrows():
        measured = {k: row[f"{k}_ms"] for k in runtime.KERNELS if not math.isnan(row[f"{k}_ms"])}
        assert measured and row["chosen"] in measured
        assert measured[row["chosen"]] == min(measured.values())
        assert row["speedup"] == pytest.approx(measured["dense"] / measured[row["chosen"]])


def test_measurements_are_cached(monkeypatch, tmp_path):
    runtime.clear_timing_cache()
    calls = []
    monkeypatch.setattr(runtime, "time_interleaved", fake_timer({"dense": 1.0, "sparse": 2.0, "int8": 3.0}, calls))
    _, result = small_result("mlp", CompressionConfig(tau=0.3), layers=2, in_dim=16, hidden=8, out_dim=4)
    cache = tmp_path / "timings.json"
    build_runtime(result, "auto", batch_size=4, example_input=torch.randn(4, 16), cache_file=cache)
    first = len(calls)
    assert first == 2
    build_runtime(result, "auto", batch_size=4, example_input=torch.randn(4, 16), cache_file=cache)
    assert len(calls) == first  # same machine, batch, layers: measured once
    build_runtime(result, "auto", batch_size=8, example_input=torch.randn(4, 16), cache_file=cache)
    assert len(calls) == 2 * first  # another batch size is another measurement
    runtime.clear_timing_cache()
    build_runtime(result, "auto", batch_size=4, example_input=torch.randn(4, 16), cache_file=cache)
    assert len(calls) == 2 * first  # read back from the cache file
    runtime.clear_timing_cache()


def test_unsupported_layers_stay_dense():
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    conv1d = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6, 3))
    for model, x, bad, why in [(grouped, torch.randn(2, 4, 6, 6), "0", "grouped"),
                               (conv1d, torch.randn(2, 2, 8), "0", "only Conv2d")]:
        module = build_runtime(model, "sparse", where_faster=False)
        report = module.runtime_report.set_index("name")
        assert report.loc[bad, "chosen"] == "dense" and why in report.loc[bad, "why_not"]
        assert report.loc["2", "chosen"] == "sparse"
        with torch.no_grad():
            assert close(module(x), model(x))


def test_plain_module_and_errors(tiny_net):
    before = state_fingerprint(tiny_net)
    x = torch.randn(3, 3, 8, 8)
    module = build_runtime(tiny_net, "auto", batch_size=3, example_input=x, budget_s=0.0, min_rounds=2)
    with torch.no_grad():
        assert close(module(x), tiny_net(x))
    assert same_state(tiny_net, before) and isinstance(tiny_net.fc, nn.Linear)
    with pytest.raises(ValueError, match="path"):
        build_runtime(tiny_net, "fast")
    with pytest.raises(ValueError, match="example_input"):
        build_runtime(tiny_net, "auto")
    with pytest.raises(ValueError, match="batch_size"):
        build_runtime(tiny_net, "auto", batch_size=0, example_input=x)
    with pytest.raises(TypeError):
        build_runtime("not a model")
    with pytest.raises(ValueError, match="kernel"):
        make_kernel(tiny_net.fc, "fp4")


def test_compare_paths_reports_every_path(tiny_net):
    table = runtime.compare_paths(tiny_net, torch.randn(2, 3, 8, 8), batch_size=2, budget_s=0.0)
    assert list(table["path"]) == ["dense", "sparse", "int8", "auto"]
    assert (table["ms"] > 0).all() and table.loc[0, "speedup"] == 1.0
