"""The Export page's channel-mode files (core.services.channel_export), on a model that was itself loaded from a
channel-pruned file: pruned again, the files record the kept channels in the dense architecture's indices."""
from __future__ import annotations

import torch

from core.deploy.channel_file import channel_bundle_bytes, channel_model, load_channel_bundle
from core.method.channel_config import ChannelConfig
from core.method.channels import ChannelPruner
from core.services.channel_export import channel_export_files
from core.services.session import ExploreSession
from core.services.uploads import read_upload
from core.workloads.models import build
from tests.services.test_channel_session import tiny_cnn

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def test_a_channel_pruned_upload_pruned_again_exports_dense_indices():
    dense = tiny_cnn("channel-export").model
    first = ChannelPruner(dense).apply(ChannelConfig(tau=0.4))
    uploaded = read_upload(channel_bundle_bytes(first.model, first.record(), "cifar_cnn", {"width": 8}), "small.pt")
    session = ExploreSession(uploaded)
    second = session.channels.pruner().apply(ChannelConfig(tau=0.6))
    assert second.params < first.params

    files = channel_export_files(session, second)
    assert files.level == files.requested == "none"
    for name, kept in files.record["kept"].items():  # a subset of the first cut's dense channels
        assert set(kept) <= set(first.kept[name]) and len(kept) == len(second.kept[name])
    # cut from the dense model at the recorded indices, before any file's weights: the twice-pruned model itself
    again = build("cifar_cnn", width=8).eval()
    again.load_state_dict(dense.state_dict())
    assert torch.allclose(_outputs(channel_model(again, files.record)), _outputs(second.model), atol=1e-5)
    assert torch.allclose(_outputs(load_channel_bundle(files.bundle)), _outputs(second.model), atol=1e-5)
    assert torch.allclose(_outputs(read_upload(files.packed, "again.packed.safetensors").model),
                          _outputs(second.model), atol=1e-5)
