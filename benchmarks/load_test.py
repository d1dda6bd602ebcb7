"""A classroom on one server: N simulated users drive the Explore page through Streamlit's own websocket protocol.

    python benchmarks/load_test.py --users 30 --pace 2 6 --duration 60              # ResNet-20
    python benchmarks/load_test.py --users 8 --sync --rounds 12                     # all move at once
    python benchmarks/load_test.py --model ResNet-18 --users 10 --pace 2 6 --duration 60

The command starts ``streamlit run app.py`` on a loopback port, then runs every user as an
asyncio task holding one websocket (``/_stcore/stream``), speaking the protocol a browser
speaks: ``BackMsg.rerun_script`` with the widget states, ``ForwardMsg`` deltas back. Each
user:

* loads the page, finds the τ and θ sliders' widget ids in the deltas;
* moves τ (its own τ values: no two users share one, so any τ it sees that it never set is
  cross-talk) and θ (random), every ``--pace`` seconds (or, with ``--sync``, all users at the
  same moment, round after round);
* times each move from sending it to receiving the new run's retention metric and the
  histogram whose β = τ·max|W| matches the τ it sent (the first paint);
* now and then reloads its tab (a new websocket and session, ``--reload-share``);
* at the end stops moving and waits for its last run to finish: the accuracy estimate must
  have converged (the page's "Status: done" / "all images").

Counted: errors (an exception or ``st.error`` element), cross-talk (a histogram for a τ the
user never set), moves without an answer (timeout). The server's RSS (psutil) is sampled
before the users arrive (after one warm-up user has loaded the model), during, and after
they leave (``--after`` seconds, the server's disconnected-session TTL set to 15 s).

The server is the README's: ``streamlit run app.py`` with the project's ``.streamlit/config.toml``
(only headless, loopback and a free port are added). The report starts with the run's
conditions (``benchmarks/run_conditions.py``): commit and clean tree, CPU and load average,
the disk caches present, the server's own account of its threads, OpenMP settings and gc
freeze, and the niceness its threads really ran at (background priority, read from ``/proc``).

``--fresh`` runs the same command in a fresh clone of the current commit (a temporary folder,
an empty cache folder, this virtualenv linked in as the README's ``.venv``): the published
figures are produced that way.

Bounded: loopback only, at most 64 users, every wait has a timeout. The driver runs on the
same CPU as the server (two cores here), so the figures include its own parsing load.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import websockets  # noqa: E402
from streamlit.proto.Alert_pb2 import Alert  # noqa: E402
from streamlit.proto.BackMsg_pb2 import BackMsg  # noqa: E402
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg  # noqa: E402

from core.common.timing import percentile  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from run_conditions import ThreadNiceness, format_conditions, machine_conditions, server_log_conditions  # noqa: E402

MAX_USERS = 64
MOVE_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 300.0
TAU_GRID = [round(0.01 * i, 2) for i in range(0, 61)]
THETA_GRID = [round(0.05 * i, 2) for i in range(2, 19)]


# ---------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_log_path(port: int) -> Path:
    return ROOT / ".cache" / f"load_test_server_{port}.log"


def start_server(port: int) -> subprocess.Popen:
    """The README's ``streamlit run app.py`` (settings from .streamlit/config.toml), headless on a loopback port."""
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
               "--server.address", "127.0.0.1", "--server.port", str(port)]
    log = open(server_log_path(port), "w")
    server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    import urllib.request

    deadline = time.time() + 90
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}); see {log.name}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not become healthy within 90 s")


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.process, self.every_s = psutil.Process(pid), every_s
        self.samples: list[tuple[float, int]] = []
        self.niceness = ThreadNiceness(pid)
        self.watch_niceness = threading.Event()  # set while users are on
        self.stop = threading.Event()

    def rss(self) -> int:
        return self.process.memory_info().rss

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((time.time(), self.rss()))
                if self.watch_niceness.is_set():
                    self.niceness.sample()
            except psutil.Error:
                return
            self.stop.wait(self.every_s)


# ---------------------------------------------------------------- one simulated user

@dataclass
class UserStats:
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    crosstalk: int = 0
    timeouts: int = 0
    reloads: int = 0
    converged: bool | None = None


