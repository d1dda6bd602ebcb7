"""Learn: the method's formulas, the paper's pseudocode and ours, a worked 8×8 example, why accuracy collapses
after pruning and how repair without retraining brings it back (measured figures, from a CSV), and a glossary."""
import numpy as np
import streamlit as st

from core.services.channel_demo import channel_speed_demo
from core.services.teaching import OUR_CODE, PAPER_PSEUDOCODE, REPAIR_CSVS, worked_example
from ui import glossary
from ui.charts import heatmap_figure
from ui.learn_repair import render_repair_story
from ui.sidebar import page_setup
from ui.state import PALETTE, footer, guard

page_setup(need_model=False)
st.title("Learn: boundary pruning and on-the-fly quantization")

st.subheader("The formulas")
st.markdown("**Boundary pruning** — per layer ℓ, a boundary proportional to the layer's largest weight:")
st.latex(r"\beta_\ell = \tau \cdot \max_i \lvert W_i^{(\ell)} \rvert, \qquad "
         r"\tilde W_i^{(\ell)} = W_i^{(\ell)} \, \mathbf{1}\!\left(\lvert W_i^{(\ell)} \rvert \ge \beta_\ell\right)")
st.markdown("The retained fraction, and the compute it saves if the zeros are skipped:")
st.latex(r"\rho = \frac{1}{N} \sum_{i=1}^{N} \mathbf{1}\!\left(\lvert W_i \rvert \ge \beta\right), "
         r"\qquad \text{compute reduction} \approx 1 - \rho")
st.markdown("**On-the-fly quantization switching** — every layer is quantized once into chunks, one per "
            "bit-width b (symmetric, per output channel c); at run time each weight takes its value from the "
            "high- or low-precision chunk:")
st.latex(r"q_{\max} = 2^{b-1} - 1, \quad s_c = \frac{\max \lvert W_c \rvert}{q_{\max}}, \quad "
         r"\hat W = s_c \cdot \operatorname{clamp}\!\left(\operatorname{round}(W / s_c), -q_{\max}, q_{\max}\right)")
st.latex(r"b(W_i) = \begin{cases} b_{\text{high}}, & \lvert W_i \rvert \ge \theta \\ "
         r"b_{\text{low}}, & \lvert W_i \rvert < \theta \end{cases} \qquad "
         r"\text{cost of a } \theta \text{ move: } O(M \cdot T_{\text{switch}})")
st.caption("M is the number of weights whose chunk changed; moving θ never re-quantizes, it re-selects. "
           "Every symbol is defined in the Glossary at the end of this page.")

st.subheader("The paper's pseudocode and this project's engine")
# one above the other, at the page's full width: side by side, an 80-character line was cut off
st.markdown("**Paper (section 3.3)** — multiplies the weights in place and prunes every module with a "
            "`weight`, BatchNorm scales included.")
st.code(PAPER_PSEUDOCODE, language="python", wrap_lines=True)
st.markdown("**Here (`core.method.engine`)** — never modifies the model, prunes Conv/Linear weights by default "
            "(BatchNorm only with `include_norm=True`), θ relative to max|W| by default.")
st.code(OUR_CODE, language="python", wrap_lines=True)

st.subheader("A worked example: one 8×8 weight matrix")
st.caption("Move τ and θ: the left map is the weight matrix with its values; the right one shows what each cell "
           "becomes — its colour says whether it was pruned or which chunk it reads, its text the resulting value.")
c1, c2, c3, c4 = st.columns(4)
tau = c1.slider("τ (example)", 0.0, 1.0, 0.3, 0.05, key="learn_tau", help=glossary.term("τ"))
use_theta = c2.toggle("quantize (example)", True, key="learn_quantize")
theta = c2.slider("θ relative (example)", 0.0, 1.0, 0.6, 0.05, key="learn_theta", disabled=not use_theta,
                  help=glossary.term("θ"))
