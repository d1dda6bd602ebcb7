"""``BoundaryPruning`` against the contract of torch's own pruning methods.

Written after PyTorch's pruning tests: wherever the contracts agree, ``BoundaryPruning``
sits beside ``prune.L1Unstructured`` in the same assertions.
"""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.method.pruning import BoundaryPruning, boundary_prune, boundary_unstructured, check_finite, check_tau
from tests.conftest import TinyNet, same_state, state_fingerprint

# (method, keyword, a value of it): both prune the same entries of the tensors below
METHODS = {
    "l1": (prune.L1Unstructured, "amount", 4),
    "boundary": (BoundaryPruning, "tau", 0.6),
}
FUNCTIONS = {
    "l1": lambda m, name, **kw: prune.l1_unstructured(m, name, amount=4, **kw),
    "boundary": lambda m, name, **kw: boundary_unstructured(m, name, tau=0.6, **kw),
}


def method_kwargs(key: str) -> tuple[type[prune.BasePruningMethod], dict]:
    method, keyword, value = METHODS[key]
    return method, {keyword: value}


def linear_with(weight: list) -> nn.Linear:
    m = nn.Linear(4, 2)
    m.weight = nn.Parameter(torch.tensor(weight, dtype=torch.float32))
    return m


WEIGHT = [[1, 2, 3, 4], [-4, -3, -2, -1]]
SCORES = [[4, 2, 1, 3], [-3, -1, -2, -4]]
# L1 with amount=4 drops the four smallest |S|; boundary with τ=0.6 keeps |S| ≥ 0.6·4 = 2.4
EXPECTED_MASK_FROM_SCORES = [[1, 0, 0, 1], [1, 0, 0, 1]]
EXPECTED_MASK_FROM_WEIGHT = [[0, 0, 1, 1], [1, 1, 0, 0]]


# ------------------------------------------------------------ 1. importance_scores


@pytest.mark.parametrize("key", METHODS)
def test_unstructured_pruning_with_importance_scores_apply(key):
    method, kwargs = method_kwargs(key)
    m = linear_with(WEIGHT)
    scores = torch.tensor(SCORES, dtype=torch.float32)
    method.apply(m, "weight", importance_scores=scores, **kwargs)
    assert m.weight_mask.tolist() == EXPECTED_MASK_FROM_SCORES
    assert torch.equal(m.weight, m.weight_orig * m.weight_mask)  # the weights are pruned, not the scores
    assert m.weight_orig.tolist() == WEIGHT


@pytest.mark.parametrize("key", FUNCTIONS)
def test_unstructured_pruning_with_importance_scores_functional(key):
    m = linear_with(WEIGHT)
    FUNCTIONS[key](m, "weight", importance_scores=torch.tensor(SCORES, dtype=torch.float32))
    assert m.weight_mask.tolist() == EXPECTED_MASK_FROM_SCORES


@pytest.mark.parametrize("key", FUNCTIONS)
def test_unstructured_pruning_without_importance_scores_ranks_the_weight(key):
    m = linear_with(WEIGHT)
    FUNCTIONS[key](m, "weight", importance_scores=None)
    assert m.weight_mask.tolist() == EXPECTED_MASK_FROM_WEIGHT


@pytest.mark.parametrize("key", METHODS)
def test_importance_scores_of_the_wrong_shape_are_refused(key):
    method, kwargs = method_kwargs(key)
    m = linear_with(WEIGHT)
    with pytest.raises(AssertionError, match="importance_scores should have the same shape"):
        method.apply(m, "weight", importance_scores=torch.ones(3), **kwargs)
    assert not prune.is_pruned(m) and isinstance(m.weight, nn.Parameter)


@pytest.mark.parametrize("key", METHODS)
def test_global_unstructured_with_importance_scores(key):
    method, kwargs = method_kwargs(key)
    a, b = linear_with(WEIGHT), linear_with(WEIGHT)
    scores = torch.tensor(SCORES, dtype=torch.float32)
    # the same scores on both layers: global pruning keeps the same entries of each
    kwargs = {"amount": 8} if key == "l1" else kwargs
    prune.global_unstructured([(a, "weight"), (b, "weight")], pruning_method=method,
                              importance_scores={(a, "weight"): scores, (b, "weight"): scores}, **kwargs)
    assert a.weight_mask.tolist() == b.weight_mask.tolist() == EXPECTED_MASK_FROM_SCORES


# ------------------------------------------------------------ 2. nothing left to prune


