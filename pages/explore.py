"""Explore: move τ and θ and see, live, what boundary pruning and chunk switching do."""
import pandas as pd
import streamlit as st

from core.common.formatting import fmt_bytes, fmt_pct
from core.services.repairs import JOB_LEVELS
from core.services.session import ExploreRequest
from core.services.session_accuracy import ACCURACY_TARGETS
from core.services.recorded import AS_LOADED, same_setting
from ui.channel_view import explore_channels
from ui.explore_view import estimate_done, latency_controls, show_accuracy, show_collapse, show_latency, show_presets, show_recorded
from ui import glossary
from ui.repair_view import await_repair, repair_choice, repair_wanted, show_pending, show_repair
from ui.errors import literal
from ui.deploy_view import show_deploy
from ui.charts import histogram_figure, paths_figure, retention_figure
from ui.sidebar import page_setup
from ui.state import PALETTE, current_config, device, footer, guard

session = page_setup()
loaded = session.loaded
state = st.session_state

st.title("Explore")
st.caption(f"**{literal(loaded.label)}** · weights from {literal(loaded.source)}. Move the sliders: every number "
           "below is recomputed for the new setting; the loaded model itself is never modified.")
st.radio("Granularity", ["weight", "channel"], key="explore_granularity", horizontal=True,
         format_func={"weight": "weight (zero single weights: size)",
                      "channel": "channel (remove whole channels: speed)"}.get,
         help="Weight: the paper's boundary pruning and θ quantization. Channel: the same boundary rule one level "
              "up, on each channel's norm; the model physically shrinks.")
if state["explore_granularity"] == "channel":
    explore_channels(session)
    st.stop()
show_presets(session)

# ---------------------------------------------------------------- controls
c1, c2, c3 = st.columns(3)
with c1:
    st.slider("τ — boundary: prune |W| < β = τ · max|W| (per layer)", 0.0, 1.0, step=0.01, key="tau",
              help=glossary.help_for("τ", "β", "ρ"))
    st.checkbox("Prune norm scales too (paper code)", key="include_norm",
                help="The paper's `hasattr(layer, 'weight')` also prunes normalisation scales, which switches "
                     "channels off and collapses a trained CNN's accuracy. Off by default.")
    repair_choice(session)
with c2:
    st.toggle("Quantize with θ (on-the-fly chunk switching)", key="quantize")
    st.radio("θ mode", ["relative", "absolute", "fraction"], key="theta_mode", horizontal=True,
             disabled=not state["quantize"],
             format_func={"relative": "relative (θ·max|W|)", "absolute": "absolute (paper)",
                          "fraction": "fraction high"}.get)
    mode = state["theta_mode"]
    if mode == "absolute":
        top = state.get("_theta_absolute_max", 1.0)
        if not 0 <= state.get("theta_absolute", 0) <= top:
            st.warning(f"θ = {state.get('theta_absolute')} was outside the slider's range [0, {top:g}] for this "
                       f"model; it is set to {round(0.3 * top, 4):g} (0.3 · max|W|).")
            state["theta_absolute"] = round(0.3 * top, 4)
        st.slider("θ — |W| ≥ θ takes the high-bit chunk", 0.0, top, step=max(top / 500, 1e-6),
                  format="%.4f", key="theta_absolute", disabled=not state["quantize"], help=glossary.term("θ"))
    elif mode == "relative":
        st.slider("θ — |W| ≥ θ·max|W| takes the high-bit chunk", 0.0, 1.0, step=0.01, key="theta_relative",
                  disabled=not state["quantize"], help=glossary.term("θ"))
    else:
        st.slider("θ — fraction of each layer's kept weights in the high-bit chunk", 0.0, 1.0, step=0.01,
                  key="theta_fraction", disabled=not state["quantize"], help=glossary.term("θ"))
with c3:
    st.select_slider("b_high (bits of the high chunk)", PALETTE, key="b_high", disabled=not state["quantize"])
    st.select_slider("b_low (bits of the low chunk)", PALETTE, key="b_low", disabled=not state["quantize"])
    st.caption("Chunks are quantized once per bit-width (symmetric, per output channel); moving θ only "
               "re-selects between chunks already in memory.")

