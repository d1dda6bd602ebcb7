"""Which weights are prunable: Conv/Linear modules, attention projections, graph modules' weight operands.

The discovery reads module types and graphs, never runs the model. It is checked here against
a recording of a real forward pass (``WeightOperands``: every parameter whose storage reaches a
convolution or matrix product at the ATen level), and against the earlier module-type-only list
for every model without attention.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.utils._python_dispatch import TorchDispatchMode

from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.method.pruning import (
    NORM_LAYERS,
    WEIGHT_LAYERS,
    boundary_prune,
    layer_name,
    layer_weight,
    parameter_name,
    prunable_layers,
    resolve_layer,
)
from core.workloads import torchvision_models as tv
from core.workloads.models import REGISTRY, build
from tests.torchvision_small import small_torchvision

aten = torch.ops.aten
#: ATen ops (what every conv/linear/matmul ends in) → positions of their weight operands.
_PRODUCTS = {aten.convolution.default: (1,), aten.mm.default: (0, 1), aten.addmm.default: (1, 2),
             aten.bmm.default: (0, 1), aten.baddbmm.default: (1, 2),
             aten._native_multi_head_attention.default: (5, 7)}


class WeightOperands(TorchDispatchMode):
    """Records the parameters (≥ 2 dims) whose storage is a weight operand of a product during a forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.params = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters() if p.dim() >= 2}
        self.found: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for i in _PRODUCTS.get(func, ()):
            if i < len(args) and isinstance(args[i], torch.Tensor):
                name = self.params.get(args[i].untyped_storage().data_ptr())
                if name is not None:
                    self.found.add(name)
        return func(*args, **(kwargs or {}))


def recorded_weights(model: nn.Module, *inputs: torch.Tensor) -> set[str]:
    recorder = WeightOperands(model)
    with torch.no_grad(), recorder:
        model(*inputs)
    return recorder.found


def legacy_layers(model: nn.Module, include_norm: bool = False) -> list[tuple[str, str]]:
    """The discovery before attention projections: Conv/Linear (and norm) modules with a weight tensor."""
    kinds = WEIGHT_LAYERS + (NORM_LAYERS if include_norm else ())
    return [(name, type(m).__name__) for name, m in model.named_modules()
            if isinstance(m, kinds) and isinstance(getattr(m, "weight", None), torch.Tensor)]


