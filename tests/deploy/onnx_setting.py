"""One small exported setting shared by the ONNX tests (exported once per test process)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from core.deploy.onnx_export import ExportConfig
from core.measure.deploy_export import SettingFiles, export_setting
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult, Engine
from tests.conftest import SmallCNN

CONFIG = CompressionConfig(tau=0.2, theta=0.3, b_low=4, b_high=8)
#: the legacy exporter writes these files ~10× faster; the default (dynamo) exporter's file is
#: checked against them in test_onnx_export.py, so both paths are covered
EXPORT = ExportConfig(exporter="torchscript")


@dataclass(frozen=True)
class Setting:
    dense: torch.nn.Module
    engine: Engine
    result: CompressionResult
    calibration: torch.Tensor
    images: torch.Tensor  # held-out inputs for comparing logits (not calibration images)
    files: SettingFiles


def small_cnn() -> SmallCNN:
    """A SmallCNN with non-trivial BatchNorm statistics (some negative γ: folding flips code signs)."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    return model


@lru_cache(maxsize=1)
def setting() -> Setting:
    dense = small_cnn()
    engine = Engine(dense, palette=(4, 8))
    result = engine.apply(CONFIG)
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(128, 3, 8, 8, generator=generator)
    images = torch.randn(32, 3, 8, 8, generator=generator)
    folder = Path(tempfile.mkdtemp(prefix="onnx-tests-"))
    files = export_setting(dense, engine, result, folder, calibration, config=EXPORT)
    return Setting(dense, engine, result, calibration, images, files)
