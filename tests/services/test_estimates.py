"""Progressive paired accuracy shared across sessions: the dense model runs once, a revisited setting resumes."""
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import core.services.session as session_module
import core.services.session_repairs as session_repairs
from core.measure.accuracy import EvalData, evaluate
from core.measure.paired import balanced_order
from core.method.config import CompressionConfig
from core.services import estimates
from core.services.choices import load_choice
from core.services.session import ExploreSession
from core.services.session_accuracy import SessionAccuracy


@pytest.fixture
def small_cifar(monkeypatch):
    """200 random 32×32 'test images' with labels stand in for CIFAR-10: the same code path, in milliseconds."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(200, 3, 32, 32, generator=generator)
    labels = torch.arange(200) % 10
    order = balanced_order(labels)
    data = estimates.EvaluationSet("small", images, labels, order, labels[order])
    monkeypatch.setattr(SessionAccuracy, "evaluation_set", lambda self: data)
    monkeypatch.setattr(estimates, "estimate_precision", lambda device: "fp32")
    session_module.clear_caches()
    yield data
    session_module.clear_caches()


def trained_like_session(key: str = "untrained:resnet20") -> ExploreSession:
    return ExploreSession(load_choice(key))


def run_to_completion(session, result):
    estimate = None
    steps = 0
    while estimate is None or not estimate.complete:
        estimate = session.accuracy.refine(result, False, "cpu")
        steps += 1
    return estimate, steps


def test_completed_estimate_equals_full_evaluation_exactly(small_cifar):
    session = trained_like_session()
    result = session.apply(CompressionConfig(tau=0.3))
    estimate, steps = run_to_completion(session, result)
    assert steps > 1  # refined batch by batch
    data = EvalData(small_cifar.images, small_cifar.labels, "small")
    compressed = evaluate(result.model, data).accuracy
    dense = evaluate(session.loaded.model, data).accuracy
    assert estimate.accuracy == pytest.approx(compressed) and estimate.dense_accuracy == pytest.approx(dense)
    assert estimate.delta == pytest.approx(compressed - dense) and estimate.delta_half_width == 0


def test_dense_predictions_run_once_for_every_session(small_cifar, monkeypatch):
    calls = []
    real_predict = estimates.predict

    def counting(model, images, **kwargs):
        calls.append((id(model), len(images)))
        return real_predict(model, images, **kwargs)

    monkeypatch.setattr(estimates, "predict", counting)
    first, second = trained_like_session(), trained_like_session()
    dense_id = id(first.loaded.model)
    run_to_completion(first, first.apply(CompressionConfig(tau=0.2)))
    dense_images = sum(n for model, n in calls if model == dense_id)
    assert dense_images == 200
    calls.clear()
    again, _ = run_to_completion(second, second.apply(CompressionConfig(tau=0.2)))
    assert calls == []  # the same setting in another session: already known, nothing runs
    run_to_completion(second, second.apply(CompressionConfig(tau=0.4)))
    assert not [1 for model, _ in calls if model == dense_id]  # a new setting: only the compressed model runs
    assert second.accuracy.estimate(second.apply(CompressionConfig(tau=0.2)), False, "cpu") == again


def test_bn_recalibrated_estimates_are_kept_apart(small_cifar, monkeypatch):
    monkeypatch.setattr(session_repairs, "calibration_images", lambda n, mean, std: torch.randn(64, 3, 32, 32))
    session = trained_like_session()
    result = session.apply(CompressionConfig(tau=0.3))
    plain, _ = run_to_completion(session, result)
    recalibrated = session.accuracy.refine(result, True, "cpu")
    assert recalibrated.n < plain.n  # its own store, started from the front


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 600), seconds=st.floats(1e-7, 100.0))
def test_every_step_is_a_multiple_of_the_first_batch(steps, seconds):
    """Step sizes from a few shapes only: oneDNN caches compiled kernels per input shape (see FIRST_BATCH)."""
    store = SimpleNamespace(done=steps * estimates.FIRST_BATCH, seconds=seconds)
    size = estimates._next_stop(store) - store.done
    assert size % estimates.FIRST_BATCH == 0 and estimates.FIRST_BATCH <= size <= estimates.MAX_BATCH


def test_a_model_sees_few_batch_shapes_while_its_estimate_refines(small_cifar, monkeypatch):
    session = trained_like_session()
    shapes = set()
    session.loaded.model.register_forward_pre_hook(lambda module, args: shapes.add(len(args[0])))
    clock = iter(range(10**6))
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock) * 0.0037)  # odd per-image speeds
    run_to_completion(session, session.apply(CompressionConfig(tau=0.3)))
    chunk = estimates.PREDICT_PIXELS // (32 * 32)
    tail = small_cifar.population % estimates.FIRST_BATCH  # only the last step, cut at the population, adds this
    assert all(n <= chunk and n % estimates.FIRST_BATCH in (0, tail) for n in shapes), shapes