class Attention(nn.Module):
    """Self-attention (packed in_proj, batch_first) and cross-attention with other key/value sizes
    (separate q/k/v projections, sequence first), between two Linear layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.cross = nn.MultiheadAttention(16, 2, kdim=12, vdim=10)
        self.memory_k = nn.Parameter(torch.randn(5, 1, 12))
        self.memory_v = nn.Parameter(torch.randn(5, 1, 10))
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # x: (N, L=7, 8)
        h = self.embed(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        k = self.memory_k.expand(-1, x.shape[0], -1)
        v = self.memory_v.expand(-1, x.shape[0], -1)
        c, _ = self.cross(h.transpose(0, 1), k, v)
        return self.head(c.mean(0))


@pytest.fixture
def attention() -> Attention:
    torch.manual_seed(0)
    return Attention().eval()


ATTENTION_LAYERS = ["embed", "attn.in_proj_weight", "attn.out_proj", "cross.q_proj_weight", "cross.k_proj_weight",
                    "cross.v_proj_weight", "cross.out_proj", "head"]


# ---------------------------------------------------------------- names and the accessor

def test_attention_projections_are_layers_in_module_order(attention):
    layers = prunable_layers(attention)
    assert [layer.name for layer in layers] == ATTENTION_LAYERS
    by_name = {layer.name: layer for layer in layers}
    packed = by_name["attn.in_proj_weight"]
    assert (packed.kind, packed.param, packed.module_path) == ("MultiheadAttention", "in_proj_weight", "attn")
    assert packed.parameter_name == "attn.in_proj_weight" and packed.weight is attention.attn.in_proj_weight
    assert by_name["attn.out_proj"].parameter_name == "attn.out_proj.weight"
    assert by_name["embed"].module_path == "embed" and by_name["embed"].weight is attention.embed.weight
    state = attention.state_dict()
    assert all(layer.parameter_name in state for layer in layers)


def test_discovery_matches_the_recorded_weight_operands(attention):
    found = {layer.parameter_name for layer in prunable_layers(attention)}
    assert found == recorded_weights(attention, torch.randn(2, 7, 8))


def test_layer_weight_resolves_module_and_parameter_names(attention):
    assert layer_weight(attention, "embed") is attention.embed.weight
    assert layer_weight(attention, "attn.in_proj_weight") is attention.attn.in_proj_weight
    assert resolve_layer(attention, "cross.k_proj_weight") == (attention.cross, "k_proj_weight")
    assert resolve_layer(attention, "attn.out_proj") == (attention.attn.out_proj, "weight")
    for bad in ("nope", "attn.nope", "attn", "embed.bias.x"):
        with pytest.raises(ValueError, match="names no weight"):
            layer_weight(attention, bad)


def test_a_bare_module_is_named_by_its_parameters():
    mha = nn.MultiheadAttention(8, 2)
    assert [(layer.name, layer.parameter_name) for layer in prunable_layers(mha)] == [
        ("in_proj_weight", "in_proj_weight"), ("out_proj", "out_proj.weight")]
    linear = nn.Linear(3, 2)
    assert [(layer.name, layer.parameter_name) for layer in prunable_layers(linear)] == [("", "weight")]
    assert layer_weight(linear, "") is linear.weight and layer_weight(mha, "in_proj_weight") is mha.in_proj_weight
    assert layer_name("", "weight") == "" and parameter_name("") == "weight"
    assert parameter_name(layer_name("a.b", "in_proj_weight"), "in_proj_weight") == "a.b.in_proj_weight"


def test_restricting_to_an_attention_layer(attention):
    layers = prunable_layers(attention, layers=["attn.in_proj_weight", "head"])
    assert [layer.name for layer in layers] == ["attn.in_proj_weight", "head"]
    with pytest.raises(ValueError, match="'attn.in_proj' is not a prunable layer"):
        prunable_layers(attention, layers=["attn.in_proj"])


# ---------------------------------------------------------------- nothing changes without attention

@pytest.mark.parametrize("name", list(REGISTRY))
def test_registry_models_give_the_same_layers_as_before(name):
    model = build(name)
    for include_norm in (False, True):
        assert [(layer.name, layer.kind) for layer in prunable_layers(model, include_norm)] == \
            legacy_layers(model, include_norm)
        assert all(layer.param == "weight" for layer in prunable_layers(model, include_norm))
    assert Engine(model).layer_names == [name for name, _ in legacy_layers(model)]


def test_every_torchvision_architecture_adds_exactly_its_attention_projections():
    """On the meta device (structure only), all 63 architectures: the list is the module-type list,
    plus, for the ViTs alone, one in_proj_weight per encoder layer, right before its out_proj."""
    for name in tv.architectures_within():
        model = tv.meta_model(name, {})
        for include_norm in (False, True):
            layers = [(layer.name, layer.kind) for layer in prunable_layers(model, include_norm)]
            before = legacy_layers(model, include_norm)
            if not name.startswith("vit_"):
                assert layers == before, name
                continue
            added = [entry for entry in layers if entry not in set(before)]
            assert [entry for entry in layers if entry not in added] == before
            assert len(added) == len(model.encoder.layers) and all(
                n.endswith(".self_attention.in_proj_weight") and k == "MultiheadAttention" for n, k in added), name
            names = [n for n, _ in layers]
            assert all(names[names.index(n) + 1] == n.replace("in_proj_weight", "out_proj") for n, _ in added)


ORACLE_MODELS = ("resnet18", "mobilenet_v3_small", "convnext_tiny", "swin_t", "vit_b_16", "maxvit_t")


@pytest.mark.slow
@pytest.mark.parametrize("name", tv.architectures_within() if os.environ.get("BOUNDARY_ALL_TORCHVISION") == "1"
                         else ORACLE_MODELS)
def test_torchvision_discovery_matches_the_recorded_weight_operands(name):
    """The static list is exactly the set of parameters a real forward multiplies by (all 63 agree:
    ``BOUNDARY_ALL_TORCHVISION=1``); norm scales, ConvNeXt's layer scale, Swin's bias tables and the
    ViT's class token and position embedding take part in no product."""
    model, size, _ = small_torchvision(name)
    found = {layer.parameter_name for layer in prunable_layers(model)}
    assert found == recorded_weights(model, torch.randn(1, 3, size, size))


# ---------------------------------------------------------------- the engine on attention

