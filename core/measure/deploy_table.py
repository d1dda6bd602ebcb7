"""The realized-savings table: latency, speed-ups, accuracy and file size per (runtime, precision, model, batch).

Rows (``model`` = ``dense`` or ``compressed``):

==================  ===========  ====================================================
runtime             precision    files
==================  ===========  ====================================================
torch eager         fp32         the dense model, the compressed (or repaired) model
onnxruntime         fp32, int8   ``dense.onnx`` (fp32), ``model.onnx``, ``model.int8.onnx``
openvino            fp32, bf16,  ``dense.onnx`` (fp32, bf16), ``model.onnx`` (fp32, bf16),
                    int8         ``model.int8.onnx``
==================  ===========  ====================================================

* **Latency**: for each batch size, every row's forward pass is timed by the project's one timer
  (:func:`core.common.timing.time_interleaved`: warm-up, interleaved rounds, median and p95), the
  torch baselines in the same rounds, with ``threads`` intra-op threads everywhere (torch's own
  setting is restored afterwards). OpenVINO compiles a static batch per size.
* **Speed-ups**: ``speedup_vs_torch_dense`` = torch eager dense latency / the row's latency;
  ``speedup_vs_runtime_dense`` = the same runtime's dense fp32 latency / the row's latency.
* **Accuracy**: from the runtime's own outputs on the first ``n`` images of the balanced order
  (:func:`core.measure.paired.balanced_order`; every image when ``eval_images`` is None), paired
  with the dense torch model on the same images: ``delta`` = (newly right − newly wrong) / n, with
  its paired 95 % interval ``delta_low``/``delta_high`` (:func:`core.measure.paired.paired_interval`,
  closed when every image was run). A larger ``eval_images`` refines it: the same balanced prefix, extended.
  An accuracy more than ``COLLAPSE_POINTS`` below dense is flagged (``collapsed``), never hidden.
* **Bytes**: the row's file on disk and zipped (torch rows: ``torch.save(state_dict)``).

Cancel/progress follow the repair's contract: ``cancel`` is None, a ``threading.Event`` or a
callable returning True; ``on_progress(done, total, step)`` after every step; a cancelled run raises
:class:`DeployCancelled` and returns nothing. Inside a :class:`core.services.jobs.Job` each step is a
turn of the shared compute queue and a checkpoint (:mod:`core.common.steps`): every row of one batch
size is timed within one turn, so other sessions' work does not land between the rows compared.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.common.steps import Cancelled, checkpoint, turn
from core.common.timing import time_interleaved
from core.deploy.onnx_runtimes import (
    RUNTIMES,
    RuntimeConfig,
    RuntimeMissing,
    load,
    require,
)
from core.measure.accuracy import EvalData
from core.measure.deploy_export import FileSize, SettingFiles
from core.measure.paired import balanced_order, paired_interval

#: an accuracy this many points below the dense model's is flagged as collapsed
COLLAPSE_POINTS = 10.0
TORCH = "torch eager"

COLUMNS = ["runtime", "precision", "model", "batch", "latency_ms", "p95_ms", "rounds", "speedup_vs_torch_dense",
           "speedup_vs_runtime_dense", "accuracy", "delta", "delta_low", "delta_high", "n_images", "newly_wrong",
           "newly_right", "collapsed", "file", "bytes", "zipped_bytes"]
#: what the table shows, in one sentence (for the page beside it)
WHAT_GIVES_SPEED = ("Speed comes from int8 (and bf16) kernels in a graph runtime, which fuse layers and run dense "
                    "int8 arithmetic; the pruned zeros give size, not speed: no maintained CPU runtime multiplies "
                    "unstructured zeros faster, but they compress (the zipped file column).")


class DeployCancelled(Cancelled, RuntimeError):
    """The measurement was stopped through its ``cancel`` argument; no table was produced (a job's
    :class:`core.common.steps.Cancelled`, so the pages report it as a cancel, not as an error)."""

    def __init__(self, done: int, total: int):
        super().__init__(done, total)
        self.args = (f"deployment measurement cancelled after {done} of {total} steps; nothing was returned",)


@dataclass(frozen=True)
class DeployConfig:
    """What to measure.

    * ``batches``: batch sizes timed (each row is measured at each).
    * ``threads``: intra-op threads for every runtime and for torch (1: see :mod:`core.deploy.onnx_runtimes`).
    * ``runtimes``: which of ONNX Runtime / OpenVINO to include (missing ones are skipped with a note).
    * ``eval_images``: images for the accuracy (None: the whole set given); 0: no accuracy.
    * ``eval_batch``: images per accuracy batch.
    * ``budget_s``, ``min_rounds``, ``max_rounds``: the timer's budget per batch size.
    * ``accuracy_rows``: (runtime, precision, model) rows to evaluate (empty: all; the dense torch
      row is always evaluated: it is the paired reference). Others get no accuracy (NaN).
    """

    batches: tuple[int, ...] = (1, 64)
    threads: int = 1
    runtimes: tuple[str, ...] = tuple(RUNTIMES)
    eval_images: int | None = 1000
    eval_batch: int = 64
    budget_s: float = 3.0
    min_rounds: int = 5
    max_rounds: int = 200
    #: rows whose accuracy is measured, as (runtime, precision, model); empty: every row
    accuracy_rows: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.batches or any(not isinstance(b, int) or b < 1 for b in self.batches):
            raise ValueError(f"batches must be whole numbers ≥ 1, got {self.batches!r}")
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"unknown runtime {unknown[0]!r}; choose from {tuple(RUNTIMES)}")
        if self.eval_images is not None and self.eval_images < 0:
            raise ValueError(f"eval_images must be None or ≥ 0, got {self.eval_images}")
        RuntimeConfig(threads=self.threads)  # validates threads


@dataclass(frozen=True)
class DeployTable:
    """The measured table (:data:`COLUMNS`), the files it measured, and notes (skipped runtimes, collapses)."""

    table: pd.DataFrame
    files: SettingFiles
    config: DeployConfig
    dense_accuracy: float | None
    notes: tuple[str, ...] = field(default=())


def _check_cancel(cancel, done: int, total: int) -> None:
    if cancel is None:
        return
    stop = cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())
    if stop:
        raise DeployCancelled(done, total)


def _torch_runner(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    model = model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return run


def _rows_wanted(config: DeployConfig, notes: list[str]) -> list[tuple[str, str, str]]:
    """(runtime, precision, model) of every row, the dense baselines first."""
    rows = [(TORCH, "fp32", "dense"), (TORCH, "fp32", "compressed")]
    for runtime in config.runtimes:
        try:
            require(runtime)
        except RuntimeMissing as exc:
            notes.append(f"{runtime} skipped: {exc}")
            continue
        for precision in RUNTIMES[runtime]:
            if precision != "int8":
                rows.append((runtime, precision, "dense"))
            rows.append((runtime, precision, "compressed"))
    return rows


def _file_of(files: SettingFiles, runtime: str, precision: str, model: str) -> str:
    if runtime == TORCH:
        return "state_dict (fp32)" if model == "dense" else "-"
    if model == "dense":
        return files.dense.name
    return files.int8.name if precision == "int8" else files.fp32.name


def _predict(run: Callable[[np.ndarray], np.ndarray], images: torch.Tensor, batch: int,
             static: bool) -> torch.Tensor:
    out = []
    for start in range(0, images.shape[0], batch):
        checkpoint()  # a job running this may stop between batches (core.common.steps)
        x = images[start:start + batch].numpy()
        n = x.shape[0]
        if static and n < batch:  # a static-batch model: pad the last batch, drop the padding's outputs
            x = np.concatenate([x, np.zeros((batch - n,) + x.shape[1:], dtype=x.dtype)])
        out.append(torch.from_numpy(run(np.ascontiguousarray(x))[:n]).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def measure_deployment(dense: nn.Module, compressed: nn.Module, files: SettingFiles, data: EvalData | None, *,
                       config: DeployConfig = DeployConfig(),
                       on_progress: Callable[[int, int, str], None] | None = None,
                       cancel: threading.Event | Callable[[], bool] | None = None) -> DeployTable:
    """Measure every row (see the module docstring). ``data``: labelled images for the accuracy,
    normalised as the models expect (None: no accuracy; the timing input is then random, shaped like
    the calibration images). Neither model is modified."""
    notes: list[str] = []
    wanted = _rows_wanted(config, notes)
    example = (data.images[:1] if data is not None else torch.randn((1,) + files.input_shape))
    shape = tuple(example.shape[1:])
    n_eval = 0 if data is None else (len(data) if config.eval_images is None else min(config.eval_images, len(data)))
    evaluated = [key for key in wanted if not config.accuracy_rows or key in config.accuracy_rows
                 or key == (TORCH, "fp32", "dense")]
    total = len(config.batches) * 2 + (len(evaluated) if n_eval else 0)
    done = 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total, label)
        _check_cancel(cancel, done, total)
        checkpoint()

    _check_cancel(cancel, 0, total)
    torch_models = {"dense": dense, "compressed": compressed}
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    timings: dict[tuple[str, str, str, int], object] = {}
    predictions: dict[tuple[str, str, str], torch.Tensor] = {}
    try:
        for batch in config.batches:
            runners = {}
            with turn():  # inside a job: one turn of the shared compute queue per step
                for runtime, precision, model in wanted:
                    key = (runtime, precision, model)
                    if runtime == TORCH:
                        runners[key] = _torch_runner(torch_models[model])
                    else:
                        path = files.dense if model == "dense" else files.int8 if precision == "int8" else files.fp32
                        rc = RuntimeConfig(threads=config.threads, batch=batch if runtime == "openvino" else None)
                        runners[key] = load(path, runtime, precision, rc)
            step(f"compiled the models for batch {batch}")
            x = np.ascontiguousarray(torch.randn((batch,) + shape, generator=torch.Generator().manual_seed(batch)).numpy())
            with turn():  # every row of one batch size timed in the same turn, interleaved
                measured = time_interleaved({key: (lambda r=run, x=x: r(x)) for key, run in runners.items()}, "cpu",
                                            warmup=2, min_rounds=config.min_rounds, max_rounds=config.max_rounds,
                                            budget_s=config.budget_s)
            for key, timing in measured.items():
                timings[key + (batch,)] = timing
            step(f"timed batch {batch}")
            if n_eval and batch == max(config.batches):
                order = balanced_order(data.labels)[:n_eval]
                images = data.images[order].contiguous()
                for key in evaluated:
                    run = runners[key]
                    static = key[0] == "openvino"
                    with turn():
                        predictions[key] = _predict(run, images, batch if static else config.eval_batch, static)
                    step(f"accuracy of {key[0]} {key[1]} {key[2]}")
                labels = data.labels[order]
    finally:
        torch.set_num_threads(threads)
    return _table(wanted, timings, predictions, labels if n_eval else None, files, config, notes, n_eval,
                  len(data) if data is not None else 0)


def _table(wanted, timings, predictions, labels, files: SettingFiles, config: DeployConfig, notes: list[str],
           n_eval: int, population: int) -> DeployTable:
    state = files.sizes.get("state_dict")
    dense_right = None
    dense_accuracy = None
    if labels is not None:
        dense_right = predictions[(TORCH, "fp32", "dense")] == labels
        dense_accuracy = float(dense_right.float().mean())
    rows = []
    for batch in config.batches:
        torch_dense = timings[(TORCH, "fp32", "dense", batch)].median_s
        for runtime, precision, model in wanted:
            timing = timings[(runtime, precision, model, batch)]
            base = timings.get((runtime, "fp32", "dense", batch))
            name = _file_of(files, runtime, precision, model)
            size = state if name.startswith("state_dict") else files.sizes.get(name, FileSize(0, 0))
            row = {"runtime": runtime, "precision": precision, "model": model, "batch": batch,
                   "latency_ms": timing.median_ms, "p95_ms": timing.p95_s * 1e3, "rounds": timing.rounds,
                   "speedup_vs_torch_dense": torch_dense / timing.median_s,
                   "speedup_vs_runtime_dense": base.median_s / timing.median_s if base is not None else float("nan"),
                   "file": name, "bytes": size.raw if name != "-" else None,
                   "zipped_bytes": size.zipped if name != "-" else None}
            if labels is not None and (runtime, precision, model) in predictions:
                right = predictions[(runtime, precision, model)] == labels
                accuracy = float(right.float().mean())
                collapsed = dense_accuracy - accuracy > COLLAPSE_POINTS / 100
                newly_wrong, newly_right = int((dense_right & ~right).sum()), int((~dense_right & right).sum())
                low, high = paired_interval(newly_right, newly_wrong, n_eval, population)
                row.update(accuracy=accuracy, delta=accuracy - dense_accuracy, delta_low=low, delta_high=high,
                           n_images=n_eval, newly_wrong=newly_wrong, newly_right=newly_right, collapsed=collapsed)
                if collapsed and batch == config.batches[0]:
                    notes.append(f"{runtime} {precision} {model}: accuracy collapsed to {accuracy:.2%} "
                                 f"(dense {dense_accuracy:.2%})")
            rows.append(row)
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    return DeployTable(table, files, config, dense_accuracy, tuple(notes))

