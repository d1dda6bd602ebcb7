"""core.measure.repair: BN recalibration, bias correction and layer-wise reconstruction without retraining."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from core.measure import accuracy as core_accuracy
from core.measure.baselines import magnitude_baseline
from core.measure.calibration import Lockstep, TraceError
from core.measure.repair import (
    METHODS,
    QuantizedLayer,
    RepairCancelled,
    RepairConfig,
    bit_widths,
    estimate_seconds,
    masks_from_zeros,
    repair,
)
from core.measure.repair.iterative import cheaper_than_factorising, masked_cg
from core.measure.repair.solver import add_gram, solve
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.method.quantization import FLOAT_PASSTHROUGH_BITS, q_max
from core.workloads import data as core_data
from core.workloads.data import CifarSplit
from core.workloads.models import build, load_pretrained
from tests.conftest import TinyNet, same_state, state_fingerprint

needs_data = pytest.mark.skipif(not (core_data.DEFAULT_JPEG_DIR / "SHA256SUMS").is_file(),
                                reason=f"CIFAR-10 JPEG copy not found at {core_data.DEFAULT_JPEG_DIR}")


class DeepNet(nn.Module):
    """conv(bias) → BN → ReLU → conv(no bias) → BN → ReLU → pool → Linear → ReLU → Linear (every correction site)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc1 = nn.Linear(12 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def deep_net(seed: int = 0) -> DeepNet:
    """Random weights; BatchNorm statistics those of the (smooth random) images, as in a trained net."""
    torch.manual_seed(seed)
    net = DeepNet().eval()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return core_accuracy.bn_recalibrate(net, images(512, seed=100 + seed))


def images(n: int, seed: int = 1, shape=(3, 16, 16)) -> torch.Tensor:
    """Smooth random images (neighbouring pixels correlate, as in photographs) plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((n, shape[0], shape[1] // 4, shape[2] // 4), generator=generator)
    smooth = nn.functional.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    return smooth + 0.1 * torch.randn((n,) + shape, generator=generator)


FAST = dict(n_images=64, n_holdout=32, batch_size=32)


@pytest.fixture
def pair():
    dense = deep_net()
    result = Engine(dense).apply(CompressionConfig(tau=0.3))
    return dense, result


# ---------------------------------------------------------------- the config

@pytest.mark.parametrize("kwargs, error, text", [
    (dict(method="retrain"), ValueError, "one of none, bn, bias, reconstruct"),
    (dict(n_images=0), ValueError, "n_images must be ≥ 1"),
    (dict(n_images=1.5), TypeError, "n_images must be a whole number"),
    (dict(n_holdout=-1), ValueError, "n_holdout must be ≥ 0"),
    (dict(batch_size=True), TypeError, "batch_size must be a whole number"),
    (dict(ridge=0), ValueError, "ridge must be a finite number > 0"),
    (dict(ridge=float("nan")), ValueError, "ridge"),
    (dict(ridge="1e-3"), TypeError, "ridge must be a number"),
    (dict(positions=-2), ValueError, "positions must be ≥ 0"),
])
def test_config_is_validated(kwargs, error, text):
    with pytest.raises(error, match=text):
        RepairConfig(**kwargs)


def test_config_defaults_and_frozen():
    config = RepairConfig()
    assert (config.method, config.n_images) == ("reconstruct", 512)
    assert [RepairConfig(m).level for m in METHODS] == [0, 1, 2, 3]
    with pytest.raises(Exception):
        config.method = "bn"


# ---------------------------------------------------------------- non-destructive, bit for bit, masks

@pytest.mark.parametrize("method", METHODS)
def test_repair_is_non_destructive_and_keeps_the_mask(pair, method):
    dense, result = pair
    engine_weights = {name: w.clone() for name, w in result.weights.items()}
    pruned = result.model
    before_dense, before_pruned = state_fingerprint(dense), state_fingerprint(pruned)
    masks = masks_from_zeros(pruned)
    out = repair(dense, pruned, images(96), RepairConfig(method, **FAST))
    assert out.model is not pruned and out.model is not dense
    assert same_state(dense, before_dense) and same_state(pruned, before_pruned)
    assert all(torch.equal(result.weights[n], w) for n, w in engine_weights.items())  # the engine's snapshot
    assert all(torch.equal(result._engine.original_weight(n), dense.get_submodule(n).weight) for n in masks)
    for name, mask in masks.items():
        weight = out.model.get_submodule(name).weight
        assert bool((weight[~mask] == 0).all()), f"{method}: a pruned weight of {name} came back"
    assert out.method == method and out.n_images == 64 and out.n_holdout == 32
    assert list(out.errors["name"]) == list(masks)
    assert not out.model.training


def test_none_is_bit_identical(pair):
    dense, result = pair
    out = repair(dense, result.model, images(96), RepairConfig("none", **FAST))
    assert out.changed == ()
    state = out.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in result.model.state_dict().items())
    assert out.errors["err_before"].notna().all() and (out.errors["err_before"] == out.errors["err_after"]).all()


def test_changed_names_what_each_method_touches(pair):
    dense, result = pair
    bn = repair(dense, result.model, images(96), RepairConfig("bn", **FAST)).changed
    assert {"bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"} <= set(bn)
    assert not any(name.endswith(("weight", ".bias")) for name in bn)
    bias = set(repair(dense, result.model, images(96), RepairConfig("bias", **FAST)).changed)
    assert {"bn1.bias", "bn2.bias", "fc1.bias", "fc2.bias"} <= bias
    assert not any(name.endswith("weight") for name in bias) and "conv1.bias" not in bias  # conv1 feeds bn1
    rec = set(repair(dense, result.model, images(96), RepairConfig("reconstruct", **FAST)).changed)
    assert {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "bn1.bias"} <= rec


# ---------------------------------------------------------------- bias correction

def channel_means(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: out.__setitem__(n, o.double().mean([d for d in range(o.ndim) if d != 1])))
        for n in names]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("method", ["bias", "reconstruct"])
def test_bias_correction_restores_the_dense_means_on_the_calibration_set(pair, method):
    dense, result = pair
    x = images(64)
    out = repair(dense, result.model, x, RepairConfig(method, n_images=64, n_holdout=0, batch_size=16))
    sites = ["bn1", "bn2", "fc1", "fc2"]  # conv1, conv2 feed BatchNorms: their mean is restored there
    want, got = channel_means(dense, x, sites), channel_means(out.model, x, sites)
    before = channel_means(result.model, x, sites)
    assert max(float((before[s] - want[s]).abs().max()) for s in sites) > 1e-2  # there was something to restore
    for site in sites:
        torch.testing.assert_close(got[site], want[site], atol=2e-6, rtol=1e-5)
    assert "mean restored at bn1" in out.errors.set_index("name").loc["conv1", "action"]
    assert "mean restored (bias)" in out.errors.set_index("name").loc["fc2", "action"]


@pytest.mark.parametrize("method", ["bias", "reconstruct"])
def test_batchnorm_statistics_are_those_of_the_repaired_activations(pair, method):
    """In the layer-by-layer pass each BatchNorm is re-estimated on what the repaired model feeds it."""
    dense, result = pair
    x = images(64)
    out = repair(dense, result.model, x, RepairConfig(method, n_images=64, n_holdout=0, batch_size=16)).model
    seen = {}
    hooks = [out.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach()))
             for n in ("bn1", "bn2")]
    with torch.no_grad():
        out(x)
    for h in hooks:
        h.remove()
    for name, z in seen.items():
        bn = out.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, z.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.running_var, z.var((0, 2, 3)), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- reconstruction

def test_solve_matches_a_direct_masked_ridge_solve():
    torch.manual_seed(0)
    x = torch.randn(300, 7, dtype=torch.float64)
    x = torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], 1)  # an intercept column
    y = torch.randn(300, 5, dtype=torch.float64)
    gram, cross = x.T @ x / 300, x.T @ y / 300
    support = torch.rand(5, 8) < 0.6
    support[:, -1] = True
    support[0] = True  # a full row: solved through the shared factorisation
    support[1, :-1] = False  # only the intercept
    lam = torch.full((8,), 0.05, dtype=torch.float64)
    lam[-1] = 0
    weights, scales = solve(gram, cross, support, lam, None)
    assert scales is None
    for c in range(5):
        s = support[c].nonzero().flatten()
        a = gram[s][:, s] + torch.diag(lam[s])
        expected = torch.zeros(8, dtype=torch.float64)
        expected[s] = torch.linalg.solve(a, cross[s, c])
        torch.testing.assert_close(weights[c], expected, atol=1e-10, rtol=1e-9)


def _masked_exact(gram, cross, support, lam):
    out = torch.zeros(support.shape, dtype=torch.float64)
    for c in range(len(support)):
        s = support[c].nonzero().flatten()
        out[c, s] = torch.linalg.solve(gram[s][:, s] + torch.diag(lam[s]), cross[s, c])
    return out


def _objective(w, gram, cross, lam):
    """Σ_c ½ w_cᵀ(G + Λ)w_c − c_cᵀw_c: the quantity the solves minimise."""
    a = gram + torch.diag(lam)
    return float(0.5 * ((w @ a) * w).sum() - (w * cross.T).sum())


def test_masked_cg_gets_999_thousandths_of_the_exact_solves_drop_and_stays_on_the_support():
    torch.manual_seed(3)
    x = torch.randn(2000, 40, dtype=torch.float64) @ (torch.eye(40, dtype=torch.float64)
                                                     + 0.3 * torch.randn(40, 40, dtype=torch.float64))
    gram, cross = x.T @ x / 2000, x.T @ torch.randn(2000, 12, dtype=torch.float64) / 2000
    support = torch.rand(12, 40) < 0.7
    lam = torch.full((40,), 1e-3 * float(gram.diagonal().mean()), dtype=torch.float64)
    start = torch.randn(12, 40, dtype=torch.float64)
    exact = _masked_exact(gram, cross, support, lam)
    regularised = gram + torch.diag(lam)
    solved = masked_cg(regularised, cross.T, support, start)
    assert bool((solved[~support] == 0).all())
    masked_start = start * support
    gained = _objective(masked_start, gram, cross, lam) - _objective(solved, gram, cross, lam)
    possible = _objective(masked_start, gram, cross, lam) - _objective(exact, gram, cross, lam)
    assert gained / possible > 0.999  # of the drop in the objective the exact solves reach


def test_solve_chooses_the_iterative_path_only_for_wide_layers_that_keep_much():
    assert cheaper_than_factorising(torch.full((512,), 3000), 4608)  # ResNet-18's layer4 at τ = 0.05
    assert cheaper_than_factorising(torch.full((512,), 1290), 4608)  # … at τ = 0.1 (28 % kept)
    assert not cheaper_than_factorising(torch.full((512,), 400), 4608)  # 9 % kept: the exact solves
    assert not cheaper_than_factorising(torch.full((64,), 400), 500)  # a narrow layer: always exact
    assert not cheaper_than_factorising(torch.zeros(0), 4608)


def test_solve_with_a_start_on_a_wide_layer_is_close_to_the_exact_solves():
    torch.manual_seed(4)
    width, n_out = 600, 64
    x = torch.randn(3000, width, dtype=torch.float64)
    gram, cross = x.T @ x / 3000, x.T @ torch.randn(3000, n_out, dtype=torch.float64) / 3000
    support = torch.rand(n_out, width) < 0.9
    lam = torch.full((width,), 1e-3, dtype=torch.float64)
    assert cheaper_than_factorising(support.sum(1), width)
    exact, _ = solve(gram, cross, support, lam, None)
    approx, _ = solve(gram, cross, support, lam, None, start=torch.zeros(n_out, width, dtype=torch.float64))
    assert bool((approx[~support] == 0).all())
    zero = torch.zeros_like(exact)
    gained = _objective(zero, gram, cross, lam) - _objective(approx, gram, cross, lam)
    possible = _objective(zero, gram, cross, lam) - _objective(exact, gram, cross, lam)
    assert gained / possible > 0.999


def test_gptq_matches_the_textbook_recursion():
    """Per channel: w = H⁻¹ r over its kept columns, then for each column j in order
    q_j = Q(w_j), w[j+1:] −= (w_j − q_j)/U_jj · U_j,j+1: with H⁻¹ = UᵀU."""
    torch.manual_seed(1)
    x = torch.randn(400, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    gram = x.T @ x / 400
    cross = x.T @ torch.randn(400, 4, dtype=torch.float64) / 400
    support = torch.rand(4, 6) < 0.7
    support[:, 0] = True
    bits = torch.where(support, torch.where(torch.rand(4, 6) < 0.5, 2, 8), 0).to(torch.int8)
    lam = torch.full((6,), 0.01, dtype=torch.float64)
    weights, scales = solve(gram, cross, support, lam, bits)
    assert set(scales) == {2, 8}
    for c in range(4):
        s = support[c].nonzero().flatten()
        h = gram[s][:, s] + torch.diag(lam[s])
        w = torch.linalg.solve(h, cross[s, c])
        u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
        step = {b: float(torch.tensor(float(w.abs().max()), dtype=torch.float32) / q_max(b)) for b in (2, 8)}
        for j in range(len(s)):
            b = int(bits[c, s[j]])
            q = torch.clamp(torch.round(w[j] / step[b]), -q_max(b), q_max(b)) * step[b]
            w[j + 1:] -= (w[j] - q) / u[j, j] * u[j, j + 1:]
            w[j] = q
        torch.testing.assert_close(weights[c, s], w, atol=1e-6, rtol=1e-6)
        assert bool((weights[c, ~support[c]] == 0).all())


def test_wide_gram_blocks_equal_the_plain_product():
    xs = torch.randn(40, 2 * 1024 + 77)
    gram = torch.zeros(xs.shape[1], xs.shape[1], dtype=torch.float64)
    add_gram(gram, xs)
    gram = torch.triu(gram) + torch.triu(gram, 1).T
    torch.testing.assert_close(gram, (xs.T @ xs).double(), atol=1e-4, rtol=1e-5)


@needs_data
@pytest.mark.slow
def test_reconstruction_lowers_every_layers_error_on_held_out_images():
    dense = load_pretrained("resnet20")
    pruned = Engine(dense).apply(CompressionConfig(tau=0.25)).model
    config = RepairConfig("reconstruct", n_images=128, n_holdout=64, batch_size=64)
    out = repair(dense, pruned, None, config)  # training images, drawn by the repair
    errors = out.errors
    assert len(errors) == 20 and errors["action"].str.startswith("reconstructed").all()
    assert (errors["err_after"] < errors["err_before"]).all(), errors[["name", "err_before", "err_after"]]
    assert errors["err_after"].iloc[-1] < 0.5 * errors["err_before"].iloc[-1]  # the logits


def test_reconstruction_lowers_layer_errors_on_a_global_magnitude_mask():
    dense = deep_net(3)
    n_prune = int(0.7 * sum(m.weight.numel() for m in (dense.conv1, dense.conv2, dense.fc1, dense.fc2)))
    pruned, _ = magnitude_baseline(dense, "global_magnitude", n_prune)
    out = repair(dense, pruned, images(256), RepairConfig("reconstruct", n_images=192, n_holdout=64, batch_size=64))
    assert (out.errors["err_after"] < out.errors["err_before"]).all()


def test_explicit_masks_are_respected_and_checked(pair):
    dense, result = pair
    masks = masks_from_zeros(result.model)
    tighter = {name: m & (torch.rand(m.shape, generator=torch.Generator().manual_seed(0)) < 0.5)
               for name, m in masks.items()}
    with pytest.raises(ValueError, match="nonzero weights outside its mask"):
        repair(dense, result.model, images(40), RepairConfig("reconstruct", **FAST), masks=tighter)
    wider = {name: torch.ones_like(m) for name, m in masks.items()}  # may regrow pruned weights
    out = repair(dense, result.model, images(96), RepairConfig("reconstruct", **FAST), masks=wider)
    assert bool((out.model.fc1.weight[~masks["fc1"]] != 0).any())
    with pytest.raises(ValueError, match="not a Conv/Linear layer"):
        repair(dense, result.model, images(40), RepairConfig("bn", **FAST), masks={"bn1": masks["fc1"]})


def test_mismatched_models_are_refused(pair):
    dense, result = pair
    with pytest.raises(ValueError, match="same architecture|differ"):
        repair(TinyNet(), result.model, images(8), RepairConfig("bn", **FAST))
    with pytest.raises(TypeError, match="RepairConfig"):
        repair(dense, result.model, images(8), "bn")


# ---------------------------------------------------------------- quantization

@pytest.mark.parametrize("b_low, b_high", [(4, 8), (2, 4), (4, 16)])
def test_quantized_reconstruction_is_representable_at_the_assigned_bits(b_low, b_high):
    dense = deep_net(1)
    engine = Engine(dense, palette=(b_low, b_high))
    result = engine.apply(CompressionConfig(tau=0.15, theta=0.4, b_low=b_low, b_high=b_high))
    bits = bit_widths(engine, result)
    out = repair(dense, result.model, images(256), RepairConfig("reconstruct", n_images=192, n_holdout=64),
                 quant=bits)
    assert set(out.quantized) == set(bits)
    for name, assigned in bits.items():
        record: QuantizedLayer = out.quantized[name]
        weight = out.model.get_submodule(name).weight.detach()
        assert torch.equal(record.bits, assigned)
        assert bool((weight[assigned == 0] == 0).all())
        rebuilt = torch.zeros_like(weight)
        for b, scales in record.scales.items():
            at = assigned == b
            codes = record.codes[at].to(torch.int32)
            assert int(codes.abs().max()) <= q_max(b)
            scale = scales.view(-1, *[1] * (weight.ndim - 1)).expand_as(weight)[at]
            rebuilt[at] = codes.to(torch.float32) * scale  # the engine's decode
            torch.testing.assert_close(weight[at] / scale, torch.round(weight[at] / scale), atol=1e-4, rtol=0)
        half = assigned == FLOAT_PASSTHROUGH_BITS
        rebuilt[half] = weight[half].half().float()
        assert torch.equal(rebuilt, weight), name
    assert (out.errors["err_after"] < out.errors["err_before"]).all()


def test_bit_widths_follow_the_engines_ranks():
    dense = deep_net(2)
    engine = Engine(dense)
    result = engine.apply(CompressionConfig(tau=0.2, theta=0.5, b_low=2, b_high=8))
    bits = bit_widths(engine, result)
    for row in result.stats.itertuples():
        b = bits[row.name]
        assert int((b > 0).sum()) == row.kept and int((b == 8).sum()) == row.n_high
        w = dense.get_submodule(row.name).weight.detach().abs()
        assert float(w[b == 0].max()) <= float(w[b > 0].min())
    with pytest.raises(ValueError, match="not quantized"):
        bit_widths(engine, engine.apply(CompressionConfig(tau=0.2)))


def test_quant_and_masks_must_agree(pair):
    dense, result = pair
    bits = {name: m.to(torch.int8) * 4 for name, m in masks_from_zeros(result.model).items()}
    other = {name: torch.zeros_like(m, dtype=torch.bool) for name, m in masks_from_zeros(result.model).items()}
    with pytest.raises(ValueError, match="disagree"):
        repair(dense, result.model, images(40), RepairConfig("bn", **FAST), masks=other, quant=bits)
    bits["fc1"] = bits["fc1"] * 3  # 12 bits
    with pytest.raises(ValueError, match="palette"):
        repair(dense, result.model, images(40), RepairConfig("bn", **FAST), quant=bits)


# ---------------------------------------------------------------- calibration data

def test_never_reads_the_test_split(monkeypatch, pair):
    dense, result = pair
    fake = torch.randint(0, 256, (600, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reads = []

    def load(split="train", *args, **kwargs):
        reads.append(split)
        if split != "train":
            raise AssertionError(f"the repair read the {split} split")
        return CifarSplit(fake, torch.zeros(600, dtype=torch.int64), "train", "fake")

    monkeypatch.setattr(core_accuracy, "load_cifar10", load)
    monkeypatch.setattr(core_data, "load_cifar10", load)

    def sample(split, index, root=None):  # the chosen images of a split (core.workloads.data.load_jpeg_sample)
        full = load(split)
        index = index % len(full.labels)  # the fake split is smaller than CIFAR-10's
        return CifarSplit(full.images[index], full.labels[index], split, "fake")

    monkeypatch.setattr(core_accuracy, "load_jpeg_sample", sample)
    monkeypatch.setattr(core_data, "load_jpeg_sample", sample)
    for method in METHODS:
        repair(dense, result.model, None, RepairConfig(method, **FAST))
    assert reads and set(reads) == {"train"}


def test_given_images_are_split_into_fit_and_held_out(pair):
    dense, result = pair
    out = repair(dense, result.model, images(100), RepairConfig("bias", n_images=80, n_holdout=50))
    assert (out.n_images, out.n_holdout) == (80, 20)
    out = repair(dense, result.model, images(50), RepairConfig("bias", n_images=80, n_holdout=50))
    assert (out.n_images, out.n_holdout) == (50, 0) and out.errors["err_after"].isna().all()
    out = repair(dense, result.model, images(50), RepairConfig("bias", n_images=80), holdout=images(10, seed=5))
    assert out.n_holdout == 10 and out.errors["err_after"].notna().all()


# ---------------------------------------------------------------- progress, cancel, estimate, tracing

def test_progress_reports_every_layer_in_forward_order(pair):
    dense, result = pair
    calls = []
    repair(dense, result.model, images(96), RepairConfig("reconstruct", **FAST),
           on_progress=lambda done, total, name: calls.append((done, total, name)))
    assert calls == [(1, 4, "conv1"), (2, 4, "conv2"), (3, 4, "fc1"), (4, 4, "fc2")]


def test_cancel_raises_and_leaves_everything_alone(pair):
    dense, result = pair
    before = state_fingerprint(result.model)
    event = threading.Event()

    def progress(done, total, name):
        if done == 2:
            event.set()

    with pytest.raises(RepairCancelled, match="after 2 of 4 layers") as caught:
        repair(dense, result.model, images(96), RepairConfig("reconstruct", **FAST), on_progress=progress,
               cancel=event)
    assert (caught.value.done, caught.value.total) == (2, 4)
    assert same_state(result.model, before)
    with pytest.raises(RepairCancelled):
        repair(dense, result.model, images(96), RepairConfig("bn", **FAST), cancel=lambda: True)


def test_cancel_during_a_layers_reconstruction_stops_inside_that_layer(pair):
    """A cancel raised while layer 2's systems are being built is honoured before layer 2 ends."""
    dense, result = pair
    before = state_fingerprint(result.model)
    calls, done_layers = [0], []

    def cancel():
        calls[0] += 1
        return len(done_layers) == 1 and calls[0] > 3  # set once the second layer has started its batches

    with pytest.raises(RepairCancelled, match="after 1 of 4 layers"):
        repair(dense, result.model, images(96), RepairConfig("reconstruct", **{**FAST, "batch_size": 16}),
               on_progress=lambda done, total, name: done_layers.append(name), cancel=cancel)
    assert done_layers == ["conv1"] and same_state(result.model, before)


def test_estimate_is_positive_and_grows_with_the_work(pair):
    dense, result = pair
    small = estimate_seconds(result.model, RepairConfig("reconstruct", n_images=64), input_shape=(3, 16, 16))
    large = estimate_seconds(result.model, RepairConfig("reconstruct", n_images=1024), input_shape=(3, 16, 16))
    none = estimate_seconds(result.model, RepairConfig("none", n_holdout=0), input_shape=(3, 16, 16))
    assert 0 < small < large and none == 0


class Untraceable(DeepNet):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 1
        return super().forward(x)


def test_untraceable_models_get_bn_but_a_clear_error_beyond():
    dense = Untraceable().eval()
    torch.manual_seed(0)
    pruned = Engine(dense).apply(CompressionConfig(tau=0.3)).model
    repair(dense, pruned, images(40), RepairConfig("bn", **FAST))
    with pytest.raises(TraceError, match="torch.fx"):
        repair(dense, pruned, images(40), RepairConfig("bias", **FAST))


@pytest.mark.parametrize("arch", ["cifar_cnn", "mlp"])
def test_registry_architectures_run_in_lockstep(arch):
    torch.manual_seed(0)
    dense = build(arch).eval()
    x = images(8, shape=(3, 32, 32)) if arch == "cifar_cnn" else torch.randn(8, 128)
    seen = []
    Lockstep(dense, build(arch).eval(), [x[:4], x[4:]]).run(
        {"classifier" if arch == "cifar_cnn" else "10": lambda step: seen.append(len(step.inputs))})
    assert seen == [2]
    pruned = Engine(dense).apply(CompressionConfig(tau=0.2)).model
    out = repair(dense, pruned, x.repeat(4, *[1] * (x.ndim - 1)), RepairConfig("reconstruct", n_images=32, n_holdout=0))
    assert out.errors["action"].str.startswith("reconstructed").all()


# ---------------------------------------------------------------- an engine result, as the front ends repair it

def test_levels_and_repair_setting_use_the_result_s_bit_widths(pair):
    from core.measure.repair import estimate_setting_seconds, levels, repair_setting

    assert levels("none") == ("none",) and levels("bias") == ("none", "bn", "bias") and levels("reconstruct") == METHODS
    with pytest.raises(ValueError, match="one of none, bn, bias, reconstruct"):
        levels("retrain")
    dense, _ = pair
    engine = Engine(dense)
    result = engine.apply(CompressionConfig(tau=0.3, theta=0.4, b_low=4, b_high=8))
    config = RepairConfig("reconstruct", **FAST)
    fixed = repair_setting(dense, engine, result, images(96), config)
    direct = repair(dense, result.model, images(96), config, quant=bit_widths(engine, result))
    assert set(fixed.quantized) == set(direct.quantized) == {"conv1", "conv2", "fc1", "fc2"}
    assert same_state(fixed.model, state_fingerprint(direct.model))
    assert estimate_setting_seconds(result, config) > 0
    assert estimate_setting_seconds(result, RepairConfig("none", n_holdout=0)) == 0