with st.expander("Per-layer τ overrides"):
    st.caption("Type a τ for a layer to override the global τ there; clear the cell to use the global τ again.")
    names = session.layer_names(state["include_norm"])
    overrides = state.get("layer_tau", {})
    table = pd.DataFrame({"layer": names, "τ override": pd.Series([overrides.get(n, float("nan")) for n in names],
                                                                   dtype="float64")})
    edited = st.data_editor(
        table, key=f"layer_tau_editor_{state.get('layer_tau_editor_version', 0)}_{int(state['include_norm'])}",
        hide_index=True, disabled=["layer"], width="stretch",
        column_config={"τ override": st.column_config.NumberColumn(min_value=0.0, max_value=1.0, step=0.01,
                                                                    format="%.2f")})
    state["layer_tau"] = {row["layer"]: float(row["τ override"]) for _, row in edited.iterrows()
                          if row["τ override"] is not None and not pd.isna(row["τ override"])}

# ---------------------------------------------------------------- compute: the fast part (one call into core)
layers = session.layer_names(state["include_norm"])
if state.get("hist_layer") not in layers:
    state["hist_layer"] = session.largest_layer()
view = None
with guard("Updating the view"):
    config, notes = current_config(session)
    for note in notes:
        st.warning(note)
    recorded = loaded.recorded
    as_loaded = recorded is not None and same_setting(config, recorded.config)
    show_recorded(recorded, as_loaded, session)
    if as_loaded:  # the upload as it is: compressing it again with its own setting would not give it back
        config = AS_LOADED
    asked = session.repairs.applied_level(state["repair"])
    request = ExploreRequest(config=config, layer=state["hist_layer"], latency_batch=int(state["latency_batch"]),
                             repair=state["repair"], run_repair=repair_wanted(session, config, asked),
                             device=device())
    view = session.update(request)
if view is None:
    st.stop()
result = view.result
level = view.repair_level  # the repair the accuracy figures are for
for note in view.notes:
    st.info(note)

# ---------------------------------------------------------------- headline metrics (heavy ones filled in below)
stats = result.stats
n_high, kept = int(stats["n_high"].sum()), int(stats["kept"].sum())
collapse_slot = st.empty()  # the explanation when the accuracy has collapsed (filled once the estimate says so)
row1 = st.columns(4)
if as_loaded and recorded.retention is not None:  # the file's masks; a kept weight may have been coded as 0
    row1[0].metric("Retention ρ", fmt_pct(recorded.retention), f"{fmt_pct(result.retention)} nonzero",
                   delta_color="off", delta_arrow="off",
                   help=f"{glossary.term('retention')} Counted from the uploaded file's keep-masks. Nonzero: "
                        "the share of its weights that are not zero (a kept weight can be quantized to 0).")
else:
    row1[0].metric("Retention ρ", fmt_pct(result.retention), f"{kept:,} of {int(stats['numel'].sum()):,} weights",
                   delta_color="off", delta_arrow="off",
                   help=f"{glossary.term('retention')} Counted: kept weights / all weights of the pruned layers "
                        "(Conv/Linear; plus norm scales with the paper option).")
if as_loaded:
    row1[1].metric("Stored size", fmt_bytes(recorded.file_bytes), f"the uploaded {recorded.kind}, measured",
                   delta_color="off", delta_arrow="off", help="Measured: the size of the file you uploaded.")
else:
    row1[1].metric("Stored size", fmt_bytes(result.model_bytes_compressed),
                   f"{100 * (result.model_bytes_compressed / result.model_bytes_fp32 - 1):+.1f} % vs fp32 "
                   f"{fmt_bytes(result.model_bytes_fp32)}", delta_color="inverse",
                   help="Computed: the bytes of the compressed storage: the keep-mask (a bitmap, an index list or an "
                        "Elias-Fano code, whichever is smallest), codes at their bit-widths, the high/low selector "
                        "(coded the same way) and per-channel scales (core.method.quantization.layer_storage), "
                        "plus every other parameter and buffer as fp32. From the format, not a file on disk (the "
                        "file is measured under Realized savings).")
accuracy_slot = row1[2].empty()
latency_slot = row1[3].empty()
full = view.full
if full is not None:
    ref = view.full_dense
    st.metric("Accuracy · full test", fmt_pct(full.accuracy, 2),
              None if ref is None else f"{100 * (full.accuracy - ref.accuracy):+.2f} pts vs dense "
                                       f"{fmt_pct(ref.accuracy, 2)}",
              help=f"Measured on all {full.n:,} images of {literal(session.data_label())}, fp32. Dense reference: "
                   f"{view.full_dense_source}.")

