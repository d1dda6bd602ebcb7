"""The Tune page's sweep on the sidebar's model and the user's own images (no Streamlit here).

The sweep itself is :func:`core.measure.tuning.run_tuning_sweep`, the one behind
``python -m core.tune``; this module only hands it what the app holds:

* :func:`tune_model`: a :class:`~core.services.choices.LoadedModel` (registry checkpoint,
  torchvision model with pretrained or uploaded weights) as a :class:`~core.measure.tuning.TuneModel`;
* :func:`tune_data`: the user's images as the session holds them (labels already mapped to the
  model's outputs by :func:`core.workloads.image_folder.for_model`) as a
  :class:`~core.measure.tuning.TuneData`, optionally a fixed class-balanced subset (the same
  subset ``--images N`` of the command line takes). Without labels, the labels are the dense
  model's predictions, so that "accuracy" is top-1 agreement with the dense model, as in the CLI;
* :func:`run_user_sweep`: the sweep, plus, for unlabelled images, the mean KL divergence
  KL(p_dense ‖ p_compressed) of every setting (:func:`core.measure.fidelity.fidelity`) on the
  first :data:`KL_IMAGES` evaluated images (a second pass: ``run_tuning_sweep`` keeps no logits);
* :func:`class_mapping`: which model output each class of the user's images became, and how many
  images each has.

Nothing here modifies the model; all inference is fp32 on the CPU.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pandas as pd
import torch

from core.common.steps import interruptible, turn
from core.measure.accuracy import bn_recalibrate, has_batchnorm, predict
from core.measure.fidelity import fidelity
from core.measure.paired import balanced_order
from core.measure.tuning import TuneData, TuneModel, make_engine, run_tuning_sweep
from core.method.config import CompressionConfig
from core.services.choices import LoadedModel
from core.workloads.image_folder import ImageSet

#: unlabelled images the mean KL is measured on per setting (the Explore page's fidelity uses as many)
KL_IMAGES = 256
Progress = Callable[[int, int, str], None]


def tune_model(loaded: LoadedModel) -> TuneModel:
    """``loaded`` as the tuning sweep takes it: the same module (shared, never modified) and pre-processing.

    Registry models (no recorded pre-processing: CIFAR-10's 32 px recipe) are marked ``registry``,
    so their packed files record no input spec, exactly as the command line writes them.
    """
    if loaded.input_kind == "vector":
        raise ValueError(f"{loaded.label} takes vectors, not images: it cannot be tuned on images")
    return TuneModel(loaded.model, loaded.arch, dict(loaded.arch_kwargs), loaded.input_preprocess(),
                     tuple(loaded.categories), loaded.source, loaded.preprocess is None)


def subset_indices(labels: torch.Tensor, n_images: int) -> torch.Tensor:
    """A fixed class-balanced subset of ``n_images`` indices in their original order (seed 0, as ``--images``)."""
    return balanced_order(labels, seed=0)[:n_images].sort().values


def tune_data(images: ImageSet, model: torch.nn.Module, n_images: int | None = None,
              batch_size: int = 64) -> TuneData:
    """The user's images (labels mapped to ``model``'s outputs, or none) as :class:`TuneData`.

    ``n_images``: keep a fixed class-balanced subset of that many (labelled), or the first that many
    (unlabelled); None or a number ≥ the set's size keeps every image. Without labels, the labels are
    ``model``'s own predictions (``labelled`` False): accuracy then means top-1 agreement with it.
    Raises ``ValueError`` for an empty set or ``n_images`` < 1.
    """
    if len(images) == 0:
        raise ValueError("the image set is empty")
    if n_images is not None and n_images < 1:
        raise ValueError(f"the number of images must be ≥ 1, got {n_images}")
    keep = n_images is not None and n_images < len(images)
    notes = tuple(images.notes)
    if images.labelled:
        tensors, labels = images.images, images.labels
        if keep:
            index = subset_indices(labels, int(n_images))
            tensors, labels = tensors[index].contiguous(), labels[index]
        what = f"a class-balanced subset of {len(labels):,} of your" if keep else f"all {len(labels):,} of your"
        return TuneData(tensors, labels, f"{what} labelled images ({images.source})", True, notes)
    tensors = images.images[:n_images] if keep else images.images
    labels = predict(model, tensors, batch_size)
    what = f"the first {len(labels):,} of your" if keep else f"all {len(labels):,} of your"
    return TuneData(tensors, labels, f"{what} unlabelled images ({images.source}); accuracy = top-1 agreement "
                                     "with the dense model", False, notes)


def _row_settings(configs: Sequence[CompressionConfig], recalibrated: bool
                  ) -> list[tuple[CompressionConfig | None, bool]]:
    """(config, BN recalibrated) of every row ``run_tuning_sweep`` returns, in its order (None: dense)."""
    rows: list[tuple[CompressionConfig | None, bool]] = [(None, False)]
    for config in configs:
        rows.append((config, False))
        if recalibrated:
            rows.append((config, True))
    return rows


def user_sweep_plan(tuned: TuneModel, data: TuneData, configs: Sequence[CompressionConfig],
                    calibration: torch.Tensor | None = None, kl_images: int = KL_IMAGES) -> tuple[float, ...]:
    """The relative cost of every step :func:`run_user_sweep` reports, in its order (images run through a model)."""
    recalibrated = calibration is not None and has_batchnorm(tuned.model)
    n, steps = float(len(data.labels)), []
    for config, bn in _row_settings(configs, recalibrated):
        steps.append(n + (len(calibration) if bn else 0))
    if not data.labelled:
        kl = float(min(kl_images, len(data.labels)))
        steps += [kl + (len(calibration) if bn else 0) for _, bn in _row_settings(configs, recalibrated)[1:]]
    return tuple(steps)


def run_user_sweep(tuned: TuneModel, data: TuneData, configs: Sequence[CompressionConfig],
                   calibration: torch.Tensor | None = None, on_progress: Progress | None = None,
                   kl_images: int = KL_IMAGES,
                   on_rows: Callable[[pd.DataFrame], None] | None = None) -> pd.DataFrame:
    """:func:`core.measure.tuning.run_tuning_sweep` on ``data``; for unlabelled data also ``mean_kl``.

    Returns the sweep's frame (columns :data:`core.measure.tuning.COLUMNS`, accuracies as fractions;
    the dense row has τ 0 and no θ) with a column ``mean_kl``: KL(p_dense ‖ p_setting) in nats on the
    first ``kl_images`` images, 0 for the dense row, NaN for labelled data (not measured there).
    ``calibration``: images for BN recalibration (every setting is then also evaluated recalibrated,
    for a model with BatchNorm). ``on_progress(done, total, label)`` is called after every step,
    ``on_rows(frame)`` with the rows so far (``mean_kl`` NaN until measured). Each step is one
    :func:`core.common.steps.turn` (in a job: a turn on the compute queue, and a cancel stops it).
    """
    report = on_progress or (lambda done, total, label: None)
    recalibrated = calibration is not None and has_batchnorm(tuned.model)
    rows = _row_settings(configs, recalibrated)
    extra = 0 if data.labelled else len(rows) - 1
    total = len(rows) + extra
    rows_out = (lambda part: on_rows(part.assign(mean_kl=math.nan))) if on_rows is not None else None
    engine = make_engine(tuned)
    frame = run_tuning_sweep(tuned, data, configs, calibration,
                             on_progress=lambda done, _total, label: report(done, total, label), engine=engine,
                             on_rows=rows_out)
    if data.labelled:
        return frame.assign(mean_kl=math.nan)
    images = data.images[:kl_images]
    dense = engine.apply(CompressionConfig()).model  # τ = 0: the dense model, a private copy
    kl = [0.0]
    for done, (config, bn) in enumerate(rows[1:], start=len(rows) + 1):
        with turn():
            model = engine.apply(config).model
            if bn:
                model = bn_recalibrate(model, calibration)
            with interruptible(dense), interruptible(model):
                kl.append(fidelity(dense, model, images).mean_kl)
        report(done, total, f"mean KL, τ={config.tau:g}" + (" +BN" if bn else ""))
        if on_rows is not None:
            on_rows(frame.assign(mean_kl=kl + [math.nan] * (len(frame) - len(kl))))
    return frame.assign(mean_kl=kl)


def class_mapping(images: ImageSet) -> pd.DataFrame:
    """Per model output that has images: ``output`` (index), ``class`` (its name) and ``images`` (count).

    ``images`` must be mapped to the model (:func:`core.workloads.image_folder.for_model`); an
    unlabelled set gives an empty frame.
    """
    if not images.labelled or len(images) == 0:
        return pd.DataFrame({"output": pd.Series(dtype=int), "class": pd.Series(dtype=str),
                             "images": pd.Series(dtype=int)})
    counts = torch.bincount(images.labels, minlength=len(images.class_names))
    present = [i for i, n in enumerate(counts.tolist()) if n]
    names = images.class_names
    return pd.DataFrame({"output": present, "class": [names[i] if i < len(names) else str(i) for i in present],
                         "images": [int(counts[i]) for i in present]})
