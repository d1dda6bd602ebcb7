"""The Explore page's accuracy repair: the level choice, a running repair's progress, the per-layer errors.

The levels and the work are :mod:`core.services.repairs` and ``session.repairs``
(:class:`core.services.session_repairs.SessionRepairs`); this module only draws them. A repair
above BN recalibration runs as a :class:`core.services.repairs.RepairJob` (a worker thread); the page
waits for it here, updating a progress bar every :data:`PROGRESS_S`. Each update is where
Streamlit interrupts a superseded run: the page then stops watching the job, and the next
run's slider move (:meth:`ExploreSession.update`) or Stop (:meth:`SessionRepairs.stop`)
cancels it; a rerun for the same setting watches it again and it goes on.
"""
from __future__ import annotations

import streamlit as st

from core.measure.repair import RepairCancelled, RepairResult
from core.method.engine import CompressionResult
from core.services.repairs import LABELS, LEVELS
from core.services.session import ExploreSession
from ui.charts import repair_errors_figure
from ui.state import set_repair, sync_repair

KEY = "repair"
#: the repair key the user stopped (a string), so that the page does not start it again by itself
STOPPED_KEY = "explore_repair_stopped"
PROGRESS_S = 0.2

HELP = ("Repairs the compressed model's accuracy without retraining, on unlabelled calibration images "
        "(never the test set); each level includes the ones before it. **BN recalibration**: BatchNorm running "
        "statistics re-estimated (seconds, weights untouched). **+ bias correction**: each pruned layer's "
        "per-channel mean output restored to the dense model's. **+ reconstruction**: the kept weights of every "
        "pruned layer re-solved by ridge least squares so that its output matches the dense model's (tens of "
        "seconds on ResNet-18; the estimate is shown before it starts). The loaded model is never modified; "
        "choosing *none* gives back the unrepaired figures.")


def _on_change() -> None:
    set_repair(st.session_state[KEY])  # keep the old bn_recal key in step (the Export page reads it)


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
    return state[KEY]


def _stopped_text(key: tuple) -> str:
    return repr(key)


def await_repair(session: ExploreSession, result: CompressionResult, level: str, box) -> RepairResult | None:
    """Estimate, start (or join) and wait for the repair of ``result`` at ``level``, drawing into ``box``.

    Returns the repair, or None when it was stopped or cancelled (the box says so and offers to
    run it). A Stop click reruns the page: its value is read here first, before any waiting.
    """
    state = st.session_state
    key = _stopped_text(session.repairs.key(result.config, level))
    with box:
        head, stop_slot, bar = st.empty(), st.empty(), st.empty()
    if state.get(STOPPED_KEY) == key or stop_slot.button("Stop the repair", key="repair_stop"):
        session.repairs.stop()
        state[STOPPED_KEY] = key
        head.info(f"The repair ({LABELS[level]}) was stopped; the accuracy figures wait for it. "
                  "Choose another level, or run it again.")
        if stop_slot.button("Run the repair", key="repair_run"):
            state.pop(STOPPED_KEY, None)
            st.rerun()
        return None
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
                text = (f"waiting for the shared CPU ({busy.running} job(s) running, {busy.waiting} waiting)…"
                        if busy.waiting or job.elapsed_s > 1 else "starting…")
            else:
                text = (f"layer {job.done} of {job.total} ({job.layer}) · {job.elapsed_s:.0f} s of about "
                        f"{estimate:.0f} s")
            bar.progress(job.fraction, text=text)
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