with st.expander("More figures: compute, memory, chunk switches, timings"):
    more1, more2 = st.columns(4), st.columns(4)
    more1[0].metric("Compute reduction", fmt_pct(result.compute_reduction),
                    help="Counted: 1 − kept MACs / all MACs of the pruned layers, from the layer shapes (a conv weight "
                         "counts once per output position). An estimate of what a sparse kernel could skip: "
                         "PyTorch's dense kernels still multiply the zeros, see the measured latency.")
    memory = session.measurements.memory()
    more1[1].metric("Memory · this session", fmt_bytes(memory.session),
                    f"model {fmt_bytes(memory.model)}; process {fmt_bytes(memory.process_rss)} RSS",
                    delta_color="off", delta_arrow="off",
                    help="Counted: bytes this session holds on its own: the engine's working buffer, which is also the "
                         f"compressed model's weights, and BN-recalibrated copies. Shared by every session on this "
                         f"model: {fmt_bytes(memory.shared)} of rank orders, quantized chunks and repaired models, "
                         f"and the model itself ({fmt_bytes(memory.model)} of parameters and buffers; the engine "
                         "reads its weights there, without a copy). The server process's resident memory (psutil, "
                         "measured) covers every session and PyTorch itself.")
    move = view.last_theta_move
    more1[2].metric("Chunk switches M", "–" if move is None else f"{move.switches:,}",
                    None if move is None else f"T_switch {1e3 * move.t_switch_s:.2f} ms", delta_color="off",
                    delta_arrow="off", help=glossary.help_for("M", "T_switch", "counted", "measured"))
    more1[3].metric("High-precision weights", f"{n_high:,}" if config.quantized else "–",
                    f"{fmt_pct(n_high / kept) if kept else '0 %'} of kept" if config.quantized else None,
                    delta_color="off", delta_arrow="off",
                    help="n_high: kept weights taking their value from the b_high chunk (|W| ≥ θ).")
    last = view.last_move
    more2[0].metric("Weights rewritten", "–" if last is None else f"{last.changed:,}",
                    None if last is None else f"engine {1e3 * last.update_s:.1f} ms", delta_color="off",
                    delta_arrow="off", help="At the last update: the engine rewrites only the weights whose source "
                                            "(zero / original / chunk) changed.")
    more2[1].metric("First paint", f"{1e3 * view.timings['total']:.0f} ms",
                    help="Measured: server-side time of the engine step and the histogram for this view; accuracy "
                         "and latency follow, queued with the other sessions' work. The page footer adds the "
                         "rendering.")
    if full is None and session.has_labels:
        more2[2].metric("Accuracy · full test", "not measured", help="Use the button under the accuracy "
                                                                     "(seconds to a minute).")

# ---------------------------------------------------------------- charts
left, right = st.columns([3, 2])
with left:
    a, b = st.columns([3, 1])
    a.selectbox("Layer", layers, key="hist_layer")
    b.toggle("log y", key="hist_log")
    h = view.histogram
    st.plotly_chart(histogram_figure(h, state["hist_log"], config.b_low, config.b_high), key="histogram")
    theta_text = "" if h.theta is None else f", θ = {h.theta:.4g}"
    if as_loaded:
        st.caption(f"What you see: the weights of **{h.layer}** ({h.numel:,} values) in {len(h.pruned)} bins, as the "
                   "uploaded file holds them: its pruned weights are the zeros in the middle bin (β is only the "
                   "exact zero here). Move τ to prune these weights again and see β.")
    else:
        st.caption(f"What you see: the weights of **{h.layer}** ({h.numel:,} values) in {len(h.pruned)} bins, "
                   f"coloured by what this setting does to them. Dashed red lines: ±β (β = {h.beta:.4g}){theta_text}"
                   f"{' (dotted green)' if h.theta is not None else ''}. Between the red lines everything is pruned.")
with right:
    st.plotly_chart(retention_figure(stats, h.layer), key="retention_chart")
    st.caption("What you see: the share of each layer's weights that survives the boundary (counted), "
               "in module order; the outlined bar is the layer in the histogram.")

