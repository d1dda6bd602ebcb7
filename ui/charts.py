"""Plotly figures for the pages (presentation only: the data comes from ``core``)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.services.histogram import HistogramData

PRUNED = "#9e9e9e"
LOW = "#f28e2b"
HIGH = "#4e79a7"
BETA = "#d62728"
THETA = "#2ca02c"


def _vline(x: float, color: str, dash: str, label: str, top: bool) -> tuple[dict, dict]:
    shape = dict(type="line", xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1,
                 line=dict(color=color, dash=dash, width=2))
    note = dict(x=x, xref="x", y=1.0 if top else 0.0, yref="paper", text=label, showarrow=False,
                yanchor="bottom" if top else "top", font=dict(color=color))
    return shape, note


def histogram_figure(h: HistogramData, log_y: bool, b_low: int, b_high: int) -> go.Figure:
    """Stacked histogram: pruned / kept-low / kept-high counts per bin, ±β and ±θ as vertical lines."""
    width = float(h.edges[1] - h.edges[0])
    x = h.centers.tolist()
    bars = [dict(y=h.pruned.tolist(), name="pruned (|W| < β)", marker_color=PRUNED)]
    if h.quantized:
        bars += [dict(y=h.low.tolist(), name=f"kept, {b_low}-bit chunk (|W| < θ)", marker_color=LOW),
                 dict(y=h.high.tolist(), name=f"kept, {b_high}-bit chunk (|W| ≥ θ)", marker_color=HIGH)]
    else:
        bars += [dict(y=(h.low + h.high).tolist(), name="kept (full precision)", marker_color=HIGH)]
    lines = [_vline(sign * h.beta, BETA, "dash", "+β" if sign > 0 else "−β", True) for sign in (-1, 1)]
    if h.theta is not None:
        lines += [_vline(sign * h.theta, THETA, "dot", "+θ" if sign > 0 else "−θ", False) for sign in (-1, 1)]
    layout = go.Layout(
        barmode="stack", bargap=0, height=360, margin=dict(l=10, r=10, t=30, b=30),
        xaxis_title=f"weight value in layer {h.layer}", yaxis_title="weights per bin" + (" (log)" if log_y else ""),
        yaxis_type="log" if log_y else "linear", legend=dict(orientation="h", y=-0.25),
        shapes=[shape for shape, _ in lines], annotations=[note for _, note in lines],
        meta={"beta": h.beta, "theta": h.theta, "layer": h.layer, "max_abs": h.max_abs})
    return go.Figure([go.Bar(x=x, width=width, **bar) for bar in bars], layout)


def retention_figure(stats: pd.DataFrame, selected: str | None = None) -> go.Figure:
    """Per-layer retention (kept / weights) in module order; the selected layer outlined."""
    names = stats["name"].tolist()
    colors = [HIGH if t != "BatchNorm2d" and not str(t).endswith("Norm") else LOW for t in stats["type"]]
    line = [2 if n == selected else 0 for n in names]
    fig = go.Figure(go.Bar(
        x=names, y=100 * stats["retention"], marker_color=colors, marker_line_width=line, marker_line_color="black",
        customdata=np.stack([stats["kept"], stats["numel"], stats["tau"], stats["beta"]], axis=1),
        hovertemplate="%{x}<br>retention %{y:.1f} %<br>kept %{customdata[0]:,} of %{customdata[1]:,}"
                      "<br>τ %{customdata[2]:.3f}, β %{customdata[3]:.4g}<extra></extra>"))
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=30, b=10), yaxis_title="retention (%)",
                      yaxis_range=[0, 105], xaxis_tickangle=-60)
    return fig


def curves_figure(frame: pd.DataFrame, x: str, y: str, color: str, *, marker: tuple[float, float] | None = None,
                  x_title: str = "", y_title: str = "", percent_y: bool = True, error: tuple[str, str] | None = None,
                  marker_label: str = "current setting") -> go.Figure:
    """Lines of ``y`` against ``x``, one per ``color`` group, with optional CI band columns and a marker."""
    fig = go.Figure()
    scale = 100 if percent_y else 1
    for label, part in frame.groupby(color, sort=False):
        part = part.sort_values(x)
        err = None
        if error is not None:
            err = dict(type="data", symmetric=False, array=scale * (part[error[1]] - part[y]),
                       arrayminus=scale * (part[y] - part[error[0]]), thickness=1)
        fig.add_scatter(x=part[x], y=scale * part[y], mode="lines+markers", name=str(label), error_y=err)
    if marker is not None:
        fig.add_scatter(x=[marker[0]], y=[scale * marker[1]], mode="markers", name=marker_label,
                        marker=dict(symbol="star", size=16, color="black"))
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=30, b=10), xaxis_title=x_title, yaxis_title=y_title,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def pareto_figure(frame: pd.DataFrame) -> go.Figure:
    """Size (fraction of fp32) vs accuracy, one point per setting; the Pareto front drawn."""
    fig = go.Figure()
    for label, part in frame.groupby("series", sort=False):
        fig.add_scatter(x=100 * part["size_fraction"], y=100 * part["accuracy"], mode="markers", name=str(label),
                        text=part["setting"], hovertemplate="%{text}<br>size %{x:.1f} % of fp32"
                                                             "<br>accuracy %{y:.2f} %<extra></extra>")
    front = pareto_front(frame)
    if not front.empty:
        fig.add_scatter(x=100 * front["size_fraction"], y=100 * front["accuracy"], mode="lines",
                        name="Pareto front", line=dict(color="black", dash="dot"))
    fig.update_layout(height=400, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="stored size (% of fp32)",
                      yaxis_title="accuracy (%)", legend=dict(orientation="h", y=-0.25))
    return fig


def pareto_front(frame: pd.DataFrame) -> pd.DataFrame:
    """Points not beaten by a smaller-or-equal-size, higher-accuracy point."""
    ordered = frame.sort_values(["size_fraction", "accuracy"], ascending=[True, False])
    best = -np.inf
    keep = []
    for index, row in ordered.iterrows():
        if row["accuracy"] > best:
            keep.append(index)
            best = row["accuracy"]
    return ordered.loc[keep]


def heatmap_figure(values: np.ndarray, text: np.ndarray, title: str, colorscale, zmin=None, zmax=None,
                   showscale: bool = True) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=values, text=text, texttemplate="%{text}", colorscale=colorscale,
                               zmin=zmin, zmax=zmax, showscale=showscale, hoverinfo="skip"))
    fig.update_layout(title=title, height=340, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(showticklabels=False),
                      yaxis=dict(showticklabels=False, autorange="reversed", scaleanchor="x"))
    return fig


PATH_COLORS = {"dense": PRUNED, "sparse": LOW, "int8": THETA, "auto": HIGH}


def paths_figure(paths: pd.DataFrame, batch: int, device: str) -> go.Figure:
    """Horizontal bars: measured ms per forward pass of each execution path, labelled with the speedup."""
    text = [f"{ms:.2f} ms · {speedup:.2f}×" for ms, speedup in zip(paths["ms"], paths["speedup"])]
    figure = go.Figure(go.Bar(
        x=paths["ms"].tolist(), y=paths["path"].tolist(), orientation="h", text=text, textposition="auto",
        marker_color=[PATH_COLORS.get(p, HIGH) for p in paths["path"]],
        hovertext=paths["layers"].tolist(), hoverinfo="text"))
    figure.update_layout(height=220, margin=dict(l=10, r=10, t=30, b=30), showlegend=False,
                         title=f"Measured latency per path (batch {batch}, {device.upper()})",
                         xaxis_title="ms per forward pass (median; lower is faster)",
                         yaxis=dict(autorange="reversed"))
    return figure


def sensitivity_heatmap(drops: pd.DataFrame, shares: pd.Series) -> go.Figure:
    """Layer × τ map of accuracy drops (points; rows in module order, each labelled with its share of the weights)."""
    labels = [f"{name} ({100 * shares.get(name, float('nan')):.1f} %)" for name in drops.index]
    values = drops.to_numpy(dtype=float)
    top = max(1.0, float(np.nanmax(values)) if values.size else 1.0)
    fig = go.Figure(go.Heatmap(
        z=values, x=[f"τ={t:g}" for t in drops.columns], y=labels, text=np.round(values, 1), texttemplate="%{text}",
        colorscale="Reds", zmin=0, zmax=top, colorbar=dict(title="drop (points)"),
        hovertemplate="%{y}<br>%{x}: %{z:.2f} points<extra></extra>"))
    fig.update_layout(height=max(260, 22 * len(labels) + 90), margin=dict(l=10, r=10, t=30, b=10),
                      yaxis=dict(autorange="reversed", title="layer (share of the weights)"), xaxis=dict(side="top"))
    return fig


def repair_errors_figure(errors: pd.DataFrame) -> go.Figure:
    """Per-layer output error before and after a repair (grouped bars, log scale), layers in module order.

    ``errors``: :attr:`core.measure.repair.RepairResult.errors` (``name``, ``err_before``, ``err_after``).
    """
    names = errors["name"].tolist()
    fig = go.Figure()
    for column, label, color in (("err_before", "before repair", PRUNED), ("err_after", "after repair", HIGH)):
        fig.add_bar(x=names, y=errors[column].tolist(), name=label, marker_color=color,
                    hovertemplate="%{x}<br>" + label + ": %{y:.3g}<extra></extra>")
    fig.update_layout(barmode="group", height=300, margin=dict(l=10, r=10, t=30, b=10), xaxis_tickangle=-60,
                      yaxis=dict(type="log", title="output error vs dense"), legend=dict(orientation="h", y=1.12),
                      meta={"kind": "repair_errors"})
    return fig


def repair_accuracy_figure(curves: pd.DataFrame, dense: float | None, model: str) -> go.Figure:
    """Measured accuracy against retention, one line per repair level (``label``), dense as a dotted line.

    ``curves``: ``retention``, ``accuracy`` (fractions) and ``label`` per row
    (:func:`core.services.teaching.repair_curves`).
    """
    fig = curves_figure(curves, "retention", "accuracy", "label", x_title="retention ρ (share of weights kept)",
                        y_title="test accuracy (%)")
    fig.update_xaxes(tickformat=".0%")
    if dense is not None:
        fig.add_hline(y=100 * dense, line_dash="dot", line_color="black", annotation_text="dense",
                      annotation_position="bottom right")
    fig.add_hline(y=10, line_dash="dash", line_color=BETA, annotation_text="chance (10 classes)",
                  annotation_position="top right")
    fig.update_layout(title=f"{model}: accuracy vs retention, per repair (measured)", meta={"kind": "repair_accuracy"})
    return fig
