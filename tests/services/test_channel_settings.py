"""Settings JSON at channel granularity: written with τ_ch, the score and the kept channels; read back; old files = weight."""
from __future__ import annotations

import json

import pytest

from core.method.channel_config import ChannelConfig
from core.method.config import CompressionConfig, ConfigError
from core.services import channel_session
from core.services.channel_settings import channel_setting, granularity
from core.services.uploads import read_settings, read_settings_channels, read_settings_repair, settings_json
from tests.services.test_channel_session import tiny_cnn


def test_a_channel_file_records_tau_ch_score_and_kept_channels_and_reads_back():
    loaded = tiny_cnn("settings-tiny")
    result = channel_session.shared_pruner(loaded).apply(ChannelConfig(tau=0.6, norm="l1", fold_bn=True))
    text = settings_json(CompressionConfig(), loaded, channels=result, repair="reconstruct")
    data = json.loads(text)
    assert (data["granularity"], data["tau_ch"], data["norm"], data["fold_bn"]) == ("channel", 0.6, "l1", True)
    assert data["channels"]["kept"] == {k: list(v) for k, v in result.kept.items()}
    assert data["channel_result"]["mac_ratio"] == pytest.approx(result.mac_ratio) and result.mac_ratio < 1
    assert read_settings_channels(text) == result.config
    assert read_settings_repair(text) == "reconstruct"
    assert read_settings(text) == CompressionConfig()  # the weight part: nothing inside the kept channels


def test_weight_files_old_and_new_are_weight_granularity():
    loaded = tiny_cnn("settings-tiny-w")
    text = settings_json(CompressionConfig(tau=0.3), loaded)
    assert json.loads(text)["granularity"] == "weight" and read_settings_channels(text) is None
    old = json.loads(text)
    del old["granularity"]  # a file from before channel pruning
    assert granularity(old) == "weight" and read_settings_channels(json.dumps(old)) is None


def test_bad_channel_entries_are_one_sentence():
    with pytest.raises(ConfigError, match="granularity"):
        channel_setting({"granularity": "block"})
    with pytest.raises(ConfigError, match="tau_ch|τ|in \\[0, 1\\]"):
        channel_setting({"granularity": "channel", "tau_ch": 3})
    bad = json.dumps({"config": CompressionConfig().to_dict(), "granularity": "channel", "norm": "l7"})
    with pytest.raises(ValueError, match="norm"):
        read_settings_channels(bad)
