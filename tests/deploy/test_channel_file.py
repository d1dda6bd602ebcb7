"""Channel-pruned models saved and loaded back with no template (core.deploy.channel_file), and exported to ONNX."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.deploy.channel_file import (
    channel_bundle_bytes,
    load_channel_bundle,
    load_compressed,
    save_channel_compressed,
)
from core.deploy.onnx_export import export_fp32
from core.method.channels import ChannelConfig, ChannelError, ChannelPruner
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads.models import build
from tests.method.channel_nets import res_mini, spread_bn

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet20_cut():
    torch.manual_seed(0)
    dense = spread_bn(build("resnet20"))
    result = ChannelPruner(dense).apply(ChannelConfig(0.6))
    assert result.mac_ratio < 1
    return dense, result


def test_packed_file_rebuilds_the_smaller_model(resnet20_cut, tmp_path):
    _, result = resnet20_cut
    engine_result = Engine(result.model).apply(CompressionConfig(tau=0.1, theta=0.3, b_low=4, b_high=8))
    path = save_channel_compressed(engine_result, result.record(), tmp_path / "m.packed", arch="resnet20")
    back = load_compressed(path)
    with torch.no_grad():
        assert torch.equal(back(X), engine_result.model(X))
    assert back.layers[0][0].conv1.out_channels == result.model.layers[0][0].conv1.out_channels


def test_bundle_rebuilds_the_smaller_model(resnet20_cut):
    _, result = resnet20_cut
    back = load_channel_bundle(channel_bundle_bytes(result.model, result.record(), "resnet20"))
    with torch.no_grad():
        assert torch.equal(back(X), result.model(X))


def test_wrong_architecture_is_refused(resnet20_cut, tmp_path):
    _, result = resnet20_cut
    with pytest.raises(ChannelError, match="different model"):
        load_channel_bundle(channel_bundle_bytes(result.model, result.record(), "resnet18"))
    engine_result = Engine(result.model).apply(CompressionConfig(tau=0.0))
    path = save_channel_compressed(engine_result, result.record(), tmp_path / "w.packed", arch="cifar_cnn")
    with pytest.raises(ChannelError, match="different model"):
        load_compressed(path)


def test_onnx_fp32_export_takes_the_smaller_model(tmp_path):
    import onnxruntime as ort

    dense = res_mini()
    x = torch.randn(2, 3, 8, 8)
    small = ChannelPruner(dense, x[:1]).apply(ChannelConfig(0.5)).model
    path = export_fp32(small, tmp_path / "small.onnx", x[:1])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, small(x).numpy(), atol=1e-4, rtol=1e-4)


def test_ordinary_packed_file_loads_as_before(tmp_path):
    from core.deploy.packed_writer import save_compressed

    torch.manual_seed(1)
    dense = build("resnet20").eval()
    result = Engine(dense).apply(CompressionConfig(tau=0.2))
    path = save_compressed(result, tmp_path / "plain.packed", arch="resnet20")
    with torch.no_grad():
        assert torch.equal(load_compressed(path)(X), result.model(X))
