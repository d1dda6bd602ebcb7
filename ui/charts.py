"""Plotly figures for the pages (presentation only: the data comes from ``core``)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.services.histogram import HistogramData

PRUNED = "#9e9e9e"
LOW = "#f28e2b"
HIGH = "#4e79a7"
BETA = "#d62728"
THETA = "#2ca02c"


REFERENCE = "reference line"  # the ``meta`` of a legend-only trace that names a reference line
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.22, x=0, xanchor="left")
LEGEND_ROW_PX = 20


def _decade_label(exponent: int) -> str:
    """10**exponent as a reader writes it: 0.001, 0.01, 0.1, 1, 10, 1,000; 1e-05 and 1e+06 beyond."""
    if -4 <= exponent < 0:
        return f"{10.0 ** exponent:.{-exponent}f}"
    if 0 <= exponent <= 5:
        return f"{10 ** exponent:,}"
    return f"1e{exponent:+03d}"


def log_axis(values: Iterable[float], title: str = "") -> dict:
    """A log axis labelled at each power of ten (0.01, 0.1, 1 …); minor ticks at 2…9 × each, unlabelled.

    The range covers the positive ``values`` (zeros and NaN are ignored) with a margin, so the
    smallest bar stays visible, and is widened to hold at least two labelled powers of ten; no
    label sits on the plot's edge, where it would run into the other axis's labels.
    """
    positive = [float(v) for v in values if v is not None and math.isfinite(v) and v > 0]
    if not positive:
        return dict(type="log", title=title)
    low, high = math.log10(min(positive)) - 0.1, math.log10(max(positive)) + 0.1
    decades = list(range(math.ceil(low), math.floor(high) + 1))
    while len(decades) < 2:  # add the nearer power of ten outside the data
        below = decades[0] - 1 if decades else math.floor(low)
        above = decades[-1] + 1 if decades else math.ceil(high)
        decades = sorted(decades + [below if low - below < above - high else above])
        low, high = min(low, decades[0]), max(high, decades[-1])
    edge = 0.12  # decades: keeps the first and the last label off the corners
    low, high = min(low, decades[0] - edge), max(high, decades[-1] + edge)
    return dict(type="log", title=title, range=[low, high], tickmode="array",
                tickvals=[10.0 ** d for d in decades], ticktext=[_decade_label(d) for d in decades],
                ticks="outside", ticklen=7,  # the labels sit beyond the major ticks, clear of the minor ones
                minor=dict(tickmode="linear", dtick="D1", ticks="outside", ticklen=3, showgrid=True,
                           gridcolor="rgba(255,255,255,0.45)"))


def _legend_entry(fig: go.Figure, label: str, line: dict) -> None:
    """A data-less trace (``meta`` :data:`REFERENCE`) that shows ``line``'s style and ``label`` in the legend."""
    fig.add_scatter(x=[None], y=[None], mode="lines", name=str(label), line=line, meta=REFERENCE, hoverinfo="skip")
    if fig.layout.height:  # a row more in the legend below the plot: the plot keeps its height
        fig.layout.height += LEGEND_ROW_PX


def add_reference(fig: go.Figure, label: str, *, x: float | None = None, y: float | None = None,
                  color: str = "gray", dash: str = "dot") -> go.Figure:
    """A full-height (``x``) or full-width (``y``) reference line, named by a legend entry, not by text on the plot.

    Text beside a line overlaps the data, other labels (two lines a few pixels apart) or the frame;
    a legend entry never does.
    """
    line = dict(color=color, dash=dash, width=2)
    if x is not None:
        go.Figure.add_vline(fig, x=x, line=line)
    if y is not None:
        go.Figure.add_hline(fig, y=y, line=line)
    _legend_entry(fig, label, line)
    return fig


REFERENCE_DASHES = ("dot", "dashdot", "longdashdot", "longdash")


