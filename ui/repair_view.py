"""The Explore page's accuracy repair: the level choice, a running repair's progress, the per-layer errors.

The levels and the work are :mod:`core.services.repairs` and ``session.repairs``
(:class:`core.services.session_repairs.SessionRepairs`); this module only draws them. A repair
above BN recalibration runs as a :class:`core.services.repairs.RepairJob` (a worker thread); the page
runs on request (:func:`repair_wanted`: a click on *Run the repair*, or, with the automatic
choice, once the sliders have rested :data:`REST_S`), never because a slider moved; until then
the view shows the setting with BN recalibration and offers the button (:func:`show_pending`).
The page waits for a running repair here, updating a progress bar every :data:`PROGRESS_S` with
the time left revised from the layers done. Each update is where
Streamlit interrupts a superseded run: the page then stops watching the job, and the next
run's slider move (:meth:`ExploreSession.update`) or Stop (:meth:`SessionRepairs.stop`)
cancels it; a rerun for the same setting watches it again and it goes on.
"""
from __future__ import annotations

import time

import streamlit as st

from core.measure.repair import RepairCancelled, RepairResult
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult
from core.services.repairs import JOB_LEVELS, LABELS, LEVELS
from core.services.session import ExploreSession
from ui.charts import repair_errors_figure
from ui.state import set_repair, sync_repair

KEY = "repair"
#: the toggle "run the repair by itself when the sliders rest" (off: on a click)
AUTO_KEY = "repair_auto"
#: the repair key (a string) the user asked to run with the button, or stopped while it ran by itself
REQUESTED_KEY = "explore_repair_requested"
STOPPED_KEY = "explore_repair_stopped"
PROGRESS_S = 0.2
#: with AUTO_KEY on, how long the sliders must rest before a repair starts by itself
REST_S = 1.5

HELP = ("Repairs the compressed model's accuracy without retraining, on unlabelled calibration images "
        "(never the test set); each level includes the ones before it. **BN recalibration**: BatchNorm running "
        "statistics re-estimated (seconds, weights untouched). **+ bias correction**: each pruned layer's "
        "per-channel mean output restored to the dense model's. **+ reconstruction**: the kept weights of every "
        "pruned layer re-solved by ridge least squares so that its output matches the dense model's (tens of "
        "seconds on ResNet-18). These two run on request, after you have settled on a setting: a slider move "
        "never restarts them. The loaded model is never modified; choosing *none* gives back the unrepaired "
        "figures.")


def _on_change() -> None:
    set_repair(st.session_state[KEY])  # keep the old bn_recal key in step (the Export page reads it)
    st.session_state.pop(STOPPED_KEY, None)  # a new choice starts afresh: no "stopped" note from before


def repair_choice(session: ExploreSession) -> str:
    """Draw the repair choice (only the levels that apply; disabled with the reason when none does); the level."""
    state = st.session_state
    level = sync_repair()
    options = session.repairs.levels()
    unavailable = session.repairs.unavailable()
    if level not in options:  # e.g. a level chosen for another model: the closest one below that applies
        lower = [o for o in options if LEVELS.index(o) < LEVELS.index(level)][-1]
        st.info(f"Repair '{LABELS[level]}' does not apply here: {unavailable[level]} It is set to "
                f"'{LABELS[lower]}'.")
        level = lower
        set_repair(level)
    by_reason: dict[str, list[str]] = {}
    for name, reason in unavailable.items():
        by_reason.setdefault(reason, []).append(LABELS[name])
    why = " ".join(f"Not offered here ({', '.join(names)}): {reason}" for reason, names in by_reason.items())
    st.selectbox("Repair (no retraining)", options, key=KEY, format_func=LABELS.get, on_change=_on_change,
                 disabled=len(options) == 1, help=HELP + (f"\n\n{why}" if why else ""))
    if any(o in JOB_LEVELS for o in options):
        st.toggle("Repair when the sliders rest", key=AUTO_KEY,
                  help=f"Off: the bias correction and the reconstruction run when you click *Run the repair*. "
                       f"On: they start {REST_S:g} s after your last slider move (a move before that, or during "
                       "the repair, stops it).")
    return state[KEY]


def _key_text(session: ExploreSession, config: CompressionConfig, level: str) -> str:
    return repr(session.repairs.key(config, level))


def repair_wanted(session: ExploreSession, config: CompressionConfig, level: str) -> bool:
    """Whether the repair of ``config`` at ``level`` runs in this page run (the ``run_repair`` of the request).

    Yes for a level without a job, for a repair already made or running (another tab's, say),
    after a click on *Run the repair* for this setting, and with :data:`AUTO_KEY` on unless the
    user stopped it for this setting.
    """
    if level not in JOB_LEVELS:
        return True
    state = st.session_state
    text = _key_text(session, config, level)
    if (session.repairs.cached(config, level) is not None or session.repairs.running(config, level)
            or state.get(REQUESTED_KEY) == text):
        return True
    return bool(state.get(AUTO_KEY)) and state.get(STOPPED_KEY) != text


def request_repair(session: ExploreSession, config: CompressionConfig, level: str) -> None:
    """Ask for the repair of ``config`` at ``level`` to run now (a button's callback: the next run starts it)."""
    set_repair(level)
    state = st.session_state
    state[REQUESTED_KEY] = _key_text(session, config, level)
    state.pop(STOPPED_KEY, None)