@pytest.mark.parametrize("key", METHODS)
def test_zero_size_parameter_is_a_noop(key):
    method, kwargs = method_kwargs(key)
    kwargs = {"amount": 0.5} if key == "l1" else kwargs  # an int amount exceeds 0 entries
    m = nn.Linear(3, 2)
    m.weight = nn.Parameter(torch.empty(2, 0))
    method.apply(m, "weight", **kwargs)
    assert prune.is_pruned(m) and m.weight_mask.shape == (2, 0)
    prune.remove(m, "weight")
    assert not prune.is_pruned(m) and isinstance(m.weight, nn.Parameter) and m.weight.shape == (2, 0)


@pytest.mark.parametrize("key", METHODS)
def test_compute_mask_on_empty_tensor_returns_default_mask(key):
    method, kwargs = method_kwargs(key)
    kwargs = {"amount": 0.5} if key == "l1" else kwargs
    default_mask = torch.ones(0, 4)
    mask = method(**kwargs).compute_mask(torch.empty(0, 4), default_mask=default_mask)
    assert mask.shape == (0, 4) and mask.dtype == default_mask.dtype


@pytest.mark.parametrize("key", METHODS)
def test_compute_mask_on_completely_pruned_tensor_returns_default_mask(key):
    method, kwargs = method_kwargs(key)
    t = torch.tensor(WEIGHT, dtype=torch.float32)
    default_mask = torch.zeros_like(t)
    assert torch.equal(method(**kwargs).compute_mask(t, default_mask=default_mask), default_mask)


def test_compute_mask_on_zero_tensor_keeps_default_mask():
    """max|W| = 0 gives β = 0: |W| ≥ 0 keeps everything the default mask keeps."""
    default_mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.equal(BoundaryPruning(0.7).compute_mask(torch.zeros(2, 2), default_mask), default_mask)


@pytest.mark.parametrize("key", METHODS)
def test_pruning_a_completely_pruned_parameter_is_a_noop(key):
    method, kwargs = method_kwargs(key)
    kwargs = {"amount": 0.5} if key == "l1" else kwargs
    m = linear_with(WEIGHT)
    prune.l1_unstructured(m, "weight", amount=1.0)  # nothing left
    method.apply(m, "weight", **kwargs)
    assert prune.is_pruned(m)
    hook = next(iter(m._forward_pre_hooks.values()))
    assert isinstance(hook, prune.PruningContainer) and len(hook) == 2
    assert torch.equal(m.weight_mask, torch.zeros(2, 4))
    prune.remove(m, "weight")
    assert isinstance(m.weight, nn.Parameter) and torch.equal(m.weight, torch.zeros(2, 4))
    assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_mask")


@pytest.mark.parametrize("key", METHODS)
def test_global_unstructured_over_completely_pruned_parameters_is_a_noop(key):
    method, kwargs = method_kwargs(key)
    kwargs = {"amount": 0.5} if key == "l1" else kwargs
    a, b = linear_with(WEIGHT), linear_with(WEIGHT)
    for m in (a, b):
        prune.l1_unstructured(m, "weight", amount=1.0)
    prune.global_unstructured([(a, "weight"), (b, "weight")], pruning_method=method, **kwargs)
    for m in (a, b):
        assert prune.is_pruned(m) and torch.equal(m.weight_mask, torch.zeros(2, 4))
        prune.remove(m, "weight")
        assert isinstance(m.weight, nn.Parameter) and torch.equal(m.weight, torch.zeros(2, 4))


def test_boundary_on_top_of_a_partial_mask_uses_the_kept_maximum():
    m = nn.Linear(3, 1, bias=False)
    m.weight = nn.Parameter(torch.tensor([[10.0, 1.0, 2.0]]))
    prune.custom_from_mask(m, "weight", mask=torch.tensor([[0.0, 1.0, 1.0]]))
    BoundaryPruning.apply(m, "weight", tau=0.6)  # max over kept = 2, β = 1.2
    assert m.weight_mask.tolist() == [[0.0, 0.0, 1.0]]


# ------------------------------------------------------------ 3. NaN and Inf


BAD_VALUES = [float("nan"), float("inf"), float("-inf")]


def same_state_nan(model: nn.Module, fingerprint: dict[str, torch.Tensor]) -> bool:
    """``same_state`` where NaN equals NaN."""
    state = model.state_dict()
    return state.keys() == fingerprint.keys() and all(
        torch.equal(state[k].isnan(), fingerprint[k].isnan())
        and torch.equal(state[k].nan_to_num(0.0), fingerprint[k].nan_to_num(0.0)) for k in state)


