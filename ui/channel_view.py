"""Explore at channel granularity: the boundary rule one level up (whole channels removed, a smaller model).

:func:`explore_channels` draws the channel mode of the Explore page: its controls, the first paint
(one call into :meth:`core.services.channel_session.ChannelSession.update`: counted MACs and
parameters, the group's score histogram, the per-layer share kept) and then, after the footer,
the queued work (latency in torch eager, the repair job, the paired accuracy), each filling a
placeholder laid out in the first paint, so a slider move is never held up by them.
"""
from __future__ import annotations

import streamlit as st

from core.common.formatting import fmt_pct
from core.measure.latency import LatencyReport
from core.measure.repair import RepairCancelled
from core.method.channel_config import NORMS, ChannelConfig
from core.services.channel_session import CHANNEL_LABELS, ChannelView
from core.services.compute_queue import QueueState
from core.services.session import ExploreSession
from ui.charts import channel_scores_figure, channel_share_figure
from ui.errors import literal
from ui.explore_view import estimate_done, latency_controls, show_accuracy
from ui.repair_view import show_repair
from ui.state import device, footer, guard, set_widget

REQUESTED_KEY = "_explore_ch_repair_requested"  # the setting whose repair the user asked for (a text)
PROGRESS_S = 0.25  # how often a running repair's progress is redrawn


def channel_config() -> ChannelConfig:
    """The channel setting of the controls."""
    state = st.session_state
    return ChannelConfig(tau=float(state["explore_tau_ch"]), norm=state["explore_ch_norm"],
                         fold_bn=bool(state["explore_ch_fold_bn"]))


def apply_channel_setting(config: ChannelConfig, repair: str | None = None) -> list[str]:
    """Put Explore in channel mode at ``config`` (a loaded settings file), and its repair level when it is one
    channel mode offers; the notes say what could not be applied (one sentence each)."""
    set_widget("explore_granularity", "channel")
    set_widget("explore_tau_ch", config.tau)
    set_widget("explore_ch_norm", config.norm)
    set_widget("explore_ch_fold_bn", config.fold_bn)
    notes = []
    if config.layer_tau:
        notes.append(f"{len(config.layer_tau)} per-layer τ_ch value(s) not applied: Explore has one τ_ch for every "
                     "group (python -m core.tune --granularity channel takes them)")
    if repair is not None and repair in CHANNEL_LABELS:
        set_widget("explore_ch_repair", repair)
    elif repair is not None:
        notes.append(f"repair '{repair}' not applied: channel mode offers {', '.join(CHANNEL_LABELS)}")
    return notes


def _request_key(session: ExploreSession, config: ChannelConfig, level: str) -> str:
    return f"{session.key}|{config}|{level}"


def _request(session: ExploreSession, config: ChannelConfig, level: str) -> None:
    st.session_state[REQUESTED_KEY] = _request_key(session, config, level)


def _waiting(queue: QueueState | None) -> str:
    if queue is None or not queue.busy:
        return "measuring…"
    return f"waiting for the shared CPU ({queue.running} job(s) running, {queue.waiting} waiting)…"


def show_channel_latency(slot, detail, latency: LatencyReport | None, waiting: QueueState | None = None) -> None:
    """The measured torch-eager latency of the smaller model against the dense one, and the speed-up."""
    if latency is None:
        slot.metric("Speed-up · torch eager", "…", help="Measured: " + _waiting(waiting))
        detail.caption(f"Latency: {_waiting(waiting)}")
        return
    speedup = latency.dense_ms / latency.compressed_ms if latency.compressed_ms > 0 else float("nan")
    slot.metric(f"Speed-up · torch eager, batch {latency.batch}" + ("" if latency.quiet else " (busy)"),
                f"{speedup:.2f}×", f"{latency.compressed_ms:.2f} ms vs dense {latency.dense_ms:.2f} ms "
                                   f"({latency.verdict})", delta_color="off", delta_arrow="off",
                help=f"Measured: the median of {latency.runs} timed forward passes of each model on "
                     f"{latency.device.upper()}, one thread, dense and the smaller model alternating after a warm-up. "
                     "The removed channels are gone from the tensors, so PyTorch's ordinary dense kernels do less "
                     "work: unlike zeroed weights, this is a real speed-up.")
    quiet = ("Measured alone and kept for every session." if latency.quiet else
             f"Taken under load (this thread got {fmt_pct(latency.cpu_share, 0)} of the CPU): not kept, measured "
             "again on the next view.")
    detail.caption(f"Latency (torch eager, fp32): dense {latency.dense_ms:.2f} ms, channel-pruned "
                   f"{latency.compressed_ms:.2f} ms per batch of {latency.batch}, {latency.runs} rounds. {quiet}")


