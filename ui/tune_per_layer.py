"""The Tune page's automatic per-layer τ: chosen from the sensitivity map, judged after the repair the user picks.

* **BN recalibration** (the default): :func:`core.services.tune_jobs.per_layer`, the allocation from
  the summed single-layer drops (optionally checked jointly against magnitude's and blends), then
  verified on test images against uniform τ and global magnitude at the same retention, each with
  and without BN recalibration.
* **+ bias correction** or **+ reconstruction**: :func:`core.services.tune_jobs.per_layer_repaired`,
  every candidate and a few greedy moves between layers judged *after that repair* on training
  images, then verified on test images with every row repaired the same way. Retention targets
  only (the greedy search moves weights at a constant count).

One Apply button writes the chosen per-layer τ (and the repair level) into Explore.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.measure.allocation import Target
from core.measure.allocation_verify import METHOD_LABELS as ALLOC_LABELS
from core.measure.sensitivity import Sensitivity
from core.method.config import CompressionConfig
from core.services import tune_jobs
from core.services.repairs import JOB_LEVELS, LABELS
from core.services.session import ExploreSession
from core.services.session_repairs import CALIBRATION_IMAGES
from ui import tune_jobs as jobs_view
from ui.charts import add_reference
from ui.repair_view import request_repair
from ui.state import apply_config, device, guard

TARGETS = {"retention (% of Conv/Linear weights kept)": "retention", "stored size (KiB)": "bytes",
           "largest estimated drop (points)": "max_drop"}
VERIFY = {"full test set (10,000 images)": None, "1,000 test images (faster)": 1000}
VERIFY_CALIBRATION = 2000
#: what the allocation is judged after: "bn" keeps the original path (with and without BN recalibration)
JUDGED_AFTER = ("bn",) + JOB_LEVELS


def tau_bars(layer_tau: dict[str, float], uniform: float | None = None) -> go.Figure:
    """The chosen τ of every layer as bars, with the uniform τ of the same retention as a dashed line."""
    taus = pd.Series(layer_tau)
    figure = go.Figure(go.Bar(x=taus.index, y=taus.values, name="per-layer τ"))
    if uniform is not None:
        add_reference(figure, "uniform τ, same retention", y=uniform, color="black", dash="dash")
    figure.update_layout(height=380, margin=dict(l=10, r=10, t=30, b=10), yaxis_title="τ", xaxis_tickangle=-60,
                         legend=dict(orientation="h", y=-0.35))
    return figure


def show_per_layer(session: ExploreSession, sensitivity: Sensitivity | None, watcher: int) -> None:
    """The section: target, what the choice is judged after, Run, the running job, the verified result."""
    st.subheader("Automatic per-layer τ")
    if sensitivity is None:
        st.caption("Measure the sensitivity above first: the per-layer τ is chosen from it.")
        return
    m1, m2, m3 = st.columns(3)
    judged = m1.selectbox("chosen and verified after", JUDGED_AFTER, key="tune_alloc_repair",
                          format_func=lambda level: LABELS[level].lstrip("+ "),
                          help="The repair you will apply. BN recalibration: the allocation from the summed "
                               "single-layer drops, verified with and without it. Bias correction or "
                               "reconstruction: every candidate and a few greedy moves of weights between layers "
                               "are judged after that repair on training images (never the test set), then "
                               "verified on test images with every row repaired the same way; minutes on "
                               "ResNet-20, longer on ResNet-18.")
    if judged == "bn":
        st.caption("Per layer, a τ from the measured grid (interpolated) so that the summed estimated drop is "
                   "smallest for the target; then verified on test images in fp32 against uniform τ and global "
                   "magnitude pruning at the **same retention**, each with and without BN recalibration (on 2,000 "
                   "augmented training images).")
        kinds = TARGETS
    else:
        st.caption(f"Candidates (the sensitivity allocation, global magnitude's per-layer counts and blends) and "
                   f"greedy moves of weights between layers, each judged after **{LABELS[judged].lstrip('+ ')}** "
                   f"on labelled training images disjoint from the repair's own; then verified on test images in "
                   "fp32 against uniform τ, global magnitude and the sensitivity allocation at the same retention, "
                   "every one after the same repair.")
        kinds = {label: kind for label, kind in TARGETS.items() if kind == "retention"}
    target_label = m1.radio("target", list(kinds), key="tune_alloc_kind" if judged == "bn" else "tune_alloc_kind_rep")
    kind = kinds[target_label]
    if kind == "retention":
        value = m2.number_input("retention (%)", 1.0, 100.0, 30.0, 1.0, key="tune_alloc_retention") / 100
    elif kind == "bytes":
        dense_kib = session.engine.dense_bytes / 1024
        value = 1024 * m2.number_input("stored size (KiB)", 1.0, float(round(dense_kib, 1)),
                                       float(round(dense_kib / 3, 1)), key="tune_alloc_bytes")
    else:
        value = m2.number_input("largest drop (points)", 0.0, 100.0, 1.0, 0.5, key="tune_alloc_drop") / 100
    verify_label = m3.radio("verify on", list(VERIFY), key="tune_alloc_verify")
    if judged == "bn":
        _bn_path(session, sensitivity, Target(kind, value), VERIFY[verify_label], m1, m3, watcher)
    else:
        _repaired_path(session, sensitivity, Target(kind, value), judged, VERIFY[verify_label], watcher)


def _bn_path(session: ExploreSession, sensitivity: Sensitivity, target: Target, verify_images: int | None,
             m1, m3, watcher: int) -> None:
    state, loaded = st.session_state, session.loaded
    alloc_bn = m3.toggle("also with BN recalibration", True, key="tune_alloc_bn", disabled=not session.has_batchnorm)
    joint = m1.toggle("joint check of candidates", True, key="tune_alloc_joint", disabled=target.kind == "max_drop",
                      help="Run the allocation, global magnitude's per-layer τ and blends of the two whole on the "
                           "sensitivity's images and keep the most accurate (summed single-layer drops predict "
                           "the joint effect poorly). Off: the allocation from the summed drops as it is.")
    if st.button("Find per-layer τ and verify", key="tune_alloc_run", type="primary"):
        with guard("The per-layer τ", "Pick another target, or measure larger τ values."):
            job = tune_jobs.per_layer(loaded, sensitivity, target, joint=bool(joint), verify_images=verify_images,
                                      bn_recalibration=bool(alloc_bn) and session.has_batchnorm,
                                      calibration_size=VERIFY_CALIBRATION, device=device(), watcher=watcher)
            jobs_view.start("tune_alloc_job", job, watcher)
    with guard("The per-layer τ", "Pick another target, or measure larger τ values."):
        jobs_view.track("tune_alloc_job", "Per-layer τ", watcher,
                        lambda result, key: state.update(tune_alloc=(result.allocation, result.comparison),
                                                         tune_alloc_key=key[1]))
    found = state.get("tune_alloc") if state.get("tune_alloc_key") == loaded.key else None
    if found is not None:
        _show_bn_result(session, found, bool(alloc_bn))


def _show_bn_result(session: ExploreSession, found, alloc_bn: bool) -> None:
    allocation, comparison = found
    frame = comparison.frame
    shown = frame.assign(method=frame["method"].map(ALLOC_LABELS),
                         **{"BN recal": frame["bn_recalibrated"].map({True: "yes", False: "no"}),
                            "retention (%)": 100 * frame["retention"], "accuracy (%)": 100 * frame["accuracy"],
                            "drop (points)": 100 * frame["drop"],
                            "stored size (KiB)": frame["bytes"].astype("Float64") / 1024})
    st.dataframe(shown[["method", "BN recal", "retention (%)", "kept", "stored size (KiB)", "accuracy (%)",
                        "drop (points)", "newly_wrong", "newly_right"]],
                 hide_index=True, key="tune_alloc_table",
                 column_config={c: st.column_config.NumberColumn(format="%.2f") for c in
                                ("retention (%)", "accuracy (%)", "drop (points)", "stored size (KiB)")})
    left, right = st.columns(2)
    with left:
        bars = go.Figure()
        for flag, label in ((False, "as pruned"), (True, "with BN recalibration")):
            part = frame[frame["bn_recalibrated"] == flag]
            if not part.empty:
                bars.add_bar(x=part["method"].map(ALLOC_LABELS), y=100 * part["accuracy"], name=label,
                             text=(100 * part["accuracy"]).map("{:.2f}".format), textposition="outside")
        bars.update_layout(barmode="group", height=380, margin=dict(l=10, r=10, t=30, b=10),
                           yaxis_title="accuracy (%)", legend=dict(orientation="h", y=-0.2))
        st.plotly_chart(bars, key="tune_alloc_chart")
        st.caption(f"What you see: measured accuracy on {comparison.images} (fp32) at "
                   f"{100 * allocation.retention:.2f} % retention; uniform τ = {comparison.uniform_tau:.4f}.")
    with right:
        st.plotly_chart(tau_bars(allocation.layer_tau, comparison.uniform_tau), key="tune_alloc_taus")
        st.caption(f"What you see: the chosen τ of every layer. Estimated drop from the sensitivity (summed over "
                   f"layers, without BN recalibration unless it was measured with it): "
                   f"{100 * allocation.predicted_drop:.2f} points.")
    if allocation.candidates is not None:
        candidates = allocation.candidates
        st.dataframe(candidates.assign(**{"retention (%)": 100 * candidates["retention"],
                                          "accuracy (%)": 100 * candidates["accuracy"],
                                          "summed single-layer drops (points)": 100 * candidates["predicted_drop"]})
                     [["candidate", "retention (%)", "accuracy (%)", "loss", "summed single-layer drops (points)",
                       "chosen"]], hide_index=True, key="tune_alloc_candidates",
                     column_config={c: st.column_config.NumberColumn(format="%.2f") for c in
                                    ("retention (%)", "accuracy (%)", "summed single-layer drops (points)")})
        st.caption(f"The joint check: every candidate at the same budget run whole on {candidates.attrs['images']}"
                   + (" after BN recalibration" if candidates.attrs["bn_recalibrated"] else "")
                   + f"; the most accurate there (**{allocation.method}**) is the automatic per-layer τ. "
                     "'magnitude' is global magnitude pruning written as per-layer τ; 'blend a' takes a share a "
                     "of each layer's kept count from the sensitivity allocation, the rest from magnitude.")
    apply_bn = alloc_bn and session.has_batchnorm
    if st.button("Apply this per-layer τ in Explore", key="tune_alloc_apply", on_click=apply_config,
                 args=(comparison.config, session), kwargs={"bn_recalibrate": apply_bn}):
        st.switch_page("pages/explore.py")
    st.caption("Applies the verified setting exactly: every Conv/Linear layer gets its own τ in Explore's per-layer "
               "table (the global τ slider goes to 0 and no longer acts on them), pruning only (no quantization)"
               + (f", BN recalibration on (Explore recalibrates on {CALIBRATION_IMAGES} images, the check above on "
                  f"{VERIFY_CALIBRATION:,}, so its figure can differ)." if apply_bn else "."))


def _apply_repaired(config: CompressionConfig, session: ExploreSession, level: str) -> None:
    """Button callback: the per-layer τ and its repair level into Explore's widgets, and the repair asked for."""
    apply_config(config, session, repair=level)
    request_repair(session, config, level)


