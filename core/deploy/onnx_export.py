"""Export a model to ONNX: fp32 as it is, and int8 QDQ with the engine's own weight codes.

**fp32** (:func:`export_fp32`): BatchNorm folded into the convolution before it
(:func:`core.deploy.int8_weights.fold_batchnorm`), exported by ``torch.onnx.export`` with a
dynamic batch axis (input ``input``: N×C×H×W, output ``logits``: N×classes).

**int8** (:func:`export_int8`), in three steps:

1. the weights are set to their int8 form (:mod:`core.deploy.int8_weights`: the engine's chunk
   codes on one int8 grid per output channel, BatchNorm folded by scaling the channel scale), and
   this fp32 model of the int8 weights is exported;
2. ONNX Runtime's ``quantize_static`` (QDQ format, per-channel symmetric int8 weights, uint8
   asymmetric activations, MinMax calibration on the given unlabelled images) places the
   Quantize/DequantizeLinear pairs and calibrates every activation: the field's tool does what
   it does well (where the QDQ pairs go so that ORT and OpenVINO fuse Conv+ReLU, Add and pooling
   into int8 kernels; activation ranges);
3. every weight initializer ORT wrote is **replaced by the engine's codes and scales**, and each
   int32 bias is re-quantized at ``s_x · S_c`` (ORT's bias convention) for the new scale.

Why replace rather than let ORT quantize the weights: ORT's per-channel scale is
``max|W_c| / 127``; a channel whose kept weights all come from the 4-bit chunk has
``max|W_c| = 7 · s_4,c`` and ORT would put them on a grid of step ``7 s_4,c / 127``, rounding codes
that are exact on the step ``s_4,c / 18``; and a fp32 round trip through ``W / scale`` can move a
code by one where the scale itself is rounded. Replacing the initializers keeps every 8-bit code
bit-identical, 4-bit codes exact wherever :mod:`core.deploy.int8_weights` says so, and pruned
weights exact zeros. Layers without engine codes (an unquantized result, layers outside the engine)
keep ORT's own per-channel quantization of their (pruned) fp32 weights; zeros stay zeros since
the weight zero-point is 0.

``ExportConfig.keep_float`` names modules whose Conv/Gemm ORT leaves in fp32 (weights and
activations): the escape hatch for layers whose int8 activations cost accuracy.
A model that cannot be exported raises :class:`ExportError`, whose message names the op or the
module (never a bare traceback).
"""
from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.deploy.int8_weights import Int8Weights, fold_batchnorm
from core.deploy.onnx_runtimes import RuntimeMissing, require

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTERS = ("dynamo", "torchscript")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


class ExportError(RuntimeError):
    """The model cannot be exported to ONNX (the message names the op or module and why)."""


class CalibrationError(ExportError):
    """An int8 export was asked for without calibration images (or with unusable ones)."""


@dataclass(frozen=True)
class ExportConfig:
    """How to export.

    * ``exporter``: ``"dynamo"`` (``torch.export``, the maintained path) or ``"torchscript"``
      (the legacy exporter, ~10× faster to run, deprecated upstream).
    * ``opset``: the ONNX opset (QDQ per-channel needs ≥ 13).
    * ``calibration_method``: ORT's activation calibration, ``"minmax"`` (default), ``"percentile"``
      (99.999th) or ``"entropy"``.
    * ``calibration_batch``: images per calibration batch.
    * ``keep_float``: module names whose Conv/Gemm stay fp32 in the int8 file.
    """

    exporter: str = "dynamo"
    opset: int = 18
    calibration_method: str = "minmax"
    calibration_batch: int = 64
    keep_float: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration_method must be one of {CALIBRATION_METHODS}, got {self.calibration_method!r}")
        if self.opset < 13:
            raise ValueError(f"opset must be ≥ 13 (per-channel QDQ), got {self.opset}")
        if self.calibration_batch < 1:
            raise ValueError(f"calibration_batch must be ≥ 1, got {self.calibration_batch}")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))


