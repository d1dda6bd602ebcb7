"""A server that idles: with a page open in Chromium and files changing under the project's ``.venv``,
the streamlit server's own CPU stays low.

Streamlit's default file watcher walks the whole project folder, ``.venv`` included: every pip run,
cache write or test under the project then costs the server CPU (measured in issue 23: 162 % of a
core for 30 s; about 7 % with the watcher off). The project's ``.streamlit/config.toml`` turns the
watcher off (``fileWatcherType = "none"``); this test starts the server the way the README says,
with nothing on its command line about the watcher, so it checks what a user gets.

Threshold: :data:`MAX_CORE_SHARE` of one core over the :data:`CHURN_S` window, the issue's target.
Measured on a 2-CPU machine at a load average of 12 to 17 (other jobs running): 1.3 % with the
project's settings; 15.5 % and 19.5 % with ``--server.fileWatcherType auto`` added by hand to the
server's command line (the test then fails; its 5 s quiet window right after the page loaded: 14 %
and 41 %, the watcher still adding watches below .venv). A looser limit such as 25 % would pass a
watching server on a busy machine, where the churn itself gets little CPU, so it would not test
the setting. On a quiet machine the churn is faster and a watching server costs more, not less.
Screenshot: ``results/screenshots/idle_learn_page.png`` (git-ignored).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.app.browser_tools import (
    ROOT,
    SHOTS,
    launch_chromium,
    require_browser,
    streamlit_server,
)

pytestmark = pytest.mark.browser

CHURN_S = 20.0  # seconds of file changes under .venv while the server's CPU is measured
QUIET_S = 5.0  # seconds measured first with no file changes, printed for comparison
MAX_CORE_SHARE = 0.10  # of one core; 0.013 measured with the watcher off, 0.155-0.195 with it on (load ~15)
FILES_PER_BURST = 50


@dataclass(frozen=True)
class CpuWindow:
    """The server process's own CPU (user + system, all its threads) over a wall-clock window."""

    cpu_s: float
    wall_s: float

    @property
    def share(self) -> float:
        """CPU seconds per wall second: 1.0 is one core busy all the time."""
        return self.cpu_s / self.wall_s


def _cpu_seconds(process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _measure(process, seconds: float) -> CpuWindow:
    """The process's CPU over the next ``seconds`` (psutil: the sum over all of its threads)."""
    cpu0, t0 = _cpu_seconds(process), time.monotonic()
    time.sleep(seconds)
    return CpuWindow(_cpu_seconds(process) - cpu0, time.monotonic() - t0)


def _busiest_threads(process, before: dict[int, float], top: int = 3) -> str:
    """The threads that used the most CPU since ``before`` (thread id → CPU seconds), for the printed report."""
    used = sorted(((t.user_time + t.system_time - before.get(t.id, 0.0), t.id) for t in process.threads()),
                  reverse=True)[:top]
    return ", ".join(f"tid {tid}: {cpu:.2f} s" for cpu, tid in used)


class Churn(threading.Thread):
    """Writes, rewrites and deletes small files and folders under ``folder`` until stopped, as pip or a cache does."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.stop = threading.Event()
        self.files = 0

    def run(self) -> None:
        burst = 0
        while not self.stop.is_set():
            sub = self.folder / f"pkg{burst % 8}" / f"mod{burst}"
            sub.mkdir(parents=True, exist_ok=True)
            for i in range(FILES_PER_BURST):
                (sub / f"f{i}.py").write_text(f"VALUE = {burst * FILES_PER_BURST + i}\n")
            (sub / "f0.py").write_text("VALUE = -1\n")  # a modification, not only creations
            old = self.folder / f"pkg{(burst - 4) % 8}" / f"mod{burst - 4}"
            if burst >= 4:
                shutil.rmtree(old, ignore_errors=True)
            self.files += FILES_PER_BURST
            burst += 1
            time.sleep(0.001)  # yields the GIL; otherwise as fast as the disk and the CPU allow


@pytest.fixture
def venv_scratch():
    """A temporary folder inside the project's own ``.venv`` (where the README puts it), removed afterwards."""
    venv = ROOT / ".venv"
    if not venv.is_dir():
        pytest.skip(f"{venv} does not exist: this test needs the virtualenv inside the project, as the README makes it")
    folder = Path(tempfile.mkdtemp(prefix="idle-test-", dir=venv))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert not folder.exists()


def test_server_idles_while_files_change_under_venv(tmp_path, venv_scratch):
    require_browser()
    psutil = pytest.importorskip("psutil")
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with streamlit_server(tmp_path / "server.log") as server, sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            page.goto(f"{server.url}/learn")  # a page with no background work: the CPU left is the server's own
            expect(page.get_by_role("heading", name="Glossary")).to_be_visible(timeout=120_000)
            page.wait_for_timeout(3000)  # let the first run's work settle
            process = psutil.Process(server.pid)
            quiet = _measure(process, QUIET_S)

            threads_before = {t.id: t.user_time + t.system_time for t in process.threads()}
            churn = Churn(venv_scratch)
            churn.start()
            try:
                busy = _measure(process, CHURN_S)
            finally:
                churn.stop.set()
                churn.join(timeout=10)
            busiest = _busiest_threads(process, threads_before)
            expect(page.get_by_role("heading", name="Glossary")).to_be_visible()  # the page is still served
            page.screenshot(path=str(SHOTS / "idle_learn_page.png"))
        finally:
            browser.close()

    load = os.getloadavg()
    print(f"\nserver CPU with files changing under .venv: {100 * busy.share:.1f} % of a core "
          f"({busy.cpu_s:.2f} s CPU in {busy.wall_s:.1f} s; {churn.files:,} files written under {venv_scratch.name}); "
          f"quiet before: {100 * quiet.share:.1f} %; busiest threads: {busiest}; "
          f"load average {load[0]:.2f} on {os.cpu_count()} CPUs")
    assert churn.files > 1000, churn.files  # the files did change, many times
    assert busy.share <= MAX_CORE_SHARE, (
        f"the server used {100 * busy.share:.1f} % of a core while files changed under .venv "
        f"(limit {100 * MAX_CORE_SHARE:.0f} %): is the file watcher on? (.streamlit/config.toml, fileWatcherType)")