def _controls(session: ExploreSession) -> tuple[ChannelConfig, str]:
    state = st.session_state
    levels = session.channels.levels()
    if state["explore_ch_repair"] not in levels:
        state["explore_ch_repair"] = "none"
    c1, c2, c3 = st.columns(3)
    with c1:
        st.slider("τ_ch — remove channels with s_c < β = τ_ch · max_c s_c (per coupled group)", 0.0, 1.0,
                  step=0.01, key="explore_tau_ch",
                  help="s_c: the norm of the weights that produce channel c (every layer writing into the group, "
                       "BatchNorm's γ/σ folded in). Channels that must go together (a residual addition, a "
                       "BatchNorm, a depthwise conv) form one group and share β. At least one channel stays.")
    with c2:
        st.radio("Channel score s_c", NORMS, key="explore_ch_norm", horizontal=True,
                 format_func={"l2": "L2 norm", "l1": "L1 norm"}.get)
        st.checkbox("Fold BatchNorm's γ/σ into the score", key="explore_ch_fold_bn",
                    help="Without the fold a conv→BN filter's norm says little: BatchNorm divides it out.")
    with c3:
        st.radio("Repair (no retraining)", levels, key="explore_ch_repair", format_func=CHANNEL_LABELS.get,
                 help="Least-squares re-solve: each layer after a removed channel is re-fitted on its kept inputs "
                      "to match the dense model's outputs on unlabelled CIFAR-10 training images, then BatchNorm "
                      "statistics are re-estimated. Runs as a cancellable job.")
        for level, why in session.channels.unavailable().items():
            st.caption(f"{CHANNEL_LABELS[level]}: not offered here: {why}")
    return channel_config(), state["explore_ch_repair"]


def explore_channels(session: ExploreSession) -> None:
    """The whole channel mode of the Explore page (the page calls this, then stops)."""
    state = st.session_state
    st.caption("**Channel granularity**: whole channels whose score is below the boundary are removed, so every "
               "convolution physically shrinks and runs faster on ordinary dense kernels. This mode shows pure "
               "channel pruning: the weight-level τ and θ are not applied inside the kept channels here "
               "(`python -m core.tune --granularity channel` composes them). The loaded model is never modified.")
    traced = False
    with guard("Tracing the model's channel dependencies", hint="Use weight granularity for this model."):
        with st.spinner("Tracing the dependency graph (once per model, shared by every session)…"):
            session.channels.pruner()
        traced = True
    if not traced:  # the guard said why, in one sentence
        return
    config, level = _controls(session)
    groups = session.channels.group_names()
    if state.get("explore_ch_group") not in groups:
        state["explore_ch_group"] = session.channels.largest_group()
    view: ChannelView | None = None
    with guard("Updating the view"):
        view = session.channels.update(config, state["explore_ch_group"], level, int(state["latency_batch"]),
                                       device())
    if view is None:
        return
    result = view.result
    for note in view.notes[:5]:
        st.info(note)

    row = st.columns(4)
    row[0].metric("MACs · counted", f"{fmt_pct(result.mac_ratio)} of dense",
                  f"{result.macs / 1e6:,.1f} M vs {result.macs_dense / 1e6:,.1f} M per image"
                  + (f" ({1 / result.mac_ratio:.2f}× fewer)" if result.mac_ratio > 0 else ""),
                  delta_color="off", delta_arrow="off",
                  help="Counted: multiply-accumulates of every Conv/Linear of the smaller model for one input, "
                       "from the layer shapes.")
    row[1].metric("Parameters · counted", f"{fmt_pct(result.params / result.params_dense)} of dense",
                  f"{result.params:,} vs {result.params_dense:,}", delta_color="off", delta_arrow="off",
                  help="Counted: every parameter of the smaller model (its tensors are physically smaller).")
    latency_slot, accuracy_slot = row[2].empty(), row[3].empty()

    left, right = st.columns([3, 2])
    with left:
        st.selectbox("Channel group", groups, key="explore_ch_group",
                     help="A coupled group is named after its first producing layer; its members share β.")
        st.plotly_chart(channel_scores_figure(view.scores.tolist(), view.beta, view.group), key="channel_scores")
        kept = int((view.scores >= view.beta).sum()) if view.beta > 0 else len(view.scores)
        st.caption(f"What you see: the scores s_c of the {len(view.scores)} channels of group **{literal(view.group)}**"
                   f" (τ_ch = {view.tau:.2f}); the dashed red line is β = {view.beta:.4g}. Channels left of it are "
                   f"removed ({len(view.scores) - kept} here). Scores are norms (never negative), so the boundary has "
                   "one side, +β.")
    with right:
        st.plotly_chart(channel_share_figure(view.layers, view.group), key="channel_share")
        st.caption("What you see: the share of each Conv/Linear's output channels that is kept (counted), in module "
                   "order; the outlined bars are the layers of the chosen group.")

    acc, perf = st.columns(2)
    with acc:
        st.subheader("Accuracy" if session.has_labels else "Accuracy: n/a")
        accuracy_detail = st.empty()
        repair_box = st.container()
    with perf:
        st.subheader("Latency")
        latency_detail = latency_controls()
    with st.expander("Per-group and per-layer tables"):
        st.dataframe(result.groups, hide_index=True, width="stretch")
        st.dataframe(result.layers, hide_index=True, width="stretch")
    footer(view.timings, page="explore", budget_s=session.update_budget_s)

    # ------------------------------------------------------------ queued work, after the first paint
    _latency(session, view, latency_slot, latency_detail)
    shown_level = _repair(session, view, level, repair_box)
    _accuracy(session, view, shown_level, accuracy_slot, accuracy_detail)