@dataclass(frozen=True)
class Int8Export:
    """What :func:`export_int8` wrote: the file, the weights it holds, and what stayed fp32.

    ``weights``: the int8 weights as stored in the file (BatchNorm folded: codes sign-flipped where
    γ < 0, scales × |γ/√(σ²+ε)|); its ``report`` is the chunk → int8 mapping's (before folding).

    ``engine_layers``: layers whose int8 codes are the engine's; ``ort_layers``: layers ORT
    quantized itself (no engine codes); ``kept_float``: Conv/Gemm left in fp32 (``keep_float``).
    """

    path: Path
    weights: Int8Weights | None
    engine_layers: tuple[str, ...]
    ort_layers: tuple[str, ...]
    kept_float: tuple[str, ...]
    calibration_images: int
    calibration_method: str


# ---------------------------------------------------------------- errors that name the op or module

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)')


def _chain(exc: BaseException) -> list[BaseException]:
    seen, chain = set(), []
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _is_library(filename: str) -> bool:
    here = Path(__file__).parent
    return ("site-packages" in filename or "/torch/" in filename or filename.startswith("<")
            or Path(filename).parent == here)


def _user_frame(chain: list[BaseException], model: nn.Module) -> str | None:
    """The model's own code where the export failed: ``Class (path) at file:line: source``.

    torch.export reports the user's frame in its message ("from user code: File ..., line N");
    the legacy exporter in the traceback. The innermost frame outside torch names the module whose
    ``forward`` holds that line.
    """
    reported = [(f, int(n), src.strip()) for exc in chain
                for f, n, _, src in _USER_FRAME.findall(_ANSI.sub("", str(exc)))]
    traced = [(f.filename, f.lineno or 0, (f.line or "").strip()) for exc in chain
              for f in traceback.extract_tb(exc.__traceback__) if f.name == "forward"]
    found = [f for f in reported if not _is_library(f[0])] or [f for f in traced if not _is_library(f[0])]
    if not found:
        return None
    filename, line, source = found[-1]
    best, best_line = None, -1
    for path, module in model.named_modules():
        code = getattr(type(module).forward, "__code__", None)
        if code is not None and code.co_filename == filename and best_line < code.co_firstlineno <= line:
            best, best_line = f"{type(module).__name__} ({path or 'the model'})", code.co_firstlineno
    where = f"{Path(filename).name}:{line}: {source}"
    return f"{best} at {where}" if best else where


def _describe(exc: BaseException, model: nn.Module, what: str) -> ExportError:
    chain = _chain(exc)
    texts = [_ANSI.sub("", str(e)) for e in chain]
    ops = sorted(set(re.findall(r"\b(?:aten|prim)[.:]{1,2}[A-Za-z_][\w.]*", "\n".join(texts))))
    root = texts[-1] if texts else ""
    first = next((line.strip() for line in root.splitlines() if line.strip()), type(chain[-1]).__name__)
    parts = [f"cannot export {type(model).__name__} to ONNX ({what}): {first[:300]}"]
    if ops:
        parts.append(f"op: {', '.join(ops[:3])}")
    where = _user_frame(chain, model)
    if where:
        parts.append(f"in {where}")
    return ExportError("; ".join(parts))


# ---------------------------------------------------------------- fp32

