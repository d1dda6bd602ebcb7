"""The Tune page's answer to "how far can I go?": the largest swept τ within X points of dense, per repair level.

Each repair level the sweep measured (none, BN recalibration, + bias, + reconstruction) is answered
from its own measured rows (:func:`core.measure.sweep_results.largest_tau_within` with ``level``),
never from another level's. One click applies the chosen τ with that level in Explore and asks for
the repair to run there.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd
import streamlit as st

from core.common.formatting import fmt_bytes
from core.measure.sweep_config import QuantSetting
from core.measure.sweep_results import TauChoice, largest_tau_within, row_levels
from core.method.config import CompressionConfig
from core.services.repairs import JOB_LEVELS, LABELS, LEVELS
from core.services.session import ExploreSession
from ui.repair_view import request_repair
from ui.state import apply_config

LEVEL_NAMES = {"none": "no repair", **{level: f"with {LABELS[level]}".replace("with + ", "with ")
                                       for level in LEVELS[1:]}}


def answers(frame: pd.DataFrame, points: float, quant: QuantSetting | None) -> dict[str, TauChoice | None]:
    """The largest τ > 0 within ``points`` for every repair level of the boundary rows in ``frame``, in level order
    (None for a level where no swept τ > 0 passes)."""
    boundary = frame[frame["method"] == "boundary"]
    if quant is None:
        boundary = boundary[boundary["theta"].isna()]
    present = set(row_levels(boundary))
    found = {level: largest_tau_within(frame, points, quant=quant, contiguous=True, level=level)
             for level in LEVELS if level in present}
    return {level: None if choice is None or choice.tau == 0 else choice for level, choice in found.items()}


def _apply(config: CompressionConfig, session: ExploreSession, level: str) -> None:
    """Button callback: the setting and its repair level into Explore's widgets, and the repair asked for."""
    apply_config(config, session, repair=level)
    if level in JOB_LEVELS:
        request_repair(session, config, level)


def summary(found: dict[str, TauChoice | None], points: float, fp32_bytes: int) -> str:
    """One sentence: "within 1 point: τ = 0.05 with no repair, τ = 0.2 with reconstruction (11 % kept, 2.3 MiB)"."""
    parts = []
    for level, choice in found.items():
        if choice is None:
            parts.append(f"no τ > 0 {LEVEL_NAMES[level]}")
            continue
        size = "" if math.isnan(choice.size_ratio) else f", {fmt_bytes(int(fp32_bytes / choice.size_ratio))}"
        parts.append(f"τ = {choice.tau:g} {LEVEL_NAMES[level]} ({100 * choice.retention:.0f} % kept{size})")
    return f"Within {points:g} point{'s' if points != 1 else ''} of dense: " + "; ".join(parts) + "."


def show_answers(frame: pd.DataFrame, session: ExploreSession, config_now: CompressionConfig,
                 quant: QuantSetting | None, fp32_bytes: int) -> None:
    """The section: X, the summary sentence, then one line per level with its figures and an Apply button."""
    x1, x2 = st.columns([1, 3])
    points = x1.number_input("X (accuracy points)", 0.0, 100.0, 1.0, 0.5, key="tune_points")
    found = answers(frame, points, quant)
    x2.markdown(summary(found, points, fp32_bytes))
    n_images = int(frame["n"].iloc[0])
    x2.caption(f"Each level answered from its own measured points, on {n_images:,} test images; among the swept τ "
               "(every smaller swept τ also passes)" + (f", with {quant.label()}" if quant is not None else "") + ".")
    for level, choice in found.items():
        name, figures, button = st.columns([1.2, 3, 1.4])
        name.markdown(f"**{LEVEL_NAMES[level].capitalize()}**")
        if choice is None:
            figures.caption(f"no swept τ > 0 stays within {points:g} points: allow more points or sweep smaller τ.")
            continue
        figures.markdown(f"τ = **{choice.tau:g}**: {100 * choice.accuracy:.2f} % vs dense "
                         f"{100 * choice.dense_accuracy:.2f} % ({-choice.drop_points:+.2f} points), "
                         f"{100 * choice.retention:.1f} % of weights kept")
        chosen = replace(config_now, tau=choice.tau, layer_tau=(), theta=None)  # the setting measured: fp32 …
        if quant is not None:  # … or the sweep's θ and bit-widths
            chosen = replace(chosen, theta=quant.theta, theta_mode=quant.theta_mode, b_low=quant.b_low,
                             b_high=quant.b_high)
        if button.button(f"Apply τ = {choice.tau:g} in Explore", key=f"tune_apply_{level}", on_click=_apply,
                         args=(chosen, session, level)):
            st.switch_page("pages/explore.py")
