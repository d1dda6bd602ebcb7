"""Export: download the compressed model (loadable back here) and the settings as JSON."""
import streamlit as st

from core.common.formatting import fmt_bytes, fmt_pct
from core.services.uploads import (
    MAX_SETTINGS_MB,
    display_name,
    export_bundle,
    packed_bytes,
    read_settings,
    settings_json,
)
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
    summary = (f"τ = {config.tau:g}" + (f", {len(config.layer_tau)} per-layer τ overrides" if config.layer_tau else "")
               + ("" if config.theta is None else f", θ = {config.theta:g} ({config.theta_mode}), "
                                                  f"{config.b_low}/{config.b_high} bit")
               + (", BatchNorm scales pruned too (paper pseudocode)" if config.include_norm else "")
               + (", BN recalibrated" if bn else ""))
    st.markdown(f"Setting: {summary} → retention {fmt_pct(result.retention, 2)}, stored size "
                f"{fmt_bytes(result.model_bytes_compressed)} (computed) vs {fmt_bytes(result.model_bytes_fp32)} fp32.")

    def bundle() -> bytes:
        model = session.inference_model(result, bn) if bn else None
        return export_bundle(result, loaded, model, bn_recalibrated=bn)

    stem = f"{loaded.arch.replace(':', '_')}_tau{config.tau:g}" + ("" if config.theta is None else f"_theta{config.theta:g}")
    a, b = st.columns(2)
    with a:
        st.subheader("Compressed model, packed")
        st.caption("The real savings on disk: per layer the keep-mask (or kept indices), the integer codes of each "
                   "chunk bit-packed at their bit-width, per-channel scales and the 1-bit chunk selector, in one "
                   "checksummed safetensors file (`core.deploy.packing`). Upload it back in the sidebar.")
        packed = state.setdefault("_packed", {})
        key = (loaded.key, config)
        if key not in packed and st.button("Pack the model", key="pack_model"):
            with st.spinner("Packing and verifying every layer…"):
                packed.clear()  # keep only the latest packed file in the session
                packed[key] = packed_bytes(result, loaded)
        if key in packed:
            data = packed[key]
            st.metric("File size · measured", fmt_bytes(len(data)),
                      f"computed stored size {fmt_bytes(result.model_bytes_compressed)}; "
                      f"fp32 {fmt_bytes(result.model_bytes_fp32)}", delta_color="off",
                      help="The file's bytes; the difference to the computed size is the container (header, "
                           "table, safetensors framing).")
            st.download_button("Download packed model (.safetensors)", data, file_name=f"{stem}.packed.safetensors",
                               mime="application/octet-stream", key="download_packed", on_click="ignore")
            if bn:
                st.caption("Note: the packed file holds the compressed weights with the BatchNorm statistics as "
                           "loaded, without the BN recalibration (use the .pt below for that).")
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
        text = settings_json(config, loaded, result, bn)
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
    try:  # read_settings refuses files over MAX_SETTINGS_BYTES before parsing them
        skipped = apply_config(read_settings(uploaded.getvalue()), session)
    except ValueError as err:  # ConfigError included: the message names the field (and may quote the file)
        show_error(f"{name} is not a settings file this app can apply: {str(err).rstrip('.')}. "
                   "Export a settings file above and load that one.")
    else:
        for note in skipped:  # names from the file: shown literally
            show_warning(note)
        st.success("Settings applied: open the Explore page to see them.")

footer(page="export")