def _latency(session: ExploreSession, view: ChannelView, slot, detail) -> None:
    state = st.session_state
    if not state["latency_on"]:
        slot.metric("Speed-up · torch eager", "off", help="Measured on request: switch latency measurement on.")
        return
    latency = view.latency
    if latency is None:
        def waiting() -> None:
            show_channel_latency(slot, detail, None, waiting=session.queue_state())

        waiting()
        with guard("Measuring latency"):
            latency = session.channels.latency(view.result, int(state["latency_batch"]), device(), poll=waiting)
    show_channel_latency(slot, detail, latency)


def _repair(session: ExploreSession, view: ChannelView, level: str, box) -> str:
    """Show, offer or run the chosen repair; the level the accuracy figures are for."""
    channels, config = session.channels, view.result.config
    level = channels.applied_level(level)
    if level == "none":
        return "none"
    if view.repair is not None:
        show_repair(view.repair, box)
        return level
    state = st.session_state
    wanted = state.get(REQUESTED_KEY) == _request_key(session, config, level)
    if not wanted and not channels.running(config, level):
        with box:
            st.caption(f"**{CHANNEL_LABELS[level]}** has not run for this setting; the accuracy below is without it.")
            st.button("Run the repair", key="explore_ch_repair_run", type="primary", on_click=_request,
                      args=(session, config, level))
        return "none"
    with box:
        head, stop_slot, bar = st.empty(), st.empty(), st.empty()
    if stop_slot.button("Stop the repair", key="explore_ch_repair_stop"):
        channels.stop_repair()
        state.pop(REQUESTED_KEY, None)
        st.rerun()
    repaired = None
    with guard("Repairing the smaller model"):
        head.caption(f"{CHANNEL_LABELS[level]}: estimating the time…")
        estimate = channels.estimate_repair_s(view.result, level)
        head.caption(f"**Repairing ({CHANNEL_LABELS[level]})**: about {estimate:.0f} s (estimated before starting; "
                     "a busy server takes longer). The accuracy follows on the repaired model.")
        job = channels.start_repair(view.result, level)
        try:
            while not job.wait(PROGRESS_S):
                text = ("waiting for the shared CPU…" if job.total == 0 else
                        f"layer {job.done} of {job.total} ({job.layer}) · {job.elapsed_s:.0f} s of about {estimate:.0f} s")
                bar.progress(job.fraction, text=text)
        finally:
            if not job.finished:  # interrupted by a rerun: the next run watches it again, or lets it go
                channels.leave(job)
        stop_slot.empty()
        state.pop(REQUESTED_KEY, None)
        if isinstance(job.error, RepairCancelled):
            bar.empty()
            head.info(f"The repair was cancelled ({job.error}).")
            return "none"
        if job.error is not None:
            bar.empty()
            raise job.error
        repaired = job.result
        head.caption(f"**Repaired ({CHANNEL_LABELS[level]})** on {repaired.n_images} calibration images from the "
                     "CIFAR-10 training split, without retraining.")
        bar.progress(1.0, text=f"repaired in {repaired.seconds:.1f} s (measured; estimated {estimate:.0f} s)")
        show_repair(repaired, box)
    return level if repaired is not None else "none"


def _accuracy(session: ExploreSession, view: ChannelView, level: str, slot, detail) -> None:
    if not session.has_labels:
        slot.metric("Accuracy", "n/a", help="This model has no labelled images here.")
        return
    target = float(st.session_state.get("accuracy_target", 0.01))
    label = literal(session.data_label())
    estimate = session.channels.estimate(view.result, level, device())
    show_accuracy(slot, detail, estimate, target, level, data_label=label)

    def waiting() -> None:
        show_accuracy(slot, detail, estimate, target, level, waiting=session.queue_state(), data_label=label)

    with guard("Estimating the accuracy"):
        while not estimate_done(estimate, target):
            estimate = session.channels.refine(view.result, level, device(), poll=waiting)
            show_accuracy(slot, detail, estimate, target, level, data_label=label)
