"""The conditions a benchmark ran under, printed beside its figures: commit, machine, load, caches, the server's settings.

    from run_conditions import machine_conditions, server_log_conditions, ThreadNiceness

``machine_conditions(root)`` is read before the run (commit and whether the tree is clean, CPU
model, load average, which disk caches exist); ``server_log_conditions(log)`` is the line the
app writes once per process (``ui/server_log.py``: torch threads, OpenMP/oneDNN settings, the gc
freeze, the background priority it believes it has); :class:`ThreadNiceness` reads back, from
``/proc``, the niceness the server's threads really ran at while users were on.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import psutil

from ui.server_log import PREFIX as SERVER_LOG_PREFIX  # the line the app writes; one definition for both


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_conditions(root: Path) -> dict:
    """Commit, clean tree, CPU, cores, load average and the disk caches present, read now."""
    cache = Path(os.environ.get("BOUNDARY_CACHE_DIR", root / ".cache"))
    caches = sorted(p.name for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []
    return {
        "commit": _git(root, "rev-parse", "--short", "HEAD") or "unknown",
        "tree": "clean" if not _git(root, "status", "--porcelain", "--untracked-files=no") else "modified",
        "root": str(root),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "disk_caches": caches or "none (cold)",
        "python": platform.python_version(),
    }


def server_log_conditions(log: Path) -> dict | None:
    """The server's own report of its settings (the first such line of its log), or None if it wrote none."""
    try:
        for line in log.read_text(errors="replace").splitlines():
            if SERVER_LOG_PREFIX in line:
                return json.loads(line.split(SERVER_LOG_PREFIX, 1)[1])
    except (OSError, ValueError):
        return None
    return None


class ThreadNiceness:
    """Samples the niceness of every thread of a process (``/proc/<pid>/task/<tid>/stat``, field 19)."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.samples = 0
        self.niced_samples = 0  # samples in which at least one thread ran above nice 0
        self.values: set[int] = set()

    def sample(self) -> None:
        niced = False
        for thread in self.process.threads():
            try:
                stat = Path(f"/proc/{self.process.pid}/task/{thread.id}/stat").read_text()
            except OSError:
                continue
            nice = int(stat.rsplit(")", 1)[1].split()[16])  # fields after "(comm)": state is field 3, nice 19
            self.values.add(nice)
            niced = niced or nice > 0
        self.samples += 1
        self.niced_samples += niced

    def summary(self) -> str:
        if not self.samples:
            return "not sampled"
        seen = sorted(v for v in self.values if v > 0)
        if not seen:
            return f"never seen: every thread at nice 0 in all {self.samples} samples (jobs ran at normal priority)"
        return (f"seen: threads at nice {', '.join(f'+{v}' for v in seen)} in {self.niced_samples} of "
                f"{self.samples} samples")


def format_conditions(machine: dict, server: dict | None, niceness: str) -> list[str]:
    """Printable lines: the run's conditions, for the top of a report."""
    lines = [f"commit {machine['commit']} ({machine['tree']} tree) in {machine['root']}; Python {machine['python']}",
             f"CPU {machine['cpu']}, {machine['cores']} cores; load average before the run {machine['load_average']}",
             f"disk caches at start: {machine['disk_caches']}; process caches: cold (a new server)"]
    if server is None:
        lines.append("server conditions: not in its log (an app older than ui/server_log.py?)")
    else:
        env = {k: v for k, v in server["env"].items() if v is not None}
        lines += [f"server: torch {server['torch']}, {server['torch_threads']} intra-op thread(s), "
                  f"{server['compute_slots']} compute slots; env {env or 'no thread settings'}; "
                  f"gc.freeze {'ran (' + format(server['gc_frozen'], ',') + ' objects)' if server['gc_frozen'] else 'did not run'}",
                  f"server: Streamlit {server['streamlit']} {server['options']}",
                  f"background priority: the server expects it {'on' if server['background_priority'] else 'off'}"
                  f" (nice +{server['job_niceness']}, euid {server['euid']}); read back from its threads: {niceness}"]
    return lines
