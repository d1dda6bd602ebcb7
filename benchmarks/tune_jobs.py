"""The Tune page's jobs measured: the first time estimate against the measured time, and the time from Cancel to stop.

Runs a job of :mod:`core.services.tune_jobs` as the page does (polling every 0.5 s), on a fresh
disk cache (a temporary folder), and prints one line per run:

* ``first estimate``: the estimate the page shows first (after the first step that costs anything),
  when it appeared, and its error against the measured total;
* ``cancel``: with ``--cancel-at F``, a second run on another fresh cache is cancelled once a share
  F of its steps is done, and the seconds from the cancel to the job's end are printed.

The defaults are the page's "500 images, fast" τ sweep: τ = 0 … 0.5 in 11 steps, BN recalibration
on 512 training images, global magnitude as the baseline (46 rows; τ = 0 runs once as the dense
model). ``--job sensitivity`` measures the page's default sensitivity map instead (6 τ, 1,000
training images). Figures depend on the machine and its load: print them, do not assert them.

    python benchmarks/tune_jobs.py --model resnet20 --cancel-at 0.3
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.measure import sensitivity, sweeps
from core.measure.sensitivity import SensitivityConfig
from core.measure.sweeps import SweepConfig
from core.services import tune_jobs
from core.services.choices import load_choice
from core.services.compute_queue import COMPUTE

POLL_S = 0.5


def start(job_kind: str, loaded):
    if job_kind == "sweep":
        taus = tuple(round(0.05 * i, 4) for i in range(11))
        config = SweepConfig(taus=taus, bn_recalibration=True, baselines=("global_magnitude",), per_class=50,
                             calibration_size=512)
        return tune_jobs.sweep(loaded, config, "cpu", "benchmark")
    return tune_jobs.sensitivity(loaded, SensitivityConfig(), "cpu", "benchmark")


def run(job_kind: str, loaded, cancel_at: float | None, cancel_after_s: float | None = None) -> None:
    with tempfile.TemporaryDirectory() as cache:  # a fresh result cache (the decoded images stay where they are)
        sweeps.sweep_cache_dir = lambda: Path(cache) / "sweeps"
        sensitivity.sensitivity_cache_dir = lambda: Path(cache) / "sensitivity"
        job = start(job_kind, loaded)
        first = first_at = None
        cancelled_at = None
        while not job.wait(POLL_S):
            job.watch("benchmark")
            if first is None and job.first_estimate_s is not None:
                first, first_at = job.first_estimate_s, job.elapsed_s
            due = (cancel_at is not None and job.total and job.done >= cancel_at * job.total) or \
                (cancel_after_s is not None and job.elapsed_s >= cancel_after_s)
            if due:
                tune_jobs.stop(job, "benchmark")
                cancelled_at = time.perf_counter()
                job.wait(60)
                break
        ended = time.perf_counter()
        if first is None:
            first, first_at = job.first_estimate_s, job.elapsed_s
        measured = job.elapsed_s
        if cancelled_at is None:  # a full run
            error = 100 * (first - measured) / measured if first else float("nan")
            print(f"{loaded.label} {job_kind}: measured {measured:.1f} s for {job.total} steps; first estimate "
                  f"{first:.1f} s shown at {first_at:.1f} s ({error:+.0f} % of the measured time); "
                  f"error: {job.error!r}", flush=True)
        else:
            print(f"{loaded.label} {job_kind}: cancelled at step {job.done} of {job.total}; it stopped "
                  f"{ended - cancelled_at:.3f} s after the cancel; error: {job.error!r}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", help="a shipped checkpoint (resnet20, resnet18, ...)")
    parser.add_argument("--job", choices=("sweep", "sensitivity"), default="sweep")
    parser.add_argument("--cancel-at", type=float, default=None, help="also cancel a run at this share of steps")
    parser.add_argument("--cancel-after-s", type=float, default=None,
                        help="also cancel a run this many seconds after it starts (in the middle of a step)")
    parser.add_argument("--no-full", action="store_true", help="only the cancelled run")
    parser.add_argument("--warm", action="store_true", help="decode the test and calibration images first")
    args = parser.parse_args()
    loaded = load_choice(f"pretrained:{args.model}")
    print(f"compute queue: {COMPUTE.slots} slot(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
          flush=True)
    if args.warm:  # a server that has decoded the images before (the first job of a process decodes them)
        from core.measure.accuracy import calibration_images, eval_data

        eval_data("test", loaded.mean, loaded.std)
        calibration_images(512, 42, loaded.mean, loaded.std)
    if not args.no_full:
        run(args.job, loaded, None)
    if args.cancel_at is not None or args.cancel_after_s is not None:
        run(args.job, loaded, args.cancel_at, args.cancel_after_s)


if __name__ == "__main__":
    main()
