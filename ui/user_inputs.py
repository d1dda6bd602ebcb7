"""The sidebar's torchvision model and evaluation-data choices, and turning them into a model and images.

Widgets leave what was chosen in ``st.session_state`` (``pending_torchvision``, ``data_upload``);
:func:`consume_pending_torchvision` loads the model (torchvision's pretrained weights are shared by
every session through ``st.cache_resource``; an uploaded state_dict stays in this session), and
:func:`prepare_data` reads the uploaded ``.zip`` for the current model's pre-processing (kept per
session, one set at a time) and hands it to the session. Errors are recorded as plain text and
shown literally (:func:`ui.errors.show_error`); file names are never used as paths.
"""
from __future__ import annotations

import hashlib
import json
import logging

import streamlit as st

from core.services.choices import LoadedModel, load_torchvision_pretrained
from core.services.session import ExploreSession
from core.services.user_tuning import class_mapping
from core.services.uploads import MAX_UPLOAD_MB, display_name, read_upload
from core.workloads import torchvision_models as tv
from core.workloads.data import CIFAR_MEAN, CIFAR_STD, DataError
from core.workloads.image_folder import ImageSet, read_image_zip
from core.workloads.models import CheckpointError
from core.workloads.preprocess import Preprocess
from ui.errors import literal, show_caption, show_error, show_warning

log = logging.getLogger("boundary_explorer")

WEIGHT_CHOICES = {"pretrained": "torchvision's pretrained weights (local torch hub cache)",
                  "upload": "upload a state_dict (.pt/.pth/.safetensors)"}
DATA_CHOICES = {"default": "CIFAR-10 test set (default)", "zip": "my images (.zip of class folders)"}
PREVIEW_IMAGES = 8
NO_FILE_YET = ("no state_dict uploaded yet: choose a .pt/.pth/.safetensors file above (and wait until its name "
               "shows under the uploader), or pick torchvision's pretrained weights.")
_TEXT_DEFAULTS = {"tv_image_size": tv.DEFAULT_IMAGE_SIZE, "tv_mean": ", ".join(map(str, tv.IMAGENET_MEAN)),
                  "tv_std": ", ".join(map(str, tv.IMAGENET_STD))}


@st.cache_resource(show_spinner="Loading torchvision's pretrained weights…", max_entries=2)
def shared_torchvision(name: str, preprocess_json: str | None) -> LoadedModel:
    """torchvision ``name`` with its pretrained weights, loaded once per process and shared (read-only).

    ``preprocess_json``: :meth:`Preprocess.to_dict` as JSON, or None for the weights' own transforms().
    """
    preprocess = None
    if preprocess_json is not None:
        preprocess = Preprocess.from_dict(json.loads(preprocess_json), "the sidebar")
    return load_torchvision_pretrained(name, preprocess)


# ---------------------------------------------------------------- the torchvision model