def test_check_finite_names_where_and_counts():
    check_finite(torch.randn(5), "layer 'fc'")
    with pytest.raises(ValueError, match=r"^layer 'fc' has NaN or Inf weights \(2 of 3\)$"):
        check_finite(torch.tensor([1.0, float("nan"), float("inf")]), "layer 'fc'")


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_nan_or_inf_weight_is_refused_and_rolled_back(bad):
    m = linear_with(WEIGHT)
    with torch.no_grad():
        m.weight[0, 1] = bad
    before = state_fingerprint(m)
    with pytest.raises(ValueError, match="parameter 'weight' of Linear has NaN or Inf weights"):
        BoundaryPruning.apply(m, "weight", tau=0.3)
    assert not prune.is_pruned(m) and isinstance(m.weight, nn.Parameter) and same_state_nan(m, before)


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_nan_or_inf_weight_on_a_pruned_module_keeps_its_pruning(bad):
    m = linear_with(WEIGHT)
    prune.l1_unstructured(m, "weight", amount=2)
    with torch.no_grad():
        m.weight_orig[1, 1] = bad
    m(torch.ones(1, 4))  # the hook recomputes the masked weight
    before, hooks = state_fingerprint(m), list(m._forward_pre_hooks.values())
    with pytest.raises(ValueError, match="NaN or Inf"):
        BoundaryPruning.apply(m, "weight", tau=0.3)
    assert list(m._forward_pre_hooks.values()) == hooks and same_state_nan(m, before)
    prune.remove(m, "weight")


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_nan_or_inf_importance_scores_are_refused(bad):
    m = linear_with(WEIGHT)
    scores = torch.tensor(SCORES, dtype=torch.float32)
    scores[0, 0] = bad
    with pytest.raises(ValueError, match="importance_scores for 'weight' has NaN or Inf values"):
        boundary_unstructured(m, "weight", tau=0.3, importance_scores=scores)
    assert not prune.is_pruned(m)


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_nan_or_inf_in_compute_mask_and_global_pruning(bad):
    t = torch.tensor([1.0, bad, 3.0])
    with pytest.raises(ValueError, match="BoundaryPruning: the tensor to prune has NaN or Inf values"):
        BoundaryPruning(0.3).compute_mask(t, default_mask=torch.ones(3))
    a, b = linear_with(WEIGHT), linear_with(WEIGHT)
    with torch.no_grad():
        b.weight[0, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        prune.global_unstructured([(a, "weight"), (b, "weight")], pruning_method=BoundaryPruning, tau=0.3)
    assert not prune.is_pruned(a) and not prune.is_pruned(b)


def test_engine_and_boundary_pruning_refuse_nan_alike():
    model = TinyNet()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'fc' has NaN or Inf weights \(1 of 320\)"):
        Engine(model)
    with pytest.raises(ValueError, match=r"of Linear has NaN or Inf weights \(1 of 320\)"):
        BoundaryPruning.apply(model.fc, "weight", tau=0.3)


# ------------------------------------------------------------ 4. τ as any real number


@pytest.mark.parametrize("tau", [np.float32(0.3), np.float64(0.3), np.int64(0), np.int32(1), 0, 1, 0.3,
                                 torch.tensor(0.3), torch.tensor([0.3]), torch.tensor(1, dtype=torch.int64)])
def test_tau_accepts_any_real_number(tau):
    value = float(tau)
    assert check_tau(tau) == pytest.approx(value) and type(check_tau(tau)) is float
    torch.manual_seed(0)
    m = nn.Linear(6, 4)
    expected = boundary_prune(m.weight, check_tau(tau))
    BoundaryPruning.apply(m, "weight", tau=tau)
    assert torch.equal(m.weight, expected)
    assert CompressionConfig(tau=tau).tau == check_tau(tau)


@pytest.mark.parametrize("key", METHODS)
@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5)])
def test_numpy_scalars_are_accepted_like_python_floats(key, value):
    method, keyword, _ = METHODS[key]
    torch.manual_seed(0)
    a, b = nn.Linear(6, 4), nn.Linear(6, 4)
    b.load_state_dict(a.state_dict())
    method.apply(a, "weight", **{keyword: value})
    method.apply(b, "weight", **{keyword: float(value)})
    assert torch.equal(a.weight_mask, b.weight_mask)


@pytest.mark.parametrize("tau", [True, False, np.bool_(True), "0.3", 0.3 + 0j, np.complex64(0.3), None,
                                 torch.tensor(True), torch.tensor(0.3 + 0j), torch.tensor([0.1, 0.2])])
def test_tau_of_the_wrong_type_is_refused(tau):
    with pytest.raises(TypeError, match="tau must be a number"):
        check_tau(tau)
    m = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="tau must be a number"):
        BoundaryPruning.apply(m, "weight", tau=tau)
    assert not prune.is_pruned(m)


