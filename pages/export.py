"""Export: download the compressed model (loadable back here) and the settings as JSON."""
import streamlit as st

from core.common.formatting import fmt_bytes, fmt_pct
from core.services import export_repair
from core.services.recorded import settings_for_other_model
from core.services.uploads import (
    MAX_SETTINGS_MB,
    display_name,
    export_bundle,
    read_settings,
    read_settings_channels,
    read_settings_repair,
    settings_json,
)
from ui import glossary
from ui.channel_export_view import channel_downloads
from ui.channel_view import apply_channel_setting, channel_config
from ui.errors import literal, show_error, show_warning
from ui.sidebar import page_setup
from ui.state import apply_config, current_config, footer, guard

session = page_setup()
loaded = session.loaded
state = st.session_state

st.title("Export")
st.caption(f"Current model: **{literal(loaded.label)}**. The export uses the setting of the Explore page.")

with guard("Preparing the export"):
    config, notes = current_config(session)
    for note in notes:
        st.warning(note)
    result = session.apply(config)
    bn = bool(state.get("bn_recal")) and session.has_batchnorm and session.evaluates_cifar
    channel_result = None
    if state.get("explore_granularity") == "channel":  # Explore's channel mode: the files hold the smaller model
        channel_result = session.channels.pruner().apply(channel_config())
        st.markdown(f"Setting: channel granularity, τ_ch = {channel_result.config.tau:g} → counted MACs "
                    f"{fmt_pct(channel_result.mac_ratio)} of dense, parameters "
                    f"{fmt_pct(channel_result.params / channel_result.params_dense)} of dense (the weight-level τ "
                    "and θ are not applied inside the kept channels, as on the Explore page).")
    else:
        summary = (f"τ = {config.tau:g}"
                   + (f", {len(config.layer_tau)} per-layer τ overrides" if config.layer_tau else "")
                   + ("" if config.theta is None else f", θ = {config.theta:g} ({config.theta_mode}), "
                                                      f"{config.b_low}/{config.b_high} bit")
                   + (", BatchNorm scales pruned too (paper pseudocode)" if config.include_norm else "")
                   + (", BN recalibrated" if bn else ""))
        st.markdown(f"Setting: {summary} → retention {fmt_pct(result.retention, 2)}, stored size "
                    f"{fmt_bytes(result.model_bytes_compressed)} (computed) vs "
                    f"{fmt_bytes(result.model_bytes_fp32)} fp32.")

    def bundle() -> bytes:
        model = session.repairs.model(result, bn) if bn else None
        return export_bundle(result, loaded, model, bn_recalibrated=bn)

    stem = f"{loaded.arch.replace(':', '_')}_tau{config.tau:g}" + ("" if config.theta is None else f"_theta{config.theta:g}")
    a, b = st.columns(2)
    with a:
        if channel_result is not None:
            channel_downloads(session, loaded, channel_result, result.model_bytes_fp32)
        else:
            st.subheader("Compressed model, packed")
            st.caption("The real savings on disk: per layer the keep-mask (bitmap, index list or Elias-Fano code, "
                       "whichever is smallest), the integer codes of each chunk bit-packed at their bit-width, "
                       "per-channel scales and the chunk selector, in one "
                       "checksummed safetensors file (`core.deploy.packed_writer`). Upload it back in the sidebar.")
            why_not = export_repair.unavailable(session)
            levels = list(export_repair.LABELS)
            explored = state.get("repair", "none")  # the Explore page's repair level, the default here
            method = st.radio(
                "Repair before packing", levels, format_func=export_repair.LABELS.get, key="export_repair",
                index=levels.index(explored) if explored in levels else 0, horizontal=True,
                disabled=why_not is not None,
                help="Without retraining, on augmented CIFAR-10 training images (never the test images): BatchNorm "
                     "statistics re-estimated; + each pruned layer's per-channel mean restored; + the kept weights "
                     "re-solved layer by layer (least squares against the dense model; quantized at the same "
                     "bit-widths). The mask, the bit-widths and the file's size stay.")
            reason = why_not or export_repair.unavailable(session, method)
            if reason is not None:
                st.caption(reason)
                method = "none"
            elif method != "none":
                with st.spinner("Estimating the repair time…"):
                    seconds = export_repair.estimate(session, result, method)
                st.caption(f"Repair time · estimated: about {seconds:.0f} s on this server now (from a few timed "
                           "forward passes; a busy server takes longer; a repair made before is reused at once).")
            packed = state.setdefault("_packed", {})  # key → the file's bytes
            repaired = state.setdefault("_packed_repair", {})  # key → the same file, with its repair
            key = (loaded.key, config, method)
            if key not in packed and st.button("Pack the model", key="pack_model"):
                bar = st.progress(0.0, text="Repairing…") if method != "none" else None

                def progress(done: int, total: int, layer: str) -> None:
                    bar.progress(done / max(total, 1), text=f"Repairing: {done}/{total} layers ({literal(layer)})")

                with st.spinner("Repairing, packing and verifying every layer…"):
                    packed.clear()  # keep only the latest packed file in the session
                    repaired.clear()
                    repaired[key] = export_repair.repaired_packed(session, result, method, on_progress=progress)
                    packed[key] = repaired[key].data
                if bar is not None:
                    bar.empty()
            if key in packed and key in repaired:
                file = repaired[key]
                st.metric("File size · measured", fmt_bytes(len(file.data)),
                          f"computed stored size {fmt_bytes(result.model_bytes_compressed)}; "
                          f"fp32 {fmt_bytes(result.model_bytes_fp32)}", delta_color="off", delta_arrow="off",
                          help="The file's bytes; the difference to the computed size is the container (header, "
                               "table, safetensors framing).\n\n" + glossary.help_for("measured", "computed"))
                if file.method != "none":
                    st.caption(f"Carries the repair “{export_repair.LABELS[file.method]}” (fitted on {file.n_images} "
                               f"training images in {file.seconds:.1f} s · measured; {file.changed} tensors changed, "
                               "recorded in the file's header).")
                suffix = "" if file.method == "none" else f"_{file.method}"
                st.download_button("Download packed model (.safetensors)", file.data,
                                   file_name=f"{stem}{suffix}.packed.safetensors",
                                   mime="application/octet-stream", key="download_packed", on_click="ignore")
                if bn and file.method == "none":
                    st.caption("Note: this packed file holds the BatchNorm statistics as loaded, without the BN "
                               "recalibration: choose a repair above to carry it (or use the .pt below).")
            st.subheader("Compressed model, state_dict")
            st.download_button("Download model (.pt: state_dict + masks + settings)", bundle, file_name=f"{stem}.pt",
                               mime="application/octet-stream", key="download_model", on_click="ignore")
            st.caption("A `torch.save` dict of plain tensors and strings: `state_dict` (the compressed weights, "
                       "dequantized to fp32" + (", BatchNorm recalibrated" if bn else "") + "), `masks` (bool "
                       "keep-masks per layer, usable with `torch.nn.utils.prune.custom_from_mask`), `arch` and "
                       "`settings` (JSON). Load it with `torch.load(path, weights_only=True)`, or upload it back here "
                       "(sidebar → Upload; the architecture is read from the file).")
    with b:
        st.subheader("Settings")
        if channel_result is not None:  # Explore's channel mode: the file records τ_ch
            st.caption(f"Channel granularity: τ_ch = {channel_result.config.tau:g}, counted MACs "
                       f"{fmt_pct(channel_result.mac_ratio)} of dense; the file records the kept channels.")
        text = settings_json(config, loaded, result, bn, channels=channel_result,
                             repair=state.get("explore_ch_repair" if channel_result is not None else "repair"))
        st.download_button("Download settings (.json)", text, file_name=f"{stem}.json", mime="application/json",
                           key="download_settings", on_click="ignore")
        with st.expander("Show the JSON"):
            st.code(text, language="json")

