import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core.deploy.kernels import (INT8_IMPLS, Int8Linear, SparseConv2d, SparseLinear, int8_representation,
                                 int8pack_works)
from core.method.quantization import dequantize
from tests.deploy.conftest import DEVICES, close, sparsify


# ---------------------------------------------------------------- kernels match dense

@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.lists(st.integers(1, 4), min_size=1, max_size=3),
       st.floats(0, 1), st.booleans(), st.integers(0, 2**31 - 1), st.sampled_from(DEVICES))
def test_sparse_linear_matches_dense(n_in, n_out, lead, sparsity, bias, seed, device):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias)
    sparsify(layer.weight, sparsity, g)
    layer = layer.to(device)
    x = torch.randn(*lead, n_in, generator=g).to(device)
    with torch.no_grad():
        assert close(SparseLinear(layer)(x), layer(x))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2), st.integers(0, 2), st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9),
       st.floats(0, 1), st.booleans(), st.integers(0, 2**31 - 1), st.sampled_from(DEVICES))
def test_sparse_conv_matches_dense(c_in, c_out, kh, kw, sh, sw, ph, pw, dil, n, h, w, sparsity, bias, seed, device):
    if h + 2 * ph < dil * (kh - 1) + 1 or w + 2 * pw < dil * (kw - 1) + 1:
        return  # no output position
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, (kh, kw), (sh, sw), (ph, pw), dil, bias=bias)
    sparsify(conv.weight, sparsity, g)
    conv = conv.to(device)
    x = torch.randn(n, c_in, h, w, generator=g).to(device)
    with torch.no_grad():
        assert close(SparseConv2d(conv)(x), conv(x))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("impl", INT8_IMPLS)
def test_int8_linear_matches_dense(bits, impl):
    if impl == "fused" and not int8pack_works(torch.device("cpu"), torch.float32):
        pytest.skip("torch._weight_int8pack_mm is not available here")
    torch.manual_seed(bits)
    layer = nn.Linear(48, 24)
    with torch.no_grad():
        layer.weight.copy_(dequantize(layer.weight, bits))
        layer.weight[layer.weight.abs() < 0.05] = 0  # pruned
    representation = int8_representation(layer.weight)
    assert representation is not None
    codes, scales = representation
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    module = Int8Linear(layer, codes, scales, impl=impl)
    assert module.impl == impl
    x = torch.randn(5, 48)
    with torch.no_grad():
        assert close(module(x), layer(x))


def test_int8_refuses_weights_it_cannot_represent():
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    assert int8_representation(weight) is None  # plain floats
    mixed = torch.where(weight.abs() > 1, dequantize(weight, 8), dequantize(weight, 4))
    assert int8_representation(mixed) is None  # two scales per row
    assert int8_representation(dequantize(weight, 3)) is not None
