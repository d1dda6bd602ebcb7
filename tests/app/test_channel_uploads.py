"""A channel-pruned packed file uploaded in the sidebar: the smaller model, shown as loaded like any export (AppTest)."""
from __future__ import annotations

import torch
from torch import nn

from core.common.formatting import fmt_bytes
from core.deploy.channel_file import with_channels
from core.deploy.packed_writer import compressed_bytes
from core.method.channel_config import ChannelConfig
from core.method.channels import ChannelPruner
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads.models import build
from tests.app.apptest_tools import no_errors, start, texts
from tests.app.test_pages import explorer, metric

SETTING = CompressionConfig(tau=0.1, theta=0.3, b_low=4, b_high=8)


def channel_packed(arch_kwargs: dict) -> tuple[bytes, dict]:
    torch.manual_seed(0)
    model = build("cifar_cnn", width=8).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.linspace(0.05, 1.0, module.num_features))
    result = ChannelPruner(model).apply(ChannelConfig(tau=0.6))
    data = with_channels(compressed_bytes(Engine(result.model).apply(SETTING), "cifar_cnn", arch_kwargs),
                         result.record())
    return data, {k: tuple(v.shape) for k, v in result.model.state_dict().items()}


def upload(at, name: str, data: bytes):
    at.sidebar.selectbox(key="model_key").set_value("upload").run()
    at.sidebar.file_uploader(key="upload_file").set_value((name, data, "application/octet-stream")).run()
    return at


def test_a_channel_packed_file_uploads_as_the_smaller_model_as_loaded():
    data, shapes = channel_packed({"width": 8})
    at = upload(start(tau=0.3, latency_on=False), "small.packed", data)
    no_errors(at)
    session = explorer(at)
    assert {k: tuple(v.shape) for k, v in session.loaded.model.state_dict().items()} == shapes
    assert session.loaded.recorded is not None and session.loaded.recorded.config == SETTING
    assert any("as it is" in i.value for i in at.info)
    assert metric(at, "Stored size").value == fmt_bytes(len(data))


def test_a_channel_packed_file_of_another_architecture_is_a_sentence():
    data, _ = channel_packed({"width": 8})
    record_only = with_channels(data, {"granularity": "channel", "kept": {"no.such.layer": [0]}})
    at = upload(start(latency_on=False), "other.packed", record_only)
    assert not at.exception
    assert any("cannot be rebuilt as cifar_cnn" in t for t in texts(at.error))
