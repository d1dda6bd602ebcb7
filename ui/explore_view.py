"""How the Explore page shows its heavier figures as they arrive: the paired accuracy estimate and the latency.

Each function fills placeholders (``st.empty()``) the page laid out during its first paint,
so a figure refines in place.
"""
from __future__ import annotations

import streamlit as st

from core.common.formatting import fmt_pct
from core.measure.latency import LatencyReport
from core.measure.paired import PairedEstimate
from core.services.compute_queue import QueueState
from core.method.config import CompressionConfig
from core.services.presets import PRESETS, Preset
from core.services.recorded import RecordedSetting
from core.services.repairs import JOB_LEVELS, LABELS as REPAIR_LABELS
from core.services.session import ExploreSession
from core.services.session_measurements import LATENCY_BATCHES
from ui.repair_view import request_repair
from ui.state import apply_config, current_config

#: a loss of more than this (the whole paired interval below it) is a collapse the page explains
COLLAPSE_POINTS = 0.10


def estimate_done(estimate: PairedEstimate | None, target: float) -> bool:
    """Refinement stops when the paired interval is within ``target`` (a fraction) or every image is in."""
    if estimate is None:
        return False
    return estimate.complete or (target > 0 and estimate.delta_half_width <= target)


def _waiting_text(waiting: QueueState | None) -> str:
    if waiting is None or not waiting.busy:
        return "measuring…"
    return f"waiting for the shared CPU ({waiting.running} job(s) running, {waiting.waiting} waiting)…"


def show_accuracy(slot, detail, estimate: PairedEstimate | None, target: float, repair: bool | str = "none",
                  waiting: QueueState | None = None,
                  data_label: str = "the CIFAR-10 test set (JPEG copy)") -> None:
    """Fill the accuracy metric and its detail line; ``repair``: the repair level of the figures (True: ``"bn"``)."""
    level = "bn" if repair is True else ("none" if repair is False else repair)
    repaired = "" if level == "none" else f" After repair: {REPAIR_LABELS[level]}."
    if estimate is None:
        slot.metric("Accuracy Δ vs dense", "…", help=_waiting_text(waiting) + repaired)
        detail.caption(f"Accuracy{'' if level == 'none' else ' (' + REPAIR_LABELS[level] + ')'}: "
                       f"{_waiting_text(waiting)}")
        return
    low, high = estimate.delta_interval
    status = ("all images" if estimate.complete else
              "done" if estimate_done(estimate, target) else _waiting_text(waiting) if waiting else "refining…")
    slot.metric(f"Accuracy Δ vs dense ±{100 * estimate.delta_half_width:.1f}",
                f"{100 * estimate.delta:+.2f} pts",
                f"{fmt_pct(estimate.accuracy)} (dense {fmt_pct(estimate.dense_accuracy)}), n = {estimate.n:,}",
                delta_color="off", delta_arrow="off",
                help="Paired: the compressed model's accuracy minus the dense model's, on the same test images (a growing, "
                     f"class-balanced sample of {data_label}), with its paired 95 % interval "
                     f"[{100 * low:+.2f}, {100 * high:+.2f}] points." + repaired)
    share = estimate.n / estimate.population
    detail.markdown(
        f"**Δ = {100 * estimate.delta:+.2f} points** (95 % interval {100 * low:+.2f} to {100 * high:+.2f}), "
        f"measured on {estimate.n:,} of {estimate.population:,} test images ({fmt_pct(share)}): "
        f"{estimate.newly_wrong:,} newly wrong, {estimate.newly_right:,} newly right. Accuracy "
        + ("" if level == "none" else f"(repair: {REPAIR_LABELS[level]}) ")
        + f"{fmt_pct(estimate.accuracy, 2)} compressed, {fmt_pct(estimate.dense_accuracy, 2)} dense on the same images. "
        f"Inference in {estimate.precision}" + (" (its predictions agree with fp32 on ≥ 99.5 % of the test set)"
                                                if estimate.precision != "fp32" else "") + f". Status: {status}.")


