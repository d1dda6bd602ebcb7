"""Pre-processing: the same pixels as torchvision's weights' transforms(), and a checked record in files."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import EfficientNet_B1_Weights, ResNet50_Weights

from core.workloads.models import CheckpointError
from core.workloads.preprocess import Preprocess


@pytest.mark.parametrize("weights", [ResNet50_Weights.DEFAULT, EfficientNet_B1_Weights.IMAGENET1K_V2])
def test_the_weights_transforms_are_reproduced_exactly(weights):
    transform = weights.transforms()  # metadata only: nothing is downloaded
    preprocess = Preprocess.from_weights(transform, "test")
    image = torch.randint(0, 256, (3, 301, 377), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert preprocess.image_size == transform.crop_size[0] and preprocess.resize_size == transform.resize_size[0]
    assert torch.equal(preprocess.normalize(preprocess.resize_crop(image)), transform(image))


def test_cifar_sizes_resize_straight_to_the_input():
    preprocess = Preprocess.for_size(32, (0.5,) * 3, (0.5,) * 3)
    assert preprocess.resize_size == 32 and Preprocess.for_size(224, (0,) * 3, (1,) * 3).resize_size == 256
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(preprocess.resize_crop(image), image)
    assert torch.equal(preprocess.denormalize(preprocess.normalize(image)), image)


def test_the_record_round_trips_and_equality_ignores_the_source():
    preprocess = Preprocess(96, 110, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic", "mine")
    back = Preprocess.from_dict(preprocess.to_dict(), "file")
    assert back == preprocess and hash(back) == hash(preprocess) and back.source == "recorded in file"


@pytest.mark.parametrize("record, words", [
    ([1, 2], "as something other than an object"),
    ({"image_size": 4}, "from 8 to 1024"),
    ({"image_size": True}, "from 8 to 1024"),
    ({"mean": [0, 0]}, "three finite numbers"),
    ({"std": [1, 0, 1]}, "three finite positive numbers"),
    ({"std": [1, float("nan"), 1]}, "three finite positive numbers"),
    ({"interpolation": "lanczos"}, "use one of bilinear"),
    ({"crop": 3}, "unknown pre-processing field"),
])
def test_bad_records_are_refused_with_a_sentence(record, words):
    with pytest.raises(CheckpointError, match=words):
        Preprocess.from_dict(record, "model.packed")
