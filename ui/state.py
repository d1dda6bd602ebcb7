"""Per-session state, the shared (read-only) model cache, error handling and the page footer.

Everything a user sets lives in ``st.session_state`` under the keys of :data:`DEFAULTS`, so
browser tabs and users never share settings. Models loaded for the picker are cached with
``st.cache_resource`` and shared between sessions: they are only ever read (the engine
snapshots them; inference runs them in eval mode).

The accuracy repair is the level under ``"repair"`` (:data:`core.services.repairs.LEVELS`).
``"bn_recal"``, the BN-recalibration toggle it replaced, is kept as a mirror (true for every
level above ``"none"``, all of which recalibrate BatchNorm) for the pages and settings that
still read or write it; :func:`sync_repair` maps a change made to it alone onto the level.
"""
from __future__ import annotations

import logging
import statistics
import time
from contextlib import contextmanager

import streamlit as st
import torch
from streamlit.runtime.scriptrunner import get_script_run_ctx

from core.common.timing import percentile
from core.services.choices import LoadedModel, load_choice, model_choices
from core.services.presets import DEFAULT as DEFAULT_PRESET
from core.services.repairs import check_level
from core.services.uploads import read_upload
from core.workloads.data import DataError
from core.method.config import CompressionConfig
from core.services.session import ExploreSession
from core.services.session_accuracy import DEFAULT_ACCURACY_TARGET
from core.workloads.models import CheckpointError

log = logging.getLogger("boundary_explorer")

UPLOAD_KEY = "upload"
TORCHVISION_KEY = "torchvision"
PALETTE = (2, 3, 4, 8)
#: every persistent setting and its default: the compression setting and repair of the first preset
#: (:data:`core.services.presets.DEFAULT`, a setting that shows the method working)
DEFAULTS: dict[str, object] = {
    "tau": DEFAULT_PRESET.config.tau,
    "quantize": DEFAULT_PRESET.config.quantized,
    "theta_mode": DEFAULT_PRESET.config.theta_mode,
    "theta_relative": DEFAULT_PRESET.config.theta,
    "theta_fraction": 0.5,
    "theta_absolute": 0.05,
    "b_low": DEFAULT_PRESET.config.b_low,
    "b_high": DEFAULT_PRESET.config.b_high,
    "repair": DEFAULT_PRESET.repair,
    "repair_auto": False,
    "bn_recal": DEFAULT_PRESET.repair != "none",  # mirror of "repair" != "none" (the old key; see sync_repair)
    "include_norm": False,
    "hist_log": False,
    "latency_on": True,
    "latency_batch": 1,
    "accuracy_target": DEFAULT_ACCURACY_TARGET,
    "device": "CPU",
    # Explore's channel granularity (core.services.channel_session); "weight" keeps the page as it was
    "explore_granularity": "weight",
    "explore_tau_ch": 0.5,
    "explore_ch_norm": "l2",
    "explore_ch_fold_bn": True,
    "explore_ch_repair": "none",
}
# widget keys whose state must survive page switches (Streamlit drops state of unrendered widgets)
WIDGET_KEYS = tuple(DEFAULTS) + ("model_key", "hist_layer", "upload_arch", "tv_arch", "tv_weights",
                                  "tv_own_transforms", "tv_image_size", "tv_mean", "tv_std", "data_source",
                                  "explore_ch_group")


KEEP_PREFIX = "_keep_"  # a widget's value, kept under a key no widget owns (see init_state)


def set_widget(key: str, value: object) -> None:
    """Set a widget's value from code (a preset, a loaded file, a callback): the widget and its kept copy.

    The kept copy (:func:`init_state`) is what restores the widget on a page that does not draw it.
    """
    state = st.session_state
    if key in state:  # drop the widget's own value too: a widget not drawn in this run would shadow the new one
        del state[key]
    state[key] = value
    state[KEEP_PREFIX + key] = value


