"""Export in Explore's channel mode: the model downloads are the channel-pruned model (AppTest).

The packed file and the ``.pt`` bundle the page offers are read back the way a user would,
through the bytes the download buttons hand to the browser (recorded from Streamlit's media file
manager) and :mod:`core.deploy.channel_file`'s loaders. Channel mode runs on the paper's synthetic
MLP (6 × 128, a second per run); the repaired files on the shipped ResNet-20, whose channel
repair is the Explore page's own (BN recalibration on 64 training images here).
"""
from __future__ import annotations

import io

import pytest
import torch
from streamlit.runtime.media_file_manager import MediaFileManager

import core.services.repairs as repairs
from core.deploy.channel_file import load_channel_bundle, load_compressed
from core.deploy.packed_reader import parse_compressed
from core.method.channel_config import ChannelConfig
from core.services.uploads import BUNDLE_FORMAT
from tests.app.apptest_tools import no_errors, start
from tests.app.test_pages import explorer

pytestmark = pytest.mark.usefixtures("fresh_caches")

MLP = dict(model_key="synthetic:mlp", latency_on=False)


@pytest.fixture
def downloads(monkeypatch) -> dict[str, object]:
    """What every download button of a run hands to the browser: file name → bytes (or the deferred callable)."""
    found: dict[str, object] = {}
    add, add_deferred = MediaFileManager.add, MediaFileManager.add_deferred

    def recording_add(self, data, mimetype, coordinates, file_name=None, is_for_static_download=False):
        if file_name is not None:
            found[file_name] = data
        return add(self, data, mimetype, coordinates, file_name=file_name,
                   is_for_static_download=is_for_static_download)

    def recording_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        if file_name is not None:
            found[file_name] = data_callable
        return add_deferred(self, data_callable, mimetype, coordinates, file_name=file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add", recording_add)
    monkeypatch.setattr(MediaFileManager, "add_deferred", recording_deferred)
    return found


def downloaded(downloads: dict[str, object], suffix: str) -> bytes:
    names = [name for name in downloads if name.endswith(suffix)]
    assert len(names) == 1, f"one download ending {suffix!r} expected, got {sorted(downloads)}"
    data = downloads[names[0]]
    return data() if callable(data) else data


def channel_counts(model: torch.nn.Module) -> list[int]:
    return [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_channel_mode_downloads_the_smaller_model(tmp_path, downloads):
    at = start(**MLP, explore_granularity="channel", explore_tau_ch=0.8)
    at.switch_page("pages/export.py").run()
    no_errors(at)
    session = explorer(at)
    dense = session.loaded.model
    path = tmp_path / "mlp.packed.safetensors"
    path.write_bytes(downloaded(downloads, ".packed.safetensors"))
    packed = load_compressed(path)  # rebuilt from the recorded architecture and kept channels, no template
    bundle = load_channel_bundle(downloaded(downloads, ".pt"))
    assert sum(channel_counts(packed)) < sum(channel_counts(dense))
    assert channel_counts(packed) == channel_counts(bundle)
    assert channel_counts(packed)[-1] == channel_counts(dense)[-1]  # the output layer keeps every class
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert packed(x).shape == bundle(x).shape == dense(x).shape
        # the files hold Explore's channel-pruned model of this τ_ch, weight for weight
        expected = session.channels.pruner().apply(ChannelConfig(tau=0.8)).model
        torch.testing.assert_close(packed(x), expected(x))
        torch.testing.assert_close(bundle(x), expected(x))
    assert parse_compressed(path.read_bytes()).header["channels"]["tau_ch"] == 0.8
    assert any("τ_ch = 0.8" in m.value for m in at.markdown)


def test_weight_mode_still_downloads_the_weight_level_model(tmp_path, downloads):
    at = start(**MLP, tau=0.3)
    at.switch_page("pages/export.py").run()
    at.button(key="pack_model").click().run()
    no_errors(at)
    dense = explorer(at).loaded.model
    data = downloaded(downloads, ".packed.safetensors")
    assert "channels" not in parse_compressed(data).header
    path = tmp_path / "mlp.packed.safetensors"
    path.write_bytes(data)
    model = load_compressed(path)
    assert channel_counts(model) == channel_counts(dense)
    assert 0 < sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.Linear))
    stored = torch.load(io.BytesIO(downloaded(downloads, ".pt")), weights_only=True)
    assert stored["format"] == BUNDLE_FORMAT and "masks" in stored and "channels" not in stored


def test_the_files_carry_the_channel_repair_made_on_the_explore_page(tmp_path, downloads, monkeypatch):
    monkeypatch.setattr(repairs, "REPAIR_IMAGES", 64)
    monkeypatch.setattr(repairs, "REPAIR_HOLDOUT", 32)
    at = start(latency_on=False, explore_granularity="channel", explore_tau_ch=0.6, explore_ch_repair="bn")
    at.switch_page("pages/export.py").run()
    no_errors(at)
    assert any("has not run for this setting" in c.value for c in at.caption)
    assert "repair" not in parse_compressed(downloaded(downloads, ".packed.safetensors")).header

    session = explorer(at)
    result = session.channels.pruner().apply(ChannelConfig(tau=0.6))
    job = session.channels.start_repair(result, "bn")  # what the Explore page's "Run the repair" starts
    assert job.wait(60) and job.error is None
    downloads.clear()
    at.run()
    no_errors(at)
    data = downloaded(downloads, "_bn.packed.safetensors")
    assert parse_compressed(data).header["repair"]["method"] == "bn"
    path = tmp_path / "repaired.packed.safetensors"
    path.write_bytes(data)
    repaired = session.channels.cached_repair(result.config, "bn").model.state_dict()
    for loaded in (load_compressed(path), load_channel_bundle(downloaded(downloads, "_bn.pt"))):
        state = loaded.state_dict()
        assert state.keys() == repaired.keys()
        assert all(torch.equal(state[k], repaired[k]) for k in repaired)
        assert not torch.equal(state["bn1.running_mean"], result.model.state_dict()["bn1.running_mean"])
