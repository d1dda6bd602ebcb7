"""Every torchvision classification architecture up to 100 M parameters through the engine and the packed file.

Each architecture (random initialisation, 10 classes, the smallest input it runs on) is built,
snapshotted by an :class:`core.method.engine.Engine`, compressed at τ = 0.2, θ = 0.3 (4/8 bit),
written to a packed file that records ``torchvision:<name>``, read back without a template
bit-exactly, and run. Every one of the 63 takes well over 3 minutes on a shared two-core machine
(``benchmarks/torchvision_models.py`` times each), so by default a representative subset runs (about
2 minutes: one per family, and every special case: SqueezeNet's convolutional head, RegNet's tensor
arithmetic at construction, DenseNet, GoogLeNet's and Inception's auxiliary heads and minimum input,
AlexNet's minimum input, attention in Swin (ViT's in tests/deploy/test_packing_attention.py), MaxViT's
fixed 224 px);
``BOUNDARY_ALL_TORCHVISION=1`` runs every one.
"""
from __future__ import annotations

import os

import pytest
import torch

from core.deploy.packed_reader import parse_compressed
from core.deploy.packed_writer import compressed_bytes
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads import torchvision_models as tv
from tests.torchvision_small import small_torchvision

SUBSET = ("alexnet", "squeezenet1_1", "mobilenet_v3_small", "shufflenet_v2_x0_5", "mnasnet0_5", "efficientnet_b0",
          "regnet_x_400mf", "densenet121", "googlenet", "inception_v3", "resnet18", "convnext_tiny", "swin_t",
          "maxvit_t")  # ViT's attention: vit_b_16 in tests/deploy/test_packing_attention.py, and Swin here
ALL = os.environ.get("BOUNDARY_ALL_TORCHVISION") == "1"
NAMES = tv.architectures_within() if ALL else SUBSET


@pytest.fixture(autouse=True)
def one_thread():
    """One PyTorch thread, as the app runs: on a shared machine two threads were 12× slower here (busy-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_subset_is_a_subset_of_the_architectures_within_the_limit():
    assert set(SUBSET) <= set(tv.architectures_within())


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_architecture_compresses_packs_and_runs(name):
    model, size, kwargs = small_torchvision(name)
    example = torch.randn(2, 3, size, size)
    result = Engine(model, example_input=example[:1]).apply(CompressionConfig(tau=0.2, theta=0.3, b_low=4, b_high=8))
    assert 0 < result.retention < 1 and result.model_bytes_compressed < result.model_bytes_fp32
    data = compressed_bytes(result, tv.arch_name(name), kwargs)
    loaded = parse_compressed(data, name).load()  # rebuilt from the recorded torchvision:<name>
    original = result.model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    assert all(torch.equal(value, original[key]) for key, value in loaded.state_dict().items())
    with torch.inference_mode():
        out = loaded(example)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert torch.equal(out, result.model(example))