# ---------------------------------------------------------------- accuracy, latency, details
acc, perf = st.columns(2)
with acc:
    st.subheader("CIFAR-10 accuracy" if session.data is None else "Accuracy on your images")
    if session.data is not None:
        st.caption(f"Measured on {literal(session.data_label())}.")
    accuracy_detail = st.empty()
    repair_box = st.container()
    if view.repair is not None:
        show_repair(view.repair, repair_box)
    elif view.repair_pending is not None:
        show_pending(session, config, view.repair_pending, level, view.repair_estimate_s, repair_box)
    if view.accuracy_available:
        population = 10_000 if session.data is None else len(session.data)
        st.select_slider("Refine until the Δ interval is within", ACCURACY_TARGETS, key="accuracy_target",
                         format_func=lambda t: f"all {population:,} images" if t == 0 else f"±{100 * t:g} points",
                         help="After a slider move the estimate refines on its own, batch after batch, on a growing "
                              "class-balanced sample of the evaluation images, until its paired 95 % interval is this "
                              "narrow.")
        if st.button(f"Measure the full {population:,}-image accuracy (fp32)", key="full_eval"):
            with guard("Measuring the full-test accuracy"):
                with st.spinner(f"Running the compressed model on all {population:,} images…"):
                    session.accuracy.full(result, level, device())
                    if view.full_dense is None or view.full_dense_source.startswith("from"):
                        session.accuracy.full(None, False, device())
                st.rerun()
        st.caption("The full-test figure is measured on request in fp32 (cached per model and setting)."
                   if view.full is None else f"Full test measured in {view.full.seconds:.1f} s (cached).")
    elif session.has_labels:
        st.info("Accuracy is unavailable (see the note above).")
    elif session.data is not None:
        st.caption("Your images have no class folders: fidelity to the dense model (top-1 agreement and the mean "
                   "KL divergence of the outputs) replaces accuracy.")
    else:
        st.caption("The synthetic MLP has no labelled data; the output deviation above shows how far the "
                   "compressed outputs move from the dense ones.")
with perf:
    st.subheader("Latency and memory")
    latency_detail = latency_controls()

st.subheader("Realized savings · measured")
with guard("Exporting and measuring in ONNX Runtime and OpenVINO"):
    show_deploy(session, result, view.repair_pending or level)  # a pending repair: it must run first
st.markdown("#### In this app: the packed file and PyTorch's execution paths · measured")
st.caption("What you would actually get, not what is counted: the packed file written to disk (`core.deploy.packed_writer`) "
           "and the latency of each execution path (`core.deploy.runtime`): **dense** multiplies the zeros, **sparse** "
           "runs CSR kernels, **int8** weight-only int8 (Linear layers whose weights are exact int8 codes), "
           "**auto** the fastest kernel per layer as measured on this machine.")
realized = view.realized
if realized is None and st.button(f"Measure file size and execution paths (batch {state['latency_batch']})",
                                  key="measure_realized"):
    with guard("Measuring the realized savings"):
        with st.spinner("Packing the model and timing every layer with each kernel…"):
            session.measurements.realized(result, int(state["latency_batch"]), device())
        st.rerun()
if realized is None:
    st.caption("Measured on request (a few seconds for ResNet-20, longer for larger models); cached per setting "
               "and batch size.")
else:
    r1 = st.columns(4)
    r1[0].metric("Packed file · measured", fmt_bytes(realized.file_bytes),
                 f"{realized.times_smaller:.1f}× smaller than the fp32 file", delta_color="off", delta_arrow="off",
                 help=f"Bytes on disk of the packed file vs the plain state_dict saved with safetensors "
                      f"({fmt_bytes(realized.state_dict_bytes)}). The file is "
                      f"{realized.file_vs_accounting:.3f}× the computed stored size above.")
    best = realized.fastest
    r1[1].metric("Fastest path · measured", best, f"{realized.ms(best):.2f} ms vs dense {realized.ms('dense'):.2f} ms",
                 delta_color="off", delta_arrow="off")
    auto_x = realized.ms("dense") / realized.ms("auto")
    r1[2].metric("auto vs dense · measured", f"{auto_x:.2f}×",
                 "faster" if auto_x > 1.05 else ("slower" if auto_x < 0.95 else "no real difference"),
                 delta_color="off", delta_arrow="off", help="Whole-model median of interleaved timed runs; auto's per-layer choice "
                                         "is in the table below.")
    r1[3].metric("Measured in", f"{realized.seconds:.1f} s", f"batch {realized.batch}, {realized.device.upper()}",
                 delta_color="off", delta_arrow="off")
    st.plotly_chart(paths_figure(realized.paths, realized.batch, realized.device), key="paths_chart")
    with st.expander("auto's choice per layer (measured ms per kernel)"):
        st.dataframe(realized.auto_layers, hide_index=True, width="stretch")
        st.caption("NaN: the kernel does not apply to the layer (see why_not) or was dropped after its warm-up "
                   "call took 4× the fastest one's. At the retention of a typical boundary setting (20–50 %), "
                   "PyTorch's dense convolutions usually beat CSR on CPU: expect auto ≈ dense for CNNs.")

