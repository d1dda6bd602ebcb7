"""The one serialised form of a setting: to_dict / from_dict, old shapes, and type checks."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.method.config import FIELDS, CompressionConfig, ConfigError

taus = st.floats(min_value=0, max_value=1, allow_nan=False)
configs = st.builds(
    CompressionConfig, tau=taus,
    theta=st.none() | st.floats(min_value=0, max_value=1, allow_nan=False),
    theta_mode=st.sampled_from(["relative", "absolute", "fraction"]),
    b_low=st.sampled_from([2, 3, 4]), b_high=st.sampled_from([4, 8]),
    layer_tau=st.dictionaries(st.sampled_from(["conv1", "layer1.0.conv2", "fc"]), taus, max_size=3),
    include_norm=st.booleans())


@given(configs)
def test_round_trip_through_json_is_exact(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert set(data) == set(FIELDS)
    assert CompressionConfig.from_dict(data) == config


def test_reads_the_old_shapes():
    config = CompressionConfig(tau=0.2, layer_tau={"fc": 0.5, "conv1": 0.1})
    packed_header = dict(config.to_dict(), layer_tau=[["conv1", 0.1], ["fc", 0.5]])  # packing wrote pairs
    assert CompressionConfig.from_dict(packed_header) == config
    settings_file = {"format": "boundary-explorer/settings/v1", "config": config.to_dict()}
    assert CompressionConfig.from_dict(settings_file) == config


@pytest.mark.parametrize("data, field", [
    ({"include_norm": "yes"}, "include_norm"),
    ({"tau": "0.2"}, "tau"),
    ({"tau": True}, "tau"),
    ({"theta": [0.3]}, "theta"),
    ({"b_low": 4.0, "theta": 0.3}, "b_low"),
    ({"b_high": "8"}, "b_high"),
    ({"theta_mode": 3}, "theta_mode"),
    ({"layer_tau": "conv1=0.2"}, "layer_tau"),
    ({"layer_tau": {"fc": "high"}}, "fc"),
    ({"layer_tau": [[1, 0.2]]}, "layer_tau"),
    ({"tau": 1.5}, "tau"),
    ({"theta": 0.3, "b_low": 9}, "b_low"),
    ({"surprise": 1}, "surprise"),
])
def test_every_field_is_type_checked_and_named(data, field):
    with pytest.raises(ConfigError, match=field):
        CompressionConfig.from_dict(data)


def test_a_non_object_is_refused():
    with pytest.raises(ConfigError, match="JSON object"):
        CompressionConfig.from_dict([0.2])


def test_numpy_scalars_are_numbers():
    config = CompressionConfig(tau=np.float32(0.25), theta=np.float64(0.5))
    assert config.tau == 0.25 and config.theta == 0.5 and type(config.tau) is float
    with pytest.raises(TypeError, match="include_norm"):
        CompressionConfig(include_norm="yes")
