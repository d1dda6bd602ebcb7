"""core.services.user_tuning: the sidebar's model and the user's images through the tuning sweep of core.tune."""
from __future__ import annotations

import io
import math
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from core.measure.accuracy import EvalData, bn_recalibrate, evaluate, predict
from core.measure.tuning import COLUMNS, settings
from core.services.choices import load_choice, torchvision_loaded
from core.services.user_tuning import class_mapping, run_user_sweep, subset_indices, tune_data, tune_model
from core.workloads import torchvision_models as tv
from core.workloads.data import CIFAR_MEAN, CIFAR_STD, CLASSES
from core.workloads.image_folder import for_model, read_image_zip
from core.workloads.preprocess import Preprocess

PRE = Preprocess.for_size(32, CIFAR_MEAN, CIFAR_STD, "test")


def _zip(classes: dict[str, int] | None, loose: int = 0) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        names = [f"{c}/{i}.png" for c, n in (classes or {}).items() for i in range(n)]
        names += [f"{i}.png" for i in range(loose)]
        for name in names:
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(png, format="PNG")
            archive.writestr(name, png.getvalue())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def loaded():
    """A randomly initialised torchvision mobilenet_v3_small with 10 classes at 32 px (a CIFAR-10-sized model).

    Its BatchNorm statistics are estimated on random images: at initialisation (running variance 1)
    the outputs are about 1e-10 and every setting would look identical to dense.
    """
    torch.manual_seed(0)
    model = bn_recalibrate(tv.build("mobilenet_v3_small", {"num_classes": 10}).eval(), torch.randn(64, 3, 32, 32))
    return torchvision_loaded("torchvision:test", "mnv3", "torchvision:mobilenet_v3_small", model,
                              {"num_classes": 10}, PRE, "random init", "test")


def test_tune_model_keeps_the_module_and_its_preprocessing(loaded):
    tuned = tune_model(loaded)
    assert tuned.model is loaded.model and tuned.preprocess == PRE
    assert not tuned.registry and tuned.input_spec == PRE.to_dict()
    assert tuned.categories == CLASSES and tuned.arch_kwargs == {"num_classes": 10}
    registry = tune_model(load_choice("untrained:resnet20"))
    assert registry.registry and registry.input_spec is None and registry.preprocess.image_size == 32
    with pytest.raises(ValueError, match="vectors"):
        tune_model(load_choice("synthetic:mlp"))


def test_labelled_images_sweep_matches_core_evaluation(loaded):
    images, _ = for_model(read_image_zip(_zip({"cat": 5, "ship": 4, "frog": 3}), "mine.zip", PRE), CLASSES, 10)
    data = tune_data(images, loaded.model)
    assert data.labelled and len(data) == 12 and torch.equal(data.labels, images.labels)
    subset = tune_data(images, loaded.model, n_images=6)
    assert len(subset) == 6 and sorted(subset.labels.tolist()) == sorted(images.labels[subset_indices(
        images.labels, 6)].tolist())
    assert set(subset.labels.tolist()) == {3, 6, 8}  # class-balanced: every class is in the subset
    frame = run_user_sweep(tune_model(loaded), data, settings([0.1, 0.3], None, 4, 8))
    assert list(frame.columns) == list(COLUMNS) + ["mean_kl"] and len(frame) == 3
    dense = evaluate(loaded.model, EvalData(data.images, data.labels, "user")).accuracy
    assert frame["accuracy_dense"].iloc[0] == pytest.approx(dense) and frame["accuracy"].iloc[0] == pytest.approx(dense)
    assert frame["mean_kl"].isna().all()
    assert (frame["retention"].iloc[1:] < 1).all() and (frame["packed_bytes"] > 0).all()


def test_unlabelled_images_measure_agreement_and_kl_with_progress(loaded):
    images = read_image_zip(_zip(None, loose=7), "plain.zip", PRE)
    data = tune_data(images, loaded.model)
    assert not data.labelled and torch.equal(data.labels, predict(loaded.model, images.images))
    seen: list[tuple[int, int]] = []
    frame = run_user_sweep(tune_model(loaded), data, settings([0.2, 0.6], None, 4, 8),
                           calibration=images.images, on_progress=lambda d, t, _: seen.append((d, t)))
    assert len(frame) == 5 and list(frame["bn_recalibrated"]) == [False, False, True, False, True]
    assert frame["accuracy"].iloc[0] == 1.0 and frame["mean_kl"].iloc[0] == 0.0
    assert all(math.isfinite(v) and v >= 0 for v in frame["mean_kl"])
    assert frame["mean_kl"].iloc[3] > frame["mean_kl"].iloc[1]  # τ = 0.6 moves the outputs further than τ = 0.2
    assert seen[-1] == (9, 9) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_class_mapping_counts_the_images_of_each_output():
    images, _ = for_model(read_image_zip(_zip({"ship": 2, "cat": 3}), "m.zip", PRE), CLASSES, 10)
    table = class_mapping(images)
    assert table.to_dict("records") == [{"output": 3, "class": "cat", "images": 3},
                                        {"output": 8, "class": "ship", "images": 2}]
    assert class_mapping(read_image_zip(_zip(None, loose=2), "p.zip", PRE)).empty


def test_bad_arguments_are_refused(loaded):
    images = read_image_zip(_zip({"cat": 2, "dog": 2}), "m.zip", PRE)
    with pytest.raises(ValueError, match="≥ 1"):
        tune_data(images, loaded.model, n_images=0)