class LegendLabelledFigure(go.Figure):
    """A figure whose ``add_hline``/``add_vline`` name their line in the legend, not with text on the plot.

    Pages add reference lines to :func:`curves_figure`'s figures with Plotly's ``annotation_text``
    ("dense", "dense + BN recal", "current τ"); beside lines a few pixels apart, or at the plot's
    edge, such text overlapped and was clipped. Here the text becomes a legend entry drawn in the
    line's style (:func:`add_reference`), and every other ``annotation_*`` argument is dropped.
    """

    def _reference_line(self, axis: str, value: float, kwargs: dict) -> LegendLabelledFigure:
        label = kwargs.pop("annotation_text", None)
        for key in [k for k in kwargs if k.startswith("annotation")]:
            kwargs.pop(key)
        line = dict(kwargs.pop("line", None) or {})
        for key in ("color", "dash", "width"):
            if f"line_{key}" in kwargs:
                line[key] = kwargs.pop(f"line_{key}")
        line.setdefault("width", 2)
        add = super().add_hline if axis == "y" else super().add_vline
        add(value, line=line, **kwargs)
        if label:
            _legend_entry(self, label, line)
        return self

    def add_hline(self, y, **kwargs) -> LegendLabelledFigure:
        """Plotly's horizontal line across the plot; ``annotation_text`` names it in the legend."""
        return self._reference_line("y", y, kwargs)

    def add_vline(self, x, **kwargs) -> LegendLabelledFigure:
        """Plotly's vertical line across the plot; ``annotation_text`` names it in the legend."""
        return self._reference_line("x", x, kwargs)


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
    y_title = "weights per bin" + (" (log)" if log_y else "")
    # the lines at ±β and ±θ as layout shapes (built here: fig.add_vline costs ~6 ms a line, on every
    # slider move), each pair named once in the legend by a data-less trace
    marks = [(h.beta, BETA, "dash", f"±β = {h.beta:.3g} (pruning boundary)")]
    if h.theta is not None:
        marks.append((h.theta, THETA, "dot", f"±θ = {h.theta:.3g} (chunk boundary)"))
    shapes = [dict(type="line", xref="x", yref="paper", x0=sign * at, x1=sign * at, y0=0, y1=1,
                   line=dict(color=color, dash=dash, width=2)) for at, color, dash, _ in marks for sign in (-1, 1)]
    names = [go.Scatter(x=[None], y=[None], mode="lines", name=label, line=dict(color=color, dash=dash, width=2),
                        meta=REFERENCE, hoverinfo="skip") for _, color, dash, label in marks]
    layout = go.Layout(
        barmode="stack", bargap=0, height=380, margin=dict(l=10, r=10, t=20, b=10),
        xaxis_title=f"weight value in layer {h.layer}",
        yaxis=log_axis(np.concatenate([h.pruned, h.low, h.high]), y_title) if log_y else dict(title=y_title),
        legend=LEGEND_BELOW, shapes=shapes,
        meta={"beta": h.beta, "theta": h.theta, "layer": h.layer, "max_abs": h.max_abs})
    return go.Figure([go.Bar(x=x, width=width, **bar) for bar in bars] + names, layout)


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
                  marker_label: str = "current setting", hlines: Sequence[tuple[float, str]] = (),
                  vline: tuple[float, str] | None = None) -> go.Figure:
    """Lines of ``y`` against ``x``, one per ``color`` group, with optional CI band columns and a marker.

    ``hlines``: ``(y, label)`` reference levels in ``y``'s units (a dense model's accuracy, say);
    ``vline``: ``(x, label)`` (the current τ). Each is a line named in the legend (:func:`add_reference`),
    so labels of nearby lines never overlap and nothing is clipped at the plot's edge.
    Lines a caller adds later with ``fig.add_hline(..., annotation_text=...)`` are named in the
    legend too (:class:`LegendLabelledFigure`).
    """
    fig = LegendLabelledFigure()
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
    for (level, label), dash in zip(hlines, REFERENCE_DASHES * len(hlines)):
        add_reference(fig, label, y=scale * level, dash=dash)
    if vline is not None:
        add_reference(fig, vline[1], x=vline[0], color="black", dash="dash")
    fig.update_layout(height=380 + LEGEND_ROW_PX * max(0, len(fig.data) - 4), margin=dict(l=10, r=10, t=30, b=10),
                      xaxis_title=x_title, yaxis_title=y_title, legend=LEGEND_BELOW)
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
                      yaxis_title="accuracy (%)", legend=LEGEND_BELOW)
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
                   showscale: bool = True, font_size: int = 13, height: int = 340) -> go.Figure:
    """A matrix as coloured cells with ``text`` in each, at ``font_size`` px (Plotly shrinks unsized text to fit)."""
    fig = go.Figure(go.Heatmap(z=values, text=text, texttemplate="%{text}", textfont=dict(size=font_size),
                               colorscale=colorscale, zmin=zmin, zmax=zmax, showscale=showscale, hoverinfo="skip"))
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(showticklabels=False, showgrid=False, zeroline=False, ticks=""),
                      yaxis=dict(showticklabels=False, showgrid=False, zeroline=False, ticks="", autorange="reversed",
                                 scaleanchor="x"))
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
    values = pd.concat([errors["err_before"], errors["err_after"]])
    fig.update_layout(barmode="group", height=320, margin=dict(l=10, r=10, t=40, b=10), xaxis_tickangle=-60,
                      yaxis=log_axis(values, "output error vs dense (log)"),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, xanchor="left"),
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
        add_reference(fig, f"dense ({100 * dense:.2f} %)", y=100 * dense, color="black")
    add_reference(fig, "chance (10 classes)", y=10, color=BETA, dash="dash")
    fig.update_layout(title=dict(text=f"{model}: accuracy vs retention, per repair (measured)", x=0, xref="paper", xanchor="left",
                                 font=dict(size=15)), margin=dict(t=50), meta={"kind": "repair_accuracy"})
    return fig


