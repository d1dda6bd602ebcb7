"""The int8 and fp32 ONNX files of a setting: engine codes kept, zeros exact, dynamic batch, named refusals."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from core.deploy.int8_weights import engine_codes, fold_batchnorm
from core.deploy.onnx_export import (
    CalibrationError,
    ExportConfig,
    ExportError,
    export_fp32,
    export_int8,
)
from core.deploy.onnx_runtimes import load
from core.measure.deploy_export import setting_weights
from tests.deploy.onnx_setting import setting

#: int8 logits against torch with the same int8 weights (only activations quantized), on inputs from
#: the calibration distribution: ‖Δ‖ / ‖logits‖ below this (measured: 0.014 in both runtimes on this model)
INT8_REL_TOLERANCE = 0.08


def _inits(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_int8_file_holds_int8_weights_with_the_engine_codes():
    s = setting()
    inits = _inits(s.files.int8)
    folded = s.files.weights
    codes = engine_codes(s.engine, s.result)
    assert set(s.files.int8_export.engine_layers) == set(codes)
    for name, (bits, engine_q, _) in codes.items():
        stored = inits[f"{name}.weight_quantized"]
        assert stored.dtype == np.int8
        np.testing.assert_array_equal(stored, folded.layers[name].codes.numpy())
        eight = bits.numpy() == 8
        # an 8-bit code keeps its magnitude exactly (its sign flips where BatchNorm's γ < 0)
        np.testing.assert_array_equal(np.abs(stored[eight]), np.abs(engine_q.numpy()[eight]))
        assert (stored[bits.numpy() == 0] == 0).all()  # pruned weights are exact zeros
        np.testing.assert_allclose(inits[f"{name}.weight_scale"], folded.layers[name].scales.numpy(), rtol=0)


def test_int8_file_is_smaller_and_its_zeros_compress():
    sizes = setting().files.sizes
    assert sizes["model.int8.onnx"].raw < sizes["model.onnx"].raw / 2
    assert sizes["model.int8.onnx"].zipped < sizes["model.int8.onnx"].raw


def test_fp32_file_computes_the_compressed_model():
    s = setting()
    with torch.no_grad():
        reference = s.result.model(s.images).numpy()
    out = load(s.files.fp32, "onnxruntime", "fp32")(s.images.numpy())
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_int8_logits_agree_with_torch_of_the_same_int8_weights(runtime):
    s = setting()
    deployed, _ = fold_batchnorm(s.result.model, setting_weights(s.engine, s.result))
    with torch.no_grad():
        reference = deployed(s.images).numpy()
    out = load(s.files.int8, runtime, "int8")(s.images.numpy())
    rel = np.linalg.norm(out - reference) / np.linalg.norm(reference)
    assert rel < INT8_REL_TOLERANCE, f"{runtime} int8 logits differ by {rel:.3f} (relative L2)"


def test_folding_batchnorm_keeps_the_codes_and_the_function():
    s = setting()
    deployed, folded = fold_batchnorm(s.result.model)
    with torch.no_grad():
        torch.testing.assert_close(deployed(s.images), s.result.model(s.images), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert folded is None


def test_the_default_exporter_writes_the_same_model(tmp_path):
    s = setting()
    path = export_fp32(s.result.model, tmp_path / "dynamo.onnx", s.images[:2])  # ExportConfig(): dynamo
    ours = load(path, "onnxruntime", "fp32")(s.images.numpy())
    legacy = load(s.files.fp32, "onnxruntime", "fp32")(s.images.numpy())
    np.testing.assert_allclose(ours, legacy, rtol=1e-4, atol=1e-4)
    assert ours.shape[0] == s.images.shape[0]  # its batch axis is dynamic too


def test_files_take_any_batch_size():
    s = setting()
    for path, precision in ((s.files.fp32, "fp32"), (s.files.int8, "int8")):
        run = load(path, "onnxruntime", precision)
        for n in (1, 3, 7):
            assert run(s.images[:n].numpy()).shape == (n, 10)


class DataDependent(nn.Module):
    """Branches on a tensor's value: torch.export cannot trace it with a dynamic batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y.flatten(1)
        return -y.flatten(1)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = DataDependent()

    def forward(self, x):
        return self.body(x)


def test_a_model_that_does_not_export_gets_a_message_naming_its_module(tmp_path):
    with pytest.raises(ExportError) as caught:
        export_fp32(Wrapper().eval(), tmp_path / "bad.onnx", torch.randn(2, 3, 8, 8))
    message = str(caught.value)
    assert "DataDependent" in message and "body" in message, message
    assert "Traceback" not in message


def test_int8_needs_calibration_images(tmp_path):
    for images in (None, torch.empty(0, 3, 8, 8)):
        with pytest.raises(CalibrationError, match="calibration images"):
            export_int8(setting().result.model, tmp_path / "x.onnx", images)


def test_keep_float_leaves_that_layer_in_fp32(tmp_path):
    s = setting()
    config = ExportConfig(keep_float=("fc",), exporter="torchscript")
    info = export_int8(s.result.model, tmp_path / "k.onnx", s.calibration[:32],
                       weights=setting_weights(s.engine, s.result), config=config)
    inits = _inits(info.path)
    assert "fc.weight_quantized" not in inits and "fc.weight" in inits
    assert "fc" not in info.engine_layers and "conv1" in info.engine_layers
    with pytest.raises(ExportError, match="nope"):
        export_int8(s.result.model, tmp_path / "n.onnx", s.calibration[:32],
                    config=ExportConfig(keep_float=("nope",), exporter="torchscript"))


def test_per_layer_int8_error_names_every_layer():
    from core.measure.deploy_layers import int8_layer_errors

    s = setting()
    errors = int8_layer_errors(s.files.fp32, s.files.int8, s.images)
    assert list(errors.name) == ["conv1", "conv2", "fc"]
    assert (errors.err > 0).all() and (errors.err < 0.01).all()  # small on the calibration distribution
