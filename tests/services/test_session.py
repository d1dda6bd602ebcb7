import pytest
import torch

import core.services.session
import core.services.session_measurements as measurements
from core.method.config import CompressionConfig
from core.services.choices import load_choice, model_choices
from core.services.session import ExploreRequest, ExploreSession
from core.services.threads import configure_threads


@pytest.fixture(autouse=True)
def fresh_caches():
    threads = torch.get_num_threads()
    core.services.session.clear_caches()
    yield
    core.services.session.clear_caches()
    torch.set_num_threads(threads)


def test_a_slider_move_does_only_the_fast_part():
    """update() runs the engine and the histogram; latency and accuracy are separate, queued calls."""
    session = ExploreSession(load_choice(model_choices()[0].key))
    view = session.update(ExploreRequest(config=CompressionConfig(tau=0.2, theta=0.3)))
    assert set(view.timings) == {"engine", "histogram", "total"}
    assert view.latency is None and view.full is None and view.realized is None  # nothing measured yet
    assert view.histogram.layer == view.result.stats["name"].iloc[0]


def test_latency_is_interleaved_kept_only_when_quiet_and_then_shared(monkeypatch):
    configure_threads()  # as the app does (the fixture restores the thread count)
    first = ExploreSession(load_choice(model_choices()[0].key))
    result = first.apply(CompressionConfig(tau=0.2, theta=0.3))
    report = first.measurements.latency(result, 1, "cpu")
    assert report.runs >= 3 and report.dense_ms > 0 and report.compressed_ms > 0
    assert len(report.dense_runs_ms) == len(report.compressed_runs_ms) == report.runs
    second = ExploreSession(load_choice(model_choices()[0].key))
    view = second.update(ExploreRequest(config=CompressionConfig(tau=0.2, theta=0.3)))
    if report.quiet:
        assert view.latency is report  # measured once, shown to every session
    else:
        assert view.latency is None  # a disturbed reading is never kept
    disturbed = type(report)(**{**report.__dict__, "cpu_share": 0.3, "quiet": True})
    assert disturbed.disturbed
    monkeypatch.setattr(measurements, "measure_latency", lambda *a, **k: disturbed)
    other = second.apply(CompressionConfig(tau=0.25))
    shown = second.measurements.latency(other, 1, "cpu")
    assert not shown.quiet and measurements.LATENCY_CACHE.get((second.key, other.config, 1, "cpu")) is None


def test_sessions_share_the_snapshot_and_each_holds_only_its_buffer():
    loaded = load_choice(model_choices()[0].key)
    a, b = ExploreSession(loaded), ExploreSession(loaded)
    assert a.engine.snapshot is b.engine.snapshot
    weights = sum(a.engine.snapshot.layer(n).numel * 4 for n in a.layer_names(include_norm=True))
    a.update(ExploreRequest(config=CompressionConfig(tau=0.2)))
    memory = a.measurements.memory()
    assert memory.session == weights  # the working buffer, which is also the current result's weights
    snapshot = a.engine.snapshot
    orders = sum(layer.order.numel() * layer.order.element_size() for layer in snapshot.layers.values())
    assert orders == weights  # int32 rank orders; the weights themselves are the model's, not copied:
    assert snapshot.nbytes == orders + a.engine.chunk_store_bytes()
    assert memory.shared >= snapshot.nbytes and memory.process_rss > 0


def test_moves_record_switches_and_which_moves_changed_theta():
    session = ExploreSession(load_choice("synthetic:mlp"))
    session.update(ExploreRequest(config=CompressionConfig(tau=0.1, theta=0.3)))
    view = session.update(ExploreRequest(config=CompressionConfig(tau=0.1, theta=0.5)))
    assert view.last_move.theta_changed and view.last_move.switches > 0
    assert view.last_theta_move is view.last_move
    tau_only = session.update(ExploreRequest(config=CompressionConfig(tau=0.2, theta=0.5)))
    assert not tau_only.last_move.theta_changed and tau_only.last_theta_move is view.last_move
    assert session.accuracy.deviation(tau_only.result, "cpu") > 0 and tau_only.estimate is None  # no labelled data


def test_records_are_keyword_only():
    with pytest.raises(TypeError):
        ExploreRequest(CompressionConfig(tau=0.2))  # a positional field list would silently shift
