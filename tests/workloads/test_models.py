"""core.workloads.models: the registry, parameter counts, forward shapes and safe checkpoint loading."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from core.workloads import models
from core.workloads.models import (
    PRETRAINED,
    REGISTRY,
    CheckpointError,
    build,
    count_params,
    load_state_dict_into,
    read_state_dict,
    sha256_file,
)

SIDE_EFFECT_FILE = "unpickled.flag"


def _leave_a_mark(path: str) -> str:
    """Called only if a checkpoint's pickle is executed."""
    with open(path, "w") as handle:
        handle.write("executed")
    return path


class Payload:
    """An arbitrary object whose unpickling runs code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return _leave_a_mark, (self.path,)


def test_registry_names():
    assert set(REGISTRY) == {"mlp", "cifar_cnn", "resnet20", "resnet18"}
    assert set(PRETRAINED) <= set(REGISTRY)
    with pytest.raises(ValueError, match="unknown model"):
        build("vgg16")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_build_and_forward(name):
    torch.manual_seed(0)
    model = build(name).eval()
    assert isinstance(model, nn.Module)
    if REGISTRY[name].input_kind == "vector":
        x, expected = torch.randn(3, 128), (3, 128)
    else:
        x, expected = torch.randn(2, 3, 32, 32), (2, 10)
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected and torch.isfinite(out).all()


def test_parameter_counts():
    assert 260_000 <= count_params(build("resnet20")) <= 280_000     # He et al.: 0.27M
    assert 11_000_000 <= count_params(build("resnet18")) <= 11_300_000  # CIFAR ResNet-18: 11.2M
    # the paper's MLP: 6 Linear layers of 128×128 (+ bias)
    mlp = build("mlp")
    assert sum(isinstance(m, nn.Linear) for m in mlp.modules()) == 6
    assert count_params(mlp) == 6 * (128 * 128 + 128)
    assert count_params(build("mlp", layers=3, in_dim=10, out_dim=2, hidden=4)) == (10 * 4 + 4) + (4 * 4 + 4) + (4 * 2 + 2)


def test_resnet20_structure():
    model = build("resnet20")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20  # 19 conv + 1 fc, option-A shortcuts have no weights


def test_wrong_shape_names_the_key():
    state = build("resnet20").state_dict()
    state["layers.1.0.conv1.weight"] = torch.zeros(32, 16, 5, 5)
    with pytest.raises(CheckpointError, match=r"'layers\.1\.0\.conv1\.weight' has shape \(32, 16, 5, 5\)"):
        load_state_dict_into(build("resnet20"), state, "bad.pt")


def test_missing_and_unexpected_keys_are_named():
    state = build("resnet20").state_dict()
    del state["fc.bias"]
    with pytest.raises(CheckpointError, match="'fc.bias' is missing"):
        load_state_dict_into(build("resnet20"), state)
    state = build("resnet20").state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected key 'extra.weight'"):
        load_state_dict_into(build("resnet20"), state)


def test_wrong_architecture_names_the_first_mismatch():
    with pytest.raises(CheckpointError, match="'conv1.weight'"):
        load_state_dict_into(build("resnet20"), build("resnet18").state_dict())


def test_pickled_object_is_refused(tmp_path):
    mark = tmp_path / SIDE_EFFECT_FILE
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"conv.weight": torch.zeros(2), "payload": Payload(str(mark))}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="not a readable state_dict"):
        read_state_dict(path)
    assert not mark.exists()
    # the same object saved with torch.save is refused too
    torch.save({"payload": Payload(str(mark))}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "evil2.pt")
    assert not mark.exists()
    # the payload is live: plain unpickling does run it (so the checks above can fail)
    with open(path, "rb") as handle:
        pickle.load(handle)
    assert mark.read_text() == "executed"


def test_non_state_dict_contents_are_refused(tmp_path):
    torch.save({"epochs": 3}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        read_state_dict(tmp_path / "meta.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "junk.pt")


def test_nested_state_dict_is_accepted(tmp_path):
    state = build("cifar_cnn", width=4).state_dict()
    torch.save({"state_dict": state}, tmp_path / "wrapped.pt")
    loaded = read_state_dict(tmp_path / "wrapped.pt")
    assert loaded.keys() == state.keys()


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = build("resnet20").eval()
    path = tmp_path / "resnet20.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = load_state_dict_into(build("resnet20"), read_state_dict(path), path.name).eval()
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_fp16_checkpoint_is_upcast(tmp_path):
    torch.manual_seed(2)
    source = build("cifar_cnn", width=4)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "half.pt")
    target = load_state_dict_into(build("cifar_cnn", width=4), read_state_dict(tmp_path / "half.pt"))
    weight = target.state_dict()["features.0.weight"]
    assert weight.dtype == torch.float32
    assert torch.equal(weight, source.state_dict()["features.0.weight"].half().float())


def test_load_pretrained_verifies_the_checksum(tmp_path, monkeypatch):
    """A card and checkpoint in a temporary folder: loads when intact, refuses when altered."""
    monkeypatch.setattr(models, "CHECKPOINT_DIR", tmp_path)
    torch.manual_seed(3)
    source = build("resnet20").eval()
    weights = tmp_path / "resnet20.pt"
    torch.save(source.state_dict(), weights)
    card = {"arch": "resnet20", "file": weights.name, "sha256": sha256_file(weights),
            "params": count_params(source), "mean": [0.5] * 3, "std": [0.25] * 3, "test_accuracy": 0.1}
    (tmp_path / "resnet20.json").write_text(json.dumps(card))
    loaded = models.load_pretrained("resnet20")
    assert not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    assert models.load_card("resnet20")["sha256"] == card["sha256"]
    blob = weights.read_bytes()
    weights.write_bytes(blob[:-10])
    with pytest.raises(CheckpointError, match="does not match the SHA256"):
        models.load_pretrained("resnet20")
    with pytest.raises(FileNotFoundError, match="resnet18"):
        models.load_pretrained("resnet18")
