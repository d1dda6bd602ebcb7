"""An uploaded channel-pruned model exported again (bundle and packed file) keeps its channel record and loads back."""
from __future__ import annotations

import torch

from core.deploy.channel_file import CHANNELS_KEY, channel_bundle_bytes
from core.method.channel_config import ChannelConfig
from core.method.channels import ChannelPruner
from core.method.config import CompressionConfig
from core.services.export_repair import repaired_packed
from core.services.session import ExploreSession
from core.services.uploads import export_bundle, packed_bytes, read_upload
from tests.services.test_channel_session import tiny_cnn

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def test_a_channel_file_uploaded_and_exported_again_loads_back_with_the_same_outputs():
    dense = tiny_cnn("reexport").model
    result = ChannelPruner(dense).apply(ChannelConfig(tau=0.6))
    assert result.mac_ratio < 1
    record = result.record()
    expected = _outputs(result.model)
    uploaded = read_upload(channel_bundle_bytes(result.model, record, "cifar_cnn", {"width": 8}), "small.pt")
    assert uploaded.channels == record
    assert torch.allclose(_outputs(uploaded.model), expected, atol=1e-6)

    session = ExploreSession(uploaded)
    kept_all = session.apply(CompressionConfig())  # τ = 0: the smaller model as loaded
    files = {"again.pt": export_bundle(kept_all, uploaded),
             "again.packed.safetensors": packed_bytes(kept_all, uploaded),
             "page.packed.safetensors": repaired_packed(session, kept_all, "none").data}
    stored = torch.load(__import__("io").BytesIO(files["again.pt"]), weights_only=True)
    assert CHANNELS_KEY in stored
    for name, data in files.items():
        again = read_upload(data, name)
        assert again.channels is not None and again.channels["kept"] == record["kept"], name
        assert torch.allclose(_outputs(again.model), expected, atol=1e-5), name
        for a, b in zip(again.model.parameters(), uploaded.model.parameters()):
            assert a.shape == b.shape, name  # the smaller shapes, rebuilt with no template


def test_an_ordinary_upload_has_no_channel_record_and_its_exports_none():
    loaded = tiny_cnn("reexport-dense")
    session = ExploreSession(loaded)
    result = session.apply(CompressionConfig(tau=0.1))
    assert loaded.channels is None
    stored = torch.load(__import__("io").BytesIO(export_bundle(result, loaded)), weights_only=True)
    assert CHANNELS_KEY not in stored