def _repaired_path(session: ExploreSession, sensitivity: Sensitivity, target: Target, level: str,
                   verify_images: int | None, watcher: int) -> None:
    state, loaded = st.session_state, session.loaded
    unavailable = session.repairs.unavailable().get(level)
    if unavailable:
        st.info(f"Not available here: {unavailable}")
        return
    if st.button("Find per-layer τ after the repair and verify", key="tune_alloc_rep_run", type="primary"):
        with guard("The per-layer τ after repair", "Pick another retention, or measure larger τ values."):
            job = tune_jobs.per_layer_repaired(loaded, sensitivity, target, level, verify_images=verify_images,
                                               device=device(), watcher=watcher)
            jobs_view.start("tune_alloc_rep_job", job, watcher)
    with guard("The per-layer τ after repair", "Pick another retention, or measure larger τ values."):
        jobs_view.track("tune_alloc_rep_job", "Per-layer τ after repair", watcher,
                        lambda result, key: state.update(tune_alloc_rep=result, tune_alloc_rep_key=key[1]))
    found = state.get("tune_alloc_rep") if state.get("tune_alloc_rep_key") == loaded.key else None
    if found is not None:
        _show_repaired_result(session, found)


def _show_repaired_result(session: ExploreSession, found: tune_jobs.RepairedPerLayerResult) -> None:
    """The verified table, the accuracy bars, the chosen τ per layer, the candidates and greedy steps, Apply."""
    allocation, verification, level = found.allocation, found.verification, found.level
    repair = LABELS[level].lstrip("+ ")
    frame = verification.frame
    st.dataframe(frame.assign(**{"retention (%)": 100 * frame["retention"], "accuracy (%)": 100 * frame["accuracy"],
                                 "drop (points)": 100 * frame["drop"]})
                 [["method", "retention (%)", "kept", "accuracy (%)", "drop (points)", "newly_wrong", "newly_right",
                   "repair_seconds"]], hide_index=True, key="tune_alloc_rep_table",
                 column_config={c: st.column_config.NumberColumn(format="%.2f") for c in
                                ("retention (%)", "accuracy (%)", "drop (points)", "repair_seconds")})
    others = [m for m in ("global magnitude", "uniform τ", "sensitivity allocation") if m in verification.predictions]
    gaps = []
    for other in others:
        delta, low, high = verification.difference("per-layer τ", other)
        gaps.append(f"{100 * delta:+.2f} points vs {other} [{100 * low:+.2f}, {100 * high:+.2f}]")
    st.caption(f"Verified on {verification.images} in fp32, every row after {repair}; paired differences (same "
               "images, 95 % interval): " + "; ".join(gaps) + ".")
    left, right = st.columns(2)
    with left:
        rows = frame[frame["method"] != "dense"]
        bars = go.Figure(go.Bar(x=rows["method"], y=100 * rows["accuracy"], name=f"after {repair}",
                                text=(100 * rows["accuracy"]).map("{:.2f}".format), textposition="outside"))
        add_reference(bars, "dense", y=100 * float(frame.loc[frame["method"] == "dense", "accuracy"].iloc[0]),
                      color="gray", dash="dot")
        bars.update_layout(height=380, margin=dict(l=10, r=10, t=30, b=10), yaxis_title="accuracy (%)",
                           legend=dict(orientation="h", y=-0.2))
        st.plotly_chart(bars, key="tune_alloc_rep_chart")
        st.caption(f"What you see: measured accuracy after {repair}, each allocation at "
                   f"{100 * allocation.retention:.2f} % retention; dotted: the dense model.")
    with right:
        st.plotly_chart(tau_bars(allocation.layer_tau), key="tune_alloc_rep_taus")
        st.caption(f"What you see: the chosen τ of every layer ({allocation.method}).")
    candidates = allocation.candidates
    st.dataframe(candidates.assign(**{"retention (%)": 100 * candidates["retention"],
                                      "accuracy (%)": 100 * candidates["accuracy"]})
                 [["candidate", "retention (%)", "accuracy (%)", "loss", "kl", "seconds", "chosen"]],
                 hide_index=True, key="tune_alloc_rep_candidates",
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in
                                ("retention (%)", "accuracy (%)", "loss", "kl", "seconds")})
    greedy = found.choice.greedy
    moved = "" if greedy is None else (f" The greedy search tried {len(greedy.steps)} moves and kept "
                                       f"{int(greedy.steps['accepted'].sum()) if len(greedy.steps) else 0}.")
    st.caption(f"Each candidate judged after {repair} on {candidates.attrs['images']}; the lowest "
               f"{candidates.attrs['criterion']} wins.{moved}")
    if st.button(f"Apply this per-layer τ with {repair} in Explore", key="tune_alloc_rep_apply",
                 on_click=_apply_repaired, args=(allocation.config(), session, level)):
        st.switch_page("pages/explore.py")
    st.caption("Applies the verified setting: every Conv/Linear layer gets its own τ in Explore's per-layer table, "
               f"pruning only, with {repair}, which starts there at once (Explore's repair uses the same images "
               "and seed as this search).")
