"""The Tune page on the user's own images: the τ and θ sweeps of ``python -m core.tune`` with their charts.

Drawn by ``pages/tune.py`` when the sidebar holds images of the user (labelled: accuracy;
unlabelled: top-1 agreement with the dense model and mean KL divergence), for whatever model
the sidebar loaded. The computation is :func:`core.services.user_tuning.run_user_sweep` (which
calls :func:`core.measure.tuning.run_tuning_sweep`); this module gathers the inputs and renders.
Session-state keys start with ``tune_``; a stored result is shown only for the model, images and
settings it was measured on.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import streamlit as st

from core.measure.tuning import choose, settings
from core.method.config import CompressionConfig
from core.services import tune_jobs
from core.services.session import ExploreSession
from core.services.session_repairs import CALIBRATION_IMAGES
from core.services.user_tuning import KL_IMAGES, class_mapping
from ui import tune_charts
from ui import tune_jobs as jobs_view
from ui.charts import curves_figure, pareto_figure
from ui.errors import literal
from ui.state import PALETTE, apply_config, current_config, guard

#: how many of the user's images a sweep evaluates (None: all of them); only choices below the set's size are offered
SUBSETS: tuple[int | None, ...] = (200, 500, None)
SERIES = {False: "boundary pruning", True: "boundary pruning + BN recal"}


def _subset_choices(n: int) -> dict[str, int | None]:
    choices = {f"{k:,} images (class-balanced, faster)": k for k in SUBSETS if k is not None and k < n}
    choices[f"all {n:,} images"] = None
    return choices


def _measured(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with the chart columns: the paired interval of Δ as bounds on the accuracy (dense + Δ, within
    [0, 1]), and a series label."""
    return frame.assign(ci_low=(frame["accuracy_dense"] + frame["delta_low"]).clip(0.0, 1.0),
                        ci_high=(frame["accuracy_dense"] + frame["delta_high"]).clip(0.0, 1.0),
                        series=frame["bn_recalibrated"].map(SERIES))


def _table(frame: pd.DataFrame, labelled: bool) -> pd.DataFrame:
    metric = "accuracy (%)" if labelled else "agreement (%)"
    table = pd.DataFrame({
        "τ": frame["tau"], "θ": frame["theta"].map(lambda v: "" if pd.isna(v) else f"{v:g}"),
        "bits": [f"{lo}/{hi}" if pd.notna(lo) else "" for lo, hi in zip(frame["b_low"], frame["b_high"])],
        "BN recal": frame["bn_recalibrated"].map({True: "yes", False: ""}),
        "retention (%)": 100 * frame["retention"], metric: 100 * frame["accuracy"],
        "Δ vs dense (points)": 100 * frame["delta"],
        "95 % interval (points)": [f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
                                   for lo, hi in zip(frame["delta_low"], frame["delta_high"])],
        "packed file (KiB)": frame["packed_bytes"] / 1024,
    })
    if not labelled:
        table["mean KL (nats)"] = frame["mean_kl"]
    return table


def _start(session: ExploreSession, slot: str, configs: list[CompressionConfig], n_images: int | None, bn: bool,
           what: str) -> None:
    """Start (or join) the sweep as a background job kept in ``slot`` (errors shown by the caller's guard)."""
    watcher = id(session)
    job = tune_jobs.user_sweep(session.loaded, session.data, configs, n_images, CALIBRATION_IMAGES if bn else None,
                               watcher, what)
    jobs_view.start(slot, job, watcher)


