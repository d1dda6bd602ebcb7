"""The τ (and θ) sweep of ``python -m core.tune`` (its default mode): any model, any labelled images.

* :func:`load_model`: a registry name (its shipped checkpoint, or ``weights`` from a file) or
  ``torchvision:<name>`` (``weights`` a state_dict file, or ``pretrained`` for torchvision's own
  weights from the local torch hub cache), with its pre-processing (:class:`TuneModel`).
* :func:`load_data`: ``cifar10`` (the test set, resized when the model's input is not 32 px) or a
  local folder in ImageFolder layout (:mod:`core.workloads.image_folder`), classes mapped to the
  model's outputs; unlabelled images are labelled with the dense model's predictions, so that
  "accuracy" is top-1 agreement with the dense model. ``n_images`` keeps a fixed class-balanced
  subset (:func:`core.measure.paired.balanced_order`).
* :func:`run_tuning_sweep`: the dense model, then every τ (× every θ), each with and without BN
  recalibration when asked; per setting the retention, the accuracy, Δ vs dense with its paired
  95 % interval and the size of its packed file. The interval treats the images as a sample of a
  larger population (no finite-population correction), so it does not close on the full set.
* :func:`choose`: the largest τ whose accuracy is at most ``max_drop`` points below dense.
* Repair (:mod:`core.measure.repair`): :func:`repair_calibration` draws the calibration images
  (CIFAR-10's *training* split, or the user's folder: never the evaluation images);
  :func:`run_tuning_sweep` with ``repair`` adds, per setting, a row after that repair;
  :func:`evaluate_setting` evaluates one setting at every repair level up to the chosen one and
  packs the last (:func:`core.deploy.packed_writer.compressed_bytes` with ``repaired``).

The model is never modified; all inference is fp32 under ``torch.inference_mode``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from core.common.steps import interruptible, turn
from core.deploy.packed_writer import compressed_bytes
from core.measure.accuracy import bn_recalibrate, calibration_images, eval_data, has_batchnorm, predict
from core.measure.calibration import calibration_split
from core.measure.paired import balanced_order, paired_interval
from core.measure.repair import RepairConfig, RepairResult, estimate_setting_seconds, levels, repair_setting
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult, Engine
from core.workloads import torchvision_models as tv
from core.workloads.data import CIFAR_MEAN, CIFAR_STD, CLASSES, load_cifar10
from core.workloads.image_folder import DEFAULT_MAX_IMAGES, DEFAULT_MAX_TENSOR_BYTES, for_model, read_image_folder
from core.workloads.models import (
    PRETRAINED,
    REGISTRY,
    CheckpointError,
    build,
    load_card,
    load_pretrained,
    load_state_dict_into,
    read_state_dict,
)
from core.workloads.preprocess import Preprocess

#: the columns of ``sweep.csv``, in order
COLUMNS: tuple[str, ...] = ("tau", "theta", "theta_mode", "b_low", "b_high", "bn_recalibrated", "retention",
                            "accuracy", "accuracy_dense", "delta", "delta_low", "delta_high", "newly_wrong",
                            "newly_right", "n", "packed_bytes", "seconds", "repair", "repair_seconds")
#: the largest calibration set a repair draws (``--repair-images``)
MAX_REPAIR_IMAGES = 4096
_NO_CORRECTION = 10**15  # population for the paired interval: the images are a sample, not the whole population


@dataclass(frozen=True)
class TuneModel:
    """A model to tune: the module (never modified), where it came from and how images become its input."""

    model: nn.Module
    arch: str
    arch_kwargs: dict
    preprocess: Preprocess
    categories: tuple[str, ...]
    source: str
    registry: bool  # a CIFAR-10 model of the registry (its files record no pre-processing)

    @property
    def input_spec(self) -> dict | None:
        return None if self.registry else self.preprocess.to_dict()


@dataclass(frozen=True)
class TuneData:
    """Normalised images with labels (model output indices), and what they are, in words."""

    images: torch.Tensor
    labels: torch.Tensor
    description: str
    labelled: bool  # False: the labels are the dense model's predictions (accuracy = top-1 agreement)
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.numel())


def _preprocess(default: Preprocess, image_size: int | None, mean: Sequence[float] | None,
                std: Sequence[float] | None) -> Preprocess:
    if image_size is None and mean is None and std is None:
        return default
    size = image_size if image_size is not None else default.image_size
    return Preprocess.for_size(size, mean if mean is not None else default.mean,
                               std if std is not None else default.std, "set on the command line")


def load_model(spec: str, weights: str | None = None, image_size: int | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> TuneModel:
    """The model ``spec`` names, with ``weights`` (a file, ``pretrained``, or None for the default).

    Registry names: the shipped checkpoint (None) or a state_dict file; their input is CIFAR-10's
    (32 px, the card's mean and std) unless ``image_size``/``mean``/``std`` say otherwise.
    ``torchvision:<name>``: a state_dict file (classes inferred from it; default input 224 px,
    ImageNet mean and std) or ``pretrained``/None (the weights' own ``transforms()``).
    Raises :class:`CheckpointError` (or ``ValueError`` for an unknown name) with a sentence.
    """
    if tv.is_torchvision(spec):
        name = tv.short_name(spec, "--model")
        if weights in (None, "pretrained", "DEFAULT"):
            model, kwargs, info = tv.load_pretrained(name)
            default = Preprocess.from_weights(info.transforms(), f"the transforms() of {info.label}")
            return TuneModel(model, tv.arch_name(name), kwargs, _preprocess(default, image_size, mean, std),
                             info.categories, str(info.path), False)
        model, kwargs, _ = tv.read_weights_file(name, weights)
        default = Preprocess.for_size(tv.DEFAULT_IMAGE_SIZE, tv.IMAGENET_MEAN, tv.IMAGENET_STD, "ImageNet defaults")
        preprocess = _preprocess(default, image_size, mean, std)
        categories = CLASSES if kwargs.get("num_classes") == 10 and preprocess.image_size == 32 else ()
        return TuneModel(model, tv.arch_name(name), kwargs, preprocess, categories, str(weights), False)
    if spec not in REGISTRY or REGISTRY[spec].input_kind != "cifar10":
        choices = [n for n, s in REGISTRY.items() if s.input_kind == "cifar10"]
        raise ValueError(f"unknown model {spec!r}; choose one of {', '.join(choices)} or torchvision:<name>")
    if weights is None:
        if spec not in PRETRAINED:
            raise ValueError(f"{spec} has no shipped checkpoint; give --weights FILE")
        card = load_card(spec)
        model, source = load_pretrained(spec), f"assets/checkpoints/{card['file']}"
        mean0, std0 = tuple(card.get("mean", CIFAR_MEAN)), tuple(card.get("std", CIFAR_STD))
    else:
        path = Path(weights)
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist or is not a file.")
        model = load_state_dict_into(build(spec), read_state_dict(path), path.name).eval()
        tv.check_finite(model, path.name)
        source, mean0, std0 = str(path), CIFAR_MEAN, CIFAR_STD
    default = Preprocess.for_size(32, mean0, std0, "the CIFAR-10 recipe of the model")
    preprocess = _preprocess(default, image_size, mean, std)
    return TuneModel(model, spec, {}, preprocess, CLASSES, source, True)


def _subset(images: torch.Tensor, labels: torch.Tensor, n_images: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if n_images is None or n_images >= len(labels):
        return images, labels
    index = balanced_order(labels, seed=0)[:n_images].sort().values
    return images[index].contiguous(), labels[index]


@torch.inference_mode()
def _outputs(model: nn.Module, preprocess: Preprocess) -> int:
    return int(model.eval()(torch.zeros(1, 3, preprocess.image_size, preprocess.image_size)).shape[-1])


def load_data(spec: str, tuned: TuneModel, n_images: int | None = None,
              max_images: int = DEFAULT_MAX_IMAGES) -> TuneData:
    """``cifar10`` (the test set) or a local image folder, as the model's input, labels mapped to its outputs.

    ``n_images``: a fixed class-balanced subset of that many. CIFAR-10 resized for a model whose
    input is not 32 px keeps at most ``max_images`` (and what fits 640 MiB as floats). A folder is
    read with at most ``max_images`` images (class-balanced sample when larger; see
    :mod:`core.workloads.image_folder`).
    Raises ``DataError`` (a ``RuntimeError``) when the data is missing or unusable.
    """
    preprocess = tuned.preprocess
    if spec == "cifar10":
        if preprocess.image_size == 32:
            data = eval_data("test", preprocess.mean, preprocess.std)
            images, labels = _subset(data.images, data.labels, n_images)
        else:  # resize the 32 px images to the model's input: a class-balanced subset within the memory budget
            raw = load_cifar10("test")
            budget = DEFAULT_MAX_TENSOR_BYTES // (3 * 4 * preprocess.image_size ** 2)
            pixels, labels = _subset(raw.images, raw.labels, min(n_images or max_images, max_images, budget))
            images = preprocess.normalize(torch.stack([preprocess.resize_crop(p) for p in pixels]))
        outputs = _outputs(tuned.model, preprocess)
        if outputs != len(CLASSES):
            raise CheckpointError(f"the model has {outputs} outputs, CIFAR-10 has {len(CLASSES)} classes: give "
                                  "--data a folder of labelled images for this model.")
        return TuneData(images, labels, f"CIFAR-10 test set (JPEG copy), {len(labels):,} images", True)
    found = read_image_folder(spec, preprocess, max_images=max_images)
    mapped, warnings = for_model(found, tuned.categories, _outputs(tuned.model, preprocess))
    notes = tuple(warnings) + (found.summary(),)
    if mapped.labelled:
        images, labels = _subset(mapped.images, mapped.labels, n_images)
        return TuneData(images, labels, f"{spec}, {len(labels):,} labelled images", True, notes)
    images = mapped.images[:n_images] if n_images else mapped.images
    labels = predict(tuned.model, images, batch_size=64)
    return TuneData(images, labels, f"{spec}, {len(labels):,} unlabelled images (accuracy = top-1 agreement with "
                                    "the dense model)", False, notes)


def calibration_set(spec: str | None, tuned: TuneModel, data: TuneData, n: int) -> torch.Tensor:
    """Images for BN recalibration: a folder (``spec``), CIFAR-10's augmented training images
    (``cifar10``), or the first ``n`` of the evaluation images (None)."""
    if spec is None:
        return data.images[:n]
    if spec == "cifar10":
        images = calibration_images(n, mean=tuned.preprocess.mean, std=tuned.preprocess.std)
        if tuned.preprocess.image_size != 32:
            pixels = tuned.preprocess.denormalize(images)
            images = tuned.preprocess.normalize(torch.stack([tuned.preprocess.resize_crop(p) for p in pixels]))
        return images
    return read_image_folder(spec, tuned.preprocess, max_images=n).images


def repair_calibration(spec: str | None, tuned: TuneModel, n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(images, description) to fit a repair on: never the evaluation images.

    ``None`` or ``cifar10``: ``n`` augmented images of CIFAR-10's *training* split
    (:func:`core.measure.calibration.calibration_split`, fixed by ``seed``), normalised for the model
    and resized when its input is not 32 px; a folder: at most ``n`` of its images (no labels used).
    """
    if not 1 <= n <= MAX_REPAIR_IMAGES:
        raise ValueError(f"a repair draws 1 to {MAX_REPAIR_IMAGES} calibration images, got {n}")
    preprocess = tuned.preprocess
    if spec in (None, "cifar10"):
        images, _ = calibration_split(n, 0, seed=seed, mean=preprocess.mean, std=preprocess.std)
        if preprocess.image_size != 32:
            pixels = preprocess.denormalize(images)
            images = preprocess.normalize(torch.stack([preprocess.resize_crop(p) for p in pixels]))
        return images, f"{len(images):,} augmented CIFAR-10 training images (seed {seed})"
    images = read_image_folder(spec, preprocess, max_images=n).images
    return images, f"{len(images):,} images of {spec}"


def settings(taus: Iterable[float], thetas: Sequence[float] | None, b_low: int, b_high: int,
             theta_mode: str = "relative") -> list[CompressionConfig]:
    """Every (τ, θ) setting of the sweep: pruning only, or each θ at each τ."""
    configs = []
    for tau in sorted(set(float(t) for t in taus)):
        if not thetas:
            configs.append(CompressionConfig(tau=tau))
        for theta in thetas or ():
            configs.append(CompressionConfig(tau=tau, theta=float(theta), theta_mode=theta_mode, b_low=b_low,
                                             b_high=b_high))
    return configs


def _row(config: CompressionConfig | None, bn: bool, result: CompressionResult, truth: torch.Tensor,
         dense: torch.Tensor, predicted: torch.Tensor, packed: int, seconds: float,
         repaired: RepairResult | None = None) -> dict:
    n = len(truth)
    dense_right, right = dense == truth, predicted == truth
    wrong = int((dense_right & ~right).sum())
    new_right = int((~dense_right & right).sum())
    low, high = (0.0, 0.0) if config is None else paired_interval(new_right, wrong, n, _NO_CORRECTION)
    return {"tau": 0.0 if config is None else config.tau,
            "theta": math.nan if config is None or not config.quantized else config.theta,
            "theta_mode": "" if config is None or not config.quantized else config.theta_mode,
            "b_low": None if config is None or not config.quantized else config.b_low,
            "b_high": None if config is None or not config.quantized else config.b_high,
            "bn_recalibrated": bn, "retention": float(result.retention),
            "accuracy": int(right.sum()) / n, "accuracy_dense": int(dense_right.sum()) / n,
            "delta": (new_right - wrong) / n, "delta_low": low, "delta_high": high,
            "newly_wrong": wrong, "newly_right": new_right, "n": n, "packed_bytes": packed, "seconds": seconds,
            "repair": "none" if repaired is None else repaired.method,
            "repair_seconds": 0.0 if repaired is None else float(repaired.seconds)}


def packed(result: CompressionResult, tuned: TuneModel, model: nn.Module | None = None,
           repaired: RepairResult | None = None) -> bytes:
    """The packed file of ``result`` with ``tuned``'s provenance; ``model``: BN-recalibrated statistics to store;
    ``repaired``: a repair of ``result`` to store instead (same mask and bit-widths)."""
    if model is not None:
        result = dataclasses.replace(result, _model=model)  # same weights, the recalibrated BN statistics
    return compressed_bytes(result, tuned.arch, tuned.arch_kwargs, input_spec=tuned.input_spec, repaired=repaired)


def make_engine(tuned: TuneModel) -> Engine:
    """The engine over ``tuned``'s model (ranks every weight once: seconds for a ResNet-18; share it)."""
    return Engine(tuned.model, example_input=torch.zeros(1, 3, tuned.preprocess.image_size,
                                                          tuned.preprocess.image_size))


def estimate_repair_seconds(tuned: TuneModel, configs: Sequence[CompressionConfig], repair: RepairConfig, *,
                            engine: Engine | None = None) -> float:
    """Estimated seconds of every repair level above ``"none"`` up to ``repair.method`` (each run on its own,
    as :func:`run_tuning_sweep` runs them) at every setting, in all (:func:`core.measure.repair.estimate_seconds`;
    it times a few forward passes, seconds for a ResNet-18)."""
    engine = engine or make_engine(tuned)
    size = tuned.preprocess.image_size
    return sum(estimate_setting_seconds(engine.apply(config), dataclasses.replace(repair, method=method),
                                        input_shape=(3, size, size))
               for config in configs for method in levels(repair.method)[1:])


def _dense_row(tuned: TuneModel, engine: Engine, data: TuneData, batch_size: int,
               report: Callable[[int], None]) -> tuple[torch.Tensor, dict]:
    """The dense model's predictions on ``data`` and its sweep row (τ 0, no θ; its packed file's size).

    ``report(0)`` before and ``report(1)`` after.
    """
    start = time.perf_counter()
    report(0)
    with turn():
        base = engine.apply(CompressionConfig(tau=0.0))  # τ = 0 keeps every weight: the dense model, a private copy
        with interruptible(base.model):
            dense = predict(base.model, data.images, batch_size)
        row = _row(None, False, base, data.labels, dense, dense, len(packed(base, tuned)), time.perf_counter() - start)
    report(1)
    return dense, row


def run_tuning_sweep(tuned: TuneModel, data: TuneData, configs: Sequence[CompressionConfig],
                     calibration: torch.Tensor | None = None, batch_size: int = 100,
                     on_progress: Callable[[int, int, str], None] | None = None, *,
                     repair: RepairConfig | None = None, repair_images: torch.Tensor | None = None,
                     keep_packed: dict | None = None,
                     on_repair_progress: Callable[[int, int, str], None] | None = None,
                     engine: Engine | None = None,
                     on_rows: Callable[[pd.DataFrame], None] | None = None) -> pd.DataFrame:
    """One row per evaluated setting (see :data:`COLUMNS`); the dense model is the row with τ 0 and no θ.

    ``calibration``: images for BN recalibration; with them (and a model with BatchNorm) every
    setting is also evaluated after recalibration (``bn_recalibrated`` true).
    ``repair`` (with ``repair_images``, the calibration images; method other than ``none``): every
    setting is also evaluated after each repair level up to that one, each run on its own (``repair``
    names the level, ``repair_seconds`` its time), so that every level has its own answer;
    ``keep_packed`` (a dict) receives those rows' packed files under ``(config, method)``.
    ``on_rows(frame)`` is called after every row with the rows so far. Each row is one
    :func:`core.common.steps.turn` (in a job: a turn on the compute queue; a cancel stops it within a layer).
    """
    repairing = repair is not None and repair.method != "none"
    if repairing and repair_images is None:
        raise ValueError("a repair needs its calibration images (repair_images)")
    recalibrate = calibration is not None and has_batchnorm(tuned.model)
    methods = levels(repair.method)[1:] if repairing else ()
    total = 1 + len(configs) * (1 + int(recalibrate) + len(methods))
    report = on_progress or (lambda done, total, label: None)
    engine = engine or make_engine(tuned)
    dense, dense_row = _dense_row(tuned, engine, data, batch_size, lambda done: report(done, total, "dense"))
    rows = [dense_row]

    def reported(label: str) -> None:
        report(len(rows), total, label)
        if on_rows is not None:
            on_rows(_frame(rows))

    if on_rows is not None:
        on_rows(_frame(rows))
    for config in configs:
        with turn():
            start = time.perf_counter()
            result = engine.apply(config)
            with interruptible(result.model):
                predicted = predict(result.model, data.images, batch_size)
            rows.append(_row(config, False, result, data.labels, dense, predicted, len(packed(result, tuned)),
                             time.perf_counter() - start))
        reported(_label(config, False))
        if recalibrate:
            with turn():
                start = time.perf_counter()
                model = bn_recalibrate(result.model, calibration)
                with interruptible(model):
                    predicted = predict(model, data.images, batch_size)
                rows.append(_row(config, True, result, data.labels, dense, predicted,
                                 len(packed(result, tuned, model)), time.perf_counter() - start))
            reported(_label(config, True))
        for method in methods:
            with turn():
                start = time.perf_counter()
                fixed = repair_setting(tuned.model, engine, result, repair_images,
                                       dataclasses.replace(repair, method=method), on_progress=on_repair_progress)
                predicted = predict(fixed.model, data.images, batch_size)
                file = packed(result, tuned, repaired=fixed)
                if keep_packed is not None:
                    keep_packed[(config, method)] = file
                rows.append(_row(config, False, result, data.labels, dense, predicted, len(file),
                                 time.perf_counter() - start, fixed))
            reported(_label(config, False) + f" +{method}")
    return _frame(rows)


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype({"b_low": "Int64", "b_high": "Int64"})


@dataclass(frozen=True)
class SettingRun:
    """One setting at every repair level: the rows (dense first), the last level's packed file and repair."""

    frame: pd.DataFrame
    packed: bytes
    config: CompressionConfig
    repaired: RepairResult | None  # the last level's repair (None: the method is "none")


def evaluate_setting(tuned: TuneModel, data: TuneData, config: CompressionConfig, repair: RepairConfig,
                     repair_images: torch.Tensor | None = None, batch_size: int = 100,
                     on_progress: Callable[[int, int, str], None] | None = None,
                     on_repair_progress: Callable[[int, int, str], None] | None = None,
                     on_estimate: Callable[[str, float], None] | None = None) -> SettingRun:
    """``config`` evaluated at every repair level up to ``repair.method`` (each level repaired on its own,
    on ``repair_images``, with ``repair``'s images, ridge and seed).

    The frame: the dense row, then one row per level (``repair`` = ``none``, ``bn``, …), each with
    its accuracy, Δ vs dense with the paired 95 % interval, retention, packed size and repair seconds.
    ``packed``: the file of the last level (carrying its repair). ``on_estimate(method, seconds)``
    is called before each repair with :func:`core.measure.repair.estimate_seconds`' estimate of it.
    """
    methods = levels(repair.method)
    if len(methods) > 1 and repair_images is None:
        raise ValueError("a repair needs its calibration images (repair_images)")
    report = on_progress or (lambda done, total, label: None)
    total = 1 + len(methods)
    engine = make_engine(tuned)
    size = tuned.preprocess.image_size
    dense, dense_row = _dense_row(tuned, engine, data, batch_size, lambda done: report(done, total, "dense"))
    rows = [dense_row]
    result = engine.apply(config)
    file, fixed = b"", None
    for method in methods:
        start = time.perf_counter()
        if method == "none":
            fixed, model = None, result.model
        else:
            level = dataclasses.replace(repair, method=method)
            if on_estimate is not None:
                on_estimate(method, estimate_setting_seconds(result, level, input_shape=(3, size, size)))
            fixed = repair_setting(tuned.model, engine, result, repair_images, level, on_progress=on_repair_progress)
            model = fixed.model
        predicted = predict(model, data.images, batch_size)
        file = packed(result, tuned, repaired=fixed)
        rows.append(_row(config, False, result, data.labels, dense, predicted, len(file),
                         time.perf_counter() - start, fixed))
        report(len(rows), total, _label(config, False) + ("" if method == "none" else f" +{method}"))
    return SettingRun(_frame(rows), file, config, fixed)


def _label(config: CompressionConfig, bn: bool) -> str:
    text = f"τ={config.tau:g}" + (f" θ={config.theta:g}" if config.quantized else "")
    return text + (" +BN" if bn else "")


@dataclass(frozen=True)
class Choice:
    """The largest τ within the allowed drop, for one BN variant (and one θ, or pruning only)."""

    config: CompressionConfig
    bn_recalibrated: bool
    row: dict


def choose(frame: pd.DataFrame, max_drop_points: float, bn: bool, theta: float | None = None,
           theta_mode: str = "relative", b_low: int = 4, b_high: int = 8, repair: str = "none") -> Choice | None:
    """The largest swept τ whose accuracy is at most ``max_drop_points`` below dense's (None when none is),
    among the rows with that BN variant and ``repair``."""
    rows = frame[(frame["bn_recalibrated"] == bn) & (frame["tau"] > 0)]
    if "repair" in rows:
        rows = rows[rows["repair"] == repair]
    rows = rows[rows["theta"].isna()] if theta is None else rows[rows["theta"] == theta]
    passing = rows[rows["accuracy"] >= rows["accuracy_dense"] - max_drop_points / 100 - 1e-12]
    if passing.empty:
        return None
    best = passing.sort_values("tau").iloc[-1].to_dict()
    config = CompressionConfig(tau=float(best["tau"])) if theta is None else CompressionConfig(
        tau=float(best["tau"]), theta=theta, theta_mode=theta_mode, b_low=b_low, b_high=b_high)
    return Choice(config, bn, best)


def pack_choice(tuned: TuneModel, choice: Choice, calibration: torch.Tensor | None) -> bytes:
    """The packed file of the chosen setting (its BN statistics recalibrated when the choice was)."""
    result = make_engine(tuned).apply(choice.config)
    if choice.bn_recalibrated and calibration is not None:
        return packed(result, tuned, bn_recalibrate(result.model, calibration))
    return packed(result, tuned)


def format_sweep(frame: pd.DataFrame, repair_columns: bool | None = None) -> str:
    """The sweep as a table: τ, θ, BN, retention, accuracy, Δ with its interval (points), packed size;
    with ``repair_columns`` (None: when a row was repaired) the repair and its seconds too."""
    repairs = frame["repair"] if "repair" in frame else pd.Series("none", index=frame.index)
    if repair_columns is None:
        repair_columns = bool((repairs != "none").any())
    out = pd.DataFrame({
        "tau": frame["tau"].map("{:g}".format),
        "theta": frame["theta"].map(lambda v: "" if pd.isna(v) else f"{v:g}"),
        "bn": frame["bn_recalibrated"].map({True: "yes", False: ""}),
        "retention_%": (100 * frame["retention"]).map("{:.2f}".format),
        "accuracy_%": (100 * frame["accuracy"]).map("{:.2f}".format),
        "delta_pts": (100 * frame["delta"]).map("{:+.2f}".format),
        "95%_interval": [f"[{100 * lo:+.2f}, {100 * hi:+.2f}]" for lo, hi in zip(frame["delta_low"],
                                                                                frame["delta_high"])],
        "packed_MB": (frame["packed_bytes"] / 1e6).map("{:.3f}".format),
    })
    if repair_columns:
        out.insert(3, "repair", repairs)
        out["packed_bytes"] = frame["packed_bytes"].map("{:,}".format)
        out["repair_s"] = frame["repair_seconds"].map("{:.1f}".format)
    return out.to_string(index=False)
