"""The inputs of ``python -m core.tune``'s sweep and one-setting modes, loaded and checked: model, images, calibration.

:func:`load_inputs` turns an :class:`InputSpec` (what the flags name) into :class:`TuneInputs`
with the loaders of :mod:`core.measure.tuning`; whatever cannot be used (a missing file, an
unknown model, unusable images) is raised as :class:`BadInput` with one sentence.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.measure import tuning
from core.measure.repair import RepairConfig
from core.measure.tuning import TuneData, TuneModel
from core.workloads.data import DataError
from core.workloads.models import CheckpointError

#: ``progress(done, total, label)``: one stage's progress
Progress = Callable[[int, int, str], None]
#: ``progress(stage)``: the progress callback of a named stage (the tune modes report several)
ProgressFor = Callable[[str], Progress]


def quiet(stage: str) -> Progress:
    """The :data:`ProgressFor` that reports nothing."""
    return lambda done, total, label: None


class BadInput(ValueError):
    """Input found unusable while a tuning run loads or plans (one sentence; the command exits with status 2)."""


@dataclass(frozen=True)
class InputSpec:
    """What to load, as the command line names it (``--model``, ``--weights``, ``--data``, … of ``core.tune``).

    ``images``: a fixed class-balanced subset of the evaluation images (None: all);
    ``calibration_data``: ``cifar10``, a folder, or None (BN: the evaluation images; repair: CIFAR-10's training split).
    """

    model: str
    data: str = "cifar10"
    weights: str | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    images: int | None = None
    max_images: int = 2000
    calibration_data: str | None = None
    calibration_size: int = 2000


@dataclass(frozen=True)
class TuneInputs:
    """The loaded inputs: the model, the evaluation images, BN calibration images and repair images (or None)."""

    model: TuneModel
    data: TuneData
    calibration: torch.Tensor | None  # images for BN recalibration (asked for only)
    repair_images: torch.Tensor | None  # images a repair is fitted on (a repair asked for only)
    repair_description: str | None  # what the repair images are, in words


def load_inputs(spec: InputSpec, repair: RepairConfig, bn_calibration: bool) -> TuneInputs:
    """The model, data and calibration sets ``spec`` names; ``repair``'s images when its method is not ``none``.

    Raises :class:`BadInput` (the loader's message on one line) for a checkpoint, data or value error.
    """
    try:
        model = tuning.load_model(spec.model, spec.weights, spec.image_size, spec.mean, spec.std)
        data = tuning.load_data(spec.data, model, spec.images, spec.max_images)
        calibration = None
        if bn_calibration:
            calibration = tuning.calibration_set(spec.calibration_data, model, data, spec.calibration_size)
        images, description = None, None
        if repair.method != "none":
            images, description = tuning.repair_calibration(spec.calibration_data, model, repair.n_images,
                                                            repair.seed)
    except (CheckpointError, DataError, ValueError, TypeError, FileNotFoundError) as err:
        raise BadInput(" ".join(str(err).split())) from err
    return TuneInputs(model, data, calibration, images, description)
