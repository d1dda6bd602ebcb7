"""Loading in ONNX Runtime / OpenVINO: missing runtime, refused batch, and the deployment table (small)."""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch

from core.deploy.onnx_export import ExportConfig, export_int8
from core.deploy.onnx_runtimes import (
    RuntimeConfig,
    RuntimeMissing,
    RuntimeRefused,
    available,
    load,
)
from core.measure.accuracy import EvalData
from core.measure.deploy_table import (
    COLUMNS,
    DeployCancelled,
    DeployConfig,
    measure_deployment,
)
from tests.deploy.onnx_setting import setting

SMALL = DeployConfig(batches=(1, 4), eval_images=40, eval_batch=16, budget_s=0.05, min_rounds=2, max_rounds=3)


def _data() -> EvalData:
    s = setting()
    with torch.no_grad():
        labels = s.dense(s.images).argmax(1)
    return EvalData(s.images, labels, "test")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_missing_runtime_says_how_to_install_it(runtime, monkeypatch, tmp_path):
    s = setting()  # exported before the runtime goes missing
    monkeypatch.setitem(sys.modules, runtime, None)  # import fails as if not installed
    assert not available(runtime)
    with pytest.raises(RuntimeMissing, match=f"pip install {runtime}"):
        load(s.files.fp32, runtime, "fp32")
    if runtime == "onnxruntime":  # the int8 export calibrates with it
        monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
        with pytest.raises(RuntimeMissing, match="pip install onnxruntime"):
            export_int8(s.result.model, tmp_path / "x.onnx", s.calibration[:8], config=ExportConfig(exporter="torchscript"))


def test_unknown_runtime_or_precision_is_refused():
    with pytest.raises(ValueError, match="runtime"):
        load(setting().files.fp32, "tensorrt", "fp32")
    with pytest.raises(ValueError, match="bf16"):
        load(setting().files.fp32, "onnxruntime", "bf16")
    with pytest.raises(ValueError, match="threads"):
        RuntimeConfig(threads=0)


def test_a_batch_size_the_compiled_model_refuses_is_a_named_error():
    run = load(setting().files.int8, "openvino", "int8", RuntimeConfig(batch=4))
    assert run(np.zeros((4, 3, 8, 8), np.float32)).shape == (4, 10)
    with pytest.raises(RuntimeRefused, match=r"OpenVINO \(int8\) refused an input of shape \(3, 3, 8, 8\)"):
        run(np.zeros((3, 3, 8, 8), np.float32))


def test_deployment_table_has_every_row_and_paired_accuracy():
    s = setting()
    progress = []
    table = measure_deployment(s.dense, s.result.model, s.files, _data(), config=SMALL,
                               on_progress=lambda done, total, step: progress.append((done, total)))
    frame = table.table
    assert list(frame.columns) == COLUMNS
    rows = set(zip(frame.runtime, frame.precision, frame.model))
    assert rows == {("torch eager", "fp32", "dense"), ("torch eager", "fp32", "compressed"),
                    ("onnxruntime", "fp32", "dense"), ("onnxruntime", "fp32", "compressed"),
                    ("onnxruntime", "int8", "compressed"), ("openvino", "fp32", "dense"),
                    ("openvino", "fp32", "compressed"), ("openvino", "bf16", "dense"),
                    ("openvino", "bf16", "compressed"), ("openvino", "int8", "compressed")}
    assert sorted(frame.batch.unique()) == [1, 4]
    assert (frame.latency_ms > 0).all()
    dense = frame[(frame.runtime == "torch eager") & (frame.model == "dense")]
    assert (dense.speedup_vs_torch_dense == 1).all() and (dense.accuracy == 1).all()  # labels = dense predictions
    # the fp32 file computes the compressed model: the same predictions as torch's compressed model
    fp32 = frame[(frame.runtime == "onnxruntime") & (frame.precision == "fp32") & (frame.model == "compressed")]
    eager = frame[(frame.runtime == "torch eager") & (frame.model == "compressed")]
    assert fp32.accuracy.iloc[0] == pytest.approx(eager.accuracy.iloc[0], abs=1 / 32)
    assert (frame.n_images == 32).all()  # eval_images 40, but only 32 given
    int8 = frame[frame.file == "model.int8.onnx"]
    assert (int8.bytes == s.files.sizes["model.int8.onnx"].raw).all()
    assert progress[-1][0] == progress[-1][1]


def test_a_cancelled_measurement_returns_nothing():
    s = setting()
    stop = threading.Event()
    stop.set()
    with pytest.raises(DeployCancelled, match="cancelled after 0"):
        measure_deployment(s.dense, s.result.model, s.files, _data(), config=SMALL, cancel=stop)
    calls = []

    def cancel_after_first_step() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(DeployCancelled, match="cancelled after 1"):
        measure_deployment(s.dense, s.result.model, s.files, None, config=SMALL, cancel=cancel_after_first_step)


def test_the_paired_interval_closes_when_every_image_was_run():
    s = setting()
    config = DeployConfig(batches=(2,), eval_images=None, budget_s=0.02, min_rounds=1, max_rounds=2,
                          runtimes=("onnxruntime",))
    frame = measure_deployment(s.dense, s.result.model, s.files, _data(), config=config).table
    assert (frame.delta_low == frame.delta).all() and (frame.delta_high == frame.delta).all()
    half = measure_deployment(s.dense, s.result.model, s.files, _data(),
                              config=DeployConfig(**{**config.__dict__, "eval_images": 16})).table
    compressed = half[half.model == "compressed"]
    assert (compressed.delta_low <= compressed.delta).all() and (compressed.delta <= compressed.delta_high).all()