class User:
    """One browser tab, speaking Streamlit's websocket protocol."""

    def __init__(self, index: int, url: str, taus: list[float], seed: int, model: str | None = None):
        self.index, self.url, self.taus = index, url, taus
        self.model = model  # text of the model picker's option to choose (None: the app's default)
        self.model_option: str | None = None
        self.rng = random.Random(seed)
        self.stats = UserStats()
        self.sent_taus: set[float] = set()
        self.ws = None
        self.ids: dict[str, str] = {}
        self.max_abs: float | None = None
        self.tau = taus[0]
        self.theta = 0.3
        self.last_status = ""

    async def connect(self) -> None:
        self.ws = await websockets.connect(self.url, subprotocols=["streamlit"], max_size=None, open_timeout=30)
        self.ids = {}
        await self.run_page(first=True)
        if self.model is not None:  # pick the model in the sidebar, as a person would
            if self.model_option is None:
                raise SystemExit(f"no model picker option contains {self.model!r}")
            await self.run_page(first=True, pick_model=True)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None

    def _rerun(self, first: bool, pick_model: bool = False) -> bytes:
        msg = BackMsg()
        msg.rerun_script.query_string = ""
        msg.rerun_script.page_script_hash = ""
        if (pick_model or not first) and self.model_option is not None and "model" in self.ids:
            state = msg.rerun_script.widget_states.widgets.add()
            state.id = self.ids["model"]
            state.string_value = self.model_option
        if not first:
            for key, value in (("tau", self.tau), ("theta", self.theta)):
                if key in self.ids:
                    state = msg.rerun_script.widget_states.widgets.add()
                    state.id = self.ids[key]
                    state.double_array_value.data.append(value)
        return msg.SerializeToString()

    def _inspect(self, fm: ForwardMsg) -> tuple[str | None, float | None]:
        """What a message tells us: ('retention' | 'histogram' | 'finished' | None, value)."""
        kind = fm.WhichOneof("type")
        if kind == "script_finished":
            return "finished", None
        if kind != "delta" or fm.delta.WhichOneof("type") != "new_element":
            return None, None
        element = fm.delta.new_element
        which = element.WhichOneof("type")
        if which == "exception":
            self.stats.errors.append(f"exception: {element.exception.message[:120]}")
        elif which == "alert" and element.alert.format == Alert.ERROR:
            self.stats.errors.append(f"st.error: {element.alert.body[:120]}")
        elif which == "slider":
            label = element.slider.label
            if label.startswith("τ"):
                self.ids["tau"] = element.slider.id
            elif label.startswith("θ — |W| ≥ θ·max|W|"):
                self.ids["theta"] = element.slider.id
        elif which == "selectbox" and element.selectbox.label == "Model":
            self.ids["model"] = element.selectbox.id
            if self.model is not None:
                self.model_option = next((o for o in element.selectbox.options if self.model in o), None)
        elif which == "metric" and element.metric.label.startswith("Retention"):
            return "retention", None
        elif which == "markdown" and "Status: " in element.markdown.body:
            self.last_status = element.markdown.body.rsplit("Status: ", 1)[1]
        elif which == "plotly_chart":
            meta = json.loads(element.plotly_chart.spec).get("layout", {}).get("meta") or {}
            if "beta" in meta and "max_abs" in meta:
                return "histogram", float(meta["beta"]) / float(meta["max_abs"]) if meta["max_abs"] else 0.0
        return None, None

    async def run_page(self, first: bool = False, pick_model: bool = False) -> float | None:
        """Send a rerun; return the seconds until this run's histogram (None for the first load or a timeout)."""
        sent = time.perf_counter()
        if not first:
            self.sent_taus.add(self.tau)
        await self.ws.send(self._rerun(first, pick_model))
        deadline = sent + MOVE_TIMEOUT_S
        seen_retention = False
        while True:
            try:
                raw = await asyncio.wait_for(self.ws.recv(), max(0.1, deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                self.stats.timeouts += 1
                return None
            fm = ForwardMsg()
            fm.ParseFromString(raw)
            what, value = self._inspect(fm)
            if what == "retention":
                seen_retention = True
            elif what == "histogram":
                if first and not pick_model:
                    return None
                if first:  # the picked model's page: wait for its own first paint
                    if seen_retention:
                        return None
                    continue
                if abs(value - self.tau) < 1e-4 and seen_retention:
                    return time.perf_counter() - sent
                if not any(abs(value - t) < 1e-4 for t in self.sent_taus | {self.taus[0]}):
                    self.stats.crosstalk += 1

    async def finish(self) -> None:
        """Stop moving; wait for the last run to finish and read the accuracy's final status."""
        deadline = time.perf_counter() + FINISH_TIMEOUT_S
        while time.perf_counter() < deadline:
            try:
                raw = await asyncio.wait_for(self.ws.recv(), max(0.1, deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                break
            fm = ForwardMsg()
            fm.ParseFromString(raw)
            if self._inspect(fm)[0] == "finished":
                break
        self.stats.converged = self.last_status.startswith(("done", "all images"))

    async def move(self) -> None:
        self.tau = self.rng.choice([t for t in self.taus if t != self.tau] or self.taus)
        self.theta = self.rng.choice(THETA_GRID)
        latency = await self.run_page()
        if latency is not None:
            self.stats.latencies_s.append(latency)


async def paced(user: User, duration_s: float, pace: tuple[float, float], reload_share: float) -> None:
    await user.connect()
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        await asyncio.sleep(user.rng.uniform(*pace))
        if user.rng.random() < reload_share:
            await user.close()
            user.stats.reloads += 1
            await user.connect()
        await user.move()
    await user.finish()
    await user.close()


async def synchronized(users: list[User], rounds: int) -> None:
    await asyncio.gather(*(u.connect() for u in users))
    for _ in range(rounds):
        await asyncio.gather(*(u.move() for u in users))  # everyone at the same moment
        await asyncio.sleep(users[0].rng.uniform(1.0, 2.0))
    await asyncio.gather(*(u.finish() for u in users))
    await asyncio.gather(*(u.close() for u in users))


def taus_for(index: int, users: int) -> list[float]:
    own = TAU_GRID[index + 1::users]  # disjoint per user (τ = 0 left out: it is every user's start)
    return own if len(own) >= 2 else own + [TAU_GRID[index + 1]]


# ---------------------------------------------------------------- the run

def _cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of ``process`` so far."""
    times = process.cpu_times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, metavar="TEXT",
                        help="text of the model picker's option every user picks, e.g. ResNet-18 (default: the app's default)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--pace", type=float, nargs=2, default=(2.0, 6.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of moving (paced mode)")
    parser.add_argument("--sync", action="store_true", help="all users move at the same moment, --rounds times")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reload-share", type=float, default=0.05, help="share of moves preceded by a tab reload")
    parser.add_argument("--after", type=float, default=60.0, help="seconds to watch the RSS after all users left")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true",
                        help="run in a fresh clone of the current commit with an empty cache (this virtualenv reused)")
    args = parser.parse_args(argv)
    if not 1 <= args.users <= MAX_USERS:
        parser.error(f"--users must be between 1 and {MAX_USERS}")
    if args.fresh:
        return run_fresh([a for a in (argv if argv is not None else sys.argv[1:]) if a != "--fresh"])
    (ROOT / ".cache").mkdir(exist_ok=True)
    machine = machine_conditions(ROOT)
    port = free_port()
    server = start_server(port)
    sampler = RssSampler(server.pid)
    sampler.start()
    url = f"ws://127.0.0.1:{port}/_stcore/stream"
    try:
        rss_start = sampler.rss()

        async def warm_up():  # one user loads the model, so "before" is the server with the model in memory
            user = User(-1, url, [0.2, 0.3], args.seed, args.model)
            await user.connect()
            await user.finish()
            await user.close()

        asyncio.run(warm_up())
        time.sleep(20)  # the warm-up session's TTL (15 s) passes
        rss_before = sampler.rss()
        cpu_before = _cpu_seconds(sampler.process), _cpu_seconds(psutil.Process())
        users = [User(i, url, taus_for(i, args.users), args.seed + i, args.model) for i in range(args.users)]
        started = time.time()
        sampler.watch_niceness.set()
        if args.sync:
            asyncio.run(synchronized(users, args.rounds))
        else:
            async def everyone():
                await asyncio.gather(*(paced(u, args.duration, tuple(args.pace), args.reload_share) for u in users))
            asyncio.run(everyone())
        left = time.time()
        sampler.watch_niceness.clear()
        cpu_server = _cpu_seconds(sampler.process) - cpu_before[0]
        cpu_driver = _cpu_seconds(psutil.Process()) - cpu_before[1]
        rss_peak = max((rss for t, rss in sampler.samples if t >= started), default=sampler.rss())
        time.sleep(args.after)
        rss_after = sampler.rss()
    finally:
        sampler.stop.set()
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    latencies = [s for u in users for s in u.stats.latencies_s]
    errors = [e for u in users for e in u.stats.errors]
    mib = 2 ** 20
    for line in format_conditions(machine, server_log_conditions(server_log_path(port)), sampler.niceness.summary()):
        print(f"# {line}")
    mode = f"{args.rounds} synchronized rounds" if args.sync else f"every {args.pace[0]:g}–{args.pace[1]:g} s for {args.duration:g} s"
    label = args.model or "the default model"
    print(f"{args.users} users on {label}, {mode}; {len(latencies)} moves answered in {left - started:.0f} s")
    if latencies:
        print(f"  slider move → new retention + histogram: p50 {1e3 * statistics.median(latencies):.0f} ms, "
              f"p95 {1e3 * percentile(latencies, 95):.0f} ms, max {1e3 * max(latencies):.0f} ms")
    print(f"  errors {len(errors)}, cross-talk {sum(u.stats.crosstalk for u in users)}, "
          f"unanswered moves {sum(u.stats.timeouts for u in users)}, reloads {sum(u.stats.reloads for u in users)}, "
          f"accuracy converged for {sum(bool(u.stats.converged) for u in users)}/{len(users)} users")
    for error in errors[:5]:
        print(f"    {error}")
    print(f"  CPU while users were on: server {cpu_server:.0f} s, this driver {cpu_driver:.0f} s "
          f"({100 * cpu_driver / max(cpu_server + cpu_driver, 1e-9):.0f} % of the two; "
          f"{os.cpu_count()} cores × {left - started:.0f} s = {(os.cpu_count() or 1) * (left - started):.0f} s available)")
    print(f"  server RSS: at start {rss_start / mib:.0f} MiB, with the model loaded {rss_before / mib:.0f} MiB, "
          f"peak {rss_peak / mib:.0f} MiB, {args.after:g} s after all users left {rss_after / mib:.0f} MiB "
          f"({100 * (rss_after / rss_before - 1):+.1f} % vs before)")
    print(f"  | {args.users} | {label} | {mode} | {1e3 * statistics.median(latencies) if latencies else float('nan'):.0f} | "
          f"{1e3 * percentile(latencies, 95) if latencies else float('nan'):.0f} | "
          f"{1e3 * max(latencies) if latencies else float('nan'):.0f} | {len(errors)} | "
          f"{sum(u.stats.crosstalk for u in users)} | {rss_before / mib:.0f} / {rss_peak / mib:.0f} / {rss_after / mib:.0f} |")
    return 0


def run_fresh(argv: list[str]) -> int:
    """This command, in a fresh clone of HEAD: an empty cache, the README's ``.venv`` linked to this one.

    The CIFAR-10 folder is passed on (``$BOUNDARY_CIFAR10_DIR``) because a clone elsewhere does
    not sit beside ``../shared``. Only committed work is measured: the clone is of HEAD.
    """
    from core.workloads.data import DEFAULT_JPEG_DIR

    with tempfile.TemporaryDirectory(prefix="boundary-fresh-") as folder:
        clone = Path(folder) / "clone"
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True)
        venv = Path(sys.prefix)
        (clone / ".venv").symlink_to(venv, target_is_directory=True)
        env = {**os.environ, "BOUNDARY_CIFAR10_DIR": os.environ.get("BOUNDARY_CIFAR10_DIR", str(DEFAULT_JPEG_DIR))}
        env.pop("BOUNDARY_CACHE_DIR", None)
        python = clone / ".venv" / "bin" / Path(sys.executable).name
        print(f"# fresh clone of {ROOT} at {clone}, virtualenv {venv} linked as .venv, empty .cache", flush=True)
        return subprocess.run([str(python), "benchmarks/load_test.py", *argv], cwd=clone, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