def render(session: ExploreSession) -> None:
    """Every section of the Tune page for the user's images in ``session.data`` (must not be None)."""
    state = st.session_state
    loaded, data = session.loaded, session.data
    labelled = data.labelled
    metric = "accuracy" if labelled else "top-1 agreement with the dense model"
    config_now, _ = current_config(session)
    st.caption(
        f"Model: **{literal(loaded.label)}**. Measured on {literal(session.data_label())}: "
        + ("the labels are the class folders, mapped to the model's outputs (table below)"
           if labelled else "no labels, so fidelity to the dense model replaces accuracy: top-1 agreement "
                            f"(on every evaluated image) and the mean KL divergence (on the first {KL_IMAGES})")
        + ". Every figure is measured (fp32, CPU) by the sweep of `python -m core.tune`; Δ vs dense is paired "
          "(the same images) with its 95 % interval. Nothing is cached on disk: a sweep is kept for this server "
          "process only.")
    if labelled:
        with st.expander("Class folders → model outputs"):
            st.dataframe(class_mapping(data), hide_index=True, key="tune_class_map")
    data_key = (loaded.key, data.key)

    # ------------------------------------------------------------ τ sweep
    st.subheader("Accuracy and retention vs τ" if labelled else "Fidelity to the dense model vs τ")
    a, b, c = st.columns(3)
    tau_max = a.slider("largest τ of the sweep", 0.05, 1.0, 0.5, 0.05, key="tune_tau_max")
    steps = a.slider("number of τ values", 3, 21, 6, key="tune_steps")
    subsets = _subset_choices(len(data))
    subset_label = b.radio("evaluate on", list(subsets), key="tune_user_subset")
    with_bn = c.toggle("also with BN recalibration", False, key="tune_user_bn", disabled=not session.has_batchnorm,
                       help=f"Re-estimate BatchNorm statistics on the first {CALIBRATION_IMAGES} of your images "
                            "(labels are not used) after pruning, as Explore does with its BN toggle.")
    taus = tuple(float(t) for t in np.round(np.linspace(0.0, tau_max, steps), 4) if t > 0)
    if st.button("Run τ sweep", type="primary", key="tune_run"):
        with guard("The τ sweep", "Pick fewer τ values or images."):
            _start(session, "tune_user_job", settings(taus, None, 4, 8), subsets[subset_label],
                   bool(with_bn and session.has_batchnorm), "τ sweep")
    with guard("The τ sweep", "Pick fewer τ values or images."):
        jobs_view.track("tune_user_job", "τ sweep", id(session),
                        lambda result, key: state.update(tune_user_frame=(key[1:], result)),
                        lambda part: tune_charts.draw_user_sweep(part, "tune_user_partial"))
    stored = state.get("tune_user_frame")
    frame = stored[1] if stored is not None and stored[0][:2] == data_key else None
    if frame is not None:
        _show_tau_sweep(session, frame, labelled, metric, config_now)
    elif not jobs_view.running("tune_user_job"):  # while it runs, the panel above shows the rows so far
        st.info("Press **Run τ sweep** to measure the curves on your images (in the background: the rest of the "
                "page stays usable, and it can be cancelled).")

    # ------------------------------------------------------------ θ sweep
    st.subheader(f"{metric.capitalize()} vs θ at the current τ")
    d, e, f = st.columns(3)
    theta_max = d.slider("largest θ (relative to max|W|)", 0.1, 1.0, 0.8, 0.05, key="tune_theta_max")
    theta_steps = d.slider("number of θ values", 3, 12, 4, key="tune_theta_steps")
    pairs = e.multiselect("bit-widths (b_low/b_high)", [f"{lo}/{hi}" for lo in PALETTE for hi in PALETTE if lo < hi],
                          default=["4/8"], key="tune_pairs")
    f.caption(f"Current τ = {config_now.tau:g}"
              + (" (the per-layer τ of Explore are not part of this sweep)" if config_now.layer_tau else "")
              + "; evaluated on the images chosen above. θ = 0 puts every kept weight in the high chunk.")
    thetas = tuple(float(t) for t in np.round(np.linspace(0.0, theta_max, theta_steps), 4))
    if st.button("Run θ sweep", key="tune_theta_run", disabled=not pairs):
        with guard("The θ sweep", "Pick fewer θ values or bit-widths."):
            configs = [c for p in pairs for c in settings((config_now.tau,), thetas, *map(int, p.split("/")))]
            _start(session, "tune_user_theta_job", configs, subsets[subset_label], False, "θ sweep")
    with guard("The θ sweep", "Pick fewer θ values or bit-widths."):
        jobs_view.track("tune_user_theta_job", "θ sweep", id(session),
                        lambda result, key: state.update(tune_user_theta=(key[1:3], result)),
                        lambda part: tune_charts.draw_user_sweep(part, "tune_user_theta_partial", x="theta"))
    stored_theta = state.get("tune_user_theta")
    theta_frame = stored_theta[1] if stored_theta is not None and stored_theta[0] == data_key else None
    if theta_frame is None:
        if not jobs_view.running("tune_user_theta_job"):  # while it runs, the panel above shows the rows so far
            st.caption("Press **Run θ sweep** to measure against θ for the chosen bit-widths.")
    else:
        q = _measured(theta_frame[theta_frame["theta"].notna()])
        q = q.assign(series="τ=" + q["tau"].map("{:g}".format) + ", " + q["b_low"].astype(str) + "/"
                     + q["b_high"].astype(str) + " bit")
        fig = curves_figure(q, "theta", "accuracy", "series", x_title="θ (relative)",
                            y_title=f"{'accuracy' if labelled else 'agreement'} (%)", error=("ci_low", "ci_high"))
        fig.add_hline(y=100 * float(theta_frame["accuracy_dense"].iloc[0]), line_dash="dot", line_color="gray",
                      annotation_text="dense")
        st.plotly_chart(fig, key="tune_theta_chart")
        st.caption(literal(f"What you see: measured {metric} as θ moves weights to the low-bit chunk, on "
                           f"{theta_frame['description'].iloc[0]}. Error bars: paired 95 % interval of Δ vs dense."))

    # ------------------------------------------------------------ Pareto
    st.subheader(f"Size vs {'accuracy' if labelled else 'agreement'} (Pareto)")
    parts = [x for x in (frame, theta_frame) if x is not None]
    if parts:
        rows = pd.concat(parts, ignore_index=True)
        dense_bytes = float(rows.loc[(rows["tau"] == 0) & rows["theta"].isna(), "packed_bytes"].iloc[0])
        points = rows.assign(size_fraction=rows["packed_bytes"] / dense_bytes,
                             series=np.where(rows["theta"].notna(), "pruned + quantized", "pruned (fp32)"),
                             setting="τ=" + rows["tau"].map("{:g}".format) + np.where(
                                 rows["theta"].notna(), ", θ=" + rows["theta"].map("{:g}".format), ""))
        points.loc[(points["tau"] == 0) & points["theta"].isna(), "series"] = "dense"
        points["series"] += np.where(points["bn_recalibrated"], " + BN recal", "")
        fig = pareto_figure(points.drop_duplicates(["series", "setting"]))
        fig.update_layout(xaxis_title="packed file (% of the dense model's packed file)",
                          yaxis_title=f"{'accuracy' if labelled else 'agreement'} (%)")
        st.plotly_chart(fig, key="tune_pareto")
        st.caption("What you see: every measured setting by the size of its packed file (written and counted, as "
                   "a share of the dense model's) and its measured figure; the dotted line joins the settings no "
                   "other beats on both.")
    else:
        st.caption("Run a sweep above to fill this chart.")

    # ------------------------------------------------------------ what does not apply here
    st.subheader("Per-layer sensitivity and automatic per-layer τ")
    if labelled:
        st.info("Not available on your images: the per-layer sensitivity is measured on a **training** split and "
                "the per-layer τ chosen from it is verified on test images it was not chosen on. Your images are "
                "one set, with no separate training split. Choose the CIFAR-10 test set as evaluation data in the "
                "sidebar (for a CIFAR-10 model) to use these sections; the τ and θ sweeps above work on your images.")
    else:
        st.info("Not available without labels: the per-layer sensitivity and the per-layer τ are accuracy drops, "
                "and your images have no class folders. Give a .zip of class folders (class_name/image.jpg) in "
                "the sidebar to measure accuracy; the sweeps above measure fidelity to the dense model meanwhile.")


