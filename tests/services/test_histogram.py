import numpy as np
import pytest
import torch

from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.services.choices import load_choice, model_choices
from core.services.histogram import LayerBins
from core.services.session import ExploreSession


def test_histogram_counts_match_the_engine():
    loaded = load_choice(model_choices()[0].key)
    session = ExploreSession(loaded)
    for config in (CompressionConfig(tau=0.3), CompressionConfig(tau=0.2, theta=0.5),
                   CompressionConfig(tau=0.1, theta=0.25, theta_mode="fraction")):
        result = session.apply(config)
        for name in session.engine.layer_names[:3] + session.engine.layer_names[-1:]:
            h = session.histogram(result, name)
            row = result.stats.set_index("name").loc[name]
            assert h.pruned.sum() == row["numel"] - row["kept"]
            if config.quantized:
                assert h.high.sum() == row["n_high"] and h.low.sum() == row["n_low"]
            else:
                assert h.low.sum() + h.high.sum() == row["kept"]


def test_bins_follow_the_engine_split_with_ties():
    weight = torch.tensor([[0.5, -0.5, 0.1, -0.1], [1.0, 0.0, 0.25, -0.25]])
    model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    result = Engine(model).apply(CompressionConfig(tau=0.25))
    histogram = LayerBins(weight, bins=8).split(result, "0")
    assert histogram.pruned.sum() == 3  # 0.1, -0.1, 0.0 are below β = 0.25; ±0.25 are kept (|W| ≥ β)
    assert histogram.high.sum() == 5 and histogram.low.sum() == 0
    assert histogram.beta == pytest.approx(0.25) and np.isclose(histogram.edges[[0, -1]], [-1, 1]).all()
    with pytest.raises(KeyError, match="not compressed"):
        LayerBins(weight).split(result, "missing")

