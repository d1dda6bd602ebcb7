"""Tune: accuracy and retention against τ (and θ), with BN recalibration and a magnitude baseline; per-layer
sensitivity and the automatic per-layer τ.

On CIFAR-10 (a CIFAR-10 model without images of the user) every section below runs. With the user's
own images in the sidebar (any image model: a registry checkpoint, a torchvision model with pretrained
or uploaded weights), the τ and θ sweeps run on those images instead (:mod:`ui.tune_user_data`:
accuracy with labels, fidelity to the dense model without), and the sections that need a training
split say why they do not apply."""

import numpy as np
import streamlit as st

from core.measure.sensitivity import DEFAULT_TAUS as DEFAULT_SENS_TAUS
from core.measure.sensitivity import SensitivityConfig, resolve_precision
from core.measure.sweep_results import pareto_points, series_labels
from core.measure.sweeps import QuantSetting, SweepConfig
from core.services import tune_jobs
from core.measure.sweep_config import REPAIR_LEVELS
from core.services.repairs import LABELS as REPAIR_LABELS
from core.services.repairs import REPAIR_IMAGES, REPAIR_SEED
from core.services.session_repairs import CALIBRATION_IMAGES
from ui import tune_charts, tune_user_data
from ui.tune_answers import show_answers
from ui.tune_per_layer import show_per_layer
from ui.tune_tradeoff import show_granularity_tradeoff
from ui import tune_jobs as jobs_view
from ui.charts import curves_figure, pareto_figure, sensitivity_heatmap
from ui.errors import literal
from ui.sidebar import page_setup
from ui.state import PALETTE, current_config, device, footer, guard

session = page_setup()
loaded = session.loaded
state = st.session_state

st.title("Tune: accuracy curves for choosing τ and θ")
if not loaded.trained:
    st.warning(literal(loaded.note))
if session.data is not None:  # the user's images, for whatever model the sidebar loaded
    with guard("The Tune page on your images", "Upload another archive, or pick the default data in the sidebar."):
        tune_user_data.render(session)
    footer(page="tune")
    st.stop()
if not session.evaluates_cifar:
    if loaded.input_kind == "vector":
        st.info("Tuning needs images with labels: this model takes vectors and has no data set. Pick an image "
                "model in the sidebar.")
    else:
        st.info("Tuning needs images for this model: it has no labelled data set here (it is not a 10-class "
                "CIFAR-10 model at 32 px). In the sidebar, choose **Evaluation data → my images** and upload a "
                ".zip of class folders (class_name/image.jpg) to measure accuracy, or of images alone to measure "
                "fidelity to the dense model (top-1 agreement and mean KL divergence).")
    footer(page="tune")
    st.stop()
st.caption(f"Model: **{literal(loaded.label)}**. Every point is a measured CIFAR-10 accuracy (JPEG copy of the test "
           "set) with its Wilson 95 % interval; results are cached on disk, so a repeated sweep is instant.")

config_now, _ = current_config(session)
watcher = id(session)  # this session, as the watcher of the jobs it starts (they are shared by key)
SUBSETS = {"50 per class (500 images, fast)": 50, "100 per class (1,000 images)": 100,
           "full test set (10,000 images, slow)": None}


# ---------------------------------------------------------------- τ sweep
st.subheader("Accuracy and retention vs τ")
a, b, c = st.columns(3)
tau_max = a.slider("largest τ of the sweep", 0.05, 1.0, 0.5, 0.05, key="tune_tau_max")
steps = a.slider("number of τ values", 3, 21, 11, key="tune_steps")
subset_label = b.radio("evaluate on", list(SUBSETS), key="tune_subset")
with_bn = c.toggle("also with BN recalibration", True, key="tune_bn", disabled=not session.has_batchnorm,
                   help=f"Re-estimate BatchNorm statistics on {CALIBRATION_IMAGES} training images after pruning.")
