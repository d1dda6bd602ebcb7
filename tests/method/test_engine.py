import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.method.pruning import boundary_mask, boundary_prune
from core.method.quantization import dequantize
from tests.conftest import TinyNet, same_state, state_fingerprint


def reference_weight(w: torch.Tensor, config: CompressionConfig, tau: float | None = None) -> torch.Tensor:
    """The method straight from the formulas, without the engine's ranks and buffers."""
    tau = config.tau if tau is None else tau
    keep = boundary_mask(w, tau)
    if config.theta is None:
        return torch.where(keep, w, torch.zeros((), dtype=w.dtype))
    magnitude = w.abs()
    theta = magnitude.max() * config.theta if config.theta_mode == "relative" else torch.tensor(config.theta)
    high = magnitude >= theta.to(w.dtype)
    value = torch.where(high, dequantize(w, config.b_high), dequantize(w, config.b_low))
    return torch.where(keep, value, torch.zeros((), dtype=w.dtype))


configs = st.builds(
    CompressionConfig,
    tau=st.floats(0, 1),
    theta=st.one_of(st.none(), st.floats(0, 1.2)),
    theta_mode=st.sampled_from(["relative", "absolute"]),
    b_low=st.sampled_from([2, 3, 4]),
    b_high=st.sampled_from([4, 8]),
    include_norm=st.booleans(),
)


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = TinyNet().eval()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
    return net


def test_apply_matches_formulas(tiny_net):
    engine = Engine(tiny_net)
    config = CompressionConfig(tau=0.2, theta=0.4, b_low=2, b_high=8)
    result = engine.apply(config)
    for name in ("conv", "fc"):
        w = getattr(tiny_net, name).weight.detach()
        assert torch.equal(result.weights[name], reference_weight(w, config))
        row = result.stats.set_index("name").loc[name]
        assert row["kept"] == int(boundary_mask(w, 0.2).sum())
        assert row["beta"] == pytest.approx(0.2 * float(w.abs().max()))
        assert row["n_high"] + row["n_low"] == row["kept"]
    assert set(result.stats["name"]) == {"conv", "fc"}
    assert result.retention == pytest.approx(result.stats["kept"].sum() / result.stats["numel"].sum())
    out = result.model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 5)


def test_public_interface_columns(tiny_net):
    result = Engine(tiny_net).apply(CompressionConfig(tau=0.2, theta=0.1, theta_mode="relative", b_low=4, b_high=8))
    for column in ("name", "numel", "beta", "kept", "retention", "n_high", "n_low", "switches",
                   "type", "shape", "max_abs", "theta", "fp32_bytes", "compressed_bytes"):
        assert column in result.stats.columns
    assert isinstance(result.model, nn.Module) and result.model is not tiny_net
    assert 0 < result.retention <= 1


def test_result_model_is_independent(tiny_net):
    before = state_fingerprint(tiny_net)
    engine = Engine(tiny_net)
    first = engine.apply(CompressionConfig(tau=0.5))
    first_model = first.model
    first_weights = state_fingerprint(first_model)
    engine.apply(CompressionConfig(tau=0.1, theta=0.5))
    with torch.no_grad():
        first_model.fc.weight.add_(1.0)  # mutating a result affects neither engine nor user
    again = engine.apply(CompressionConfig(tau=0.5))
    assert torch.equal(again.weights["fc"], first_weights["fc.weight"])
    assert same_state(tiny_net, before)


def test_stale_result_rebuilds_its_own_weights(tiny_net):
    engine = Engine(tiny_net)
    old = engine.apply(CompressionConfig(tau=0.3, theta=0.5, b_low=2, b_high=4))
    engine.apply(CompressionConfig(tau=0.7))
    w = tiny_net.conv.weight.detach()
    assert torch.equal(old.weights["conv"], reference_weight(w, old.config))


@settings(max_examples=40, deadline=None)
@given(st.lists(configs, min_size=1, max_size=6), st.integers(0, 5))
def test_any_sequence_then_first_again_is_bit_identical(sequence, seed):
    model = small_model(seed)
    before = state_fingerprint(model)
    engine = Engine(model)
    first = engine.apply(sequence[0])
    first_weights = {k: v.clone() for k, v in first.weights.items()}
    for config in sequence[1:]:
        result = engine.apply(config)
        for name in engine.layer_names:
            w = model.get_submodule(name).weight.detach()
            assert torch.equal(result.weights[name], reference_weight(w, config, config.tau_for(name)))
    again = engine.apply(sequence[0])
    assert all(torch.equal(again.weights[k], first_weights[k]) for k in first_weights)
    assert same_state(model, before)


@settings(max_examples=30, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.integers(0, 5))
def test_engine_retention_non_increasing(t1, t2, seed):
    engine = Engine(small_model(seed))
    lo, hi = sorted((t1, t2))
    assert engine.apply(CompressionConfig(tau=hi)).retention <= engine.apply(CompressionConfig(tau=lo)).retention