b_low = c3.select_slider("b_low (example)", PALETTE, 2, key="learn_b_low")
b_high = c4.select_slider("b_high (example)", PALETTE, 4, key="learn_b_high")
with guard("The worked example"):
    ex = worked_example(tau, theta if use_theta else None, min(b_low, b_high), max(b_low, b_high))
    st.markdown(f"max|W| = {np.abs(ex.weights).max():.2f} → **β = τ·max|W| = {ex.beta:.3f}**"
                + ("" if ex.theta is None else f", **θ = {ex.theta:.3f}**")
                + f"; kept {int(ex.keep.sum())} of {ex.keep.size} cells (ρ = {100 * ex.retention:.0f} %)"
                + ("" if ex.theta is None else f", {ex.n_high} of them from the {ex.b_high}-bit chunk."))
    # two maps, not three, and no colour bars: cells wide enough for their numbers at 13 px
    # (Plotly shrinks unsized heatmap text to fit a cell: three maps side by side gave about 7 px)
    h1, h2 = st.columns(2)
    with h1:
        st.plotly_chart(heatmap_figure(np.abs(ex.weights), np.vectorize(lambda v: f"{v:.2f}")(ex.weights),
                                       "W (colour: |W|)", "Blues", showscale=False, height=420), key="learn_w")
    categories = np.where(~ex.keep, 0, np.where(ex.high, 2, 1)) if ex.theta is not None else ex.keep.astype(int) * 2
    chunks = np.where(ex.chunk == 32, "fp32", np.char.add(ex.chunk.astype(str), "-bit"))
    values = np.vectorize(lambda v: f"{v:.2f}")(ex.compressed)
    labels = np.where(ex.chunk == 0, "0", np.char.add(np.char.add(values, "<br>"), chunks))
    with h2:
        st.plotly_chart(heatmap_figure(categories, labels, "W̃ (colour: pruned, low- or high-bit chunk)",
                                       [[0, "#d9d9d9"], [0.5, "#f28e2b"], [1, "#4e79a7"]], 0, 2, showscale=False,
                                       height=420), key="learn_out")
    st.caption("Grey: |W| < β, set to zero. Orange: kept, read from the low-bit chunk (|W| < θ). Blue: kept, read "
               "from the high-bit chunk (|W| ≥ θ), or kept in full precision when quantization is off. "
               "The chunks are quantized per row (the output channel), so the same value can round differently "
               "in different rows.")

st.subheader("Why the paper's CNN fell to 10.09 % and how repair brings it back")
model = st.radio("Measured on", list(REPAIR_CSVS), horizontal=True, key="learn_repair_model",
                 format_func={"resnet18": "ResNet-18 (shipped)", "resnet20": "ResNet-20 (shipped)"}.get)
with guard("The repair figures", "Produce the CSV again with the command shown."):
    render_repair_story(model)

st.subheader("Why channels give speed and zeros do not")
st.markdown("Boundary pruning zeroes single weights: the tensor keeps its shape, and PyTorch's dense kernels (like "
            "every maintained CPU runtime) multiply the zeros as if they were there, so the stored size shrinks but "
            "the time does not. Remove whole channels instead (the same boundary rule on each channel's norm, "
            "β = τ_ch · max_c s_c) and the convolution itself becomes smaller: fewer multiply-adds, less time. "
            "Time it here, on one convolution, at the same share of weights kept:")
a, b = st.columns([3, 1])
a.slider("Share of weights kept", 0.1, 1.0, value=0.5, step=0.05, key="learn_demo_kept")
if b.button("Time it on this server", key="learn_demo_run"):
    with guard("Timing the convolutions"), st.spinner("Timing dense, zeroed and channel-pruned convolutions…"):
        st.session_state["learn_demo"] = channel_speed_demo(float(st.session_state["learn_demo_kept"]))
demo = st.session_state.get("learn_demo")
if demo is not None:
    st.dataframe(demo.table, hide_index=True, width="stretch",
                 column_config={"weights kept": st.column_config.NumberColumn(format="percent"),
                                "MACs (counted)": st.column_config.NumberColumn(format="localized"),
                                "median ms": st.column_config.NumberColumn(format="%.3f"),
                                "speed-up": st.column_config.NumberColumn(format="%.2f×")})
    st.caption(f"Measured just now: {demo.layer} on an input of shape {demo.input_shape}, torch eager, fp32, one "
               f"thread, the three runs interleaved over {demo.rounds} rounds (median)"
               + ("." if demo.quiet else "; other work ran meanwhile, so the figures are noisy.")
               + " MACs are counted from the shapes: the zeroed convolution still does every one of them. "
                 "On whole models, with repair and accuracy: `python benchmarks/structured.py`; in the app: "
                 "Explore → Granularity → channel.")

st.subheader("Glossary")
st.caption("The words and symbols the pages use; the same definitions appear as tooltips (the ? icons) beside the figures and sliders.")
st.markdown(glossary.glossary_markdown())

footer(page="learn")
