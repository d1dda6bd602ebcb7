"""Tune: accuracy and retention against τ (and θ), with BN recalibration and a magnitude baseline."""
from dataclasses import replace

import numpy as np
import pandas as pd
import streamlit as st

from core.services.session import CALIBRATION_IMAGES
from core.measure.sweeps import QuantSetting, SweepConfig, run_sweep
from core.measure.sweep_results import largest_tau_within, pareto_points, series_labels
from ui.charts import curves_figure, pareto_figure
from ui.sidebar import page_setup
from ui.state import PALETTE, apply_config, current_config, device, footer, guard

session = page_setup()
loaded = session.loaded
state = st.session_state

st.title("Tune: accuracy curves for choosing τ and θ")
st.caption(f"Model: **{loaded.label}**. Every point is a measured CIFAR-10 accuracy (JPEG copy of the test set) "
           "with its Wilson 95 % interval; results are cached on disk, so a repeated sweep is instant.")

if not session.evaluates_cifar:
    st.info("Tuning needs a CIFAR-10 model (this one has no labelled data set). Pick a CIFAR-10 model in the sidebar.")
    footer(page="tune")
    st.stop()
if not loaded.trained:
    st.warning(loaded.note)

config_now, _ = current_config(session)
SUBSETS = {"50 per class (500 images, fast)": 50, "100 per class (1,000 images)": 100,
           "full test set (10,000 images, slow)": None}


def _model_id() -> str | None:
    card = loaded.card or {}
    return f"sha256:{card['sha256']}" if "sha256" in card else None


def _run(sweep_config: SweepConfig, bar) -> pd.DataFrame:
    def progress(done: int, total: int, label: str) -> None:
        bar.progress(done / max(total, 1), text=f"{done}/{total}: {label}")

    return run_sweep(loaded.model, sweep_config, model_id=_model_id(), mean=loaded.mean, std=loaded.std,
                     device=device(), on_progress=progress)


# ---------------------------------------------------------------- τ sweep
st.subheader("Accuracy and retention vs τ")
a, b, c = st.columns(3)
tau_max = a.slider("largest τ of the sweep", 0.05, 1.0, 0.5, 0.05, key="tune_tau_max")
steps = a.slider("number of τ values", 3, 21, 11, key="tune_steps")
subset_label = b.radio("evaluate on", list(SUBSETS), key="tune_subset")
with_bn = c.toggle("also with BN recalibration", True, key="tune_bn", disabled=not session.has_batchnorm,
                   help=f"Re-estimate BatchNorm statistics on {CALIBRATION_IMAGES} training images after pruning.")
with_layer = c.toggle("also per-layer L1 magnitude pruning", False, key="tune_layer_l1")
taus = tuple(float(t) for t in np.round(np.linspace(0.0, tau_max, steps), 4))
sweep_config = SweepConfig(taus=taus, bn_recalibration=with_bn and session.has_batchnorm,
                           baselines=("global_magnitude",) + (("layer_l1",) if with_layer else ()),
                           per_class=SUBSETS[subset_label], calibration_size=CALIBRATION_IMAGES,
                           include_norm=config_now.include_norm)
if st.button("Run τ sweep", type="primary", key="tune_run"):
    bar = st.progress(0.0, text="starting the sweep…")
    with guard("The τ sweep", "Check the CIFAR-10 data (see the README) or pick fewer τ values."):
        state["tune_frame"] = _run(sweep_config, bar)
        state["tune_key"] = (loaded.key, sweep_config, device())
    bar.empty()

frame = state.get("tune_frame")
if frame is not None and state.get("tune_key", (None,))[0] != loaded.key:
    frame = None  # a sweep of another model
if frame is None:
    st.info("Press **Run τ sweep** to measure the curves (rows already computed once are read from the disk cache).")