def show_pending(session: ExploreSession, config: CompressionConfig, pending: str, shown_level: str,
                 estimate_s: float | None, box) -> None:
    """The repair asked for is not run for this setting: say so, and offer to run it."""
    state = st.session_state
    text = _key_text(session, config, pending)
    about = "" if estimate_s is None else f" (about {estimate_s:.0f} s)"
    with box:
        stopped = state.get(STOPPED_KEY) == text
        st.info(f"**Repair {LABELS[pending]}: {'stopped' if stopped else 'not run'} for this setting.** "
                f"The accuracy below is {'without repair' if shown_level == 'none' else 'with BN recalibration only'}"
                f" until it runs; a slider move never starts it by itself"
                f"{'' if state.get(AUTO_KEY) else ' (or switch on: by itself when the sliders rest)'}.")
        st.button(f"Run the repair{about}", key="repair_run", type="primary", on_click=request_repair,
                  args=(session, config, pending))


def _progress_text(job, estimate: float) -> str:
    """A running repair's progress, with the time left revised from the layers done so far."""
    if job.done == 0:
        return f"layer 1 of {job.total} · {job.elapsed_s:.0f} s of about {estimate:.0f} s"
    left = (job.total - job.done) * job.elapsed_s / job.done  # the measured mean time per layer so far
    return (f"layer {job.done} of {job.total} ({job.layer}) · {job.elapsed_s:.0f} s, about {left:.0f} s left "
            f"(revised from the layers done; first estimate {estimate:.0f} s)")


def _rest(head, level: str) -> None:
    """With the automatic repair: wait until the sliders have rested (a move meanwhile reruns the page)."""
    end = time.monotonic() + REST_S
    while (left := end - time.monotonic()) > 0:
        head.caption(f"{LABELS[level]}: starts in {left:.1f} s unless you move a slider…")
        time.sleep(min(0.1, left))


def await_repair(session: ExploreSession, result: CompressionResult, level: str, box) -> RepairResult | None:
    """Estimate, start (or join) and wait for the repair of ``result`` at ``level``, drawing into ``box``.

    Returns the repair, or None when it was stopped or cancelled (the next run shows it as not
    run, with its button). A Stop click reruns the page: its value is read here first.
    """
    state = st.session_state
    text = _key_text(session, result.config, level)
    with box:
        head, stop_slot, bar = st.empty(), st.empty(), st.empty()
    if stop_slot.button("Stop the repair", key="repair_stop"):
        session.repairs.stop()
        state[STOPPED_KEY] = text
        state.pop(REQUESTED_KEY, None)
        st.rerun()
    if not session.repairs.running(result.config, level) and state.get(REQUESTED_KEY) != text:
        _rest(head, level)
    queue = session.queue_state()
    head.caption(f"{LABELS[level]}: estimating the time…" if not queue.busy else
                 f"{LABELS[level]}: waiting for the shared CPU to estimate the time…")
    estimate = session.repairs.estimate(result, level,
                                        poll=lambda: bar.progress(0.0, text="waiting for the shared CPU…"))
    head.caption(f"**Repairing ({LABELS[level]})**: about {estimate:.0f} s (estimated before starting from this "
                 f"machine's measured speed; a busy server takes longer). The accuracy follows on the repaired model.")
    job = session.repairs.start(result, level)
    try:
        while not job.wait(PROGRESS_S):
            if job.total == 0:
                busy = session.queue_state()
                progress = (f"waiting for the shared CPU ({busy.running} job(s) running, {busy.waiting} waiting)…"
                            if busy.waiting or job.elapsed_s > 1 else "starting…")
            else:
                progress = _progress_text(job, estimate)
            bar.progress(job.fraction, text=progress)
    finally:
        if not job.finished:  # interrupted by a rerun: the next run watches it again, or lets it go
            session.repairs.leave(job)
    stop_slot.empty()
    if isinstance(job.error, RepairCancelled):
        bar.empty()
        head.info(f"The repair was cancelled ({job.error}).")
        return None
    if job.error is not None:
        bar.empty()
        raise job.error
    state.pop(REQUESTED_KEY, None)
    repaired = job.result
    head.caption(f"**Repaired ({LABELS[level]})** on {repaired.n_images} calibration images from the CIFAR-10 "
                 "training split. The accuracy below is the repaired model's.")
    bar.progress(1.0, text=f"repaired in {repaired.seconds:.1f} s (measured; estimated {estimate:.0f} s)")
    return repaired


def show_repair(repaired: RepairResult, box) -> None:
    """The per-layer output error before/after (held-out calibration images) and what was done, in ``box``."""
    with box:
        errors = repaired.errors
        if repaired.n_holdout and errors["err_before"].notna().any():
            st.plotly_chart(repair_errors_figure(errors), key="repair_errors")
            st.caption(f"What you see: for each pruned layer, the relative squared error of its output against the "
                       f"dense model's, ‖y − y_dense‖² / ‖y_dense‖², before and after the repair "
                       f"({LABELS[repaired.method]}), "
                       f"measured on {repaired.n_holdout} held-out training images that the repair did not fit. "
                       f"Repair: {repaired.seconds:.1f} s on {repaired.n_images} calibration images (measured).")
        with st.expander("What the repair did, per layer"):
            st.dataframe(errors, hide_index=True, width="stretch")

