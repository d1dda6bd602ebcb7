"""The paper's benchmark suite (sections 4–5): synthetic MLP and CIFAR-10 CNN, one row per run.

* :func:`run_synthetic` — the paper's MLP (``core.workloads.models.build('mlp', …)``), randomly
  initialised with the run's seed, fed N(0, 1) batches (``core.workloads.data.gaussian_batches``).
* :func:`run_cnn` — a trained checkpoint (``core.workloads.models.load_pretrained``) on the real
  CIFAR-10 test set, optionally with BatchNorm recalibration after pruning.

Both prune with :class:`core.method.engine.Engine` (``CompressionConfig(tau=threshold, …)``),
never modifying the model they start from, and return a DataFrame with
:data:`CSV_COLUMNS`. What each column measures:

* ``params_total`` / ``params_kept`` / ``retention``: the prunable weights (Conv/Linear
  weights; plus normalisation scales with ``include_norm``), as in the paper's ρ.
* ``compute_reduction``: 1 − kept MACs / total MACs (a conv weight counts once per output
  position), i.e. what a sparse kernel could skip. The pruned model here runs with dense
  kernels, so the wall time does not shrink with it.
* ``inference_time_s`` / ``inference_time_dense_s``: the mean wall time of one forward
  pass of one batch (``torch.inference_mode``, eval mode), after warm-up passes, for the
  pruned and the unpruned model.
* ``peak_memory_mib``: ``memory_profiler.memory_usage`` around the pruned model's measured
  inference (as the paper did): the peak resident memory of the whole process — Python,
  PyTorch, the data held in memory and the models — not the model alone. Freed heap memory
  is handed back to the OS first (:func:`release_memory`), so runs are comparable.
* ``model_bytes_fp32`` / ``model_bytes_compressed``: bytes of every parameter and buffer
  as fp32 / bytes of the compressed storage (kept weights, their positions, chunk codes).
* ``accuracy`` / ``accuracy_dense``: top-1 accuracy (fraction) of the pruned / unpruned
  model on the CIFAR-10 test set (empty for the synthetic benchmark).
* ``file_bytes_packed`` / ``file_bytes_state_dict`` (:data:`REALIZED_COLUMNS`): the size on
  disk of the packed file (:mod:`core.deploy.packed_writer`) and of the plain fp32 state_dict saved with
  safetensors, both written and measured every run.
* ``latency_{dense,sparse,int8,auto}_s``: with ``execution_paths`` set, the median wall
  time of one batch through each execution path of :mod:`core.deploy.runtime` (sparse CSR kernels,
  weight-only int8, auto = the fastest kernel per layer measured here); empty otherwise.

Run ``r`` (1-based) uses seed ``seed + r − 1``: the first run uses the paper's seed.
Same seed → same retention and accuracy.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from core.common.memory import release_memory
from core.common.timing import synchronize, time_call
from core.deploy.runtime import PATHS
from core.measure.paper_tables import CSV_COLUMNS, REALIZED_COLUMNS
from core.workloads.data import gaussian_batches, jpeg_dir
from core.method.config import THETA_MODES, CompressionConfig
from core.method.engine import Engine
from core.workloads.models import PRETRAINED, REGISTRY, CheckpointError, build, card_path, load_card, load_pretrained
from core.method.quantization import SUPPORTED_BITS

TEST_SET_SIZE = 10_000

ProgressFn = Callable[[int, int, str], None]


class BenchmarkError(RuntimeError):
    """A benchmark cannot start: missing checkpoint or data, unavailable device, bad setting."""


# ---------------------------------------------------------------- configurations

def _check_common(threshold: float, runs: int, batch_size: int, theta: float | None, theta_mode: str,
                  bits: tuple[int, ...], device: str) -> tuple[int, int]:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
            or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold (τ) must be a number in [0, 1], got {threshold!r}")
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an integer ≥ 1, got {runs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be an integer ≥ 1, got {batch_size!r}")
    if theta_mode not in THETA_MODES:
        raise ValueError(f"theta mode must be one of {', '.join(THETA_MODES)}, got {theta_mode!r}")
    if theta is not None:
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta < 0:
            raise ValueError(f"theta must be a finite number ≥ 0, got {theta!r}")
        if theta_mode == "fraction" and theta > 1:
            raise ValueError(f"theta in 'fraction' mode must be in [0, 1], got {theta}")
    bits = tuple(bits)
    if len(bits) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bits):
        raise ValueError(f"bits must be two integers LOW HIGH, got {bits!r}")
    low, high = bits
    for b in bits:
        if b not in SUPPORTED_BITS:
            raise ValueError(f"bit-width {b} is not supported; choose from {', '.join(map(str, SUPPORTED_BITS))}")
    if low > high:
        raise ValueError(f"bits LOW ({low}) must not exceed HIGH ({high})")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (use cpu or cuda)") from err
    return low, high


def _check_config(config, positive_ints: tuple[str, ...]) -> None:
    """Validate a benchmark config: ``positive_ints`` fields ≥ 1, warmup ≥ 0, an integer seed and
    :func:`_check_common`; store ``bits`` as a tuple (the config is frozen)."""
    for name in positive_ints:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name.replace('_', '-')} must be an integer ≥ 1, got {value!r}")
    if not isinstance(config.warmup, int) or config.warmup < 0:
        raise ValueError(f"warmup must be an integer ≥ 0, got {config.warmup!r}")
    if not isinstance(config.seed, int):
        raise ValueError(f"seed must be an integer, got {config.seed!r}")
    _check_common(config.threshold, config.runs, config.batch_size, config.theta, config.theta_mode, config.bits,
                  config.device)
    object.__setattr__(config, "bits", tuple(config.bits))


@dataclass(frozen=True)
class SyntheticBenchmarkConfig:
    """The paper's synthetic benchmark: ``layers`` Linear layers, in_dim → hidden … → out_dim.

    ``threshold`` is τ; ``theta`` (None: pruning only) with ``theta_mode`` and ``bits``
    (b_low, b_high) adds the on-the-fly quantization; ``n_batches`` Gaussian batches of
    ``batch_size`` are timed after ``warmup`` passes.
    """

    layers: int = 6
    in_dim: int = 128
    out_dim: int = 128
    hidden: int = 128
    threshold: float = 0.2
    runs: int = 5
    batch_size: int = 64
    seed: int = 42
    theta: float | None = None
    bits: tuple[int, int] = (4, 8)
    device: str = "cpu"
    n_batches: int = 50
    warmup: int = 5
    theta_mode: str = "relative"
    execution_paths: bool = False

    def __post_init__(self) -> None:
        _check_config(self, ("layers", "in_dim", "out_dim", "hidden", "n_batches"))

    @property
    def model_label(self) -> str:
        if self.in_dim == self.hidden == self.out_dim:
            return f"mlp[{self.layers}x{self.hidden}]"
        return f"mlp[{self.layers} layers {self.in_dim}-{self.hidden}-{self.out_dim}]"


@dataclass(frozen=True)
class CnnBenchmarkConfig:
    """The paper's CIFAR-10 benchmark on a trained checkpoint of the registry.

    ``max_batches`` limits the accuracy evaluation to about ``max_batches × batch_size``
    test images (a fixed class-balanced subset, rounded down to a multiple of 10, for quick
    runs; the ``dataset`` column then says so); None evaluates all 10,000.
    ``include_norm`` reproduces the paper's pseudocode (``hasattr(layer, 'weight')``),
    which also prunes the BatchNorm scales. ``timing_batches`` test batches are timed
    after ``warmup`` passes; ``calibration_images`` training images re-estimate the
    BatchNorm statistics when ``bn_recalibrate`` is set.
    """

    dataset: str = "cifar10"
    model: str = "cifar_cnn"  # the compact VGG-style CNN standing for the paper's unspecified "CIFAR-10 CNN"
    threshold: float = 0.2
    batch_size: int = 64
    runs: int = 5
    theta: float | None = None
    bits: tuple[int, int] = (4, 8)
    bn_recalibrate: bool = False
    data_root: str | None = None
    device: str = "cpu"
    seed: int = 42
    max_batches: int | None = None
    include_norm: bool = False
    theta_mode: str = "relative"
    timing_batches: int = 10
    warmup: int = 2
    calibration_images: int = 2000
    execution_paths: bool = False

    def __post_init__(self) -> None:
        if self.dataset != "cifar10":
            raise ValueError(f"dataset must be cifar10 (the only data set of the paper's CNN benchmark), got {self.dataset!r}")
        if self.model not in REGISTRY or REGISTRY[self.model].input_kind != "cifar10":
            choices = ", ".join(name for name, spec in REGISTRY.items() if spec.input_kind == "cifar10")
            raise ValueError(f"model must be a CIFAR-10 model of the registry ({choices}), got {self.model!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise ValueError(f"max batches must be an integer ≥ 1 (or None for the whole test set), got {self.max_batches!r}")
        _check_config(self, ("timing_batches", "calibration_images"))

    @property
    def eval_images(self) -> int:
        """How many test images the accuracy is measured on."""
        if self.max_batches is None or self.max_batches * self.batch_size >= TEST_SET_SIZE:
            return TEST_SET_SIZE
        return 10 * max(1, self.max_batches * self.batch_size // 10)  # a class-balanced subset

    @property
    def model_label(self) -> str:
        label = self.model
        if self.include_norm:
            label += " (norm layers pruned)"
        if self.bn_recalibrate:
            label += " (BN recalibrated)"
        return label

    @property
    def dataset_label(self) -> str:
        if self.eval_images >= TEST_SET_SIZE:
            return "cifar10"
        return f"cifar10 (test subset: {self.eval_images}/{TEST_SET_SIZE} images)"


# ---------------------------------------------------------------- preflight checks

def check_device(device: str) -> torch.device:
    """The torch device, or :class:`BenchmarkError` if it is not available here."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError(f"device {device!r} is not available: no CUDA GPU on this machine (use --device cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BenchmarkError(f"device {device!r} is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BenchmarkError(f"device {device!r} is not supported (use cpu or cuda)")
    return dev


def preflight_synthetic(config: SyntheticBenchmarkConfig) -> None:
    """Everything a synthetic run needs, checked before any work."""
    check_device(config.device)


def preflight_cnn(config: CnnBenchmarkConfig) -> None:
    """Everything a CNN run needs — device, checkpoint card, test (and training) archive — checked cheaply."""
    check_device(config.device)
    if config.model not in PRETRAINED or not card_path(config.model).is_file():
        shipped = ", ".join(name for name in PRETRAINED if card_path(name).is_file()) or "none yet"
        raise BenchmarkError(
            f"no trained checkpoint for {config.model!r} (expected its card at {card_path(config.model)}); "
            f"train it with `python -m core.train {config.model}` or pick a shipped one (--model; shipped: {shipped})")
    folder = jpeg_dir(config.data_root)
    needed = ["test"] + (["train"] if config.bn_recalibrate else [])
    for split in needed:
        archive = folder / f"cifar10-{split}.tar.gz"
        if not archive.is_file():
            raise BenchmarkError(f"CIFAR-10 {split} archive not found: {archive} (point --data-root at the folder "
                                 f"holding cifar10-{{train,test}}.tar.gz and SHA256SUMS)")


# ---------------------------------------------------------------- measurement

def _timed_passes(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> list[float]:
    """Seconds of one forward pass per batch (each batch once: the paper times a pass over its data)."""
    with torch.inference_mode():
        return [time_call(lambda: model(batch), device) for batch in batches]


def measure_inference(model: nn.Module, batches: list[torch.Tensor], warmup: int,
                      device: torch.device) -> tuple[float, float]:
    """(mean seconds per forward pass of one batch, peak process memory MiB during the timed passes).

    ``warmup`` untimed passes first; then freed memory is released (:func:`release_memory`)
    and one timed pass per batch runs inside ``memory_profiler.memory_usage`` (run once,
    sampling every millisecond).
    """
    from memory_profiler import memory_usage

    model.eval()
    with torch.inference_mode():
        for i in range(warmup):
            model(batches[i % len(batches)])
    synchronize(device)
    release_memory()
    peak, times = memory_usage((_timed_passes, (model, batches, device), {}), interval=0.001,
                               max_usage=True, retval=True, max_iterations=1)
    return sum(times) / len(times), float(peak)


def process_memory_mib() -> float:
    """The current resident memory of this process, as memory_profiler reports it."""
    from memory_profiler import memory_usage

    release_memory()
    return float(memory_usage(-1, interval=0.01, timeout=0.02, max_usage=True))


def _realized_columns(config, result, timed: nn.Module, example: torch.Tensor, arch: str,
                      arch_kwargs: dict | None = None) -> dict:
    """The :data:`REALIZED_COLUMNS` of one run: file sizes always, per-path latency with ``execution_paths``."""
    from core.measure.realized import measure_file_sizes, measure_realized

    if not config.execution_paths:
        packed, state_dict = measure_file_sizes(result, arch, arch_kwargs)
        return {"file_bytes_packed": packed, "file_bytes_state_dict": state_dict}
    model = None if timed is result.model else timed  # the result itself carries the exact int8 scales
    realized = measure_realized(result, example, arch=arch, arch_kwargs=arch_kwargs, model=model,
                                batch_size=config.batch_size, paths=PATHS, budget_s=0.1)
    return {"file_bytes_packed": realized.file_bytes, "file_bytes_state_dict": realized.state_dict_bytes,
            **{f"latency_{path}_s": realized.ms(path) / 1e3 for path in PATHS}}


def _row(run: int, seed: int, model_label: str, dataset: str, config, result, t_pruned: float, t_dense: float,
         peak: float, accuracy: float | None, accuracy_dense: float | None, realized: dict) -> dict:
    quantized = config.theta is not None
    return {**realized,
        "run": run, "model": model_label, "dataset": dataset, "tau": float(config.threshold),
        "theta": float(config.theta) if quantized else None,
        "b_low": config.bits[0] if quantized else None, "b_high": config.bits[1] if quantized else None,
        "params_total": int(result.stats["numel"].sum()), "params_kept": int(result.stats["kept"].sum()),
        "retention": result.retention, "compute_reduction": result.compute_reduction,
        "inference_time_s": t_pruned, "inference_time_dense_s": t_dense, "peak_memory_mib": peak,
        "model_bytes_fp32": result.model_bytes_fp32, "model_bytes_compressed": result.model_bytes_compressed,
        "accuracy": accuracy, "accuracy_dense": accuracy_dense,
        "seed": seed, "device": str(config.device), "torch_version": torch.__version__,
    }


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    for column in ("theta", "accuracy", "accuracy_dense") + REALIZED_COLUMNS[2:]:
        df[column] = df[column].astype("float64")
    for column in ("b_low", "b_high"):
        df[column] = df[column].astype("Int64")
    return df


def _compression(config) -> CompressionConfig:
    return CompressionConfig(tau=config.threshold, theta=config.theta, theta_mode=config.theta_mode,
                             b_low=config.bits[0], b_high=config.bits[1],
                             include_norm=getattr(config, "include_norm", False))


def _report(on_progress: ProgressFn | None, done: int, total: int, label: str) -> None:
    if on_progress is not None:
        on_progress(done, total, label)


# ---------------------------------------------------------------- the two benchmarks

def run_synthetic(config: SyntheticBenchmarkConfig, on_progress: ProgressFn | None = None) -> pd.DataFrame:
    """The paper's synthetic benchmark, one row per run (columns :data:`CSV_COLUMNS`).

    Each run builds the MLP with ``torch.manual_seed(seed + run − 1)`` (PyTorch's default
    Linear init: Kaiming-uniform, |W| uniform on [0, 1/√fan_in]) and times it on Gaussian
    batches drawn with the same seed.
    """
    preflight_synthetic(config)
    device = check_device(config.device)
    baseline = process_memory_mib()
    rows = []
    total = config.runs
    _report(on_progress, 0, total, "synthetic MLP: starting")
    for index in range(config.runs):
        run, seed = index + 1, config.seed + index
        torch.manual_seed(seed)
        dense = build("mlp", layers=config.layers, in_dim=config.in_dim, out_dim=config.out_dim,
                      hidden=config.hidden).eval()
        batches = gaussian_batches(config.n_batches, config.batch_size, config.in_dim, seed=seed)
        engine = Engine(dense, palette=config.bits, example_input=batches[0])
        result = engine.apply(_compression(config))
        pruned = result.model.to(device).eval()
        dense = dense.to(device)
        batches = [b.to(device) for b in batches]
        t_dense, _ = measure_inference(dense, batches, config.warmup, device)
        t_pruned, peak = measure_inference(pruned, batches, config.warmup, device)
        realized = _realized_columns(config, result, pruned, batches[0], "mlp", dict(
            layers=config.layers, in_dim=config.in_dim, out_dim=config.out_dim, hidden=config.hidden))
        rows.append(_row(run, seed, config.model_label, "gaussian", config, result,
                         t_pruned, t_dense, peak, None, None, realized))
        _report(on_progress, run, total, f"run {run}/{total}: retention {result.retention:.2%}")
    df = _frame(rows)
    df.attrs["notes"] = [
        f"peak_memory_mib is the whole process's resident memory (memory_profiler); "
        f"this process used {baseline:.1f} MiB before the first model was built",
        "the pruned model runs with dense kernels (zeros are multiplied), so its wall time is not "
        "expected to drop with retention",
    ]
    df.attrs["baseline_memory_mib"] = baseline
    return df


def load_trained(name: str) -> nn.Module:
    """The trained checkpoint, or :class:`BenchmarkError` with what to do when it is missing or altered."""
    try:
        return load_pretrained(name)
    except FileNotFoundError as err:
        raise BenchmarkError(f"no trained checkpoint for {name!r}: {err}; train it with `python -m core.train {name}`") from err
    except CheckpointError as err:
        raise BenchmarkError(f"the checkpoint for {name!r} cannot be used: {err}") from err


def _eval_subset(data, n_images: int):
    from core.measure.accuracy import EvalData, balanced_subset

    if n_images >= len(data):
        return data
    subset = balanced_subset(data, n_images // 10, seed=0)
    return EvalData(subset.images, subset.labels, subset.split)


def run_cnn(config: CnnBenchmarkConfig, on_progress: ProgressFn | None = None,
            model: nn.Module | None = None) -> pd.DataFrame:
    """The paper's CIFAR-10 benchmark on the trained ``config.model``, one row per run.

    ``model`` overrides the checkpoint (for development and tests with an untrained
    network); by default the trained checkpoint is loaded and a missing one is a
    :class:`BenchmarkError`. Accuracy is measured on the real test set (all 10,000 images,
    or a class-balanced ``max_batches × batch_size`` subset).
    """
    from core.measure.accuracy import bn_recalibrate, calibration_images, eval_data, evaluate

    if model is None:
        preflight_cnn(config)
        dense = load_trained(config.model)
        card = load_card(config.model)
        mean, std = tuple(card["mean"]), tuple(card["std"])
    else:
        check_device(config.device)
        from core.measure.accuracy import CIFAR_MEAN, CIFAR_STD

        dense, mean, std = model, CIFAR_MEAN, CIFAR_STD
    device = check_device(config.device)
    dense = dense.eval()
    total = 1 + 3 * config.runs
    _report(on_progress, 0, total, f"{config.model}: loading the CIFAR-10 test set")
    data = eval_data("test", mean, std, root=config.data_root)
    scored = _eval_subset(data, config.eval_images)
    engine = Engine(dense, palette=config.bits, example_input=data.images[:1])
    dense = dense.to(device)
    accuracy_dense = evaluate(dense, scored, device=config.device).accuracy
    baseline = process_memory_mib()
    _report(on_progress, 1, total, f"dense accuracy {accuracy_dense:.2%}")
    rows = []
    done = 1
    for index in range(config.runs):
        run, seed = index + 1, config.seed + index
        torch.manual_seed(seed)
        result = engine.apply(_compression(config))
        pruned = result.model
        if config.bn_recalibrate:
            images = calibration_images(config.calibration_images, seed=seed, mean=mean, std=std,
                                        root=config.data_root)
            pruned = bn_recalibrate(pruned, images)
        pruned = pruned.to(device).eval()
        done += 1
        _report(on_progress, done, total, f"run {run}/{config.runs}: pruned, retention {result.retention:.2%}")
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(data), generator=generator)
        batches = [data.images[order[i * config.batch_size:(i + 1) * config.batch_size]].to(device)
                   for i in range(config.timing_batches)]
        t_dense, _ = measure_inference(dense, batches, config.warmup, device)
        t_pruned, peak = measure_inference(pruned, batches, config.warmup, device)
        done += 1
        _report(on_progress, done, total, f"run {run}/{config.runs}: {t_pruned * 1e3:.1f} ms per batch")
        accuracy = evaluate(pruned, scored, device=config.device).accuracy
        realized = _realized_columns(config, result, pruned, batches[0], config.model)
        done += 1
        _report(on_progress, done, total, f"run {run}/{config.runs}: accuracy {accuracy:.2%}")
        rows.append(_row(run, seed, config.model_label, config.dataset_label, config, result,
                         t_pruned, t_dense, peak, accuracy, accuracy_dense, realized))
    df = _frame(rows)
    notes = [f"peak_memory_mib is the whole process's resident memory (memory_profiler), including the "
             f"normalised test set held in memory; the process used {baseline:.1f} MiB before the first run"]
    if config.eval_images < TEST_SET_SIZE:
        notes.insert(0, f"accuracy measured on a class-balanced subset of {len(scored)} of the "
                        f"{TEST_SET_SIZE} test images (max_batches={config.max_batches}); not the full-test figure")
    if model is not None:
        notes.insert(0, "model supplied by the caller (not the shipped checkpoint)")
    df.attrs["notes"] = notes
    df.attrs["baseline_memory_mib"] = baseline
    df.attrs["eval_images"] = len(scored)
    return df


# ---------------------------------------------------------------- retention across τ

DEFAULT_CURVE_TAUS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))


def retention_curve(model: nn.Module, taus=DEFAULT_CURVE_TAUS, include_norm: bool = False) -> pd.DataFrame:
    """Retention ρ(τ) of boundary pruning for ``model`` (no accuracy, so it is cheap).

    Columns ``tau``, ``retention``, ``params_total``, ``params_kept``. The model is not modified.
    """
    engine = Engine(model, palette=(8,))
    rows = []
    for tau in taus:
        result = engine.apply(CompressionConfig(tau=float(tau), include_norm=include_norm))
        rows.append({"tau": float(tau), "retention": result.retention,
                     "params_total": int(result.stats["numel"].sum()), "params_kept": int(result.stats["kept"].sum())})
    return pd.DataFrame(rows, columns=["tau", "retention", "params_total", "params_kept"])
