"""benchmarks/run_conditions.py: what a load test prints about its run is read back, not assumed."""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run_conditions  # noqa: E402
from core.services.server_conditions import server_conditions  # noqa: E402
from ui.server_log import log_server_conditions  # noqa: E402


def test_the_server_log_line_is_read_back(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="boundary_explorer"):
        logged = log_server_conditions.__wrapped__()  # not the cached call: an AppTest may have logged first
    log = tmp_path / "server.log"
    log.write_text("starting\n" + "\n".join(r.getMessage() for r in caplog.records) + "\nmore\n")
    read = run_conditions.server_log_conditions(log)
    assert read == json.loads(json.dumps(logged))
    assert read["options"]["server.fileWatcherType"] == "none" and read["options"]["runner.postScriptGC"] is False
    lines = run_conditions.format_conditions(run_conditions.machine_conditions(ROOT), read, "not sampled")
    assert any("postScriptGC" in line for line in lines) and any("background priority" in line for line in lines)
    assert run_conditions.server_log_conditions(tmp_path / "missing.log") is None


def test_server_conditions_report_what_is_in_effect():
    import gc

    import torch

    found = server_conditions()
    assert found["torch_threads"] == torch.get_num_threads() and found["gc_frozen"] == gc.get_freeze_count()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_thread_niceness_sees_a_lowered_thread():
    lowered, done = threading.Event(), threading.Event()

    def low() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + 5)
        lowered.set()
        done.wait(10)

    thread = threading.Thread(target=low)
    thread.start()
    try:
        lowered.wait(10)
        sampler = run_conditions.ThreadNiceness(os.getpid())
        sampler.sample()
        assert sampler.niced_samples == 1 and "seen" in sampler.summary() and "never" not in sampler.summary()
    finally:
        done.set()
        thread.join()
