import pytest
import torch

import core.services.session
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


def test_update_fits_the_latency_budget_shape():
    """The update path's parts are all measured; this checks they are reported (not a speed assertion)."""
    configure_threads()  # as the app does (the fixture restores the thread count)
    session = ExploreSession(load_choice(model_choices()[0].key))
    view = session.update(ExploreRequest(config=CompressionConfig(tau=0.2, theta=0.3)))
    assert {"engine", "histogram", "latency", "total"} <= set(view.timings)
    assert view.latency.runs >= 3 and view.latency.dense_ms > 0 and view.latency.compressed_ms > 0
    again = session.update(ExploreRequest(config=CompressionConfig(tau=0.2, theta=0.3)))
    assert again.latency is view.latency  # cached per setting


def test_moves_record_switches_and_which_moves_changed_theta():
    session = ExploreSession(load_choice("synthetic:mlp"))
    session.update(ExploreRequest(config=CompressionConfig(tau=0.1, theta=0.3), quick_per_class=0,
                                  measure_latency=False))
    view = session.update(ExploreRequest(config=CompressionConfig(tau=0.1, theta=0.5), quick_per_class=0,
                                         measure_latency=False))
    assert view.last_move.theta_changed and view.last_move.switches > 0
    assert view.last_theta_move is view.last_move
    tau_only = session.update(ExploreRequest(config=CompressionConfig(tau=0.2, theta=0.5), quick_per_class=0,
                                             measure_latency=False))
    assert not tau_only.last_move.theta_changed and tau_only.last_theta_move is view.last_move
    assert tau_only.deviation is not None and tau_only.quick is None  # no labelled data for the MLP


def test_records_are_keyword_only():
    with pytest.raises(TypeError):
        ExploreRequest(CompressionConfig(tau=0.2))  # a positional field list would silently shift

