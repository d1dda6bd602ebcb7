"""The Tune page's granularity section: accuracy against counted MACs or measured latency, weight vs channel
granularity, with and without repair, on one chart with the Pareto front.

The measurement is :func:`core.services.tradeoff_jobs.tradeoff` (a queued, cancellable job; rows cached on
disk); this module only gathers the grid, tracks the job (:func:`ui.tune_jobs.track`) and draws the result.
Session-state keys start with ``tune_tradeoff``.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.measure.granularity_tradeoff import REPAIRS, TradeoffConfig, pareto_points
from core.services import tradeoff_jobs
from core.services.channel_session import CHANNEL_LABELS
from ui import tune_jobs as jobs_view
from ui.charts import LEGEND_BELOW, add_reference
from ui.state import guard

SLOT = "tune_tradeoff_job"
WEIGHT_TAUS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
CHANNEL_TAUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: x axes: column, axis title, what kind of figure it is
AXES: dict[str, tuple[str, str]] = {
    "counted MACs": ("mac_ratio", "counted MACs (× dense; dense kernels multiply pruned zeros too)"),
    "measured latency": ("latency_ratio", "measured torch-eager latency (× dense, same run)"),
    "non-zero MACs": ("nonzero_mac_ratio", "counted MACs with a non-zero weight (× dense; no CPU kernel skips zeros)"),
}
SYMBOLS = {"dense": "star", "weight": "circle", "channel": "square"}
COLOURS = {"none": "#4e79a7", "bn": "#f28e2b", "reconstruct": "#59a14f"}
REPAIR_NAMES = {"none": "no repair", "bn": "BN recalibration", "reconstruct": "least squares + BN"}


def tradeoff_figure(frame: pd.DataFrame, x: str, x_title: str) -> go.Figure:
    """Accuracy (%) against ``x``: marker symbol = granularity, colour = repair; the Pareto front dotted."""
    fig = go.Figure()
    for (granularity, repair), part in frame.groupby(["granularity", "repair"], sort=False):
        text = [f"{granularity} τ{'_ch' if granularity == 'channel' else ''} = {t:g}, {REPAIR_NAMES[repair]}<br>"
                f"MACs {m:.2f} × · latency {lat:.1f} ms vs dense {d:.1f} ms (batch {b})"
                for t, m, lat, d, b in zip(part["tau"], part["mac_ratio"], part["latency_ms"], part["dense_ms"],
                                           part["batch"])]
        name = "dense" if granularity == "dense" else f"{granularity}, {REPAIR_NAMES[repair]}"
        fig.add_scatter(x=part[x], y=100 * part["accuracy"], mode="markers", name=name, text=text,
                        marker=dict(symbol=SYMBOLS[granularity], size=14 if granularity == "dense" else 10,
                                    color="black" if granularity == "dense" else COLOURS[repair]),
                        hovertemplate="%{text}<br>accuracy %{y:.1f} %<extra></extra>")
    front = pareto_points(frame, x)
    fig.add_scatter(x=front[x], y=100 * front["accuracy"], mode="lines", name="Pareto front",
                    line=dict(color="black", dash="dot"), hoverinfo="skip")
    dense = frame[frame["granularity"] == "dense"]
    if not dense.empty:
        add_reference(fig, "dense accuracy", y=100 * float(dense["accuracy"].iloc[0]))
    fig.update_layout(height=440, margin=dict(l=10, r=10, t=30, b=10), xaxis_title=x_title,
                      yaxis_title="accuracy (%)", legend=LEGEND_BELOW)
    return fig


def _draw(frame: pd.DataFrame, key: str) -> None:
    axis = st.radio("x axis", list(AXES), horizontal=True, key=f"{key}_axis")
    column, title = AXES[axis]
    st.plotly_chart(tradeoff_figure(frame, column, title), key=key)
    n = int(frame["n"].iloc[0])
    batch = int(frame["batch"].iloc[0])
    st.caption(
        f"What you see: every point is one setting, measured on the same {n:,} class-balanced CIFAR-10 test images. "
        "Circles prune single weights (τ), squares whole channels (τ_ch); the colour is the repair; the star is the "
        "dense model and the dotted line the Pareto front (no other point is both cheaper and more accurate). "
        "Counted MACs are what the dense kernels run: pruned weights stay in the kernels as zeros, so the circles "
        "sit at 1.0 × dense; channel pruning makes every kernel smaller. Latency is measured in torch eager, "
        f"batch {batch}, each model timed alternately with the dense model in one run (the ratio is within that "
        "run); a repair keeps a model's shapes, so a setting's repaired points share its timing. The star's latency "
        "is the dense model timed against a copy of itself: how far it is from 1.0 × is the noise of this server now.")
    with st.expander("The measured rows"):
        table = frame[["granularity", "tau", "repair", "accuracy", "mac_ratio", "nonzero_mac_ratio", "latency_ms",
                       "dense_ms", "latency_ratio", "cached"]]
        st.dataframe(table.rename(columns={"tau": "τ / τ_ch", "mac_ratio": "counted MACs (× dense)",
                                           "nonzero_mac_ratio": "non-zero MACs (× dense)",
                                           "latency_ratio": "latency (× dense)"}), hide_index=True)


def show_granularity_tradeoff(session) -> None:
    """The section: a heading, the grid's controls, Run, the job's progress, then the chart and its caption.

    ``session``: the page's :class:`core.services.session.ExploreSession` (its ``loaded`` model is only read).
    """
    loaded = session.loaded
    state = st.session_state
    st.subheader("Speed from the rule: weight vs channel granularity")
    reason = tradeoff_jobs.supported(loaded)
    if reason is not None:
        st.info(f"This section does not apply: {reason}.")
        return
    a, b, c = st.columns(3)
    weight_taus = a.multiselect("weight τ", WEIGHT_TAUS, default=[0.1, 0.2, 0.3], key="tune_tradeoff_weight_taus")
    channel_taus = a.multiselect("channel τ_ch", CHANNEL_TAUS, default=[0.5, 0.6, 0.7], key="tune_tradeoff_channel_taus")
    repairs = b.multiselect("repairs", list(REPAIRS), default=["none", "bn"], key="tune_tradeoff_repairs",
                            format_func=lambda r: CHANNEL_LABELS.get(r, r),
                            help="Every point is also measured after this repair (fitted on CIFAR-10 training images, "
                                 "never the test set). Least squares takes tens of seconds per point on ResNet-18.")
    per_class = b.select_slider("test images per class", [20, 50, 100], value=50, key="tune_tradeoff_per_class")
    batch = c.select_slider("latency batch", [1, 8, 32, 64, 128], value=64, key="tune_tradeoff_batch")
    watcher = id(session)
    run = c.button("Run the granularity comparison", key="tune_tradeoff_run",
                   disabled=not (weight_taus or channel_taus) or not repairs)
    if run:
        config = TradeoffConfig(weight_taus=tuple(weight_taus), channel_taus=tuple(channel_taus),
                                repairs=tuple(repairs), per_class=per_class, batch=batch)
        jobs_view.start(SLOT, tradeoff_jobs.tradeoff(loaded, config, watcher), watcher)
    with guard("The granularity comparison", "Pick fewer settings, or another model."):
        jobs_view.track(SLOT, "Granularity comparison", watcher,
                        lambda result, key: state.update(tune_tradeoff_frame=result, tune_tradeoff_key=key[1]),
                        lambda part: _draw(part, "tune_tradeoff_partial"))
    frame = state.get("tune_tradeoff_frame")
    if frame is None or state.get("tune_tradeoff_key") != loaded.key:
        if not jobs_view.running(SLOT):
            st.info("Press **Run the granularity comparison** to measure accuracy, counted MACs and torch-eager "
                    "latency for both granularities (rows already measured are read from the disk cache).")
        return
    _draw(frame, "tune_tradeoff_chart")
