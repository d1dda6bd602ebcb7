"""Channel-granularity boundary pruning (core.method.channels): exact slicing, coupled groups, the rule's contract."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core.method.channels import ChannelConfig, ChannelError, ChannelPruner
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads.models import build
from tests.conftest import SmallCNN
from tests.method.channel_nets import res_mini, spread_bn

X8 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def mini() -> tuple[nn.Module, ChannelPruner]:
    model = res_mini()
    return model, ChannelPruner(model, X8[:1])


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.6, 0.9, 1.0])
def test_smaller_model_equals_dense_with_removed_channels_zeroed(mini, tau):
    _, pruner = mini
    result = pruner.apply(ChannelConfig(tau))
    with torch.no_grad():
        torch.testing.assert_close(result.model(X8), pruner.zeroed(result)(X8), atol=1e-5, rtol=1e-5)
    assert result.model(X8).shape == (4, 10)


def test_coupled_channels_go_together(mini):
    _, pruner = mini
    result = pruner.apply(ChannelConfig(0.6))
    # the residual stream: stem, a2 (block output) and their BatchNorms keep the same channels
    stream = result.kept_out["stem"]
    for name in ("a2", "stem_bn", "a2_bn"):
        assert torch.equal(result.kept_out[name], stream)
    for name in ("a1", "b1", "proj"):  # every consumer loses the same inputs
        assert torch.equal(result.kept_in[name], stream)
    # the projection shortcut and the block it is added to
    assert torch.equal(result.kept_out["proj"], result.kept_out["b2"])
    # the concatenation feeds a depthwise conv: its parts' kept channels are the depthwise conv's, in order
    dw = result.kept_out["dw"]
    left = result.kept_out.get("left", torch.arange(6))
    right = result.kept_out.get("right", torch.arange(6))
    assert torch.equal(torch.cat([left, right + 6]), dw)
    assert result.model.dw.groups == result.model.dw.out_channels == len(dw)
    assert result.model.fc.in_features == len(dw) * 16  # flatten → Linear: 16 positions per channel


def test_never_all_channels(mini):
    _, pruner = mini
    result = pruner.apply(ChannelConfig(1.0))
    assert (result.groups["kept"] >= 1).all()
    assert result.groups["note"].str.contains("kept 1").any()
    for name in ("left", "right"):  # each part of the concatenation keeps one
        assert result.model.get_submodule(name).out_channels >= 1


def test_user_model_untouched_and_results_independent():
    model = res_mini()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = ChannelPruner(model, X8[:1])
    first = pruner.apply(ChannelConfig(0.5))
    with torch.no_grad():
        first.model.stem.weight.add_(1.0)  # a result is the caller's to change
    second = pruner.apply(ChannelConfig(0.5))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert not torch.equal(first.model.stem.weight, second.model.stem.weight)


def test_counted_macs_match_a_forward_count(mini):
    _, pruner = mini
    result = pruner.apply(ChannelConfig(0.5))
    counted = 0

    def hook(module, args, out):
        nonlocal counted
        if isinstance(module, nn.Conv2d):
            counted += out[0].numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            counted += module.in_features * module.out_features

    hooks = [m.register_forward_hook(hook) for m in result.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        result.model(X8[:1])
    for h in hooks:
        h.remove()
    assert counted == result.macs
    assert result.macs == pruner.macs(ChannelConfig(0.5)) < result.macs_dense
    assert result.params == sum(p.numel() for p in result.model.parameters())


@settings(max_examples=25, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1))
def test_kept_channels_shrink_as_tau_grows(mini, a, b):
    _, pruner = mini
    low, high = sorted((a, b))
    masks_low, _ = pruner.removed(ChannelConfig(low))
    masks_high, _ = pruner.removed(ChannelConfig(high))
    for name in masks_low:  # removed at the lower τ_ch ⇒ removed at the higher one (β is monotone in τ_ch)
        kept_high = ~masks_high[name]
        if int(kept_high.sum()) > 1:  # the keep-one rule may keep a channel back
            assert not bool((masks_low[name] & kept_high).any())
    assert pruner.macs(ChannelConfig(high)) <= pruner.macs(ChannelConfig(low))


def test_weight_engine_composes_inside_kept_channels(mini):
    _, pruner = mini
    small = pruner.apply(ChannelConfig(0.5)).model
    before = {k: v.clone() for k, v in small.state_dict().items()}
    result = Engine(small, example_input=X8[:1]).apply(CompressionConfig(tau=0.2, theta=0.3, b_low=4, b_high=8))
    assert 0 < result.retention < 1
    assert result.model(X8).shape == (4, 10)
    assert result.model.stem.weight.shape == small.stem.weight.shape
    for key, value in small.state_dict().items():
        assert torch.equal(value, before[key])


def test_per_layer_override_and_bad_overrides(mini):
    _, pruner = mini
    result = pruner.apply(ChannelConfig(0.0, layer_tau={"b1": 0.9}))
    row = result.groups.set_index("name").loc["b1"]
    assert row["tau"] == 0.9 and row["kept"] < 12
    assert (result.groups.set_index("name").drop("b1")["kept"] == result.groups.set_index("name").drop("b1")["channels"]).all()
    with pytest.raises(ChannelError, match="nope"):
        pruner.apply(ChannelConfig(0.1, layer_tau={"nope": 0.5}))
    with pytest.raises(ChannelError, match="coupled"):
        pruner.apply(ChannelConfig(0.1, layer_tau={"stem": 0.5, "a2": 0.7}))
    with pytest.raises(ChannelError, match=r"\[0, 1\]"):
        ChannelConfig(1.5)


def test_option_a_shortcut_is_a_boundary():
    model = spread_bn(build("resnet20"))
    pruner = ChannelPruner(model)
    stuck = [g for g in pruner.groups if not g.prunable]
    assert stuck and all("shortcut" in g.reason for g in stuck)
    result = pruner.apply(ChannelConfig(0.8))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), pruner.zeroed(result)(x), atol=1e-4, rtol=1e-4)
    assert result.mac_ratio < 0.9


def test_grouped_conv_is_not_split():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    pruner = ChannelPruner(model, torch.randn(1, 3, 8, 8))
    reasons = " ".join(g.reason for g in pruner.groups)
    assert "grouped convolution" in reasons
    result = pruner.apply(ChannelConfig(1.0))
    assert result.model(torch.randn(1, 3, 8, 8)).shape == (1, 3)


def test_model_that_does_not_run_gives_a_sentence():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(10, 2))
    with pytest.raises(ChannelError, match="does not run on an input") as info:
        ChannelPruner(model, torch.randn(1, 3, 8, 8))
    assert "Traceback" not in str(info.value)


def test_model_without_prunable_groups():
    class Detached(nn.Module):  # autograd sees no path from the output to the conv: nothing to couple
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).detach().sum(dim=(2, 3))

    pruner = ChannelPruner(Detached(), torch.randn(1, 3, 8, 8))
    result = pruner.apply(ChannelConfig(0.9))
    assert result.macs == result.macs_dense


def test_small_cnn_flatten_linear():
    torch.manual_seed(0)
    model = spread_bn(SmallCNN())
    pruner = ChannelPruner(model, torch.randn(1, 3, 8, 8))
    result = pruner.apply(ChannelConfig(0.5))
    assert result.model.fc.in_features == result.model.conv2.out_channels * 64
    with torch.no_grad():
        torch.testing.assert_close(result.model(X8), pruner.zeroed(result)(X8), atol=1e-5, rtol=1e-5)