def test_tau_zero_keeps_everything(tiny_net):
    result = Engine(tiny_net).apply(CompressionConfig(tau=0.0))
    assert result.retention == 1.0
    assert all(torch.equal(result.weights[n], tiny_net.get_submodule(n).weight) for n in ("conv", "fc"))


def test_norm_layers_only_with_paper_option(tiny_net):
    engine = Engine(tiny_net)
    default = engine.apply(CompressionConfig(tau=0.9))
    assert "bn" not in set(default.stats["name"])
    assert torch.equal(default.weights["bn"], tiny_net.bn.weight)
    paper = engine.apply(CompressionConfig(tau=0.9, include_norm=True))
    assert "bn" in set(paper.stats["name"])
    assert (paper.weights["bn"] == 0).any()
    assert torch.equal(paper.weights["bn"], torch.where(boundary_mask(tiny_net.bn.weight, 0.9), tiny_net.bn.weight, 0.0))


def test_switch_accounting(tiny_net):
    engine = Engine(tiny_net)
    engine.apply(CompressionConfig(tau=0.1, theta=0.5, b_low=4, b_high=8))
    result = engine.apply(CompressionConfig(tau=0.1, theta=0.3, b_low=4, b_high=8))
    magnitude = tiny_net.fc.weight.detach().abs()
    top = magnitude.max()
    kept = magnitude >= top * 0.1
    moved = kept & (magnitude >= top * 0.3) & (magnitude < top * 0.5)
    row = result.stats.set_index("name").loc["fc"]
    assert row["switches"] == int(moved.sum()) > 0
    assert result.switches == result.stats["switches"].sum()
    assert result.t_switch_s >= 0
    same = engine.apply(CompressionConfig(tau=0.1, theta=0.3, b_low=4, b_high=8))
    assert same.switches == 0 and same.changed == 0


def test_fraction_mode(tiny_net):
    result = Engine(tiny_net).apply(CompressionConfig(tau=0.2, theta=0.25, theta_mode="fraction"))
    for _, row in result.stats.iterrows():
        assert row["n_high"] == round(0.25 * row["kept"])


def test_per_layer_tau(tiny_net):
    result = Engine(tiny_net).apply(CompressionConfig(tau=0.1, layer_tau={"fc": 0.6}))
    rows = result.stats.set_index("name")
    assert rows.loc["fc", "tau"] == 0.6 and rows.loc["conv", "tau"] == 0.1
    assert rows.loc["fc", "kept"] == int(boundary_mask(tiny_net.fc.weight, 0.6).sum())


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(tau=1.5), ValueError, "tau"),
    (dict(tau=float("nan")), ValueError, "tau"),
    (dict(theta=-0.1), ValueError, "theta"),
    (dict(theta=float("nan")), ValueError, "theta"),
    (dict(theta=0.1, b_low=8, b_high=4), ValueError, "b_low"),
    (dict(theta=0.1, b_low=1, b_high=4), ValueError, "b_low"),
    (dict(theta=2.0, theta_mode="fraction"), ValueError, "fraction"),
    (dict(theta_mode="median"), ValueError, "theta_mode"),
    (dict(layer_tau={"fc": -1}), ValueError, "fc"),
])
def test_bad_config(kwargs, error, text):
    with pytest.raises(error, match=text):
        CompressionConfig(**kwargs)


def test_bad_inputs_to_engine(tiny_net):
    engine = Engine(tiny_net, palette=(4, 8))
    with pytest.raises(ValueError, match="palette"):
        engine.apply(CompressionConfig(theta=0.1, b_low=2, b_high=8))
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        engine.apply(CompressionConfig(layer_tau={"nope": 0.1}))
    with pytest.raises(TypeError):
        Engine("not a model")
    with pytest.raises(ValueError, match="no prunable layer"):
        Engine(nn.Sequential(nn.ReLU()))
    broken = small_model(0)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'fc' has NaN"):
        Engine(broken)


