"""The ONNX files of one setting: the dense model (the same-runtime baseline), the compressed fp32 and int8.

:func:`export_setting` takes what the app and ``core.tune`` hold (the dense model, the engine, its
result and optionally a repair of it) and writes three files into a folder:

* ``dense.onnx``: the user's dense model, fp32: the fair "same runtime" baseline;
* ``model.onnx``: the compressed (or repaired) model, fp32, its weights as they are;
* ``model.int8.onnx``: int8 QDQ with the engine's codes (a repair's own codes for a repaired
  quantized result), activations calibrated on ``calibration`` (unlabelled *training* or the
  user's images; never test images), see :mod:`core.deploy.onnx_export`.

Sizes: each file's bytes on disk, and its bytes zipped (``zipfile`` deflate, level 9), beside
``torch.save(model.state_dict())`` of the dense model, the file a user would otherwise ship.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.deploy.int8_weights import Int8Weights, engine_codes, to_int8
from core.deploy.onnx_export import (
    ExportConfig,
    Int8Export,
    check_calibration_images,
    export_fp32,
    export_int8,
)

DENSE_FILE = "dense.onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
DEFAULT_EXPORT = ExportConfig()


def zipped_bytes(data: bytes, name: str = "file") -> int:
    """Bytes of a zip archive holding ``data`` as one deflated member (level 9)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr(name, data)
    return buffer.tell()


@dataclass(frozen=True)
class FileSize:
    """``raw``: bytes on disk; ``zipped``: bytes of the file zipped (deflate, level 9)."""

    raw: int
    zipped: int

    @classmethod
    def of(cls, path: Path) -> FileSize:
        data = Path(path).read_bytes()
        return cls(len(data), zipped_bytes(data, Path(path).name))


def state_dict_size(model: nn.Module) -> FileSize:
    """Size of ``torch.save(model.state_dict())``, raw and zipped."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    return FileSize(len(data), zipped_bytes(data, "state_dict.pt"))


@dataclass(frozen=True)
class SettingFiles:
    """The three files of one setting and their sizes (``sizes`` keyed by file name, plus ``"state_dict"``)."""

    folder: Path
    dense: Path
    fp32: Path
    int8: Path
    int8_export: Int8Export
    sizes: dict[str, FileSize]
    input_shape: tuple[int, ...]  # one image: C×H×W

    @property
    def weights(self) -> Int8Weights | None:
        return self.int8_export.weights


def setting_weights(engine, result, repaired=None) -> Int8Weights | None:
    """The int8 weights of a setting: a repair's codes when it has them, else the engine's chunks.

    ``repaired``: a :class:`core.measure.repair.RepairResult` of this result (its ``quantized``
    holds the re-solved layers' codes and scales; layers it did not re-solve keep the engine's).
    An unquantized setting (θ = None) has no codes: ORT quantizes its weights (None).
    """
    codes = dict(engine_codes(engine, result))
    if repaired is not None:
        if not codes:
            return None  # a repaired fp32 setting: its weights changed, ORT quantizes them
        codes.update(repaired.quantized)
    return to_int8(codes) if codes else None


def export_setting(dense: nn.Module, engine, result, folder: str | Path, calibration: torch.Tensor | None, *,
                   repaired=None, config: ExportConfig = DEFAULT_EXPORT) -> SettingFiles:
    """Write ``dense.onnx``, ``model.onnx`` and ``model.int8.onnx`` of a setting into ``folder``.

    ``result``: ``engine.apply(config)``; ``repaired``: its repair (the exported model is then
    ``repaired.model``). Nothing passed in is modified. Raises
    :class:`core.deploy.onnx_export.ExportError` (naming the op/module) when the model does not
    export, :class:`core.deploy.onnx_export.CalibrationError` without calibration images.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = repaired.model if repaired is not None else result.model
    calibration = check_calibration_images(calibration)  # before any file is written
    example = calibration[:2]
    dense_path = export_fp32(dense, folder / DENSE_FILE, example, config)
    fp32_path = export_fp32(model, folder / FP32_FILE, example, config)
    weights = setting_weights(engine, result, repaired)
    int8 = export_int8(model, folder / INT8_FILE, calibration, weights=weights, config=config)
    sizes = {path.name: FileSize.of(path) for path in (dense_path, fp32_path, int8.path)}
    sizes["state_dict"] = state_dict_size(dense)
    return SettingFiles(folder, dense_path, fp32_path, int8.path, int8, sizes, tuple(calibration.shape[1:]))