def init_state() -> None:
    """Defaults for new sessions, and keep widget values alive across pages, without ever overriding a widget.

    Streamlit drops a widget's key from the state at the end of a run that did not draw it
    (another page), and a widget's identity includes its page (the sidebar's model picker on
    Export is another widget than on Explore), so each widget's value is also kept under
    ``_keep_<key>`` and written back from there only when the key is missing or the page changed. Writing a widget's own key on every run (the usual
    ``state[key] = state[key]``) would not do: a value written through Session State is sent
    back to the browser as the widget's value, and it is the value this run *started* with, so
    a key press made while the page reruns is overwritten and lost (measured: 10 ArrowRight
    presses on τ at 4/s landed as +0.09, at 8/s as +0.08).
    """
    state = st.session_state
    state["_run_started"] = time.perf_counter()
    ctx = get_script_run_ctx()
    page = None if ctx is None else ctx.page_script_hash
    new_page = state.get("_page") != page  # a widget's id includes its page: the same key is a new widget there
    state["_page"] = page
    for key in WIDGET_KEYS:
        kept = KEEP_PREFIX + key
        if kept in state and (new_page or key not in state):
            state[key] = state[kept]
    for key, value in DEFAULTS.items():
        if key not in state:
            state[key] = value
    for key in WIDGET_KEYS:
        if key in state:
            state[KEEP_PREFIX + key] = state[key]
    state.setdefault("layer_tau", {})
    state.setdefault("update_times_ms", {})


@st.cache_resource(show_spinner="Loading the model…", max_entries=6)
def shared_model(key: str) -> LoadedModel:
    """A picker model, loaded once per server process and shared by every session (read-only)."""
    return load_choice(key)


def devices() -> list[str]:
    return ["CPU"] + (["CUDA"] if torch.cuda.is_available() else [])


def device() -> str:
    chosen = st.session_state.get("device", "CPU")
    return "cuda" if chosen == "CUDA" and torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- uploads

def process_upload(data: bytes, filename: str, arch: str | None) -> None:
    """Validate and load an uploaded checkpoint into this session (never shared), or record the error.

    The recorded message is plain text (the sidebar shows it with :func:`ui.errors.show_error`);
    the file name is never used as a path.
    """
    from core.services.uploads import display_name

    state = st.session_state
    try:
        loaded = read_upload(data, filename, arch)
    except CheckpointError as err:
        state["upload_error"] = str(err)
        return
    except Exception:  # anything unexpected is still reported, never raised into the page
        log.exception("upload of %r failed", filename)
        state["upload_error"] = (f"{display_name(filename)} could not be loaded because of an unexpected error; "
                                 "the server log has the details.")
        return
    state.pop("upload_error", None)
    state["uploaded_model"] = loaded
    state["model_key"] = UPLOAD_KEY


def consume_pending_upload() -> None:
    """Process the file the uploader (or a test) left in ``pending_upload``: (bytes, name, arch or None)."""
    pending = st.session_state.pop("pending_upload", None)
    if pending is not None:
        data, filename, arch = pending
        with st.spinner(f"Checking and loading {filename}…"):
            process_upload(data, filename, arch)


# ---------------------------------------------------------------- the session's explorer

def _reset_model_state(session: ExploreSession) -> None:
    state = st.session_state
    state["layer_tau"] = {}
    set_widget("hist_layer", session.largest_layer())
    top = session.global_max_abs()
    set_widget("theta_absolute", float(f"{0.3 * session.typical_max_abs():.3g}"))  # some weights on each side
    state["_theta_absolute_max"] = float(f"{top * 1.001:.4g}") if top > 0 else 1.0  # rounded up
    state["layer_tau_editor_version"] = state.get("layer_tau_editor_version", 0) + 1
    if session.loaded.recorded is not None:  # an export of this app: the sliders take its setting
        apply_config(session.loaded.recorded.config, session, repair="none")