def show_latency(slot, detail, latency: LatencyReport | None, waiting: QueueState | None = None) -> None:
    if latency is None:
        slot.metric("Latency", "…", help="Measured: " + _waiting_text(waiting))
        detail.caption(f"Latency: {_waiting_text(waiting)}")
        return
    verdict = latency.verdict
    clear = latency.quiet and verdict != "no clear difference"
    slot.metric(f"Latency, batch {latency.batch}" + ("" if latency.quiet else " (busy)"), f"{latency.compressed_ms:.2f} ms",
                f"{latency.compressed_ms - latency.dense_ms:+.2f} ms vs dense ({verdict})" if clear else
                f"dense {latency.dense_ms:.2f} ms · " + ("no clear Δ" if latency.quiet else "under load"),
                delta_color="inverse" if clear else "off", delta_arrow="auto" if clear else "off",
                help=f"Measured: the median of {latency.runs} timed forward passes of each model on "
                     f"{latency.device.upper()}, one thread, dense and compressed alternating after a warm-up. "
                     "Coloured only when the difference is clear (a sign test on the alternating rounds) and "
                     "nothing else ran meanwhile. The compressed model stores zeros densely, so PyTorch runs the "
                     "same kernels: expect no speed-up from pruning alone.")
    quiet = ("Measured alone (no other job running) and kept for every session."
             if latency.quiet else
             f"Taken under load: other work ran at the same time (this thread got {fmt_pct(latency.cpu_share, 0)} "
             "of the CPU), so the figure is not kept and is measured again on the next view.")
    peak = ("" if latency.peak_compressed_mib is None else
            f" Memory during the runs: {latency.memory_method}, {latency.peak_compressed_mib:.0f} MiB.")
    detail.caption(f"Dense {latency.dense_ms:.2f} ms, compressed {latency.compressed_ms:.2f} ms, "
                   f"{latency.runs} rounds. {quiet}{peak}")


def _apply_preset(session: ExploreSession, chosen: Preset) -> None:
    """A preset button's callback: its setting and repair into the controls (a job level runs at once)."""
    apply_config(chosen.config, session, repair=chosen.repair)
    st.session_state["preset_applied"] = chosen.label
    if chosen.repair in JOB_LEVELS and chosen.repair in session.repairs.levels():
        config, _ = current_config(session)
        request_repair(session, config, chosen.repair)


def show_presets(session: ExploreSession) -> None:
    """A row of named starting points (:data:`core.services.presets.PRESETS`), each a button with its why."""
    columns = st.columns([1] + [2] * len(PRESETS))
    columns[0].markdown("**Start from:**")
    for column, chosen in zip(columns[1:], PRESETS):
        column.button(chosen.label, key=f"preset_{chosen.key}", help=chosen.description, width="stretch",
                      on_click=_apply_preset, args=(session, chosen))


def show_collapse(slot, session: ExploreSession, config: CompressionConfig, estimate: PairedEstimate | None,
                  level: str) -> bool:
    """When the accuracy has collapsed (the paired interval entirely below −:data:`COLLAPSE_POINTS`): one
    sentence on why, and a button that runs the strongest repair offered here; whether it was drawn.
    Otherwise ``slot`` is cleared."""
    if estimate is None or estimate.delta_interval[1] >= -COLLAPSE_POINTS:
        slot.empty()
        return False
    strongest = session.repairs.levels()[-1]
    with slot.container():  # no figure in the sentence: it is drawn once per run while the estimate refines
        if level == strongest:
            st.warning(f"**Still collapsed after {REPAIR_LABELS[level]}**: too few weights are left for any re-fit "
                       "of their values to reproduce the dense model's outputs. Lower τ.")
            return True
        st.warning("**The pruned network has collapsed** (more than 10 points below dense). Zeroing every weight "
                   "below τ·max|W| "
                   "shifts each layer's outputs, and the layers after it (BatchNorm first) no longer match them; "
                   "nothing is wrong with the engine, and no retraining is needed to bring most of it back"
                   + (" (Learn explains)." if level == "none" else "."))
        if strongest != "none":
            st.button(f"Repair it: {REPAIR_LABELS[strongest]}", key="collapse_repair", type="primary",
                      on_click=request_repair, args=(session, config, strongest))
    return True


def _back_to_recorded(session: ExploreSession, recorded: RecordedSetting) -> None:
    apply_config(recorded.config, session, repair="none")


def show_recorded(recorded: RecordedSetting | None, as_loaded: bool, session: ExploreSession) -> None:
    """For an uploaded export of this app: say whether the page shows it as loaded or compresses it again."""
    if recorded is None:
        return
    if as_loaded:
        st.info(f"**The uploaded {recorded.kind}, as it is** ({recorded.describe()}). The sliders stand at its "
                "setting; its weights are shown without compressing them again: retention counted on them, the "
                "size the file's. An upload is its own dense reference, so its accuracy is measured as it is "
                "(Δ 0): compare the full-test figure with the one before export. Move a slider to compress "
                "these weights again.")
        return
    st.info(f"**Compressing the uploaded weights again** with this setting: the figures are relative to the "
            f"uploaded {recorded.kind} ({recorded.describe()}), not to the original dense model.")
    st.button("Back to the file's own setting", key="back_to_recorded", on_click=_back_to_recorded,
              args=(session, recorded))


def latency_controls():
    """The latency section's switch and batch size (one definition for both granularities: the same widget
    keys), and the placeholder the measured latency is drawn into once the page has painted."""
    x, y = st.columns(2)
    x.toggle("Measure latency", key="latency_on")
    y.selectbox("Batch size", LATENCY_BATCHES, key="latency_batch")
    return st.empty()