repair_levels = c.multiselect("also after the repair", list(REPAIR_LEVELS), key="tune_repairs",
                              format_func=lambda level: REPAIR_LABELS[level].lstrip("+ "),
                              disabled="bias" in session.repairs.unavailable(),
                              help=f"Each boundary-pruning point also repaired as on the Explore page ({REPAIR_IMAGES} "
                                   "training images, never the test set) and measured again, so the answers below "
                                   "hold for the repair you will apply. Reconstruction takes tens of seconds per τ "
                                   "on ResNet-18; every point is cached on disk, so a repeat is instant.")
with_quant = c.toggle(f"with the current {config_now.b_low}/{config_now.b_high}-bit weights", config_now.quantized,
                      key="tune_quant", disabled=not config_now.quantized,
                      help="Boundary pruning (and its repaired points) also measured with Explore's θ and "
                           "bit-widths; the answers below are then for that quantized setting.")
with_layer = c.toggle("also per-layer L1 magnitude pruning", False, key="tune_layer_l1")
taus = tuple(float(t) for t in np.round(np.linspace(0.0, tau_max, steps), 4))
sweep_quant = (QuantSetting(config_now.theta, config_now.b_low, config_now.b_high, config_now.theta_mode),) \
    if with_quant and config_now.quantized else ()
sweep_config = SweepConfig(taus=taus, bn_recalibration=with_bn and session.has_batchnorm,
                           baselines=("global_magnitude",) + (("layer_l1",) if with_layer else ()),
                           per_class=SUBSETS[subset_label], calibration_size=CALIBRATION_IMAGES,
                           include_norm=config_now.include_norm, quant=sweep_quant,
                           repair_levels=tuple(repair_levels), repair_images=REPAIR_IMAGES, repair_seed=REPAIR_SEED)
if st.button("Run τ sweep", type="primary", key="tune_run"):
    jobs_view.start("tune_sweep_job", tune_jobs.sweep(loaded, sweep_config, device(), watcher), watcher)
with guard("The τ sweep", "Check the CIFAR-10 data (see the README) or pick fewer τ values."):
    jobs_view.track("tune_sweep_job", "τ sweep", watcher,
                    lambda result, key: state.update(tune_frame=result, tune_key=key[1:]),
                    lambda part: tune_charts.draw_sweep(part, "tune_acc_partial"))

frame = state.get("tune_frame")
if frame is not None and state.get("tune_key", (None,))[0] != loaded.key:
    frame = None  # a sweep of another model
if frame is None:
    if not jobs_view.running("tune_sweep_job"):
        st.info("Press **Run τ sweep** to measure the curves (rows already computed once are read from the disk "
                "cache). It runs in the background: the rest of the page stays usable, and it can be cancelled.")
else:
    data = frame.assign(series=series_labels(frame))
    curves = data[data["method"] != "dense"]
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
    with guard("Finding the largest τ"):
        quant = QuantSetting(frame["theta"].dropna().iloc[0], int(frame["b_low"].dropna().iloc[0]),
                             int(frame["b_high"].dropna().iloc[0]), frame["theta_mode"].dropna().iloc[0]) \
            if frame["theta"].notna().any() else None
        show_answers(frame, session, config_now, quant, session.apply(config_now).model_bytes_fp32)


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
    with guard("The θ sweep"):
        quant = tuple(QuantSetting(t, int(p.split("/")[0]), int(p.split("/")[1])) for p in pairs for t in thetas)
        theta_config = SweepConfig(taus=(config_now.tau,), quant=quant, bn_recalibration=False, baselines=(),
                                   per_class=SUBSETS[subset_label], calibration_size=CALIBRATION_IMAGES,
                                   include_norm=config_now.include_norm)
        jobs_view.start("tune_theta_job", tune_jobs.sweep(loaded, theta_config, device(), watcher), watcher)
with guard("The θ sweep"):
    jobs_view.track("tune_theta_job", "θ sweep", watcher,
                    lambda result, key: state.update(tune_theta_frame=result, tune_theta_key=key[1]),
                    lambda part: tune_charts.draw_sweep(part, "tune_theta_partial", x="theta"))
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
elif not jobs_view.running("tune_theta_job"):
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