def _export(model: nn.Module, path: Path, example: torch.Tensor, config: ExportConfig, what: str) -> Path:
    """``torch.onnx.export`` of ``model`` (already in its deployed form) with a dynamic batch axis."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example[:2] if example.shape[0] >= 2 else torch.cat([example, example])  # batch 2: not specialised
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if config.exporter == "dynamo":
                # torch.export once (non-strict), so a model that cannot be captured fails fast and
                # names its own line; torch.onnx.export's own retries (strict, then a JIT trace) would
                # each pay the full capture again
                exported = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                               strict=False)
                program = torch.onnx.export(exported, (example,), dynamo=True, input_names=[INPUT_NAME],
                                            output_names=[OUTPUT_NAME], opset_version=config.opset,
                                            optimize=True, verbose=False)
                program.save(str(path))
            else:
                torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], opset_version=config.opset,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as exc:
        raise _describe(exc, model, what) from exc
    return path


def deployed_model(model: nn.Module, int8: Int8Weights | None = None) -> tuple[nn.Module, Int8Weights | None]:
    """The module that is exported (a new object): eval, BatchNorm folded, weights at their int8 values with ``int8``."""
    return fold_batchnorm(model, int8)


def export_fp32(model: nn.Module, path: str | Path, example: torch.Tensor,
                config: ExportConfig = ExportConfig()) -> Path:
    """Write ``model`` (its weights as they are; BatchNorm folded) as fp32 ONNX to ``path``; returns the path."""
    deployed, _ = deployed_model(model)
    return _export(deployed, Path(path), example, config, "fp32")


# ---------------------------------------------------------------- int8

class _Reader:
    """ORT's CalibrationDataReader protocol over a tensor of images, ``batch`` at a time."""

    def __init__(self, images: torch.Tensor, batch: int):
        self._batches: Iterator[np.ndarray] = iter(
            [images[i:i + batch].float().contiguous().numpy() for i in range(0, images.shape[0], batch)])

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:  # pragma: no cover - ORT calls it only for some calibrators
        pass


def check_calibration_images(images: torch.Tensor | None) -> torch.Tensor:
    """``images`` if they can calibrate an int8 export (N×C×H×W, N ≥ 1, finite); else :class:`CalibrationError`."""
    if images is None or not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise CalibrationError("an int8 export needs calibration images (N×C×H×W, N ≥ 1): unlabelled training "
                               "images or the user's own images, never test images; none were given")
    if not bool(torch.isfinite(images).all()):
        raise CalibrationError("the calibration images contain NaN or infinite values")
    return images


def _weight_nodes(model) -> dict[str, object]:
    """``{initializer name: Conv/Gemm/MatMul node using it as weight}``."""
    return {node.input[1]: node for node in model.graph.node
            if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1}


def _quantize(fp32_path: Path, out_path: Path, images: torch.Tensor, config: ExportConfig,
              exclude_nodes: list[str]) -> None:
    require("onnxruntime")  # RuntimeMissing, with the pip line, when ONNX Runtime is not installed
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[config.calibration_method]
    with _quiet_root_logger():
        quantize_static(str(fp32_path), str(out_path), _Reader(images, config.calibration_batch),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=exclude_nodes,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                       "CalibPercentile": 99.999})


