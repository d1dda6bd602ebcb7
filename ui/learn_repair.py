"""The Learn page's section on accuracy collapse and repair: text, formulas, and figures read from a CSV.

Every figure shown comes from :func:`core.services.teaching.repair_story`, i.e. from the CSV that
``benchmarks/repair.py`` wrote; without the file, the section explains the method and names the
command that produces it.
"""
from __future__ import annotations

import streamlit as st

from core.common.formatting import fmt_pct
from core.common.paths import REPO_ROOT
from core.services.teaching import REPAIR_COMMANDS, REPAIR_CSVS, RepairStory, repair_curves, repair_story, repair_table
from ui.charts import repair_accuracy_figure

NAMES = {"resnet18": "ResNet-18", "resnet20": "ResNet-20"}


def _measured(story: RepairStory | None, text) -> None:
    """A sentence with measured figures, only when the file is there."""
    if story is not None:
        st.markdown(text(story))


def render_repair_story(model: str) -> None:
    """Draw the section for ``model`` (a key of :data:`core.services.teaching.REPAIR_CSVS`)."""
    story = repair_story(model)
    name = NAMES.get(model, model)
    path = REPAIR_CSVS[model]
    try:
        shown = path.relative_to(REPO_ROOT)
    except ValueError:
        shown = path
    st.markdown("The paper quotes **10.09 %** test accuracy for its CNN at τ = 0.2 with 31.95 % of the weights kept, "
                "without retraining — chance level on CIFAR-10's ten balanced classes. Four steps explain it and "
                "show what repair without retraining gives back; none of them trains the network.")
    if story is None:
        st.info(f"The measured figures for {name} are not here yet: `{shown}` is missing. "
                "This command produces it (an hour or more on a 2-core CPU; add `--taus 0.2` for one τ):")
        st.code(REPAIR_COMMANDS[model], language="bash", wrap_lines=True)

    st.markdown("**1 · Pruning shifts every layer's output statistics.** Removing the small weights of a layer "
                "changes the mean and the variance of every output channel. A BatchNorm layer after it still "
                "normalises with the running statistics μ, σ² it recorded during training:")
    st.latex(r"y = \gamma \, \frac{z - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta")
    st.markdown("With μ and σ² no longer those of z, every channel comes out shifted and scaled; the error "
                "compounds layer after layer, and the accuracy can fall to chance (10 % for ten balanced classes).")
    _measured(story, lambda s: (
        f"Measured: the shipped {name} at τ = {s.tau:g} keeps **{fmt_pct(s.retention, 1)}** of its Conv/Linear "
        f"weights and scores **{s.figure('none')}** on the CIFAR-10 test set"
        + ("" if s.dense is None else f" (dense: {fmt_pct(s.dense, 2)})") + "."))

    st.markdown("**2 · BatchNorm recalibration.** Run a few hundred unlabelled *training* images through the pruned "
                "network and re-estimate every μ and σ² from what the layers now produce. No weight changes.")
    _measured(story, lambda s: f"Measured at τ = {s.tau:g}: **{s.figure('bn')}**.")

    st.markdown("**3 · Bias correction.** Recalibrated statistics still leave each pruned layer's per-channel *mean* "
                "output off the dense model's. Restore it: in forward order, with the repaired layers upstream, add")
    st.latex(r"\Delta_c = \mathbb{E}\left[y^{\text{dense}}_c\right] - \mathbb{E}\left[y^{\text{pruned}}_c\right]")
    st.markdown("to the shift β of the BatchNorm after the layer (or to the layer's own bias), on the same "
                "calibration images.")
    _measured(story, lambda s: f"Measured at τ = {s.tau:g}: **{s.figure('bias')}**.")

    st.markdown("**4 · Layer-wise reconstruction.** Keep the mask (the pruned weights stay zero) and re-solve the "
                "kept weights of each layer so that, given the already-repaired inputs X, its output matches the "
                "dense model's y — per output channel c, a ridge least-squares problem over its kept inputs $S_c$:")
    st.latex(r"\min_{w} \; \lVert X_{S_c} w - y_c \rVert^2 + \lambda \lVert w \rVert^2")
    st.markdown(r"solved in closed form (a Cholesky factorisation of $X_{S_c}^\top X_{S_c} + \lambda I$); "
                "no gradient step, no labels.")
    _measured(story, lambda s: f"Measured at τ = {s.tau:g}: **{s.figure('reconstruct')}**"
              + (f" (the repair itself: {s.seconds['reconstruct']:.0f} s, measured when the file was written)"
                 if "reconstruct" in s.seconds else "") + ".")

    if story is None:
        return
    st.plotly_chart(repair_accuracy_figure(repair_curves(story), story.dense, name), key=f"learn_repair_{model}")
    st.caption(f"What you see: the CIFAR-10 test accuracy of the shipped {name} after boundary pruning at each τ "
               "(x: the share of Conv/Linear weights kept), without repair and after each repair, measured. "
               f"Source: `{path.name}`, written by `{REPAIR_COMMANDS[model]}`.")
    st.dataframe(repair_table(story), hide_index=True, width="stretch", key=f"learn_repair_table_{model}")
    st.caption("Accuracy (%) on the CIFAR-10 test set per pruning, τ and repair; `global_magnitude` prunes the same "
               "number of weights by one global threshold (the baseline); a `+4/8bit` row is also quantized.")