def explorer() -> ExploreSession | None:
    """This session's :class:`ExploreSession` for the selected model (built on first use or model change).

    While "upload" is picked and nothing valid is uploaded yet, the first picker model is shown.
    """
    state = st.session_state
    key = state.get("model_key")
    if key is None:
        return None
    loaded = None
    if key in (UPLOAD_KEY, TORCHVISION_KEY):
        held = state.get("uploaded_model" if key == UPLOAD_KEY else "torchvision_model")
        if held is not None:
            loaded = held
        else:
            key = model_choices()[0].key
    want = loaded.key if loaded is not None else key
    session = state.get("explorer")
    if session is not None and session.key == want:
        return session
    with st.spinner("Preparing the engine (snapshot and ranking of every weight)…"):
        if loaded is None:
            loaded = shared_model(key)
        session = ExploreSession(loaded)
    state["explorer"] = session
    _reset_model_state(session)
    return session


def current_config(session: ExploreSession) -> tuple[CompressionConfig, list[str]]:
    """The compression setting of the controls, and notes about adjustments made to it."""
    state = st.session_state
    notes = []
    include_norm = bool(state.get("include_norm", False))
    theta = None
    mode = state.get("theta_mode", "relative")
    if state.get("quantize", True):
        theta = float(state.get(f"theta_{mode}", 0.3))
    b_low, b_high = int(state.get("b_low", 4)), int(state.get("b_high", 8))
    if b_low > b_high:
        notes.append(f"b_low ({b_low}) was above b_high ({b_high}); they are swapped.")
        b_low, b_high = b_high, b_low
    valid = set(session.layer_names(include_norm))
    overrides = {name: float(v) for name, v in state.get("layer_tau", {}).items() if name in valid}
    config = CompressionConfig(tau=float(state.get("tau", 0.2)), theta=theta, theta_mode=mode,
                               b_low=b_low, b_high=b_high, layer_tau=overrides, include_norm=include_norm)
    return config, notes


def apply_config(config: CompressionConfig, session: ExploreSession | None = None, *,
                 bn_recalibrate: bool | None = None, repair: str | None = None) -> list[str]:
    """Write ``config`` into the widgets' state, so that :func:`current_config` gives it back.

    ``session``: the model it is applied to; per-layer τ for layers that model does not have
    are left out, and listed in the returned notes (nothing is dropped silently).
    ``repair``: also set the repair level (:data:`core.services.repairs.LEVELS`);
    ``bn_recalibrate`` (the old toggle, used when ``repair`` is None): True sets the
    ``"bn"`` level, False ``"none"``. Raises ``ValueError`` for bit-widths outside the app's
    palette or an unknown level.
    """
    if config.quantized and not {config.b_low, config.b_high} <= set(PALETTE):
        raise ValueError(f"bit-widths {config.b_low}/{config.b_high} are not in the app's palette {PALETTE}")
    if repair is not None:
        check_level(repair)
    state = st.session_state
    overrides = dict(config.layer_tau)
    notes = []
    if session is not None:
        valid = set(session.layer_names(config.include_norm))
        unknown = sorted(set(overrides) - valid)
        if unknown:
            notes.append(f"{len(unknown)} per-layer τ value(s) not applied, for layers this model does not have: "
                         + ", ".join(unknown[:10]) + (" …" if len(unknown) > 10 else ""))
        overrides = {name: tau for name, tau in overrides.items() if name in valid}
    set_widget("tau", config.tau)
    set_widget("quantize", config.quantized)
    set_widget("theta_mode", config.theta_mode)
    if config.quantized:
        set_widget(f"theta_{config.theta_mode}", config.theta)
        top = state.get("_theta_absolute_max", 1.0)
        if config.theta_mode == "absolute" and config.theta > top:
            state["_theta_absolute_max"] = float(f"{config.theta:.4g}")  # the slider reaches the value applied
            notes.append(f"θ = {config.theta:g} (absolute) is above every weight of this model (max|W| = {top:g}): "
                         "every kept weight takes the b_low chunk. The θ slider now reaches that value.")
    set_widget("b_low", config.b_low)
    set_widget("b_high", config.b_high)
    set_widget("include_norm", config.include_norm)
    state["layer_tau"] = overrides
    state["layer_tau_editor_version"] = state.get("layer_tau_editor_version", 0) + 1
    if repair is None and bn_recalibrate is not None:
        repair = "bn" if bn_recalibrate else "none"
    if repair is not None:
        set_repair(repair)
    return notes