@contextlib.contextmanager
def _quiet_root_logger():
    """Drop ORT's root-logger advice to run its pre-processing: the graph it gets is already folded
    (BatchNorm into Conv) and shape-complete from torch.onnx, and a pre-processed graph would rename
    the initializers this module replaces."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _replace_weights(model, weights: Int8Weights, biases: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Put the engine's codes and scales into ORT's QDQ weight initializers; re-quantize the int32 biases."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def value(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def put(name: str, array: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    replaced, missing = [], []
    for layer, int8 in weights.layers.items():
        key = f"{layer}.weight_quantized"
        if key not in inits:
            missing.append(layer)
            continue
        dq = next(n for n in consumers[key] if n.op_type == "DequantizeLinear")
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        codes = int8.codes.numpy()
        stored = value(key)
        if stored.shape == codes.shape and axis == 0:
            put(key, codes.astype(np.int8))
        elif codes.ndim == 2 and stored.shape == codes.T.shape and axis == 1:
            put(key, np.ascontiguousarray(codes.T).astype(np.int8))
        else:
            raise ExportError(f"cannot place the int8 codes of layer '{layer}': ORT stored its weight as "
                              f"{stored.shape} on axis {axis}, the engine has {codes.shape}")
        scale = int8.scales.numpy().astype(np.float32)
        put(dq.input[1], scale)
        if len(dq.input) > 2 and dq.input[2] in inits:
            put(dq.input[2], np.zeros(scale.shape, dtype=np.int8))
        op = next(n for n in consumers[dq.output[0]] if n.op_type in ("Conv", "Gemm", "MatMul"))
        if len(op.input) > 2 and op.input[2] in producers and layer in biases:
            bias_dq = producers[op.input[2]]
            act_dq = producers.get(op.input[0])
            if bias_dq.op_type == "DequantizeLinear" and act_dq is not None and act_dq.op_type == "DequantizeLinear":
                s_x = value(act_dq.input[1]).astype(np.float32)
                bias_scale = (s_x * scale).astype(np.float32)
                bias = biases[layer].double().numpy()
                q = np.clip(np.round(bias / bias_scale.astype(np.float64)), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
                put(bias_dq.input[0], q)
                put(bias_dq.input[1], bias_scale)
                if len(bias_dq.input) > 2 and bias_dq.input[2] in inits:
                    put(bias_dq.input[2], np.zeros(q.shape, dtype=np.int32))
        replaced.append(layer)
    return replaced, missing


def export_int8(model: nn.Module, path: str | Path, images: torch.Tensor | None, *,
                weights: Int8Weights | None = None, config: ExportConfig = ExportConfig()) -> Int8Export:
    """Write an int8 QDQ ONNX file of ``model`` to ``path`` (see the module docstring for how).

    ``model``: the compressed model (an engine result's or a repair's ``model``; not modified).
    ``images``: unlabelled calibration images, normalised as the model expects.
    ``weights``: the engine's int8 weights (:func:`core.deploy.int8_weights.to_int8`); None lets
    ORT quantize every weight itself.
    """
    import onnx

    images = check_calibration_images(images)
    deployed, folded = deployed_model(model, weights)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="boundary-onnx-") as tmp:
        fp32 = _export(deployed, Path(tmp) / "weights_fp32.onnx", images[:2], config, "int8")
        graph = onnx.load(str(fp32))
        nodes = _weight_nodes(graph)
        unknown = [m for m in config.keep_float if f"{m}.weight" not in nodes]
        if unknown:
            raise ExportError(f"keep_float names '{unknown[0]}', which is not a Conv/Linear of the exported graph")
        exclude = [nodes[f"{m}.weight"].name for m in config.keep_float]
        quantized = Path(tmp) / "quantized.onnx"
        try:
            _quantize(fp32, quantized, images, config, exclude)
        except RuntimeMissing:
            raise
        except Exception as exc:
            raise ExportError(f"ONNX Runtime could not quantize {type(model).__name__}: {str(exc).splitlines()[0][:300]}") from exc
        qmodel = onnx.load(str(quantized))
    engine_layers: list[str] = []
    if folded is not None:
        keep = set(config.keep_float)
        folded = Int8Weights({k: v for k, v in folded.layers.items() if k not in keep}, folded.report)
        modules = dict(deployed.named_modules())
        biases = {name: modules[name].bias.detach() for name in folded.layers
                  if name in modules and getattr(modules[name], "bias", None) is not None}
        engine_layers, _ = _replace_weights(qmodel, folded, biases)
    ort_layers = sorted(init.name[:-len(".weight_quantized")] for init in qmodel.graph.initializer
                        if init.name.endswith(".weight_quantized") and init.name[:-len(".weight_quantized")]
                        not in set(engine_layers))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(qmodel, str(path))
    return Int8Export(path=path, weights=folded, engine_layers=tuple(engine_layers), ort_layers=tuple(ort_layers),
                      kept_float=config.keep_float, calibration_images=int(images.shape[0]),
                      calibration_method=config.calibration_method)
