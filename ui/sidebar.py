"""The shared sidebar: model picker (shipped checkpoints, synthetic MLP, upload) and device picker."""
from __future__ import annotations

import streamlit as st

from core.services.choices import model_choices
from core.services.uploads import MAX_UPLOAD_MB
from core.workloads.models import REGISTRY
from ui.errors import literal, show_error
from ui.state import TORCHVISION_KEY, UPLOAD_KEY, consume_pending_upload, devices, explorer, guard
from ui.user_inputs import consume_pending_torchvision, render_data_choice, render_torchvision

AUTO_ARCH = "auto (from a file exported by this app)"


def _on_file() -> None:
    uploaded = st.session_state.get("upload_file")
    if uploaded is None:
        return
    arch = st.session_state.get("upload_arch", AUTO_ARCH)
    st.session_state["pending_upload"] = (uploaded.getvalue(), uploaded.name, None if arch == AUTO_ARCH else arch)


def render_sidebar():
    """Draw the sidebar; return this session's ExploreSession (None if no model could be prepared)."""
    choices = model_choices()
    labels = {c.key: c.label for c in choices}
    labels[UPLOAD_KEY] = "Upload a state_dict…"
    labels[TORCHVISION_KEY] = "torchvision model…"
    state = st.session_state
    if state.get("model_key") not in labels:
        state["model_key"] = choices[0].key
    consume_pending_upload()  # may switch model_key to the upload before the picker is drawn
    consume_pending_torchvision()  # likewise for a torchvision model
    with st.sidebar:
        st.selectbox("Model", list(labels), format_func=labels.get, key="model_key",
                     help="Shipped checkpoints are listed only when their JSON card exists in assets/checkpoints.")
        if state["model_key"] == UPLOAD_KEY:
            st.selectbox("Architecture of the upload", [AUTO_ARCH] + list(REGISTRY), key="upload_arch",
                         help="A plain state_dict needs its architecture; files exported by this app carry it.")
            # MB as Streamlit counts them (10^6 bytes in the browser): the label, the uploader's own
            # "200MB per file" and core.services.uploads.MAX_UPLOAD_BYTES name the same limit. No `type=`:
            # the format is read from the content (a .ckpt or misnamed file is fine), and Streamlit's own
            # extension check would raise on odd names (a NUL byte) before the app could answer.
            st.file_uploader(
                f"State dict (.pt/.pth/.safetensors, ≤ {MAX_UPLOAD_MB} MB)",
                key="upload_file", on_change=_on_file, max_upload_size=MAX_UPLOAD_MB,
                help="Loaded with torch.load(weights_only=True) or safetensors: nothing is unpickled. "
                     "The format is read from the content, whatever the file is called.")
            if "upload_error" in state:
                show_error(f"Upload rejected: {state['upload_error']}")
            if "uploaded_model" not in state:  # after a rejected file, not "nothing": that file was refused
                st.info(("No file loaded" if "upload_error" in state else "Nothing uploaded yet")
                        + ": the pages show the first model of the list meanwhile.")
        elif state["model_key"] == TORCHVISION_KEY:
            render_torchvision()
        st.radio("Device", devices(), key="device", horizontal=True,
                 help="Where inference (latency, accuracy) runs. The engine's weight bookkeeping stays on the CPU.")
        if "CUDA" not in devices():
            st.caption("No CUDA GPU found: CPU only.")
    session = None
    with guard("Preparing the model", "Pick another model in the sidebar."):
        session = explorer()
    if session is not None:
        with st.sidebar:
            loaded = session.loaded
            if loaded.trained:  # the note may name an uploaded file: shown literally
                st.caption(literal(loaded.note))
            else:
                st.warning(literal(loaded.note))
            with guard("Reading your images", "Upload another archive, or pick the default data."):
                render_data_choice(session)
    return session


def page_setup(need_model: bool = True):
    """Start of every page: session defaults, the shared sidebar, and this session's explorer.

    (Done by each page rather than by ``app.py`` so a page also works when run on its own,
    as ``streamlit.testing`` does after the first run.) With ``need_model`` the page stops
    with an error when no model could be prepared.
    """
    from core.services.threads import configure_threads
    from ui.state import init_state

    configure_threads()
    init_state()
    session = render_sidebar()
    st.session_state["_explorer_ready"] = session is not None
    if need_model and session is None:
        st.error("No model could be prepared. Pick another model in the sidebar (or reload the page).")
        st.stop()
    return session