with st.expander("Per-layer table"):
    shown = stats[["name", "type", "shape", "numel", "tau", "beta", "kept", "retention", "n_high", "n_low",
                   "switches", "compressed_bytes", "fp32_bytes"]]
    st.dataframe(shown, hide_index=True, width="stretch")
    st.caption("Counted per layer for the current setting; bytes are computed from the storage format.")

footer(view.timings, page="explore", budget_s=session.update_budget_s)

# ---------------------------------------------------------------- heavy work, after the first paint
# Each call below is one queued job. A slider move reruns the page: Streamlit stops this run at its
# next element update (a refined figure, or the "waiting" note a queued job shows every 0.1 s), so
# heavy work never delays the next first paint by more than one batch.
if state["latency_on"]:
    lat = view.latency
    if lat is None:
        def waiting_for_latency():
            show_latency(latency_slot, latency_detail, None, waiting=session.queue_state())

        waiting_for_latency()
        with guard("Measuring latency"):
            lat = session.measurements.latency(result, int(state["latency_batch"]), device(), poll=waiting_for_latency)
    show_latency(latency_slot, latency_detail, lat)
else:
    latency_slot.metric("Latency", "off", help="Measured on request: switch latency measurement on below.")

if view.accuracy_available:
    estimate = view.estimate
    target = float(state["accuracy_target"])
    data_label = literal(session.data_label())
    show_accuracy(accuracy_slot, accuracy_detail, estimate, target, level, data_label=data_label)
    collapsed = show_collapse(collapse_slot, session, config, estimate, view.repair_pending or level)

    def waiting_for_accuracy():
        show_accuracy(accuracy_slot, accuracy_detail, estimate, target, level, waiting=session.queue_state(),
                      data_label=data_label)

    repaired = True  # the model the estimate needs is there (a job level's repair first, with its progress)
    if level in JOB_LEVELS and view.repair is None:
        repaired = None
        with guard("Repairing the model"):
            repaired = await_repair(session, result, level, repair_box)
            if repaired is not None:
                show_repair(repaired, repair_box)
    if repaired is not None:
        with guard("Estimating the accuracy"):
            while not estimate_done(estimate, target):
                estimate = session.accuracy.refine(result, level, device(), poll=waiting_for_accuracy)
                show_accuracy(accuracy_slot, accuracy_detail, estimate, target, level, data_label=data_label)
                if not collapsed:  # drawn once per run (its button has one key)
                    collapsed = show_collapse(collapse_slot, session, config, estimate, view.repair_pending or level)
elif session.has_labels:
    accuracy_slot.metric("Accuracy", "n/a", help="See the note above.")
elif session.data is not None:
    with guard("Measuring the fidelity to the dense model"):
        measured = view.fidelity if view.fidelity is not None else session.accuracy.fidelity(result, device())
        accuracy_slot.metric("Top-1 agreement with dense · measured", f"{100 * measured.agreement:.1f} %",
                             f"mean KL {measured.mean_kl:.4f} nats on {measured.n:,} images", delta_color="off",
                             delta_arrow="off",
                             help=f"The share of your (unlabelled) images on which the compressed and the dense model "
                                  f"predict the same class (Wilson 95 % interval {100 * measured.agreement_low:.1f} to "
                                  f"{100 * measured.agreement_high:.1f} %), and the mean KL(p_dense ‖ p_compressed) "
                                  "of their softmax outputs.")
else:
    with guard("Measuring the output deviation"):
        deviation = view.deviation if view.deviation is not None else session.accuracy.deviation(result, device())
        accuracy_slot.metric("Output deviation · measured", f"{100 * deviation:.2f} %",
                             help="‖f_compressed(x) − f_dense(x)‖ / ‖f_dense(x)‖ over 256 Gaussian inputs: this "
                                  "model has no labelled data set, so this replaces accuracy.")
