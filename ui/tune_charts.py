"""The Tune page's charts of results still coming in: sweep points and heatmap cells as they are measured.

Each ``draw_*`` function draws one partial result of a running (or cancelled) job of
:mod:`core.services.tune_jobs` under a key of its own; :func:`ui.tune_jobs.track` calls it on
every poll. The finished results keep the page's own charts.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from core.measure.sweep_results import series_labels
from ui.charts import curves_figure, sensitivity_heatmap


def draw_sweep(frame: pd.DataFrame, key: str, x: str = "tau") -> None:
    """Accuracy against ``x`` (τ, or θ for the θ sweep) for the rows of a CIFAR-10 sweep measured so far."""
    data = frame.assign(series=series_labels(frame))
    if x == "theta":
        data = data[data["theta"].notna()]
        data = data.assign(series="τ=" + data["tau"].map("{:g}".format) + ", " + data["b_low"].astype(str) + "/"
                           + data["b_high"].astype(str) + " bit")
    else:
        data = data[data["method"] != "dense"]
    if data.empty:
        st.caption(f"{len(frame)} row(s) measured so far (the dense reference first); the curves follow.")
        return
    fig = curves_figure(data, x, "accuracy", "series", x_title="θ (relative)" if x == "theta" else "τ",
                        y_title="accuracy (%)", error=("ci_low", "ci_high"))
    st.plotly_chart(fig, key=key)
    st.caption(f"Measured so far: {len(frame)} row(s). The chart fills in as each row is measured.")


def draw_user_sweep(frame: pd.DataFrame, key: str, x: str = "tau") -> None:
    """Accuracy (or agreement) against ``x`` for the rows of a sweep on the user's images measured so far."""
    rows = frame[frame["tau"] > 0] if x == "tau" else frame[frame["theta"].notna()]
    if rows.empty:
        st.caption("The dense reference is measured; the settings follow.")
        return
    rows = rows.assign(series=rows["bn_recalibrated"].map({False: "boundary pruning",
                                                           True: "boundary pruning + BN recal"}))
    fig = curves_figure(rows, x, "accuracy", "series", x_title="θ (relative)" if x == "theta" else "τ",
                        y_title="measured (%)")
    st.plotly_chart(fig, key=key)
    st.caption(f"Measured so far: {len(frame)} row(s), the dense reference included.")


def partial_drops(frame: pd.DataFrame) -> pd.DataFrame:
    """Layers × τ of the accuracy drop in points for the cells measured so far (NaN where not yet measured)."""
    layers = list(dict.fromkeys(frame["layer"]))
    taus = sorted(set(frame["tau"]))
    table = frame.pivot(index="layer", columns="tau", values="drop")
    return 100 * table.reindex(index=layers, columns=taus)


def draw_sensitivity(frame: pd.DataFrame, key: str) -> None:
    """The sensitivity heatmap of the cells measured so far (a row per layer reached)."""
    if frame.empty:
        return
    shares = frame.drop_duplicates("layer").set_index("layer")["share"]
    st.plotly_chart(sensitivity_heatmap(partial_drops(frame), shares), key=key)
    st.caption(f"Measured so far: {len(frame)} cell(s); each layer's row fills in as its τ values are measured.")
