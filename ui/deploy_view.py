"""The Explore page's deployment table: the setting exported to ONNX and measured in ONNX Runtime and OpenVINO.

The work is ``session.measurements.deploy`` (:mod:`core.services.deploy_jobs`: a queued,
cancellable job shared by every session, its table cached per setting); this module draws the
button, the running job (the polling panel of :mod:`ui.tune_jobs`: progress, estimate, Cancel)
and the finished table with its files for download.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core.common.formatting import fmt_bytes
from core.measure.deploy_table import WHAT_GIVES_SPEED, DeployTable
from core.method.engine import CompressionResult
from core.services import tune_jobs
from core.services.jobs import Job
from core.services.session import ExploreSession
from ui.errors import literal
from ui.tune_jobs import start, track

SLOT = "explore_deploy_job"
WHAT = "Export to ONNX and measurement"


def _file_reader(path: Path):
    """Deferred bytes of a file for a download button (read only when clicked)."""
    return lambda: path.read_bytes()


def _summary(table: DeployTable) -> pd.DataFrame:
    """One row per (runtime, precision, model): latency per batch, speed-ups, accuracy, file size."""
    frame = table.table
    rows = []
    for (runtime, precision, model), group in frame.groupby(["runtime", "precision", "model"], sort=False):
        row = {"runtime": runtime, "precision": precision, "model": model}
        for _, r in group.iterrows():
            b = int(r["batch"])
            row[f"ms, batch {b}"] = r["latency_ms"]
            row[f"× vs torch dense, batch {b}"] = r["speedup_vs_torch_dense"]
            row[f"× vs same runtime dense, batch {b}"] = r["speedup_vs_runtime_dense"]
        first = group.iloc[0]
        row["accuracy %"] = None if pd.isna(first["accuracy"]) else 100 * first["accuracy"]
        row["Δ pts"] = None if pd.isna(first["delta"]) else 100 * first["delta"]
        row["file"] = None if pd.isna(first["bytes"]) else fmt_bytes(int(first["bytes"]))
        row["zipped"] = None if pd.isna(first["zipped_bytes"]) else fmt_bytes(int(first["zipped_bytes"]))
        rows.append(row)
    return pd.DataFrame(rows)


def _draw(table: DeployTable) -> None:
    frame = table.table
    collapsed = frame[frame["collapsed"].fillna(False).astype(bool)]
    for _, row in collapsed.drop_duplicates(["runtime", "precision", "model"]).iterrows():
        st.warning(f"{row['runtime']} {row['precision']} ({row['model']}): the accuracy collapsed "
                   f"({100 * row['delta']:+.1f} points against the dense torch model).")
    st.dataframe(_summary(table), hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.2f") for c in frame.columns})
    n = frame["n_images"].dropna()
    st.caption(f"Measured: median latency, one thread, every runtime interleaved with the torch baselines in one "
               f"run; accuracy from each runtime's own outputs on {int(n.max()) if len(n) else 0:,} evaluation "
               "images, paired against the dense torch model (Δ). Files: on disk, raw and zipped.")
    for note in table.notes:
        st.caption(literal(note))
    files = table.files
    a, b = st.columns(2)
    a.download_button(f"Download model.int8.onnx ({fmt_bytes(files.int8.stat().st_size)})", _file_reader(files.int8),
                      file_name="model.int8.onnx", mime="application/octet-stream", key="download_int8_onnx",
                      on_click="ignore")
    b.download_button(f"Download model.onnx, fp32 ({fmt_bytes(files.fp32.stat().st_size)})", _file_reader(files.fp32),
                      file_name="model.onnx", mime="application/octet-stream", key="download_fp32_onnx",
                      on_click="ignore")
    st.caption("Both load without this project: `onnxruntime.InferenceSession(\"model.int8.onnx\")` or "
               "`openvino.Core().compile_model(\"model.int8.onnx\")`; any batch size.")


def show_deploy(session: ExploreSession, result: CompressionResult, level: str) -> None:
    """The deployment table of the current setting: measured on request, cached for every session."""
    st.markdown("#### Deployed: ONNX Runtime and OpenVINO · measured")
    st.caption(WHAT_GIVES_SPEED)
    state = st.session_state
    watcher = id(session)
    key = session.measurements.deploy_key(result.config, level)
    job = state.get(SLOT)
    if isinstance(job, Job) and job.key != key:  # a job of another setting: let it go
        if not job.finished:
            tune_jobs.stop(job, watcher)
        del state[SLOT]
        job = None
    table = session.measurements.cached_deploy(result.config, level)
    if isinstance(job, Job):
        track(SLOT, WHAT, watcher, lambda found, _: _draw(found))
        return
    if table is not None:
        _draw(table)
        return
    why = session.measurements.deploy_unavailable(result.config, level)
    if why is not None:
        st.caption(why)
    elif st.button("Export to ONNX and measure in ONNX Runtime and OpenVINO", key="deploy_run",
                   help="Writes the fp32 and int8 (QDQ, the engine's own codes) ONNX files of this setting, then "
                        "times and evaluates them against torch. A minute or more on ResNet-18; runs in the "
                        "background, can be cancelled, and is kept for every session."):
        start(SLOT, session.measurements.deploy(result, level, watcher), watcher)
        st.rerun()
