"""torchvision architectures: bounded arguments, classes read from the weights, the local hub cache only."""
from __future__ import annotations

import hashlib
import io
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from core.workloads import torchvision_models as tv
from core.workloads.models import CheckpointError


@pytest.fixture(scope="module")
def squeeze7() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return tv.build("squeezenet1_1", {"num_classes": 7}).state_dict()


def test_every_classification_architecture_is_listed_and_the_picker_keeps_those_up_to_100m():
    names = tv.architectures()
    assert {"resnet18", "resnet50", "vit_b_16", "convnext_tiny", "regnet_y_128gf", "vgg16"} <= set(names)
    within = tv.architectures_within()
    assert "resnet50" in within and "vgg16" not in within and "regnet_y_128gf" not in within


@pytest.mark.parametrize("kwargs, words", [
    ({"num_classes": 0}, "whole number from 1 to 100000"),
    ({"num_classes": True}, "whole number"),
    ({"num_classes": 10.0}, "whole number"),
    ({"pretrained": True}, "accepts only: num_classes"),
    ({"image_size": 64}, "accepts only: num_classes"),
])
def test_arguments_are_checked(kwargs, words):
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(")):
        tv.check_kwargs("resnet18", kwargs, "x.pt")


def test_architectures_over_100m_parameters_are_refused_before_they_are_built():
    with pytest.raises(CheckpointError, match="138,357,544 parameters; this app loads models of at most 100,000,000"):
        tv.check_kwargs("vgg16", {}, "x.pt")
    with pytest.raises(CheckpointError, match="at most 1,000"):
        tv.check_kwargs("resnet18", {"num_classes": 10}, "x.pt", max_params=1000)


def test_unknown_architectures_and_vit_sizes_are_refused():
    with pytest.raises(CheckpointError, match="torchvision.models does not have"):
        tv.short_name("torchvision:os.system")
    with pytest.raises(CheckpointError, match="a multiple of 16"):
        tv.check_kwargs("vit_b_16", {"image_size": 40})
    assert tv.check_kwargs("vit_b_16", {"image_size": 32, "num_classes": 3}) == {"image_size": 32, "num_classes": 3}
    assert tv.check_kwargs("googlenet", {"transform_input": True}) == {"transform_input": True}
    with pytest.raises(CheckpointError, match="true or false"):
        tv.check_kwargs("googlenet", {"transform_input": 1})


def test_the_classifier_is_found_for_linear_and_convolutional_heads():
    assert tv.classifier_key("resnet18") == "fc.weight"
    assert tv.classifier_key("vit_b_16") == "heads.head.weight"
    assert tv.classifier_key("squeezenet1_1") == "classifier.1.weight"  # a 1×1 convolution, no Linear at all
    assert tv.classifier_key("mobilenet_v3_small") == "classifier.3.weight"


def test_a_state_dict_gives_its_number_of_classes_and_loads_exactly(squeeze7):
    model, kwargs, notes = tv.from_state_dict("squeezenet1_1", squeeze7, "mine.pt")
    assert kwargs == {"num_classes": 7} and notes == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in squeeze7.items())
    assert not model.training


def test_vit_image_size_is_read_from_the_position_embedding():
    state = tv.build("vit_b_32", {"num_classes": 3, "image_size": 64}).state_dict()
    assert tv.infer_kwargs("vit_b_32", state) == {"num_classes": 3, "image_size": 64}


def test_data_parallel_prefix_densenet_keys_and_auxiliary_heads_are_handled():
    state = {f"module.{k}": v for k, v in tv.build("resnet18", {"num_classes": 4}).state_dict().items()}
    _, kwargs, notes = tv.from_state_dict("resnet18", state, "dp.pt")
    assert kwargs == {"num_classes": 4} and "module." in notes[0]
    dense = tv.build("densenet121", {"num_classes": 2}).state_dict()
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in dense.items()}
    assert tv.prepare_state("densenet121", old)[0].keys() == dense.keys()
    google = tv.build("googlenet", {"num_classes": 5}).state_dict()
    with_aux = dict(google, **{"aux1.fc2.weight": torch.zeros(5, 1024), "aux2.fc2.bias": torch.zeros(5)})
    _, kwargs, notes = tv.from_state_dict("googlenet", with_aux, "g.pt")
    assert kwargs == {"num_classes": 5} and "auxiliary training heads (2 tensors)" in notes[0]


def test_a_state_dict_of_another_architecture_does_not_fit(squeeze7):
    with pytest.raises(CheckpointError, match="does not fit torchvision resnet18: its classifier weight 'fc.weight'"):
        tv.from_state_dict("resnet18", squeeze7, "squeeze.pt")
    state = dict(squeeze7)
    state["features.0.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(CheckpointError, match="'features.0.weight' has shape"):
        tv.from_state_dict("squeezenet1_1", state, "bad.pt")


def test_nan_weights_are_refused(squeeze7):
    state = dict(squeeze7)
    state["features.0.weight"] = state["features.0.weight"].clone()
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="'features.0.weight' holds NaN or infinite values"):
        tv.from_state_dict("squeezenet1_1", state, "nan.pt")


def test_weights_files_are_read_safely(tmp_path, squeeze7):
    save_file({k: v.contiguous() for k, v in squeeze7.items()}, str(tmp_path / "w.safetensors"))
    model, kwargs, _ = tv.read_weights_file("squeezenet1_1", tmp_path / "w.safetensors")
    assert kwargs == {"num_classes": 7}
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="not a readable state_dict"):
        tv.read_weights_file("squeezenet1_1", tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        tv.read_weights_file("squeezenet1_1", tmp_path / "missing.pt")


def test_missing_pretrained_weights_name_the_file_the_folder_and_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        tv.load_pretrained("resnet18")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message and "does not download" in message


def _fake_pretrained(monkeypatch, folder, name, data: bytes, label: str = "Fake_Weights"):
    digest = hashlib.sha256(data).hexdigest()[:8]
    filename = f"{name}-{digest}.pth"
    (folder / filename).write_bytes(data)
    weights = SimpleNamespace(url=f"https://example.invalid/{filename}", name="V1",
                              meta={"categories": [f"c{i}" for i in range(7)]},
                              transforms=lambda: None)
    monkeypatch.setattr(tv, "hub_checkpoint_dir", lambda: folder)
    monkeypatch.setattr(tv, "pretrained", lambda n: tv.Pretrained(name, weights))
    return folder / filename


def test_cached_pretrained_weights_load_and_an_altered_file_is_refused(tmp_path, monkeypatch, squeeze7):
    buffer = io.BytesIO()
    torch.save(squeeze7, buffer)
    path = _fake_pretrained(monkeypatch, tmp_path, "squeezenet1_1", buffer.getvalue())
    model, kwargs, info = tv.load_pretrained("squeezenet1_1")
    assert kwargs == {"num_classes": 7} and info.categories[0] == "c0"
    assert torch.equal(model.state_dict()["classifier.1.weight"], squeeze7["classifier.1.weight"])
    path.write_bytes(buffer.getvalue()[:-10])
    with pytest.raises(CheckpointError, match="does not match the SHA256 prefix"):
        tv.load_pretrained("squeezenet1_1")