def test_all_zero_layer():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    nn.init.zeros_(model[0].weight)
    result = Engine(model).apply(CompressionConfig(tau=0.5, theta=0.5))
    assert result.retention == 1.0 and torch.equal(result.weights["0"], torch.zeros(4, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights(dtype):
    model = small_model(3).to(dtype)
    config = CompressionConfig(tau=0.2, theta=0.3, b_low=2, b_high=8)
    result = Engine(model).apply(config)
    w = model.fc.weight.detach()
    assert result.weights["fc"].dtype == dtype
    assert torch.equal(result.weights["fc"], reference_weight(w, config))


def test_compute_reduction_weights_convs_by_output_positions(tiny_net):
    engine = Engine(tiny_net, example_input=torch.randn(1, 3, 8, 8))
    result = engine.apply(CompressionConfig(tau=0.3))
    rows = result.stats.set_index("name")
    assert rows.loc["conv", "macs_per_weight"] == 64 and rows.loc["fc", "macs_per_weight"] == 1
    macs = rows["numel"] * rows["macs_per_weight"]
    expected = 1 - (rows["kept"] * rows["macs_per_weight"]).sum() / macs.sum()
    assert math.isclose(result.compute_reduction, expected)


def test_size_accounting_totals(tiny_net):
    result = Engine(tiny_net).apply(CompressionConfig(tau=0.3, theta=0.5, b_low=4, b_high=8))
    dense = sum(t.numel() * 4 for t in tiny_net.state_dict().values() if t.is_floating_point())
    dense += sum(t.numel() * t.element_size() for t in tiny_net.state_dict().values() if not t.is_floating_point())
    assert result.model_bytes_fp32 == dense
    assert result.model_bytes_compressed < dense
    prunable = result.stats["fp32_bytes"].sum()
    assert result.model_bytes_compressed == dense - prunable + result.stats["compressed_bytes"].sum()


# ---------------------------------------------------------------- shared snapshots and lent buffers

def test_engines_sharing_a_snapshot_are_independent_and_exact():
    from core.method.snapshot import WeightSnapshot

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    snapshot = WeightSnapshot(model)
    a, b = Engine.sharing(snapshot), Engine.sharing(snapshot)
    solo = Engine(model)
    ra = a.apply(CompressionConfig(tau=0.3, theta=0.5))
    rb = b.apply(CompressionConfig(tau=0.1))
    for name in a.layer_names:
        assert torch.equal(ra.weights[name], solo.apply(CompressionConfig(tau=0.3, theta=0.5)).weights[name])
        assert torch.equal(rb.weights[name], boundary_prune(model.get_submodule(name).weight.detach(), 0.1))
    assert a.chunk("0", 8) is b.chunk("0", 8)  # quantized once for both
    assert a.working_bytes() == b.working_bytes() == sum(p.numel() * 4 for n, p in model.named_parameters()
                                                        if n.endswith("weight"))


def test_lent_buffers_give_exact_results_and_survive_in_place_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    reference = Engine(model)
    engine = Engine(model, lend_buffers=True)
    settings = [CompressionConfig(tau=t, theta=th) for t, th in ((0.2, None), (0.4, 0.5), (0.1, 0.3), (0.2, None))]
    kept_results = []
    for config in settings:
        result = engine.apply(config)
        kept_results.append((config, result, {k: v.clone() for k, v in result.weights.items()}))
        expected = reference.apply(config).weights
        assert all(torch.equal(result.weights[k], expected[k]) for k in expected)
    for _, result, frozen in kept_results:  # older results keep their values after later moves
        assert all(torch.equal(result.weights[k], frozen[k]) for k in frozen)
    result = engine.apply(CompressionConfig(tau=0.3))
    with torch.no_grad():
        result.model[0].weight.mul_(0)  # a user changes the lent result in place
    after = engine.apply(CompressionConfig(tau=0.35))
    expected = reference.apply(CompressionConfig(tau=0.35)).weights
    assert all(torch.equal(after.weights[k], expected[k]) for k in expected)


# ---------------------------------------------------------------- the snapshot reads the model's own weights

@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, -0.0, 1e-3, -1e-3, 0.25, -0.25, 0.5, 1.0, -1.0, 3.0, 1e-30]),
                       min_size=1, max_size=1200),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       pick=st.integers(0, 10_000), nudge=st.sampled_from([0.0, 1e-4, -1e-4, 0.5]))
def test_count_below_is_the_number_of_weights_below_the_threshold(values, dtype, pick, nudge):
    """#{|W| < t} from the ranks (coarse table, then one stride) equals counting: ties, zeros, −0.0, every dtype."""
    from core.method.pruning import PrunableLayer
    from core.method.snapshot import RankedLayer

    module = nn.Linear(len(values), 1, bias=False).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(values, dtype=torch.float64).reshape(1, -1))
    ranked = RankedLayer(PrunableLayer("l", "Linear", module), 1.0)
    weight = module.weight.detach()
    threshold = torch.tensor(abs(values[pick % len(values)]) + nudge, dtype=torch.float64)
    expected = int((weight.abs() < threshold.to(dtype)).sum())
    assert ranked.count_below(threshold) == expected
    assert ranked.count_below(torch.tensor(float("inf"))) == len(values) and ranked.count_below(torch.tensor(0.0)) == 0


def test_the_snapshot_holds_no_copy_of_the_weights_and_refuses_a_model_changed_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    engine = Engine(model)
    order_bytes = sum(engine.rank_order(name).numel() * 4 for name in engine.layer_names)
    assert engine.snapshot.nbytes == order_bytes  # int32 rank orders only: the weights are the model's
    assert engine.apply(CompressionConfig(tau=0.3)).weights["0"].data_ptr() != model[0].weight.data_ptr()
    with torch.no_grad():
        model[0].weight.mul_(2)  # the user trains on: the engine's ranks no longer describe these weights
    with pytest.raises(RuntimeError, match="layer '0' was changed in place after the engine ranked it"):
        engine.apply(CompressionConfig(tau=0.2))
    fresh = Engine(model).apply(CompressionConfig(tau=0.2))
    assert torch.equal(fresh.weights["0"], boundary_prune(model[0].weight.detach(), 0.2))