st.subheader("Load settings")
st.caption("Upload a settings JSON exported here to set the Explore sliders to it.")
# no `type=`: the content is parsed whatever the name (Streamlit's extension check raises on odd names)
uploaded = st.file_uploader(f"Settings JSON (≤ {MAX_SETTINGS_MB} MB)", key="settings_file",
                            max_upload_size=MAX_SETTINGS_MB)
if uploaded is not None and st.button("Apply these settings", key="apply_settings"):
    name = display_name(uploaded.name)
    other_model = None
    try:  # read_settings refuses files over MAX_SETTINGS_BYTES before parsing them
        config, level = read_settings(uploaded.getvalue()), read_settings_repair(uploaded.getvalue())
        channels = read_settings_channels(uploaded.getvalue())
        other_model = settings_for_other_model(uploaded.getvalue(), session.loaded.arch, session.loaded.arch_kwargs)
        if other_model:
            skipped = []
        elif channels is not None:  # a channel-granularity file: Explore's channel mode at its τ_ch
            skipped = apply_channel_setting(channels, level)
        else:
            skipped = apply_config(config, session, repair=level)
    except ValueError as err:  # ConfigError included: the message names the field (and may quote the file)
        show_error(f"{name} is not a settings file this app can apply: {str(err).rstrip('.')}. "
                   "Export a settings file above and load that one.")
    else:
        if other_model:
            show_error(f"{name} was not applied: {other_model}. Load that model first, or export this model's "
                       "own settings.")
        else:
            for note in skipped:  # names from the file: shown literally
                show_warning(note)
            st.success("Settings applied: open the Explore page to see them.")

footer(page="export")
