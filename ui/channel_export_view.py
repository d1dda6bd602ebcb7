"""The Export page's downloads in Explore's channel mode: the smaller model, packed and as a .pt bundle."""
from __future__ import annotations

import streamlit as st

from core.common.formatting import fmt_bytes
from core.method.channels import ChannelResult
from core.services.channel_export import channel_export_files
from core.services.channel_session import CHANNEL_LABELS
from ui import glossary


def channel_downloads(session, loaded, channel_result: ChannelResult, dense_fp32_bytes: int) -> None:
    """The packed file and the .pt bundle of ``channel_result`` (with the Explore page's channel repair when it ran)."""
    state = st.session_state
    with st.spinner("Packing the channel-pruned model and verifying every layer…"):
        files = channel_export_files(session, channel_result, state.get("explore_ch_repair", "none"))
    ch_stem = f"{loaded.arch.replace(':', '_')}_tauch{channel_result.config.tau:g}" + (
        "" if files.level == "none" else f"_{files.level}")
    st.subheader("Channel-pruned model, packed")
    st.caption("The smaller model itself: removed channels are gone from the tensors. The packed format of "
               "`core.deploy.packed_writer` (τ = 0, fp32 values) with the kept channels of every group in "
               "its checksummed header, so `core.deploy.channel_file.load_compressed(path)` rebuilds it with "
               "no template. Upload it back in the sidebar.")
    st.metric("File size · measured", fmt_bytes(len(files.packed)),
              f"dense fp32 {fmt_bytes(dense_fp32_bytes)}", delta_color="off", delta_arrow="off",
              help=glossary.help_for("measured"))
    if files.level != "none":
        st.caption(f"Carries the repair “{CHANNEL_LABELS[files.level]}” of the Explore page (fitted on "
                   f"{files.n_images} training images in {files.seconds:.1f} s · measured; recorded in "
                   "the file's header).")
    elif files.requested != "none":
        st.caption(f"The repair “{CHANNEL_LABELS[files.requested]}” has not run for this setting: the files "
                   "hold the smaller model without it. Run it on the Explore page, then come back.")
    st.download_button("Download packed model (.safetensors)", files.packed,
                       file_name=f"{ch_stem}.packed.safetensors", mime="application/octet-stream",
                       key="download_packed", on_click="ignore")
    st.subheader("Channel-pruned model, state_dict")
    st.download_button("Download model (.pt: state_dict + kept channels + settings)", files.bundle,
                       file_name=f"{ch_stem}.pt", mime="application/octet-stream", key="download_model",
                       on_click="ignore")
    st.caption("A `torch.save` dict of plain tensors and strings: `state_dict` (the smaller model's "
               "tensors), `channels` (JSON: the kept channels per group), `arch` and `settings` (JSON). "
               "Load it with `core.deploy.channel_file.load_channel_bundle(path)` (it reads with "
               "`torch.load(..., weights_only=True)`), or upload it back here.")
