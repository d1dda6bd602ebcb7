"""A Tune section's running job on the page: progress, the time estimate, Cancel, and the results so far.

The jobs themselves are :mod:`core.services.tune_jobs` (worker threads, no Streamlit). A section
keeps its job in session state under a *slot* (:func:`start`) and calls :func:`track` where its
results go. While the job runs, :func:`track` draws a fragment that reruns every :data:`POLL_S`
seconds on its own (``st.fragment(run_every=...)``): only that fragment redraws, so every other
widget of the page stays usable, and each poll tells the job this session still watches it. When
the job has finished, the next full run hands its result to the section (``on_result``) and the
polling stops; a cancelled job leaves a note and the rows it measured (they are also in the disk
cache, so running it again resumes).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable

import streamlit as st

from core.common.steps import Cancelled
from core.services import tune_jobs
from core.services.compute_queue import COMPUTE
from core.services.jobs import Job

#: seconds between two polls of a running job (each redraws only its fragment)
POLL_S = 0.5


def start(slot: str, job: Job, watcher: Hashable) -> None:
    """Keep ``job`` as the section's job; a different job the section was running is let go (cancelled
    unless another session watches it)."""
    state = st.session_state
    previous = state.get(slot)
    if isinstance(previous, Job) and previous is not job and not previous.finished:
        tune_jobs.stop(previous, watcher)
    state[slot] = job
    for what in ("note", "partial", "error"):
        state.pop(f"{slot}_{what}", None)


def running(slot: str) -> bool:
    """Whether the section's job is still running (its Run button can say so)."""
    job = st.session_state.get(slot)
    return isinstance(job, Job) and not job.finished


def status_text(job: Job) -> str:
    """One line: the step, the elapsed time and the estimate (or what the job waits for)."""
    if job.total == 0 or job.done == 0:
        queue = COMPUTE.state()
        if queue.waiting:
            return (f"waiting for the shared CPU ({queue.running} job(s) running, {queue.waiting} waiting) · "
                    f"{job.elapsed_s:.0f} s")
        return f"measuring the first step to estimate the time… {job.elapsed_s:.0f} s"
    text = f"{job.done} of {job.total} ({job.label}) · {job.elapsed_s:.0f} s"
    estimate = job.estimate_s
    if estimate is not None:
        text += f" of about {estimate:.0f} s (estimated from the steps measured so far)"
    return text


def _panel(slot: str, what: str, watcher: Hashable, draw_partial: Callable[[object], None] | None) -> None:
    """The running job's progress, Cancel and partial results (the body of the polling fragment)."""
    job = st.session_state.get(slot)
    if not isinstance(job, Job):
        return
    if job.finished:
        st.rerun()  # the full run hands the result to the section and stops polling
    job.watch(watcher)
    if not job.cancelled and st.button("Cancel", key=f"{slot}_cancel",
                                       help="Stops the measurement within about a second. On CIFAR-10, the rows "
                                            "measured so far stay in the disk cache: running it again resumes there."):
        tune_jobs.stop(job, watcher)
        if not job.cancelled:  # another session watches the same measurement: it goes on for them
            del st.session_state[slot]
            st.session_state[f"{slot}_note"] = f"{what}: you stopped waiting; another session still runs it."
            return
    st.progress(job.fraction, text=f"**{what}**: " + ("stopping…" if job.cancelled else status_text(job)))
    if draw_partial is not None and job.partial is not None:
        draw_partial(job.partial)


_polling_panel = st.fragment(run_every=POLL_S)(_panel)


def track(slot: str, what: str, watcher: Hashable, on_result: Callable[[object, Hashable], None],
          draw_partial: Callable[[object], None] | None = None) -> None:
    """Draw the section's job: a polling panel while it runs; once it has finished, ``on_result(result, key)``
    (``key``: the job's key, what the result was measured for), or the note of a cancel with the results
    measured so far. A failed job's error is raised here, on every run until the section starts another job."""
    state = st.session_state
    job = state.get(slot)
    if isinstance(job, Job) and job.finished:
        del state[slot]
        if job.error is None:
            on_result(job.result, job.key)
            return
        if not isinstance(job.error, Cancelled):
            state[f"{slot}_error"] = job.error  # shown on every run until the next start
            raise job.error
        resume = ("Run it again to measure it whole." if getattr(job, "remember", False) else
                  "What it measured is kept in the disk cache: run it again to resume.")
        state[f"{slot}_note"] = (f"{what} was cancelled after {job.done} of {job.total} steps "
                                 f"({job.elapsed_s:.0f} s). {resume}")
        state[f"{slot}_partial"] = job.partial
        job = None
    if isinstance(job, Job):
        _polling_panel(slot, what, watcher, draw_partial)
        return
    if state.get(f"{slot}_error") is not None:
        raise state[f"{slot}_error"]
    note = state.get(f"{slot}_note")
    if note:
        st.info(note)
        partial = state.get(f"{slot}_partial")
        if draw_partial is not None and partial is not None:
            draw_partial(partial)
