"""core.services.tradeoff_jobs: the granularity tradeoff as a shared, cancellable Tune job (a tiny CIFAR-shaped CNN)."""
from __future__ import annotations

import pytest
import torch

import core.measure.granularity_tradeoff as tradeoff_module
from core.measure.accuracy import EvalData
from core.measure.granularity_tradeoff import TradeoffConfig
from core.services import channel_session, tradeoff_jobs, tune_jobs
from core.services.choices import LoadedModel
from core.services.jobs import Job
from tests.services.test_channel_session import tiny_cnn

CONFIG = TradeoffConfig(weight_taus=(0.3,), channel_taus=(0.5,), repairs=("none", "bn"), per_class=2, batch=2,
                        latency_budget_s=0.01, latency_runs=2, repair_images=16)


@pytest.fixture(autouse=True)
def fake_cifar(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    data = EvalData(torch.randn(40, 3, 32, 32, generator=generator), torch.arange(40) % 10, "test")
    fit = torch.randn(16, 3, 32, 32, generator=generator)
    monkeypatch.setattr(tradeoff_module, "eval_data", lambda split, mean, std: data)
    monkeypatch.setattr(tradeoff_jobs, "eval_data", lambda split, mean, std: data)
    monkeypatch.setattr("core.measure.calibration.calibration_split", lambda n, h, seed, mean, std: (fit[:n], fit[:0]))
    monkeypatch.setattr(tradeoff_module, "tradeoff_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(tradeoff_module, "_context", lambda *args: {"test": "tradeoff-job"})
    tune_jobs.clear()
    channel_session.clear_caches()
    yield
    tune_jobs.clear()


def _finish(job: Job) -> Job:
    while not job.wait(0.5):
        job.watch("test")
    return job


def test_the_job_measures_every_row_and_is_shared_between_sessions():
    loaded = tiny_cnn("tradeoff-tiny")
    seen = []
    first = tradeoff_jobs.tradeoff(loaded, CONFIG, "session-a")
    assert tradeoff_jobs.tradeoff(loaded, CONFIG, "session-b") is first  # same key: one job
    _finish(first)
    assert first.error is None, first.error
    frame = first.result
    seen.append(len(first.partial))
    assert list(frame.granularity) == ["dense", "weight", "weight", "channel", "channel"]
    assert first.done == first.total == 5 and seen == [5]
    assert (frame[frame.granularity == "channel"].mac_ratio < 1).all()
    again = _finish(tradeoff_jobs.tradeoff(loaded, CONFIG, "session-a"))
    assert again.result.cached.all()  # every row from the disk cache


def test_a_model_without_cifar_inputs_is_one_sentence():
    from core.workloads.models import build

    loaded = LoadedModel("mlp-tradeoff", "an MLP", "mlp", build("mlp"), "vector", False)
    assert "CIFAR-10" in tradeoff_jobs.supported(loaded)
    job = _finish(tradeoff_jobs.tradeoff(loaded, CONFIG, "session-a"))
    assert isinstance(job.error, ValueError) and "vector" in str(job.error)


def test_cancel_stops_the_job(monkeypatch):
    loaded = tiny_cnn("tradeoff-cancel")
    real = tradeoff_module._Runner.compute

    def slow(self, *args):
        job = next(j for j in tune_jobs.jobs() if j.key[0] == "tradeoff")
        job.cancel()  # a Cancel while the first row runs
        return real(self, *args)

    monkeypatch.setattr(tradeoff_module._Runner, "compute", slow)
    job = _finish(tradeoff_jobs.tradeoff(loaded, CONFIG, "session-a"))
    from core.common.steps import Cancelled

    assert isinstance(job.error, Cancelled)
