"""The Tune page for models and data other than the shipped CIFAR-10 checkpoints, driven headless with AppTest.

A torchvision mobilenet_v3_small (random init with estimated BN statistics, 10 classes, 32 px) given
as an uploaded state_dict; the user's images handed over as the sidebar's uploader callback does
(``data_upload``). Small settings throughout: 3 τ values, a dozen images.
"""
from __future__ import annotations

import io

import pytest
import torch
from streamlit.testing.v1 import AppTest

import core.measure.sweeps
import core.services.session
import core.services.tune_jobs
from core.measure.accuracy import EvalData, bn_recalibrate, evaluate
from core.workloads import torchvision_models as tv
from tests.app.apptest_tools import (
    APP,
    CIFAR_STATS,
    has_chart,
    image_zip,
    no_errors,
    texts,
)
from tests.app.tune_tools import run_jobs

TIMEOUT = 240


@pytest.fixture(autouse=True)
def fresh(fresh_caches, tmp_path, monkeypatch):
    """Fresh model caches; the CIFAR-10 sweep's disk cache in a temporary folder."""
    monkeypatch.setattr(core.measure.sweeps, "sweep_cache_dir", lambda: tmp_path / "sweeps")
    yield


def _weights(num_classes: int) -> bytes:
    """A mobilenet_v3_small state_dict; BN statistics estimated on random images (outputs are not ~1e-10)."""
    torch.manual_seed(0)
    model = tv.build("mobilenet_v3_small", {"num_classes": num_classes}).eval()
    buffer = io.BytesIO()
    torch.save(bn_recalibrate(model, torch.randn(32, 3, 32, 32)).state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cifar_sized() -> bytes:
    return _weights(10)


def tune_with(weights: bytes, data: bytes | None, size: int = 32) -> AppTest:
    """The app with the torchvision upload loaded (and ``data`` as the user's images), on the Tune page."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    state = {"model_key": "torchvision", "tv_arch": "mobilenet_v3_small", "tv_weights": "upload",
             "tv_image_size": size, **(CIFAR_STATS if size == 32 else {}),
             "pending_torchvision": ("mobilenet_v3_small", weights, "mine.pt")}
    if data is not None:
        state.update(data_source="zip", data_upload=(data, "mine.zip"))
    for key, value in state.items():
        at.session_state[key] = value
    at.switch_page("pages/tune.py").run()
    return at


def test_labelled_images_sweep_choose_and_apply(cifar_sized):
    at = tune_with(cifar_sized, image_zip({"cat": 5, "ship": 4, "frog": 3}))
    no_errors(at)
    session = at.session_state["explorer"]
    assert session.loaded.arch == "torchvision:mobilenet_v3_small" and session.data is not None
    assert any("Accuracy and retention vs τ" in s.value for s in at.subheader)
    maps = [d.value for d in at.dataframe if "output" in d.value.columns]
    assert maps and maps[0].to_dict("records") == [{"output": 3, "class": "cat", "images": 5},
                                                   {"output": 6, "class": "frog", "images": 3},
                                                   {"output": 8, "class": "ship", "images": 4}]
    # the sections that need a training split say so instead of failing
    assert any("no separate training split" in i for i in texts(at.info))
    assert not [b for b in at.button if b.key in ("tune_sens_run", "tune_alloc_run")]

    at.slider(key="tune_steps").set_value(3).run()
    run_jobs(at.button(key="tune_run").click().run())
    no_errors(at)
    frame = at.session_state["tune_user_frame"][1]
    assert list(frame["tau"]) == [0.0, 0.25, 0.5] and (frame["n"] == 12).all()
    # the dense accuracy through this path equals core's own evaluation on the same images
    dense = evaluate(session.loaded.model, EvalData(session.data.images, session.data.labels, "user")).accuracy
    assert frame["accuracy_dense"].iloc[0] == pytest.approx(dense)
    assert has_chart(at, "tune_acc") and has_chart(at, "tune_ret") and has_chart(at, "tune_pareto")
    assert not has_chart(at, "tune_kl")
    table = next(d.value for d in at.dataframe if "accuracy (%)" in d.value.columns)
    assert len(table) == 3

    at.number_input(key="tune_points").set_value(100.0).run()  # every τ passes: the largest is chosen
    no_errors(at)
    assert any("τ = 0.5" in s.value for s in at.success)
    at.button(key="tune_apply").click().run()
    no_errors(at)
    assert at.session_state["tau"] == 0.5 and at.session_state["layer_tau"] == {}


def test_theta_sweep_on_labelled_images(cifar_sized):
    at = tune_with(cifar_sized, image_zip({"cat": 3, "ship": 3}))
    no_errors(at)
    at.slider(key="tune_theta_steps").set_value(3).run()
    at.multiselect(key="tune_pairs").set_value(["2/8"]).run()
    run_jobs(at.button(key="tune_theta_run").click().run())
    no_errors(at)
    theta = at.session_state["tune_user_theta"][1]
    assert sorted(theta["theta"].dropna()) == [0.0, 0.4, 0.8]
    quantized = theta[theta["theta"].notna()]
    assert (quantized["tau"] == at.session_state["tau"]).all() and set(quantized["b_low"]) == {2}
    assert has_chart(at, "tune_theta_chart") and has_chart(at, "tune_pareto")


def test_unlabelled_images_measure_fidelity(cifar_sized):
    at = tune_with(cifar_sized, image_zip(None, loose=6))
    no_errors(at)
    assert any("Fidelity to the dense model vs τ" in s.value for s in at.subheader)
    assert any("Not available without labels" in i for i in texts(at.info))
    at.slider(key="tune_steps").set_value(3).run()
    run_jobs(at.button(key="tune_run").click().run())
    no_errors(at)
    frame = at.session_state["tune_user_frame"][1]
    assert frame["accuracy"].iloc[0] == 1.0 and frame["mean_kl"].iloc[0] == 0.0
    assert (frame["mean_kl"].iloc[1:] > 0).all()
    assert has_chart(at, "tune_kl")
    table = next(d.value for d in at.dataframe if "agreement (%)" in d.value.columns)
    assert "mean KL (nats)" in table.columns


def test_a_failing_sweep_is_an_error_message_not_a_traceback(cifar_sized, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(core.services.tune_jobs, "run_user_sweep", broken)
    at = tune_with(cifar_sized, image_zip({"cat": 2, "ship": 2}))
    run_jobs(at.button(key="tune_run").click().run())
    assert not at.exception
    assert any("The τ sweep failed" in e and "out of cheese" in e for e in texts(at.error)), texts(at.error)
    assert "tune_user_frame" not in at.session_state
    at.slider(key="tune_steps").set_value(4).run()  # the page keeps working
    assert not at.exception


def test_torchvision_cifar_sized_model_on_cifar10_runs_the_cifar_sweep(cifar_sized):
    at = tune_with(cifar_sized, None)
    no_errors(at)
    assert at.session_state["explorer"].data is None
    at.slider(key="tune_steps").set_value(3).run()
    at.slider(key="tune_tau_max").set_value(0.2).run()
    at.toggle(key="tune_bn").set_value(False).run()
    run_jobs(at.button(key="tune_run").click().run())
    no_errors(at)
    frame = at.session_state["tune_frame"]
    assert set(frame["tau"]) == {0.0, 0.1, 0.2} and (frame["n"] == 500).all()
    assert has_chart(at, "tune_acc")


def test_a_model_without_data_asks_for_images():
    at = tune_with(_weights(1000), None, size=64)
    no_errors(at)
    assert any("Evaluation data → my images" in i for i in texts(at.info)), texts(at.info)
    assert not [b for b in at.button if b.key == "tune_run"]


def test_the_synthetic_mlp_says_tuning_needs_images():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_key"] = "synthetic:mlp"
    at.switch_page("pages/tune.py").run()
    no_errors(at)
    assert any("takes vectors" in i for i in texts(at.info)), texts(at.info)


def test_a_shipped_cifar_model_on_the_users_images_sweeps_those_images():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["data_source"] = "zip"
    at.session_state["data_upload"] = (image_zip({"cat": 2, "dog": 2, "ship": 2}), "mine.zip")
    at.switch_page("pages/tune.py").run()
    no_errors(at)
    session = at.session_state["explorer"]
    assert session.evaluates_cifar and session.data is not None and len(session.data) == 6
    at.slider(key="tune_steps").set_value(3).run()
    run_jobs(at.button(key="tune_run").click().run())
    no_errors(at)
    frame = at.session_state["tune_user_frame"][1]
    assert len(frame) == 3 and (frame["n"] == 6).all() and "tune_frame" not in at.session_state
