"""``from core import ...``: every name of the public surface imports, and the README's example runs."""
import importlib
import re
from pathlib import Path

import torch

import core


def test_every_listed_name_imports():
    assert len(core.__all__) == len(set(core.__all__))
    for name in core.__all__:
        assert getattr(importlib.import_module("core"), name) is not None, name


def test_the_readme_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## The engine in five lines\n+```python\n(.*?)```", readme, re.S)
    assert block, "the README has no engine example"
    torch.manual_seed(0)
    model = core.build("resnet20").eval()
    monkeypatch.chdir(tmp_path)
    scope = {"model": model}
    exec(block.group(1), scope)  # noqa: S102 (the README's own code)
    result = scope["result"]
    assert isinstance(result, core.CompressionResult) and 0 < result.retention < 1
    packed = next(tmp_path.glob("*.safetensors"))
    restored = core.load_compressed(packed)
    for name, weight in result.weights.items():
        assert torch.equal(restored.get_submodule(name).weight, weight)