# ---------------------------------------------------------------- weight vs channel granularity
show_granularity_tradeoff(session)

# ---------------------------------------------------------------- per-layer sensitivity
st.subheader("Per-layer sensitivity")
st.caption("Each Conv/Linear layer pruned **alone** (every other layer dense) at each τ of the grid; the cell is the "
           "accuracy drop against the dense model on the same images (paired: newly wrong − newly right), in "
           "points. The images are, by default, class-balanced **training** images without augmentation, so the "
           "per-layer τ chosen from them is verified on test images it was not chosen on. Results are cached on "
           "disk per model, images, grid and recipe.")
SENS_TAUS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)
SENS_SOURCES = {"training images (not the test set)": "train", "test images": "test"}
g, h, k = st.columns(3)
sens_taus = g.multiselect("τ grid", SENS_TAUS, default=list(DEFAULT_SENS_TAUS), key="tune_sens_taus")
sens_images = h.select_slider("images", [100, 200, 500, 1000, 2000, 5000], value=1000, key="tune_sens_images")
sens_source = h.radio("measured on", list(SENS_SOURCES), key="tune_sens_source")
sens_bn = k.toggle("recalibrate BN after pruning each layer (about 3× slower)", False, key="tune_sens_bn",
                   disabled=not session.has_batchnorm,
                   help=f"Re-estimate BatchNorm statistics on {SensitivityConfig().calibration_size:,} augmented "
                        "training images after each pruning (and for the dense reference).")
k.caption(f"Inference in {resolve_precision('auto', device())} (an estimate: bf16 where the CPU runs it natively; "
          "the dense reference at the same precision).")
if st.button("Measure sensitivity", key="tune_sens_run", type="primary", disabled=not sens_taus):
    with guard("The sensitivity measurement", "Pick fewer τ values or images."):
        sens_config = SensitivityConfig(taus=tuple(sens_taus), n_images=int(sens_images),
                                        source=SENS_SOURCES[sens_source], bn_recalibration=bool(sens_bn))
        jobs_view.start("tune_sens_job", tune_jobs.sensitivity(loaded, sens_config, device(), watcher), watcher)


def _store_sensitivity(result, key) -> None:
    state.update(tune_sens=result, tune_sens_key=key[1])
    state.pop("tune_alloc", None)


with guard("The sensitivity measurement", "Pick fewer τ values or images."):
    jobs_view.track("tune_sens_job", "Sensitivity", watcher, _store_sensitivity,
                    lambda part: tune_charts.draw_sensitivity(part, "tune_sens_partial"))
sensitivity = state.get("tune_sens") if state.get("tune_sens_key") == loaded.key else None
if sensitivity is None:
    if not jobs_view.running("tune_sens_job"):  # while it runs, the panel above fills in the map
        st.info("Press **Measure sensitivity** to fill the layer × τ map (a second run of the same settings reads "
                "the disk cache).")
else:
    st.plotly_chart(sensitivity_heatmap(100 * sensitivity.drops(), sensitivity.shares()), key="tune_sens_map")
    st.caption(f"What you see: accuracy drop in points (red = worse) with only that layer pruned at τ; beside each "
               f"layer, its share of the weights. Measured on {sensitivity.images} ({sensitivity.precision}"
               + (", BN recalibrated" if sensitivity.bn_recalibration else "")
               + f"); dense accuracy on them {100 * sensitivity.dense_accuracy:.2f} %. One cell is "
                 f"{100 / sensitivity.n:.2g} points: smaller drops are below resolution. {sensitivity.seconds:.1f} s "
                 f"({sensitivity.computed} layers measured, {sensitivity.cached} from the cache).")

# ---------------------------------------------------------------- automatic per-layer τ
show_per_layer(session, sensitivity, watcher)

footer(page="tune")
