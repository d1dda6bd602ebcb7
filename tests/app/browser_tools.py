"""Shared by the real-browser tests: the streamlit server started the way the README says, and Chromium.

The server gets no setting on its command line beyond where to listen (``--server.headless``,
``--server.address``, ``--server.port``): the file watcher, the session TTL and the upload limit
come from the project's ``.streamlit/config.toml``, as they do for a user, so a test measures
what a user gets. ``extra_args`` exists for a by-hand check (say ``--server.fileWatcherType auto``
to see what the config guards against); a committed test should pass none.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "results" / "screenshots"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HEALTH_WAIT_S = 60


@dataclass(frozen=True)
class Server:
    """A running ``streamlit run app.py``: its URL, its process and the file its output goes to."""

    url: str
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_browser() -> None:
    """Skip the calling test, with the reason, when Debian's Chromium or the playwright package is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (see .ci/run) to run the browser test")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def _wait_healthy(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + HEALTH_WAIT_S
    while True:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().decode().strip() == "ok":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"streamlit did not answer /_stcore/health within {HEALTH_WAIT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@contextmanager
def streamlit_server(log: Path, extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Iterator[Server]:
    """``python -m streamlit run app.py`` headless on a free local port, healthy on entry, stopped on exit.

    ``env``: variables added to the server's environment (say an empty cache folder for a newcomer's run).
    Fails the test if the server dies or is not healthy within :data:`HEALTH_WAIT_S`, and if its
    output has a traceback when it stops.
    """
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
             "--server.address", "127.0.0.1", "--server.port", str(port), *extra_args],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, log)
        yield Server(url, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def launch_chromium(playwright):
    """Debian's Chromium, headless, with the flags that work on this kind of machine (see TESTING.md)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)


def press(page, slider, key: str, times: int, per_second: float) -> None:
    """``times`` presses of ``key`` on ``slider`` at ``per_second``, with no check or retry in between:
    every press must land."""
    slider.focus()
    for _ in range(times):
        page.keyboard.press(key)
        page.wait_for_timeout(1000 / per_second)
