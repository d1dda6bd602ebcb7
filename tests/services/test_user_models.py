"""Uploads of torchvision models, their provenance in every export, and the user's images in a session."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.method.config import CompressionConfig
from core.services import session as session_module
from core.services.choices import load_choice
from core.services.session import ExploreRequest, ExploreSession
from core.services.uploads import export_bundle, packed_bytes, read_upload, settings_json
from core.workloads import torchvision_models as tv
from core.workloads.image_folder import read_image_folder
from core.workloads.models import CheckpointError
from core.workloads.preprocess import Preprocess

CIFAR_SIZED = Preprocess.for_size(32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@pytest.fixture(autouse=True)
def fresh_caches():
    session_module.clear_caches()
    yield
    session_module.clear_caches()


def saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def weights() -> bytes:
    torch.manual_seed(0)
    return saved(tv.build("squeezenet1_1", {"num_classes": 10}).state_dict())


def folder(root, classes: dict[str, int]):
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_torchvision_state_dict_uploads_with_its_classes_and_input(weights):
    loaded = read_upload(weights, "sq.pt", "torchvision:squeezenet1_1", preprocess=CIFAR_SIZED)
    assert loaded.arch == "torchvision:squeezenet1_1" and loaded.arch_kwargs == {"num_classes": 10}
    assert loaded.input_kind == "cifar10" and loaded.image_size == 32 and loaded.mean == CIFAR_SIZED.mean
    assert "torchvision squeezenet1_1 (10 classes)" in loaded.label
    imagenet = read_upload(weights, "sq.pt", "torchvision:squeezenet1_1")
    assert imagenet.input_kind == "image" and imagenet.image_size == 224
    assert imagenet.example_input(2).shape == (2, 3, 224, 224) and imagenet.key != loaded.key


def test_bad_torchvision_uploads_are_sentences(weights):
    with pytest.raises(CheckpointError, match="sq.pt does not fit torchvision resnet18"):
        read_upload(weights, "sq.pt", "torchvision:resnet18")
    state = torch.load(io.BytesIO(weights), weights_only=True)
    state["features.0.bias"][0] = float("inf")
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        read_upload(saved(state), "inf.pt", "torchvision:squeezenet1_1")
    with pytest.raises(CheckpointError, match="more than 100 bytes|the limit is"):
        read_upload(weights, "sq.pt", "torchvision:squeezenet1_1", max_bytes=100)


def test_bundle_packed_file_and_settings_record_where_the_model_came_from(weights):
    loaded = read_upload(weights, "sq.pt", "torchvision:squeezenet1_1", preprocess=CIFAR_SIZED)
    result = ExploreSession(loaded).apply(CompressionConfig(tau=0.2, theta=0.3))
    for data, name in ((export_bundle(result, loaded), "bundle.pt"), (packed_bytes(result, loaded), "m.packed")):
        back = read_upload(data, name)  # no architecture given: read from the file
        assert back.arch == "torchvision:squeezenet1_1" and back.arch_kwargs == {"num_classes": 10}
        assert back.preprocess == CIFAR_SIZED and back.input_kind == "cifar10"
        assert all(torch.equal(a, b) for a, b in zip(back.model.state_dict().values(),
                                                     result.model.state_dict().values()))
    record = json.loads(settings_json(result.config, loaded, result))["model"]
    assert record["arch"] == "torchvision:squeezenet1_1" and record["arch_kwargs"] == {"num_classes": 10}
    assert record["input"]["image_size"] == 32


def test_registry_exports_keep_their_old_shape():
    loaded = load_choice("synthetic:mlp")
    record = json.loads(settings_json(CompressionConfig(tau=0.1), loaded))["model"]
    assert record["arch"] == "mlp" and record["arch_kwargs"] == {} and "input" not in record


def test_labelled_images_drive_the_paired_estimate_and_the_full_accuracy(weights, tmp_path):
    loaded = read_upload(weights, "sq.pt", "torchvision:squeezenet1_1", preprocess=CIFAR_SIZED)
    session = ExploreSession(loaded)
    images = read_image_folder(folder(tmp_path, {"cat": 4, "ship": 4}), loaded.input_preprocess())
    assert session.use_data(images) == ["The data has 2 class folders and the model 10 outputs; folders are mapped "
                                        "by the weights' category names."]
    evaluation = session.accuracy.evaluation_set()
    assert evaluation.key == session.data.key and evaluation.population == 8
    assert sorted(set(evaluation.labels.tolist())) == [3, 8]  # cat, ship in CIFAR-10's order
    result = session.apply(CompressionConfig(tau=0.3))
    view = session.update(ExploreRequest(config=result.config))
    assert view.accuracy_available
    estimate = session.accuracy.refine(result, False, "cpu")
    assert estimate.population == 8
    assert session.accuracy.full(result, True, "cpu").n == 8  # SqueezeNet has no BatchNorm: the "bn" level is "none"
    assert "no BatchNorm" in session.repairs.unavailable()["bn"]
    session.use_data(None)
    assert session.data is None and session.accuracy.evaluation_set().key.startswith("cifar10-test")


def test_unlabelled_images_give_fidelity_instead_of_accuracy(weights, tmp_path):
    loaded = read_upload(weights, "sq.pt", "torchvision:squeezenet1_1")
    session = ExploreSession(loaded)
    for i in range(3):
        Image.fromarray(np.full((30, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    session.use_data(read_image_folder(tmp_path, loaded.input_preprocess()))
    assert not session.has_labels
    dense = session.apply(CompressionConfig(tau=0.0))
    same = session.accuracy.fidelity(dense, "cpu")
    assert same.agreement == 1.0 and same.mean_kl == pytest.approx(0.0, abs=1e-6) and same.n == 3
    view = session.update(ExploreRequest(config=dense.config))
    assert view.fidelity is same and not view.accuracy_available


def test_exported_programs_are_refused_because_loading_them_unpickles():
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with pytest.raises(CheckpointError, match=r"model.pt2 is an exported program .* can execute code"):
        read_upload(buffer.getvalue(), "model.pt2", "mlp")
