"""The exported files stand alone: a process that imports only onnxruntime (or openvino) and numpy
gets the same logits the project evaluated."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from core.deploy.onnx_runtimes import load
from tests.deploy.onnx_setting import setting

SCRIPTS = {
    "onnxruntime": """
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    """,
    "openvino": """
        import openvino
        compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        logits = compiled(x)[0]
    """,
}
HEADER = """
import sys
import numpy as np
path, inputs, out = sys.argv[1:4]
x = np.load(inputs)
"""
FOOTER = """
np.save(out, logits)
imported = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "core", "tests", "onnx"))
print("IMPORTED", imported)
"""


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_standalone_logits_match_the_project(runtime, which, tmp_path):
    s = setting()
    path = s.files.int8 if which == "int8" else s.files.fp32
    x = s.images.numpy()
    np.save(tmp_path / "x.npy", x)
    script = HEADER + textwrap.dedent(SCRIPTS[runtime]) + FOOTER
    done = subprocess.run([sys.executable, "-I", "-c", script, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "IMPORTED []" in done.stdout, done.stdout  # no torch, no project code
    standalone = np.load(tmp_path / "y.npy")
    ours = load(path, runtime, which)(x)
    # same file, same runtime: the figures the project reports are the artifact's own (thread count and
    # kernel order may move the last bits of fp32 sums)
    np.testing.assert_allclose(standalone, ours, rtol=1e-5, atol=1e-5)
