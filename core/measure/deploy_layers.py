"""Which layers' int8 activations cost accuracy: each Conv/Gemm output of the int8 file against the fp32 file.

For every Conv/Gemm of the int8 QDQ file whose output tensor the fp32 file also has (both files
come from the same deployed graph, so the exporter names the tensors alike), both files are run
in ONNX Runtime on the same unlabelled images with that tensor added as an output, and

    err = ‖y_int8 − y_fp32‖² / ‖y_fp32‖²       (summed over the images)

is reported per layer, in graph order. The error is cumulative (each layer sees the quantized
activations of the layers before it), like the repair's per-layer error table: the layer where it
jumps is the one to keep in higher precision (``ExportConfig.keep_float``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

WEIGHT_SUFFIXES = (".weight_quantized", ".weight")


def _layer_outputs(model) -> dict[str, str]:
    """``{module name: output tensor}`` of every Conv/Gemm whose weight names its module."""
    producers = {out: node for node in model.graph.node for out in node.output}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        weight = node.input[1]
        source = producers.get(weight)
        if source is not None and source.op_type == "DequantizeLinear":
            weight = source.input[0]
        for suffix in WEIGHT_SUFFIXES:
            if weight.endswith(suffix):
                out[weight[:-len(suffix)]] = node.output[0]
                break
    return out


def _run_with_outputs(path: Path, names: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory(prefix="layer-errors-") as folder:
        probe = Path(folder) / "probe.onnx"
        onnx.save(model, str(probe))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
        values = session.run(names, {session.get_inputs()[0].name: images})
    return dict(zip(names, values))


def int8_layer_errors(fp32_path: str | Path, int8_path: str | Path, images: torch.Tensor) -> pd.DataFrame:
    """One row per Conv/Gemm in graph order: ``name``, ``err`` (see the module docstring), ``err_ratio``
    (this layer's error / the previous layer's: where the error jumps). ``images``: unlabelled, normalised."""
    import onnx

    fp32_layers = _layer_outputs(onnx.load(str(fp32_path)))
    int8_layers = _layer_outputs(onnx.load(str(int8_path)))
    names = [name for name in int8_layers if name in fp32_layers]
    x = np.ascontiguousarray(images.float().numpy())
    reference = _run_with_outputs(Path(fp32_path), [fp32_layers[n] for n in names], x)
    quantized = _run_with_outputs(Path(int8_path), [int8_layers[n] for n in names], x)
    rows, previous = [], None
    for name in names:
        y = reference[fp32_layers[name]].astype(np.float64)
        q = quantized[int8_layers[name]].astype(np.float64)
        err = float(((q - y) ** 2).sum() / max((y ** 2).sum(), 1e-30))
        rows.append({"name": name, "err": err, "err_ratio": err / previous if previous else float("nan")})
        previous = err
    return pd.DataFrame(rows, columns=["name", "err", "err_ratio"])