def _triple(text: str, what: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise CheckpointError(f"The {what} must be three numbers separated by commas, for example 0.5, 0.5, 0.5.")
    return values  # type: ignore[return-value]


def chosen_preprocess() -> Preprocess | None:
    """The pre-processing the widgets describe (None: the pretrained weights' own transforms())."""
    state = st.session_state
    if state.get("tv_weights", "pretrained") == "pretrained" and state.get("tv_own_transforms", True):
        return None
    return Preprocess.for_size(int(state.get("tv_image_size", tv.DEFAULT_IMAGE_SIZE)),
                               _triple(state.get("tv_mean", _TEXT_DEFAULTS["tv_mean"]), "mean"),
                               _triple(state.get("tv_std", _TEXT_DEFAULTS["tv_std"]), "standard deviation"))


def _on_load() -> None:
    """Leave the load request; with "upload" chosen but no file (yet), an error instead of other weights."""
    state = st.session_state
    if state.get("tv_weights") != "upload":
        state["pending_torchvision"] = (state.get("tv_arch", "resnet18"), None, None)
    elif (upload := state.get("tv_file")) is None:
        state["torchvision_error"] = NO_FILE_YET
    else:
        state["pending_torchvision"] = (state.get("tv_arch", "resnet18"), upload.getvalue(), upload.name)


def consume_pending_torchvision() -> None:
    """Load what :func:`render_torchvision` left in ``pending_torchvision``: (architecture, bytes or None, name)."""
    state = st.session_state
    pending = state.pop("pending_torchvision", None)
    if pending is None:
        return
    name, data, filename = pending
    try:
        preprocess = chosen_preprocess()
        with st.spinner(f"Loading torchvision {name}…"):
            if data is None:
                loaded = shared_torchvision(name, None if preprocess is None else json.dumps(preprocess.to_dict()))
            else:
                loaded = read_upload(data, filename, tv.arch_name(name), preprocess=preprocess)
    except CheckpointError as err:
        state["torchvision_error"] = str(err)
        return
    except Exception:  # anything unexpected is reported, never raised into the page
        log.exception("loading torchvision %r failed", name)
        state["torchvision_error"] = (f"torchvision {name} could not be loaded because of an unexpected error; "
                                      "the server log has the details.")
        return
    state.pop("torchvision_error", None)
    state["torchvision_model"] = loaded
    state["model_key"] = "torchvision"


def render_torchvision() -> None:
    """The torchvision choice: architecture, weights, pre-processing and the load button."""
    state = st.session_state
    names = list(tv.architectures_within())
    if state.get("tv_arch") not in names:
        state["tv_arch"] = "resnet18" if "resnet18" in names else names[0]
    for key, value in {**_TEXT_DEFAULTS, "tv_own_transforms": True}.items():
        state.setdefault(key, value)  # defaults through the state only: a widget given both warns
    st.selectbox("torchvision architecture", names, key="tv_arch",
                 help=f"Every classification model of torchvision.models up to "
                      f"{tv.MAX_TORCHVISION_PARAMS / 1e6:.0f} M parameters.")
    st.radio("Weights", list(WEIGHT_CHOICES), format_func=WEIGHT_CHOICES.get, key="tv_weights")
    if state["tv_weights"] == "pretrained":
        info = tv.pretrained(state["tv_arch"])
        st.caption(literal(f"Read from {info.path} (never downloaded; fetch {info.url} elsewhere and put it there)."))
        st.checkbox("Use the weights' own pre-processing (transforms())", key="tv_own_transforms")
    else:
        st.file_uploader(f"State dict of {state['tv_arch']} (≤ {MAX_UPLOAD_MB} MB)", key="tv_file",
                         max_upload_size=MAX_UPLOAD_MB,
                         help="Read with torch.load(weights_only=True) or safetensors; the number of classes is "
                              "read from the classifier's weight.")
    if state["tv_weights"] == "upload" or not state.get("tv_own_transforms", True):
        st.number_input("Image size (px)", min_value=8, max_value=1024, step=1, key="tv_image_size")
        st.text_input("Mean (R, G, B)", key="tv_mean")
        st.text_input("Std (R, G, B)", key="tv_std")
        st.caption(f"ImageNet: 224 px, mean {_TEXT_DEFAULTS['tv_mean']}. A 10-class model at 32 px is evaluated "
                   f"on CIFAR-10 (its mean {', '.join(map(str, CIFAR_MEAN))}, std {', '.join(map(str, CIFAR_STD))}).")
    waiting_for_file = state["tv_weights"] == "upload" and state.get("tv_file") is None
    st.button("Load this torchvision model", key="tv_load", on_click=_on_load, disabled=waiting_for_file,
              help="Upload a state_dict first." if waiting_for_file else None)
    if "torchvision_error" in state:
        show_error(f"torchvision model not loaded: {state['torchvision_error']}")
    if "torchvision_model" not in state:
        st.info("Nothing loaded yet: the pages show the first model of the list meanwhile.")


# ---------------------------------------------------------------- the evaluation data

def _on_data_file() -> None:
    uploaded = st.session_state.get("data_file")
    if uploaded is not None:
        st.session_state["data_upload"] = (uploaded.getvalue(), uploaded.name)


def render_data_choice(session: ExploreSession) -> None:
    """The evaluation-data choice (image models only), the uploader, and the chosen data's summary and preview."""
    state = st.session_state
    if session.loaded.input_kind == "vector":
        return
    state.setdefault("data_source", "default")
    default_label = "CIFAR-10 test set (default)" if session.evaluates_cifar else "none (output deviation)"
    st.radio("Evaluation data", list(DATA_CHOICES), key="data_source",
             format_func=lambda k: default_label if k == "default" else DATA_CHOICES[k])
    if state["data_source"] == "zip":
        st.file_uploader(f"Images (.zip, ≤ {MAX_UPLOAD_MB} MB): class_name/image.jpg, or images alone",
                         key="data_file", on_change=_on_data_file, max_upload_size=MAX_UPLOAD_MB,
                         help="Read in memory: no absolute paths, '..' or symbolic links; at most 2,000 images "
                              "(a class-balanced sample beyond); files that are not images are skipped and counted.")
    images = prepare_data(session)
    if "data_error" in state:
        show_error(f"Images not used: {state['data_error']}")
    if images is None:
        return
    show_caption(images.summary())
    for warning in session.data_warnings:
        show_warning(warning)
    with st.expander("Preview of the processed images"):
        shown = session.data.preview(PREVIEW_IMAGES) if session.data is not None else []
        if shown:
            st.image([pixels for pixels, _ in shown], caption=[literal(c) for _, c in shown], width=64)
        if session.data is not None and session.data.labelled:  # which output each class folder became
            mapped = [n for n in session.data.notes if n.startswith("Class folders map")]
            show_caption(mapped[-1] if mapped else "Class folders → model outputs:")
            st.dataframe(class_mapping(session.data), hide_index=True, key="data_class_map")


def prepare_data(session: ExploreSession) -> ImageSet | None:
    """Read the uploaded archive for this model's pre-processing and give it to ``session`` (or go back to
    the default data); returns the set in use. Errors are recorded in ``data_error``."""
    state = st.session_state
    upload = state.get("data_upload") if state.get("data_source") == "zip" else None
    if upload is None:
        session.use_data(None)
        return None
    data, filename = upload
    preprocess = session.loaded.input_preprocess()
    key = (hashlib.sha256(data).hexdigest(), preprocess.key())
    cached = state.get("_data_set")
    if cached is None or cached[0] != key:
        state.pop("data_error", None)
        try:
            with st.spinner(f"Reading {display_name(filename)}…"):
                cached = (key, read_image_zip(data, display_name(filename), preprocess))
        except (DataError, CheckpointError) as err:
            state["data_error"] = str(err)
            state.pop("_data_set", None)
            session.use_data(None)
            return None
        state["_data_set"] = cached
    session.use_data(cached[1])
    return cached[1]
