"""Run an exported ONNX file in ONNX Runtime (CPU) or OpenVINO (CPU).

``load(path, runtime, precision)`` returns a :class:`Runner`: ``runner(x)`` maps a float32
N×C×H×W numpy array to the logits (numpy). Precisions:

* ONNX Runtime: ``"fp32"`` (an fp32 file) and ``"int8"`` (a QDQ file, run with ORT's QDQ → QLinear
  fusions: u8·s8 kernels, VNNI where the CPU has it).
* OpenVINO: ``"fp32"`` and ``"bf16"`` (``INFERENCE_PRECISION_HINT``: f32 / bf16) and ``"int8"``
  (the same QDQ file: OpenVINO's low-precision transformations turn the Q/DQ pairs into int8
  convolutions; the hint is f32 for what stays float).

Threads: one intra-op thread by default (``RuntimeConfig.threads``). Next to the app's own threads,
more threads oversubscribe the cores and batch-1 latency collapses; the speed-ups are reported
at 1 thread. A runtime that is not installed raises :class:`RuntimeMissing` with the pip line; a
batch size the compiled model refuses raises :class:`RuntimeRefused`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RUNTIMES: dict[str, tuple[str, ...]] = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}
LABELS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
PIP = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


class RuntimeMissing(ImportError):
    """The runtime's Python package is not installed."""


class RuntimeRefused(RuntimeError):
    """The runtime refused the model or the input (a batch size, a shape, an op it cannot run)."""


@dataclass(frozen=True)
class RuntimeConfig:
    """``threads``: intra-op threads (1 by default; see the module docstring). ``batch``: OpenVINO
    compiles for this static batch (None: the file's dynamic batch axis)."""

    threads: int = 1
    batch: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a whole number ≥ 1, got {self.threads!r}")
        if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
            raise ValueError(f"batch must be None or a whole number ≥ 1, got {self.batch!r}")


@dataclass(frozen=True)
class Runner:
    """A compiled model in one runtime: call it with a float32 N×C×H×W array, get the logits."""

    runtime: str
    precision: str
    path: Path
    threads: int
    _run: Callable[[np.ndarray], np.ndarray]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        try:
            return self._run(x)
        except RuntimeMissing:
            raise
        except Exception as exc:
            raise RuntimeRefused(f"{LABELS[self.runtime]} ({self.precision}) refused an input of shape "
                                 f"{tuple(x.shape)}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}") from exc


def available(runtime: str) -> bool:
    """Whether ``runtime``'s package can be imported."""
    try:
        require(runtime)
    except RuntimeMissing:
        return False
    return True


def require(runtime: str):
    """The runtime's module; :class:`RuntimeMissing` (with the pip line) when it is not installed."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {tuple(RUNTIMES)}, got {runtime!r}")
    try:
        if runtime == "onnxruntime":
            import onnxruntime as module
        else:
            import openvino as module
    except ImportError as exc:
        raise RuntimeMissing(f"{LABELS[runtime]} is not installed in this Python environment: "
                             f"install it with `pip install {PIP[runtime]}` (see requirements.txt)") from exc
    return module


def load(path: str | Path, runtime: str, precision: str = "fp32", config: RuntimeConfig = RuntimeConfig()) -> Runner:
    """Compile ``path`` in ``runtime`` at ``precision`` (see the module docstring)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {tuple(RUNTIMES)}, got {runtime!r}")
    if precision not in RUNTIMES[runtime]:
        raise ValueError(f"{LABELS[runtime]} runs {RUNTIMES[runtime]}, not {precision!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    module = require(runtime)
    try:
        run = _ort(module, path, config) if runtime == "onnxruntime" else _openvino(module, path, precision, config)
    except Exception as exc:
        raise RuntimeRefused(f"{LABELS[runtime]} could not load {path.name} ({precision}): "
                             f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}") from exc
    return Runner(runtime, precision, path, config.threads, run)


def _ort(ort, path: Path, config: RuntimeConfig) -> Callable[[np.ndarray], np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]
    return run


def _openvino(ov, path: Path, precision: str, config: RuntimeConfig) -> Callable[[np.ndarray], np.ndarray]:
    core = ov.Core()
    model = core.read_model(str(path))
    if config.batch is not None:
        shape = model.input(0).get_partial_shape()
        shape[0] = config.batch
        model.reshape({model.input(0): shape})
    properties = {"INFERENCE_NUM_THREADS": config.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    compiled = core.compile_model(model, "CPU", properties)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()
    return run