_REPAIR_WRITTEN = "_repair_written"  # the (level, bn_recal) pair set_repair wrote last


def set_repair(level: str) -> None:
    """Set the repair level and its ``bn_recal`` mirror (``ValueError`` for an unknown level)."""
    state = st.session_state
    set_widget("repair", check_level(level))
    set_widget("bn_recal", level != "none")
    state[_REPAIR_WRITTEN] = (state["repair"], state["bn_recal"])


def sync_repair() -> str:
    """Reconcile the repair level with the old ``bn_recal`` key; return the level.

    Whichever of the two changed since :func:`set_repair` last wrote them wins: a new level
    as it is; ``bn_recal`` alone (code that predates the levels, an old session) gives ``"bn"``
    when true and ``"none"`` when false. Before anything was written, a level other than
    ``"none"`` wins, else ``bn_recal``. An unknown level stored in the state is ``"none"``.
    """
    state = st.session_state
    level = state.get("repair", "none")
    try:
        check_level(level)
    except ValueError:
        level = "none"
    bn = bool(state.get("bn_recal", False))
    written = state.get(_REPAIR_WRITTEN)
    if written is None:
        if level == "none" and bn:
            level = "bn"
    elif level == written[0] and bn != written[1]:
        level = "bn" if bn else "none"
    set_repair(level)
    return level


# ---------------------------------------------------------------- errors and the footer

@contextmanager
def guard(what: str, hint: str = "Try another setting or model; if it persists, reload the page."):
    """Show any error inside as ``st.error`` with what to do (never a traceback).

    Messages may quote files (names, keys) and libraries: they are shown literally, never as
    markdown, without escape codes (:func:`ui.errors.show_error`).
    """
    from core.common.formatting import printable
    from ui.errors import show_error

    def text(err: BaseException) -> str:
        return printable(err, 300).rstrip(".") or type(err).__name__

    try:
        yield
    except (CheckpointError, DataError, FileNotFoundError) as err:
        show_error(f"{what}: {text(err)}. {hint}")
    except (ValueError, TypeError, KeyError) as err:
        log.exception("%s failed", what)
        show_error(f"{what}: {text(err)}. {hint}")
    except torch.cuda.OutOfMemoryError:
        show_error(f"{what}: the GPU ran out of memory. Pick a smaller batch or the CPU in the sidebar.")
    except Exception as err:  # noqa: BLE001 (the page must never show a traceback)
        log.exception("%s failed", what)
        show_error(f"{what} failed because of an unexpected error ({type(err).__name__}: {text(err)}). {hint}")


def record_update_time(page: str, ms: float, limit: int = 200) -> list[float]:
    times = st.session_state.setdefault("update_times_ms", {}).setdefault(page, [])
    times.append(ms)
    del times[:-limit]
    return times


def footer(breakdown: dict[str, float] | None = None, page: str = "page", budget_s: float | None = None) -> None:
    """Server-side time of this run (script start → here), the breakdown, and p50/p95 on this page this session."""
    started = st.session_state.get("_run_started")
    if started is None:
        return
    elapsed_ms = (time.perf_counter() - started) * 1e3
    times = record_update_time(page, elapsed_ms)
    text = f"Server-side update time: {elapsed_ms:.0f} ms (this run, script start to footer)"
    if len(times) >= 2:
        text += (f" · {page} page, this session: p50 {statistics.median(times):.0f} ms, "
                 f"p95 {percentile(times, 95):.0f} ms over {len(times)} runs (the first includes loading)")
    if budget_s is not None:
        text += f" · budget for this model: {1e3 * budget_s:.0f} ms (p95)"
    if breakdown:
        parts = ", ".join(f"{k.replace('_', ' ')} {v * 1e3:.0f}" for k, v in breakdown.items() if k != "total")
        text += f" · of which (ms): {parts}"
    st.divider()
    st.caption(text)
