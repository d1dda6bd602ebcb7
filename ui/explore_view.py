"""How the Explore page shows its heavier figures as they arrive: the paired accuracy estimate and the latency.

Each function fills placeholders (``st.empty()``) the page laid out during its first paint,
so a figure refines in place.
"""
from __future__ import annotations


from core.common.formatting import fmt_pct
from core.measure.latency import LatencyReport
from core.measure.paired import PairedEstimate
from core.services.compute_queue import QueueState
from core.services.repairs import LABELS as REPAIR_LABELS


def estimate_done(estimate: PairedEstimate | None, target: float) -> bool:
    """Refinement stops when the paired interval is within ``target`` (a fraction) or every image is in."""
    if estimate is None:
        return False
    return estimate.complete or (target > 0 and estimate.delta_half_width <= target)


def _waiting_text(waiting: QueueState | None) -> str:
    if waiting is None or not waiting.busy:
        return "measuring…"
    return f"waiting for the shared CPU ({waiting.running} job(s) running, {waiting.waiting} waiting)…"


def show_accuracy(slot, detail, estimate: PairedEstimate | None, target: float, repair: bool | str = "none",
                  waiting: QueueState | None = None,
                  data_label: str = "the CIFAR-10 test set (JPEG copy)") -> None:
    """Fill the accuracy metric and its detail line; ``repair``: the repair level of the figures (True: ``"bn"``)."""
    level = "bn" if repair is True else ("none" if repair is False else repair)
    repaired = "" if level == "none" else f" After repair: {REPAIR_LABELS[level]}."
    if estimate is None:
        slot.metric("Accuracy Δ vs dense · paired", "…", help=_waiting_text(waiting) + repaired)
        detail.caption(f"Accuracy{'' if level == 'none' else ' (' + REPAIR_LABELS[level] + ')'}: "
                       f"{_waiting_text(waiting)}")
        return
    low, high = estimate.delta_interval
    status = ("all images" if estimate.complete else
              "done" if estimate_done(estimate, target) else _waiting_text(waiting) if waiting else "refining…")
    slot.metric(f"Accuracy Δ vs dense · paired, ±{100 * estimate.delta_half_width:.1f}",
                f"{100 * estimate.delta:+.2f} pts",
                f"{fmt_pct(estimate.accuracy)} vs dense {fmt_pct(estimate.dense_accuracy)} on {estimate.n:,} images",
                delta_color="off", delta_arrow="off",
                help="The compressed model's accuracy minus the dense model's, on the same test images (a growing, "
                     f"class-balanced sample of {data_label}), with its paired 95 % interval "
                     f"[{100 * low:+.2f}, {100 * high:+.2f}] points." + repaired)
    share = estimate.n / estimate.population
    detail.markdown(
        f"**Δ = {100 * estimate.delta:+.2f} points** (95 % interval {100 * low:+.2f} to {100 * high:+.2f}), "
        f"measured on {estimate.n:,} of {estimate.population:,} test images ({fmt_pct(share)}): "
        f"{estimate.newly_wrong:,} newly wrong, {estimate.newly_right:,} newly right. Accuracy "
        + ("" if level == "none" else f"(repair: {REPAIR_LABELS[level]}) ")
        + f"{fmt_pct(estimate.accuracy, 2)} compressed, {fmt_pct(estimate.dense_accuracy, 2)} dense on the same images. "
        f"Inference in {estimate.precision}" + (" (its predictions agree with fp32 on ≥ 99.5 % of the test set)"
                                                if estimate.precision != "fp32" else "") + f". Status: {status}.")


def show_latency(slot, detail, latency: LatencyReport | None, waiting: QueueState | None = None) -> None:
    if latency is None:
        slot.metric("Latency · measured", "…", help=_waiting_text(waiting))
        detail.caption(f"Latency: {_waiting_text(waiting)}")
        return
    label = f"Latency, batch {latency.batch} · measured" + ("" if latency.quiet else " under load")
    slot.metric(label, f"{latency.compressed_ms:.2f} ms",
                f"{latency.compressed_ms - latency.dense_ms:+.2f} ms vs dense {latency.dense_ms:.2f} ms",
                delta_color="inverse",
                help=f"Median of {latency.runs} timed forward passes of each model on {latency.device.upper()}, one "
                     "thread, dense and compressed alternating after a warm-up. The compressed model stores zeros "
                     "densely, so PyTorch runs the same kernels: expect no speed-up from pruning alone.")
    quiet = ("Measured alone (no other job running) and kept for every session."
             if latency.quiet else
             f"Taken under load: other work ran at the same time (this thread got {fmt_pct(latency.cpu_share, 0)} "
             "of the CPU), so the figure is not kept and is measured again on the next view.")
    peak = ("" if latency.peak_compressed_mib is None else
            f" Memory during the runs: {latency.memory_method}, {latency.peak_compressed_mib:.0f} MiB.")
    detail.caption(f"Dense {latency.dense_ms:.2f} ms, compressed {latency.compressed_ms:.2f} ms, "
                   f"{latency.runs} rounds. {quiet}{peak}")
