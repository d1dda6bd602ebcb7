"""core.services.channel_session: the shared pruner, a channel slider move, latency and the repair job (tiny models)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.method.channel_config import ChannelConfig, ChannelError
from core.services import channel_session, repairs
from core.services.choices import LoadedModel
from core.services.session import ExploreSession, clear_caches
from core.workloads.models import build


@pytest.fixture(autouse=True)
def fresh():
    clear_caches()
    repairs.clear()
    yield
    clear_caches()
    repairs.clear()


def tiny_cnn(key: str = "tiny-cnn") -> LoadedModel:
    torch.manual_seed(0)
    model = build("cifar_cnn", width=8).eval()
    with torch.no_grad():  # BatchNorm scales spread out, so channel scores differ (as in a trained model)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.linspace(0.05, 1.0, module.num_features))
    return LoadedModel(key, "tiny CNN", "cifar_cnn", model, "cifar10", False)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).tolist()  # not a tensor: no graph to trace


def test_the_pruner_is_traced_once_and_shared_read_only():
    loaded = tiny_cnn()
    before = [p.detach().clone() for p in loaded.model.parameters()]
    first, second = ExploreSession(loaded), ExploreSession(loaded)
    assert first.channels.pruner() is second.channels.pruner()
    view = first.channels.update(ChannelConfig(tau=0.6), "", "none", 1, "cpu")
    assert view.result.macs < view.result.macs_dense
    assert view.result.params < view.result.params_dense
    for p, q in zip(before, loaded.model.parameters()):
        assert torch.equal(p, q) and p.shape == q.shape  # the user's model is never touched


def test_update_reports_beta_scores_and_kept_shares():
    session = ExploreSession(tiny_cnn())
    group = session.channels.largest_group()
    low = session.channels.update(ChannelConfig(tau=0.2), group, "none", 1, "cpu")
    high = session.channels.update(ChannelConfig(tau=0.7), group, "none", 1, "cpu")
    scores = session.channels.pruner().pruner.scores()[group]
    assert high.beta == pytest.approx(0.7 * float(scores.max()))
    assert torch.equal(high.scores, scores)
    assert high.result.mac_ratio < low.result.mac_ratio
    shares = high.layers.set_index("name")["share"]
    assert ((shares > 0) & (shares <= 1)).all()
    kept = high.layers.set_index("name")["kept_out"]
    assert int(kept[group]) == int((scores >= high.beta).sum()) or int(kept[group]) == 1
    assert set(high.timings) >= {"channels", "total"}
    assert session.channels.update(ChannelConfig(tau=0.2), "no such group", "none", 1, "cpu").group == group


def test_a_model_that_cannot_be_traced_is_one_sentence_remembered(monkeypatch):
    loaded = LoadedModel("untraceable", "x", "mlp", Untraceable(), "vector", False)
    with pytest.raises(ChannelError):
        channel_session.shared_pruner(loaded)
    calls = []
    monkeypatch.setattr(channel_session, "ChannelPruner", lambda *a, **k: calls.append(1))
    with pytest.raises(ChannelError):
        channel_session.shared_pruner(loaded)
    assert not calls  # the failure was remembered: no second trace on the next rerun


def test_latency_compares_dense_and_smaller_model():
    session = ExploreSession(tiny_cnn())
    view = session.channels.update(ChannelConfig(tau=0.6), "", "none", 1, "cpu")
    report = session.channels.latency(view.result, 4, "cpu", budget_s=0.02)
    assert report.dense_ms > 0 and report.compressed_ms > 0 and report.batch == 4


def test_channel_repair_runs_as_a_cancellable_job_and_is_cached(monkeypatch):
    monkeypatch.setattr(repairs, "REPAIR_IMAGES", 32)
    monkeypatch.setattr(repairs, "REPAIR_HOLDOUT", 8)
    images = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(repairs, "calibration", lambda n, h, seed, mean, std: (images[:n], images[n:n + h]))
    session = ExploreSession(tiny_cnn())
    assert session.channels.levels() == ["none", "bn", "reconstruct"]
    view = session.channels.update(ChannelConfig(tau=0.6), "", "reconstruct", 1, "cpu")
    assert view.repair is None and not session.channels.running(view.result.config, "reconstruct")
    with pytest.raises(ValueError):
        session.channels.model(view.result, "reconstruct")  # not made yet: said, not guessed
    job = session.channels.start_repair(view.result, "reconstruct")
    assert job.wait(60) and job.error is None
    repaired = session.channels.cached_repair(view.result.config, "reconstruct")
    assert repaired is job.result and session.channels.model(view.result, "reconstruct") is repaired.model
    x = images[:2]
    assert repaired.model(x).shape == view.result.model(x).shape
    assert any(view.result.model.state_dict()[k].shape == v.shape and not torch.equal(view.result.model.state_dict()[k], v)
               for k, v in repaired.model.state_dict().items())
    again = session.channels.update(ChannelConfig(tau=0.6), "", "reconstruct", 1, "cpu")
    assert again.repair is repaired  # cached for every session
    # a slider move releases a running job: the next setting's job is cancelled when nobody watches it
    other = session.channels.update(ChannelConfig(tau=0.65), "", "reconstruct", 1, "cpu")
    slow = session.channels.start_repair(other.result, "reconstruct")
    session.channels.update(ChannelConfig(tau=0.7), "", "reconstruct", 1, "cpu")
    assert slow.wait(60)
    assert slow.error is None or slow.cancelled