else:
    data = frame.assign(series=series_labels(frame))
    curves = data[(data["method"] != "dense") & data["theta"].isna()]
    dense_rows = data[data["method"] == "dense"]
    left, right = st.columns(2)
    with left:
        fig = curves_figure(curves, "tau", "accuracy", "series", x_title="τ", y_title="accuracy (%)",
                            error=("ci_low", "ci_high"))
        for _, row in dense_rows.iterrows():
            fig.add_hline(y=100 * row["accuracy"], line_dash="dot", line_color="gray",
                          annotation_text=row["series"], annotation_position="bottom right")
        fig.add_vline(x=config_now.tau, line_color="black", line_dash="dash", annotation_text="current τ")
        st.plotly_chart(fig, key="tune_acc")
        st.caption("What you see: measured accuracy vs τ. The baselines prune exactly as many weights as boundary "
                   "pruning at that τ (same retention), chosen by global magnitude instead of the per-layer "
                   "boundary. Error bars: Wilson 95 % interval. Dotted: dense model. Dashed: your current τ.")
    with right:
        boundary = curves[curves["method"] == "boundary"].drop_duplicates("tau")
        fig = curves_figure(boundary.assign(series="boundary pruning"), "tau", "retention", "series",
                            x_title="τ", y_title="retention (%)")
        current = session.apply(config_now) if not config_now.layer_tau else None
        if current is not None:
            fig.add_scatter(x=[config_now.tau], y=[100 * current.retention], mode="markers", name="current setting",
                            marker=dict(symbol="star", size=16, color="black"))
        st.plotly_chart(fig, key="tune_ret")
        st.caption("What you see: the share of Conv/Linear weights kept at each τ (counted); the star is the "
                   "Explore page's current setting.")

    st.subheader("Largest τ within X points of the dense accuracy")
    x1, x2 = st.columns([1, 2])
    points = x1.number_input("X (accuracy points)", 0.0, 100.0, 1.0, 0.5, key="tune_points")
    use_bn = x1.toggle("with BN recalibration", bool(frame["bn_recalibrated"].any()), key="tune_points_bn",
                       disabled=not bool(frame["bn_recalibrated"].any()))
    with guard("Finding the largest τ"):
        choice = largest_tau_within(frame, points, bn_recalibrated=use_bn, contiguous=True)
        if choice is None:
            x2.warning(f"No swept τ > 0 stays within {points:g} points of dense; allow more points or sweep "
                       "smaller τ values.")
        else:
            x2.success(f"**τ = {choice.tau:g}**: accuracy {100 * choice.accuracy:.2f} % vs dense "
                       f"{100 * choice.dense_accuracy:.2f} % ({choice.drop_points:+.2f} points drop), retention "
                       f"{100 * choice.retention:.1f} %" + (" — with BN recalibration" if use_bn else "")
                       + f". Measured on {int(frame['n'].iloc[0]):,} test images; among the swept τ values "
                         "(every smaller τ also passes).")

            chosen = replace(config_now, tau=choice.tau, layer_tau=())
            if x2.button(f"Apply τ = {choice.tau:g} in Explore", key="tune_apply", on_click=apply_config,
                         args=(chosen, session), kwargs={"bn_recalibrate": use_bn}):
                st.switch_page("pages/explore.py")

# ---------------------------------------------------------------- θ sweep
st.subheader("Accuracy vs θ at the current τ")
d, e, f = st.columns(3)
theta_max = d.slider("largest θ (relative to max|W|)", 0.1, 1.0, 0.8, 0.05, key="tune_theta_max")
theta_steps = d.slider("number of θ values", 3, 12, 6, key="tune_theta_steps")
pairs = e.multiselect("bit-widths (b_low/b_high)", [f"{lo}/{hi}" for lo in PALETTE for hi in PALETTE if lo < hi],
                      default=["2/8", "4/8"], key="tune_pairs")
f.caption(f"Current τ = {config_now.tau:g}. θ = 0 puts every kept weight in the high chunk; θ = 1 puts all but "
          "the largest weight per layer in the low chunk.")
thetas = tuple(float(t) for t in np.round(np.linspace(0.0, theta_max, theta_steps), 4))
if st.button("Run θ sweep", key="tune_theta_run", disabled=not pairs):
    bar = st.progress(0.0, text="starting the θ sweep…")
    with guard("The θ sweep"):
        quant = tuple(QuantSetting(t, int(p.split("/")[0]), int(p.split("/")[1])) for p in pairs for t in thetas)
        theta_config = SweepConfig(taus=(config_now.tau,), quant=quant, bn_recalibration=False, baselines=(),
                                   per_class=SUBSETS[subset_label], calibration_size=CALIBRATION_IMAGES,
                                   include_norm=config_now.include_norm)
        state["tune_theta_frame"] = _run(theta_config, bar)
        state["tune_theta_key"] = loaded.key
    bar.empty()
theta_frame = state.get("tune_theta_frame")
if theta_frame is not None and state.get("tune_theta_key") == loaded.key:
    q = theta_frame[theta_frame["theta"].notna()].copy()
    q["series"] = "τ=" + q["tau"].map("{:g}".format) + ", " + q["b_low"].astype(str) + "/" + q["b_high"].astype(str) + " bit"
    fig = curves_figure(q, "theta", "accuracy", "series", x_title="θ (relative)", y_title="accuracy (%)",
                        error=("ci_low", "ci_high"))
    pruned_only = theta_frame[(theta_frame["method"] == "boundary") & theta_frame["theta"].isna()]
    if not pruned_only.empty:
        fig.add_hline(y=100 * pruned_only["accuracy"].iloc[0], line_dash="dot", line_color="gray",
                      annotation_text="pruned, not quantized")
    if config_now.theta is not None and config_now.theta_mode == "relative":
        fig.add_vline(x=config_now.theta, line_color="black", line_dash="dash", annotation_text="current θ")
    st.plotly_chart(fig, key="tune_theta_chart")
    st.caption("What you see: measured accuracy as θ moves weights from the high-bit to the low-bit chunk, at the "
               "τ the sweep ran with.")
else:
    st.caption("Press **Run θ sweep** to measure accuracy against θ for the chosen bit-widths.")

# ---------------------------------------------------------------- Pareto
st.subheader("Size vs accuracy (Pareto)")
parts = [x for x in (state.get("tune_frame"), state.get("tune_theta_frame")) if x is not None]
if parts and state.get("tune_key", (None,))[0] == loaded.key:
    st.plotly_chart(pareto_figure(pareto_points(parts)), key="tune_pareto")
    st.caption("What you see: every measured setting by its stored size (computed from the storage format, as a "
               "share of fp32) and its measured accuracy; the dotted line joins the settings no other setting "
               "beats on both.")
else:
    st.caption("Run a sweep above to fill this chart.")

footer(page="tune")