def _show_tau_sweep(session: ExploreSession, frame: pd.DataFrame, labelled: bool, metric: str,
                    config_now: CompressionConfig) -> None:
    """Charts, table, CSV download and the largest τ within X points, for a finished τ sweep."""
    data = _measured(frame)
    curves = data[data["tau"] > 0]
    dense = float(frame["accuracy_dense"].iloc[0])
    description = frame["description"].iloc[0]
    y_title = f"{'accuracy' if labelled else 'agreement'} (%)"
    left, right = st.columns(2)
    with left:
        fig = curves_figure(curves, "tau", "accuracy", "series", x_title="τ", y_title=y_title,
                            error=("ci_low", "ci_high"))
        fig.add_hline(y=100 * dense, line_dash="dot", line_color="gray", annotation_text="dense",
                      annotation_position="bottom right")
        fig.add_vline(x=config_now.tau, line_color="black", line_dash="dash", annotation_text="current τ")
        st.plotly_chart(fig, key="tune_acc")
        st.caption(literal(f"What you see: measured {metric} vs τ on {description}. Error bars: paired 95 % "
                           "interval of Δ vs dense. Dotted: dense model. Dashed: your current τ."))
    with right:
        boundary = curves[~curves["bn_recalibrated"]]
        fig = curves_figure(boundary.assign(series="boundary pruning"), "tau", "retention", "series",
                            x_title="τ", y_title="retention (%)")
        if not config_now.layer_tau:
            current = session.apply(config_now)
            fig.add_scatter(x=[config_now.tau], y=[100 * current.retention], mode="markers", name="current setting",
                            marker=dict(symbol="star", size=16, color="black"))
        st.plotly_chart(fig, key="tune_ret")
        st.caption("What you see: the share of Conv/Linear weights kept at each τ (counted); the star is the "
                   "Explore page's current setting.")
    if not labelled:
        fig = curves_figure(curves, "tau", "mean_kl", "series", x_title="τ", y_title="mean KL(p_dense ‖ p) (nats)",
                            percent_y=False)
        st.plotly_chart(fig, key="tune_kl")
        st.caption(f"What you see: the mean KL divergence of the pruned model's outputs from the dense model's on "
                   f"the first {min(KL_IMAGES, int(frame['n'].iloc[0])):,} evaluated images (0: identical outputs).")
    st.dataframe(_table(frame, labelled), hide_index=True, key="tune_user_table",
                 column_config={c: st.column_config.NumberColumn(format="%.2f") for c in
                                ("retention (%)", "accuracy (%)", "agreement (%)", "Δ vs dense (points)",
                                 "packed file (KiB)")})
    st.download_button("Download the sweep (CSV, the columns of python -m core.tune's sweep.csv)",
                       frame.drop(columns=["description"]).to_csv(index=False).encode(), "sweep.csv", "text/csv",
                       key="tune_user_csv")

    st.subheader(f"Largest τ within X points of the dense {'accuracy' if labelled else 'agreement (100 %)'}")
    x1, x2 = st.columns([1, 2])
    points = x1.number_input("X (points)", 0.0, 100.0, 1.0, 0.5, key="tune_points")
    has_bn = bool(frame["bn_recalibrated"].any())
    use_bn = x1.toggle("with BN recalibration", has_bn, key="tune_points_bn", disabled=not has_bn)
    with guard("Finding the largest τ"):
        choice = choose(frame, points, bool(use_bn and has_bn))
        if choice is None:
            x2.warning(f"No swept τ > 0 stays within {points:g} points of dense; allow more points or sweep "
                       "smaller τ values.")
            return
        row = choice.row
        x2.success(f"**τ = {choice.config.tau:g}**: {metric} {100 * row['accuracy']:.2f} % vs dense "
                   f"{100 * row['accuracy_dense']:.2f} % (Δ {100 * row['delta']:+.2f} points, 95 % interval "
                   f"[{100 * row['delta_low']:+.2f}, {100 * row['delta_high']:+.2f}]), retention "
                   f"{100 * row['retention']:.1f} %, packed file {row['packed_bytes'] / 1024:,.1f} KiB"
                   + (" — with BN recalibration" if choice.bn_recalibrated else "")
                   + f". Measured on {int(row['n']):,} images.")
        chosen = replace(config_now, tau=choice.config.tau, layer_tau=())
        if x2.button(f"Apply τ = {choice.config.tau:g} in Explore", key="tune_apply", on_click=apply_config,
                     args=(chosen, session), kwargs={"bn_recalibrate": bool(choice.bn_recalibrated)}):
            st.switch_page("pages/explore.py")
