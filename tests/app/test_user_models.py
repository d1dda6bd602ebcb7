"""The sidebar's torchvision model choice and the user's images, driven headless with AppTest.

The uploads are handed over the way the uploader's callbacks do (``pending_torchvision``,
``data_upload`` in the session state): AppTest has no file chooser.
"""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from core.workloads import torchvision_models as tv
from tests.app.apptest_tools import APP, image_zip, texts

TIMEOUT = 180


pytestmark = pytest.mark.usefixtures("fresh_caches")


@pytest.fixture(scope="module")
def cifar_sized_weights() -> bytes:
    """A randomly initialised torchvision mobilenet_v3_small with 10 classes, as torch.save bytes."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(tv.build("mobilenet_v3_small", {"num_classes": 10}).state_dict(), buffer)
    return buffer.getvalue()


def start_with_torchvision(weights: bytes) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["accuracy_target"] = 0.05
    at.session_state["model_key"] = "torchvision"
    at.session_state["tv_arch"] = "mobilenet_v3_small"
    at.session_state["tv_weights"] = "upload"
    at.session_state["tv_image_size"] = 32
    at.session_state["tv_mean"] = "0.4914, 0.4822, 0.4465"
    at.session_state["tv_std"] = "0.2470, 0.2435, 0.2616"
    at.session_state["pending_torchvision"] = ("mobilenet_v3_small", weights, "mnv3.pt")
    return at.run()


def test_the_registry_stays_the_default():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert at.session_state["model_key"].startswith("pretrained:")
    assert "torchvision model…" in at.selectbox(key="model_key").options


def test_torchvision_upload_loads_and_explores_on_cifar(cifar_sized_weights):
    at = start_with_torchvision(cifar_sized_weights)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)
    session = at.session_state["explorer"]
    assert session.loaded.arch == "torchvision:mobilenet_v3_small"
    assert session.loaded.arch_kwargs == {"num_classes": 10}
    assert session.loaded.input_kind == "cifar10" and session.loaded.image_size == 32
    assert any(m.label.startswith("Accuracy Δ vs dense") for m in at.metric)  # evaluated on CIFAR-10
    at.slider(key="tau").set_value(0.3).run()
    assert not at.exception
    assert abs(at.session_state["explorer"].last_config.tau - 0.3) < 1e-9


def test_a_state_dict_of_another_architecture_is_an_error(cifar_sized_weights):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_key"] = "torchvision"
    at.session_state["tv_arch"] = "resnet18"
    at.session_state["tv_weights"] = "upload"
    at.session_state["pending_torchvision"] = ("resnet18", cifar_sized_weights, "mnv3.pt")
    at.run()
    assert not at.exception
    errors = texts(at.error)
    assert any("mnv3.pt does not fit" in e for e in errors), errors
    assert "torchvision_model" not in at.session_state


def test_missing_pretrained_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_key"] = "torchvision"
    at.session_state["tv_arch"] = "resnet18"
    at.session_state["tv_weights"] = "pretrained"
    at.session_state["pending_torchvision"] = ("resnet18", None, None)
    at.run()
    assert not at.exception
    errors = texts(at.error)
    assert any("resnet18-f37072fd.pth" in e and str(tmp_path) in e for e in errors), errors


def test_labelled_images_replace_cifar_and_show_a_preview(cifar_sized_weights):
    at = start_with_torchvision(cifar_sized_weights)
    at.session_state["data_source"] = "zip"
    at.session_state["data_upload"] = (image_zip({"cat": 6, "ship": 6}, {"val/notes.txt": b"hello"}, shape=(40, 48)), "mine.zip")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)
    session = at.session_state["explorer"]
    assert session.data is not None and len(session.data) == 12 and session.has_labels
    assert session.accuracy.evaluation_set().key == session.data.key
    assert any("1 file that is not an image" in c for c in texts(at.caption))
    assert at.get("image"), "no preview images"
    assert any("2 class folders and the model 10 outputs" in w for w in texts(at.warning))
    metric = next(m for m in at.metric if m.label.startswith("Accuracy Δ vs dense"))
    assert "n = 12" in metric.delta
    assert "all 12 images" in at.select_slider(key="accuracy_target").options  # not CIFAR-10's 10,000


def test_unlabelled_images_measure_fidelity(cifar_sized_weights):
    at = start_with_torchvision(cifar_sized_weights)
    at.session_state["data_source"] = "zip"
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(5):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(png, format="PNG")
            archive.writestr(f"{i}.png", png.getvalue())
    at.session_state["data_upload"] = (buffer.getvalue(), "plain.zip")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(m.label.startswith("Top-1 agreement with dense") for m in at.metric)


def test_a_hostile_archive_is_refused_with_a_sentence(cifar_sized_weights):
    at = start_with_torchvision(cifar_sized_weights)
    at.session_state["data_source"] = "zip"
    at.session_state["data_upload"] = (image_zip({"cat": 1}, {"../escape.png": b"x"}, shape=(40, 48)), "evil.zip")
    at.run()
    assert not at.exception
    assert any("climbs out of the folder" in e for e in texts(at.error)), texts(at.error)
    assert at.session_state["explorer"].data is None


def test_an_imagenet_sized_model_without_data_shows_the_output_deviation():
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(tv.build("mobilenet_v3_small", {"num_classes": 1000}).state_dict(), buffer)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_key"] = "torchvision"
    at.session_state["tv_arch"] = "mobilenet_v3_small"
    at.session_state["tv_weights"] = "upload"
    at.session_state["pending_torchvision"] = ("mobilenet_v3_small", buffer.getvalue(), "imagenet.pt")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)
    loaded = at.session_state["explorer"].loaded
    assert loaded.input_kind == "image" and loaded.image_size == 224 and loaded.arch_kwargs == {"num_classes": 1000}
    assert any(m.label.startswith("Output deviation") for m in at.metric)
    assert at.radio(key="data_source").value == "default"


def test_load_with_upload_chosen_but_no_file_never_falls_back_to_the_pretrained_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no pretrained weights there: a fallback would show their error
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_key"] = "torchvision"
    at.session_state["tv_arch"] = "resnet18"
    at.session_state["tv_weights"] = "upload"
    at.run()
    assert at.button(key="tv_load").disabled  # nothing to load yet
    at.radio(key="tv_weights").set_value("pretrained").run()
    assert not at.button(key="tv_load").disabled
    at.radio(key="tv_weights").set_value("upload")  # switched back, and Load clicked before the page reran
    at.button(key="tv_load").click().run()
    assert not at.exception
    errors = texts(at.error)
    assert any("no state_dict uploaded yet" in e for e in errors), errors
    assert not any("pretrained weights of torchvision" in e for e in errors), errors
    assert "torchvision_model" not in at.session_state