def channel_scores_figure(scores: Sequence[float], beta: float, group: str, bins: int = 40) -> go.Figure:
    """Histogram of one group's channel scores s_c (norms, ≥ 0): removed (s_c < β) grey, kept blue; β a dashed line.

    Scores are norms, never negative, so the boundary has one side: the line at +β (−β would lie off the axis).
    """
    values = np.asarray(scores, dtype=float)
    top = float(values.max()) if len(values) else 1.0
    edges = np.linspace(0.0, top * 1.0001 if top > 0 else 1.0, bins + 1)
    removed, _ = np.histogram(values[values < beta], edges)
    kept, _ = np.histogram(values[values >= beta], edges)
    centers, width = (edges[:-1] + edges[1:]) / 2, float(edges[1] - edges[0])
    line = {"color": BETA, "dash": "dash", "width": 2}
    fig = go.Figure([go.Bar(x=centers, y=removed, width=width, name="removed (s_c < β)", marker_color=PRUNED),
                     go.Bar(x=centers, y=kept, width=width, name="kept (s_c ≥ β)", marker_color=HIGH),
                     go.Scatter(x=[None], y=[None], mode="lines", name=f"β = {beta:.3g} (channel boundary)",
                                line=line, meta=REFERENCE, hoverinfo="skip")])
    fig.update_layout(barmode="stack", bargap=0, height=380, margin={"l": 10, "r": 10, "t": 20, "b": 10},
                      xaxis_title=f"channel score s_c in group {group}", yaxis_title="channels per bin",
                      legend=LEGEND_BELOW, meta={"beta": beta, "group": group},
                      shapes=[{"type": "line", "xref": "x", "yref": "paper", "x0": beta, "x1": beta, "y0": 0, "y1": 1,
                               "line": line}])
    return fig


def channel_share_figure(layers: pd.DataFrame, group: str | None = None) -> go.Figure:
    """Per Conv/Linear, the share of output channels kept (counted), in module order; ``group``'s layers outlined."""
    line = [2 if g == group else 0 for g in layers["group"]]
    fig = go.Figure(go.Bar(
        x=layers["name"], y=100 * layers["share"], marker_color=HIGH, marker_line_width=line,
        marker_line_color="black", customdata=np.stack([layers["kept_out"], layers["out_channels"]], axis=1),
        hovertemplate="%{x}<br>%{y:.1f} % of output channels kept<br>%{customdata[0]} of %{customdata[1]}"
                      "<extra></extra>"))
    fig.update_layout(height=360, margin={"l": 10, "r": 10, "t": 30, "b": 10}, yaxis_title="output channels kept (%)",
                      yaxis_range=[0, 105], xaxis_tickangle=-60)
    return fig
