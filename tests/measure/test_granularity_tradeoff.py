"""The granularity tradeoff on res_mini (8×8 images, synthetic data): rows, counting, the cache and cancelling."""
from __future__ import annotations

import threading

import pytest
import torch

from core.common.steps import Cancelled, job_steps
from core.measure.accuracy import EvalData
from core.measure.granularity_tradeoff import (
    COLUMNS,
    TradeoffConfig,
    nonzero_macs,
    pareto_points,
    run_tradeoff,
    tradeoff_plan,
)
from core.method.channels import ChannelPruner
from tests.method.channel_nets import res_mini

CONFIG = TradeoffConfig(weight_taus=(0.3,), channel_taus=(0.5,), repairs=("none", "bn", "reconstruct"),
                        batch=4, latency_budget_s=0.01, latency_runs=2, repair_images=32)


def _data() -> EvalData:
    generator = torch.Generator().manual_seed(1)
    return EvalData(torch.randn(40, 3, 8, 8, generator=generator), torch.arange(40) % 10, "synthetic")


def _images() -> torch.Tensor:
    return torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def test_rows_counting_and_the_loaded_model_untouched(tmp_path):
    model = res_mini()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frame = run_tradeoff(model, CONFIG, data=_data(), repair_images=_images(), cache_root=tmp_path)
    assert list(frame.columns) == list(COLUMNS)
    assert list(zip(frame.granularity, frame.repair)) == [("dense", "none")] + \
        [("weight", r) for r in CONFIG.repairs] + [("channel", r) for r in CONFIG.repairs]
    dense_macs = ChannelPruner(model, example_input=_data().images[:1]).macs_dense
    assert (frame.macs_dense == dense_macs).all()
    weight = frame[frame.granularity == "weight"]
    channel = frame[frame.granularity == "channel"]
    assert (weight.mac_ratio == 1.0).all()  # dense kernels: unstructured zeros are multiplied too
    assert (weight[weight.repair == "none"].nonzero_mac_ratio < 1.0).all()
    assert (channel.mac_ratio < 1.0).all() and (channel.macs == channel.macs.iloc[0]).all()
    assert frame.loc[0, "mac_ratio"] == 1.0 and frame.loc[0, "nonzero_mac_ratio"] == 1.0
    # one timing per setting, shared by its repairs; ratios from one interleaved run
    assert channel.latency_ms.nunique() == 1 and (frame.latency_ms > 0).all()
    assert ((frame.latency_ratio - frame.latency_ms / frame.dense_ms).abs() < 1e-12).all()
    assert frame.accuracy.between(0, 1).all() and (frame.n == 40).all()
    assert not frame.cached.any()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    again = run_tradeoff(model, CONFIG, data=_data(), repair_images=_images(), cache_root=tmp_path)
    assert again.cached.all()
    assert again.drop(columns="cached").equals(frame.drop(columns="cached"))
    assert tradeoff_plan(model, CONFIG, data=_data(), repair_images=_images(), cache_root=tmp_path) == (0.0,) * 7


def test_plan_counts_every_row_and_repairs_cost_more(tmp_path):
    costs = tradeoff_plan(res_mini(), CONFIG, data=_data(), repair_images=_images(), cache_root=tmp_path)
    assert len(costs) == 7 and all(c > 0 for c in costs)
    assert costs[3] > costs[2] > 40  # reconstruct > bn > an evaluation alone (timing is counted on "none")


def test_nonzero_macs_of_a_dense_model_are_all_of_them():
    model = res_mini()
    nonzero, total = nonzero_macs(model, torch.zeros(1, 3, 8, 8))
    assert nonzero == total == ChannelPruner(model, example_input=torch.zeros(1, 3, 8, 8)).macs_dense


def test_a_cancelled_job_stops_and_keeps_the_rows_before(tmp_path):
    stop = threading.Event()
    seen = []

    def check():
        if stop.is_set():
            raise Cancelled(len(seen), 7)

    def progress(done, total, label):
        seen.append(done)
        if done == 2:
            stop.set()

    with job_steps(check), pytest.raises(Cancelled):
        run_tradeoff(res_mini(), CONFIG, data=_data(), repair_images=_images(), cache_root=tmp_path,
                     on_progress=progress)
    costs = tradeoff_plan(res_mini(), CONFIG, data=_data(), repair_images=_images(), cache_root=tmp_path)
    assert costs[:2] == (0.0, 0.0) and all(c > 0 for c in costs[2:])


def test_pareto_points_drop_beaten_rows():
    import pandas as pd

    frame = pd.DataFrame({"x": [1.0, 0.5, 0.5, 0.8], "accuracy": [0.9, 0.7, 0.6, 0.65]})
    assert list(pareto_points(frame, "x").index) == [1, 0]


def test_bad_configs_are_one_sentence():
    with pytest.raises(ValueError, match="channel_taus"):
        TradeoffConfig(channel_taus=(1.5,))
    with pytest.raises(ValueError, match="repairs"):
        TradeoffConfig(repairs=("bias",))
