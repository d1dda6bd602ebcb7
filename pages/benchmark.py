"""Benchmark: the paper's two benchmarks, run from the browser, beside the paper's tables."""
import streamlit as st
import torch

from core.measure.paper_suite import (
    BenchmarkError,
    CnnBenchmarkConfig,
    SyntheticBenchmarkConfig,
    run_cnn,
    run_synthetic,
)
from core.measure.paper_tables import PAPER_RESULTS, compare_with_paper
from core.services.choices import shipped_checkpoints
from ui import glossary
from ui.sidebar import page_setup
from ui.state import devices, footer, guard

state = st.session_state
page_setup(need_model=False)
st.title("Benchmark: the paper's experiments")
st.caption(f"Both benchmarks of the paper's section 4, with its defaults (τ = 0.2, batch 64, 5 runs, seed 42), "
           f"run on this machine. The paper's figures are quoted from {PAPER_RESULTS['source']}.")
device = "cuda" if state.get("device") == "CUDA" and "CUDA" in devices() else "cpu"


def _progress_bar(text: str):
    bar = st.progress(0.0, text=text)

    def update(done: int, total: int, label: str) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"{done}/{total}: {label}")

    return bar, update


#: the run table's column headers' tooltips: what each figure is, and whether it is counted or measured
RUN_COLUMNS = {
    "tau": st.column_config.NumberColumn("tau", help=glossary.term("τ")),
    "retention": st.column_config.NumberColumn("retention", help=glossary.help_for("retention", "counted")),
    "compute_reduction": st.column_config.NumberColumn(
        "compute_reduction", help="1 − retention: the share of the pruned layers' multiply-adds that could be "
                                  "skipped.\n\n" + glossary.help_for("counted")),
    **{column: st.column_config.NumberColumn(column, help=glossary.help_for("measured"))
       for column in ("inference_time_s", "inference_time_dense_s", "peak_memory_mib", "accuracy", "accuracy_dense")},
}


def _show(key: str, which: str) -> None:
    df = state.get(key)
    if df is None:
        return
    paper = PAPER_RESULTS[which]
    st.markdown(f"**Paper vs ours** — {paper['title']}")
    st.dataframe(compare_with_paper(df, which), hide_index=True, width="stretch")
    st.markdown("**Our runs** (one row per run, measured here)")
    shown = df[["run", "model", "dataset", "tau", "retention", "compute_reduction", "inference_time_s",
                "inference_time_dense_s", "peak_memory_mib", "accuracy", "accuracy_dense", "device"]]
    st.dataframe(shown, hide_index=True, width="stretch", column_config=RUN_COLUMNS)
    for note in df.attrs.get("notes", []):
        st.caption("Note: " + note)
    st.download_button("Download the CSV", df.to_csv(index=False).encode(), file_name=f"{which}_pruning_results.csv",
                       mime="text/csv", key=f"{key}_csv", on_click="ignore")


# ---------------------------------------------------------------- synthetic
st.subheader("5.1 Synthetic MLP (6 layers, 128 wide, Gaussian inputs)")
syn = SyntheticBenchmarkConfig()
st.caption(f"`python -m experiments.run_boundary_pruning_synthetic --layers {syn.layers} --in-dim {syn.in_dim} "
           f"--out-dim {syn.out_dim} --threshold {syn.threshold} --runs {syn.runs} --batch-size {syn.batch_size}` "
           f"— {syn.n_batches} timed batches per run after {syn.warmup} warm-up passes; a few seconds.")
if st.button("Run the synthetic benchmark", key="bench_syn_run", type="primary"):
    bar, update = _progress_bar("building the MLP…")
    with guard("The synthetic benchmark"):
        state["bench_syn"] = run_synthetic(SyntheticBenchmarkConfig(device=device), on_progress=update)
    bar.empty()
_show("bench_syn", "synthetic")

# ---------------------------------------------------------------- CNN
st.subheader("5.2 CIFAR-10 CNN")
shipped = shipped_checkpoints()
if not shipped:
    st.warning("No trained CIFAR-10 checkpoint is shipped yet (assets/checkpoints/*.json). Train one with "
               "`python -m core.train cifar_cnn`, then reload this page.")
else:
    a, b, c = st.columns(3)
    default = shipped.index("cifar_cnn") if "cifar_cnn" in shipped else 0
    model = a.selectbox("Checkpoint", shipped, index=default, key="bench_model",
                        help="The paper does not say which CNN it used; cifar_cnn is the closest (a compact VGG-style net).")
    quick = b.toggle("quick: accuracy on 1,280 test images", False, key="bench_quick",
                     help="Off: all 10,000 test images per run, as the paper (about a minute on this CPU).")
    paper_norm = c.toggle("paper pseudocode: prune BatchNorm scales too", False, key="bench_norm",
                          help="The paper's `hasattr(layer, 'weight')` also prunes BatchNorm scales.")
    bn = c.toggle("BN recalibration after pruning", False, key="bench_bn", help=glossary.term("repair levels"))
    cnn = CnnBenchmarkConfig(model=model, max_batches=20 if quick else None, include_norm=paper_norm,
                             bn_recalibrate=bn, device=device)
    st.caption(f"`python -m experiments.run_boundary_pruning_cnn --dataset cifar10 --model {model} --threshold "
               f"{cnn.threshold} --batch-size {cnn.batch_size} --runs {cnn.runs}`"
               + (" (quick subset)" if quick else "") + f" — accuracy on {cnn.eval_images:,} test images per run.")
    if st.button("Run the CIFAR-10 benchmark", key="bench_cnn_run", type="primary"):
        bar, update = _progress_bar("loading the checkpoint and the test set…")
        with guard("The CIFAR-10 benchmark"):
            try:
                state["bench_cnn"] = run_cnn(cnn, on_progress=update)
            except BenchmarkError as err:
                st.error(f"The benchmark cannot start: {err}")
        bar.empty()
    _show("bench_cnn", "cnn")

st.caption("Measured: times (mean of timed forward passes after warm-up), peak memory (memory_profiler, the whole "
           "process) and accuracy. Counted: retention and compute reduction. The paper's values are quoted, not rerun. "
           f"PyTorch runs with {torch.get_num_threads()} thread(s) in this app (`BOUNDARY_TORCH_THREADS`); the "
           "command-line benchmarks use PyTorch's default.")
footer(page="benchmark")