@pytest.mark.parametrize("tau", [float("nan"), np.float32("nan"), torch.tensor(float("nan")),
                                 -0.1, 1.5, 2, -1, float("inf"), float("-inf")])
def test_tau_outside_unit_interval_is_refused(tau):
    with pytest.raises(ValueError, match="tau must be in"):
        check_tau(tau)
    with pytest.raises(ValueError, match="tau must be in"):
        BoundaryPruning(tau)


@pytest.mark.parametrize("key", METHODS)
def test_amount_out_of_range_is_refused_by_both(key):
    method, keyword, _ = METHODS[key]
    for value in (-0.1, 1.5):
        with pytest.raises(ValueError):
            method(**{keyword: value})


def test_bad_tau_on_a_pruned_module_keeps_its_pruning():
    """torch drops the old hook before building the method; BoundaryPruning checks τ first."""
    m = linear_with(WEIGHT)
    prune.l1_unstructured(m, "weight", amount=2)
    before, hooks = state_fingerprint(m), list(m._forward_pre_hooks.values())
    with pytest.raises(ValueError, match="tau"):
        BoundaryPruning.apply(m, "weight", tau=1.5)
    assert list(m._forward_pre_hooks.values()) == hooks and same_state(m, before)


# ------------------------------------------------------------ 5. the engine on a hooked model


def prune_l1(model: nn.Module) -> None:
    prune.l1_unstructured(model.conv, "weight", amount=0.3)
    prune.l1_unstructured(model.fc, "weight", amount=0.5)


def prune_boundary(model: nn.Module) -> None:
    boundary_unstructured(model.conv, "weight", tau=0.2)
    BoundaryPruning.apply(model.fc, "weight", tau=0.3)


def prune_both(model: nn.Module) -> None:  # a PruningContainer on fc, a bias pruned too
    prune_l1(model)
    BoundaryPruning.apply(model.fc, "weight", tau=0.4)
    prune.l1_unstructured(model.fc, "bias", amount=2)


@pytest.mark.parametrize("pruner", [prune_l1, prune_boundary, prune_both])
@pytest.mark.parametrize("forward_first", [False, True])
def test_engine_on_a_model_with_pruning_hooks(pruner, forward_first):
    torch.manual_seed(0)
    model = TinyNet().eval()
    pruner(model)
    x = torch.randn(2, 3, 8, 8)
    if forward_first:
        model(x)
    before = state_fingerprint(model)
    hooks = {name: list(m._forward_pre_hooks.values()) for name, m in model.named_modules()}
    masked = {name: model.get_submodule(name).weight for name in ("conv", "fc")}
    effective = {name: (m.weight_orig * m.weight_mask).detach() for name, m in
                 (("conv", model.conv), ("fc", model.fc))}

    engine = Engine(model)
    for name, weight in effective.items():
        assert torch.equal(engine.original_weight(name), weight)
    config = CompressionConfig(tau=0.25)
    result = engine.apply(config)
    for name, weight in effective.items():
        assert torch.equal(result.weights[name], boundary_prune(weight, 0.25))
    out = result.model
    assert not prune.is_pruned(out)
    assert all(isinstance(out.get_submodule(name).weight, nn.Parameter) for name in ("conv", "fc"))
    assert set(out.state_dict()) == set(TinyNet().state_dict())
    assert torch.equal(out.fc.weight, result.weights["fc"])
    assert out(x).shape == (2, 5)

    # the user's model is exactly as it was: tensors, hooks, the masked attribute itself
    assert same_state(model, before)
    assert {name: list(m._forward_pre_hooks.values()) for name, m in model.named_modules()} == hooks
    assert all(model.get_submodule(name).weight is tensor for name, tensor in masked.items())

    # at τ = 0 the result computes what the hooked model computes
    plain = Engine(model).apply(CompressionConfig(tau=0.0)).model
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x))


def test_engine_takes_weight_orig_times_mask_not_a_stale_masked_weight():
    """After a training step on ``weight_orig`` and no forward, ``weight`` is stale."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    prune_l1(model)
    with torch.no_grad():
        model.fc.weight_orig.mul_(2.0)
    stale = model.fc.weight.detach().clone()
    engine = Engine(model)
    effective = (model.fc.weight_orig * model.fc.weight_mask).detach()
    assert torch.equal(engine.original_weight("fc"), effective)
    assert not torch.equal(effective, stale)
    assert torch.equal(model.fc.weight, stale)  # still untouched: no forward ran