def test_engine_prunes_and_restores_attention_projections(attention):
    before = {k: v.clone() for k, v in attention.state_dict().items()}
    engine = Engine(attention, example_input=torch.randn(1, 7, 8))
    assert engine.layer_names == ATTENTION_LAYERS
    assert engine.parameter_name("attn.in_proj_weight") == "attn.in_proj_weight"
    assert engine.parameter_name("attn.out_proj") == "attn.out_proj.weight"
    result = engine.apply(CompressionConfig(tau=0.3))
    stats = result.stats.set_index("name")
    for name in ("attn.in_proj_weight", "cross.q_proj_weight", "cross.k_proj_weight", "cross.v_proj_weight"):
        weight = layer_weight(attention, name)
        assert torch.equal(result.weights[name], boundary_prune(weight, 0.3))
        assert 0 < stats.loc[name, "kept"] < weight.numel()
        assert torch.equal(layer_weight(result.model, name), result.weights[name])
    assert stats.loc["attn.in_proj_weight", "type"] == "MultiheadAttention"
    assert stats.loc["attn.in_proj_weight", "shape"] == "48×16"
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        assert not torch.equal(result.model(x), attention(x))
        back = engine.apply(CompressionConfig(tau=0.0))
        assert torch.equal(back.model(x), attention(x))
    assert all(torch.equal(v, before[k]) for k, v in attention.state_dict().items())  # never modified


def test_attention_uses_per_sample_count_tokens(attention):
    """in_proj: (L + 2S)/3 uses; q: L; k, v: S; out_proj (called by the attention, not as a module): L."""
    stats = Engine(attention, example_input=torch.randn(1, 7, 8)).apply(CompressionConfig()).stats
    uses = dict(zip(stats["name"], stats["macs_per_weight"]))
    assert uses == {"embed": 7.0, "attn.in_proj_weight": 7.0, "attn.out_proj": 7.0, "cross.q_proj_weight": 7.0,
                    "cross.k_proj_weight": 5.0, "cross.v_proj_weight": 5.0, "cross.out_proj": 7.0, "head": 1.0}


def test_engine_takes_a_torch_pruned_in_proj_at_its_effective_weight(attention):
    prune.l1_unstructured(attention.attn, "in_proj_weight", amount=0.5)
    effective = attention.attn.in_proj_weight_orig * attention.attn.in_proj_weight_mask
    engine = Engine(attention)
    assert torch.equal(engine.original_weight("attn.in_proj_weight"), effective)
    model = engine.apply(CompressionConfig(tau=0.0)).model
    assert not hasattr(model.attn, "in_proj_weight_orig") and isinstance(model.attn.in_proj_weight, nn.Parameter)
    assert hasattr(attention.attn, "in_proj_weight_orig")  # the user's hooks stay


# ---------------------------------------------------------------- graph modules

class Functional(nn.Module):
    """Weights used through torch functions, not modules: what a graph module holds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.proj = nn.Parameter(torch.randn(6, 4))
        self.mix = nn.Parameter(torch.randn(6, 5))
        self.scale = nn.Parameter(torch.ones(5))  # elementwise: not a weight operand

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        h = F.linear(h, self.proj)
        return (h @ self.mix) * self.scale


@pytest.mark.parametrize("how", ["symbolic_trace", "export"])
def test_graph_module_weight_operands(how):
    torch.manual_seed(0)
    model = Functional().eval()
    x = torch.randn(2, 3, 8, 8)
    if how == "symbolic_trace":
        graph = torch.fx.symbolic_trace(model)
        expected = [("conv", "Conv2d"), ("proj", "linear"), ("mix", "matmul")]
    else:
        graph = torch.export.export(model, (x,)).module()
        expected = [("conv", "conv2d"), ("proj", "linear"), ("mix", "matmul")]
    layers = prunable_layers(graph)
    assert [(layer.name, layer.kind) for layer in layers] == expected
    assert {layer.parameter_name for layer in layers} == recorded_weights(graph, x)
    engine = Engine(graph)
    result = engine.apply(CompressionConfig(tau=0.4))
    for layer in layers:
        assert torch.equal(result.weights[layer.name], boundary_prune(layer.weight, 0.4))
    reference = Functional().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.conv.weight.copy_(result.weights["conv"])
        reference.proj.copy_(result.weights["proj"])
        reference.mix.copy_(result.weights["mix"])
        assert torch.equal(result.model(x), reference(x))


def test_a_graph_weight_that_is_also_a_module_weight_is_listed_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(self.fc(x), self.fc.weight)

    graph = torch.fx.symbolic_trace(Twice())
    assert [(layer.name, layer.kind) for layer in prunable_layers(graph)] == [("fc", "Linear")]
