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

``--repair reconstruct`` (or ``bias``) adds the page's repaired series (the repair on Explore's
512 training images); ``--tau-max``/``--steps`` set the τ grid, ``--no-bn``/``--no-baseline`` drop
those series; ``--repeat`` runs the same sweep again on the same cache (the second-sweep figure);
``--within X`` prints the largest τ within X points of dense per repair level (the page's answer).

    python benchmarks/tune_jobs.py --model resnet20 --cancel-at 0.3
    python benchmarks/tune_jobs.py --model resnet18 --repair reconstruct --tau-max 0.25 --steps 6 --no-bn \
        --no-baseline --repeat --within 1
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run_conditions import machine_conditions
from core.measure import sensitivity, sweeps
from core.measure.sensitivity import SensitivityConfig
from core.measure.sweep_results import largest_tau_within, row_levels
from core.measure.sweeps import SweepConfig
from core.services import tune_jobs
from core.services.choices import load_choice
from core.services.compute_queue import COMPUTE

POLL_S = 0.5


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    """The page's τ sweep: "50 per class", BN recalibration on 512 images, global magnitude (unless dropped)."""
    taus = tuple(float(round(args.tau_max * i / (args.steps - 1), 4)) for i in range(args.steps))
    return SweepConfig(taus=taus, bn_recalibration=not args.no_bn,
                       baselines=() if args.no_baseline else ("global_magnitude",), per_class=50,
                       calibration_size=512, repair_levels=() if args.repair == "none" else (args.repair,))


def start(job_kind: str, loaded, args: argparse.Namespace):
    if job_kind == "sweep":
        return tune_jobs.sweep(loaded, sweep_config(args), "cpu", "benchmark")
    return tune_jobs.sensitivity(loaded, SensitivityConfig(), "cpu", "benchmark")


def answers(frame, points: float) -> None:
    """The largest τ within ``points`` of dense for every repair level in ``frame`` (the page's answer)."""
    for level in dict.fromkeys(row_levels(frame[frame["method"] == "boundary"])):
        choice = largest_tau_within(frame, points, contiguous=True, level=level)
        found = "no swept τ > 0" if choice is None or choice.tau == 0 else (
            f"τ = {choice.tau:g} ({100 * choice.accuracy:.2f} % vs dense {100 * choice.dense_accuracy:.2f} %, "
            f"{100 * choice.retention:.1f} % kept)")
        print(f"  within {points:g} points, repair {level}: {found}", flush=True)


def run(job_kind: str, loaded, args: argparse.Namespace, cancel_at: float | None,
        cancel_after_s: float | None = None) -> None:
    with tempfile.TemporaryDirectory() as cache:  # a fresh result cache (the decoded images stay where they are)
        sweeps.sweep_cache_dir = lambda: Path(cache) / "sweeps"
        sensitivity.sensitivity_cache_dir = lambda: Path(cache) / "sensitivity"
        job = start(job_kind, loaded, args)
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
            if args.within is not None and job_kind == "sweep" and job.error is None:
                answers(job.result, args.within)
            if args.repeat and job.error is None:  # the same sweep again: every row from the disk cache
                tune_jobs.clear()  # forget the finished job's result, as a new server process would
                began = time.perf_counter()
                again = start(job_kind, loaded, args)
                while not again.wait(0.01):
                    again.watch("benchmark")
                print(f"{loaded.label} {job_kind} repeated on the same cache: {time.perf_counter() - began:.2f} s "
                      f"({again.total} steps); error: {again.error!r}", flush=True)
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
    parser.add_argument("--repair", choices=("none", "bias", "reconstruct"), default="none",
                        help="sweep: also the repaired series of this level")
    parser.add_argument("--tau-max", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--no-bn", action="store_true", help="sweep: without the BN-recalibrated series")
    parser.add_argument("--no-baseline", action="store_true", help="sweep: without global magnitude")
    parser.add_argument("--repeat", action="store_true", help="then the same sweep again on the same cache")
    parser.add_argument("--within", type=float, default=None, metavar="X",
                        help="print the largest τ within X points of dense, per repair level")
    args = parser.parse_args()
    print("conditions:", machine_conditions(Path(__file__).resolve().parents[1]), flush=True)
    loaded = load_choice(f"pretrained:{args.model}")
    print(f"compute queue: {COMPUTE.slots} slot(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
          flush=True)
    if args.warm:  # a server that has decoded the images before (the first job of a process decodes them)
        from core.measure.accuracy import calibration_images, eval_data

        eval_data("test", loaded.mean, loaded.std)
        calibration_images(512, 42, loaded.mean, loaded.std)
    if not args.no_full:
        run(args.job, loaded, args, None)
    if args.cancel_at is not None or args.cancel_after_s is not None:
        run(args.job, loaded, args, args.cancel_at, args.cancel_after_s)


if __name__ == "__main__":
    main()
