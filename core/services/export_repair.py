"""The Export page's repaired packed file: repair the current setting, then pack it (no Streamlit here).

The page offers the repairs of :mod:`core.measure.repair` (each includes the ones before) for
the packed download; this module is the one call behind it:

* :func:`unavailable`: why a level cannot be applied to the loaded model here (None: it can).
  The repairs are fitted on augmented CIFAR-10 *training* images (never the test images the
  app measures on, never the user's images), so they are offered for CIFAR-10 models; other
  models are repaired with ``python -m core.tune --tau … --repair … --calibration-data DIR``;
* :func:`estimate`: :func:`core.measure.repair.estimate_seconds` for the setting (an estimate,
  from a few timed forward passes; queued, cached);
* :func:`repaired_packed`: the repair, then the packed file carrying it
  (:func:`core.deploy.packed_writer.compressed_bytes` with ``repaired``: the same mask, the same
  bit-widths, the same data size; the header records the repair).

``bias`` and ``reconstruct`` are the Explore page's own repairs
(:meth:`core.services.session_repairs.SessionRepairs.run`: queued, and cached process-wide, so a
setting repaired on the Explore page, by any session, is packed at once and the file carries the
model whose accuracy was shown there). ``bn`` is :func:`core.measure.repair.repair_setting` with
method ``"bn"`` on the same number of training images (the Explore page's BN level is a
recalibrated model, not a repair record). The loaded model and the session's engine are only read.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from core.common.lru import LRUCache
from core.deploy.packed_writer import compressed_bytes
from core.measure.calibration import calibration_split
from core.measure.repair import METHODS, RepairConfig, estimate_setting_seconds, repair_setting
from core.method.engine import CompressionResult
from core.services.compute_queue import COMPUTE
from core.services.session import ExploreSession
from core.services.uploads import with_record

#: the choices, in order, with the words the page shows (each includes the ones before)
LABELS: dict[str, str] = {
    "none": "None",
    "bn": "BN recalibration",
    "bias": "+ bias correction",
    "reconstruct": "+ reconstruction",
}
#: the levels the Explore page's shared repair (and its cache) serves
SHARED_LEVELS: tuple[str, ...] = ("bias", "reconstruct")
#: calibration images the ``bn`` level is fitted on (augmented CIFAR-10 training images, fixed seed)
CALIBRATION_IMAGES = 512
SEED = 0
_ESTIMATES = LRUCache(256)  # (model key, config, "bn") -> seconds


def bn_config() -> RepairConfig:
    """The ``bn`` repair the page runs: :data:`CALIBRATION_IMAGES` images, no held-out error table."""
    return RepairConfig(method="bn", n_images=CALIBRATION_IMAGES, n_holdout=0, seed=SEED)


def unavailable(session: ExploreSession, method: str | None = None) -> str | None:
    """Why ``method`` (None: any repair) cannot be applied to the loaded model here, in a sentence (None: it can)."""
    if method not in (None, *METHODS):
        raise ValueError(f"repair method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "none":
        return None
    if not session.evaluates_cifar:
        return ("Repair is fitted on CIFAR-10 training images here, so it is offered for CIFAR-10 models; repair "
                "other models from the command line: `python -m core.tune --tau … --repair … "
                "--calibration-data DIR`.")
    if method == "bn" and not session.has_batchnorm:
        return "This model has no BatchNorm layer: there are no statistics to recalibrate."
    return None


@lru_cache(maxsize=2)
def _images(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    images, _ = calibration_split(CALIBRATION_IMAGES, 0, seed=SEED, mean=mean, std=std)
    return images


def estimate(session: ExploreSession, result: CompressionResult, method: str) -> float:
    """Estimated seconds of the repair ``method`` of ``result`` on this server now (0 for ``none``; cached)."""
    if method == "none":
        return 0.0
    if method in SHARED_LEVELS:
        return session.repairs.estimate(result, method)
    key = (session.key, result.config, method)
    cached = _ESTIMATES.get(key)
    if cached is None:
        with COMPUTE.job():
            cached = estimate_setting_seconds(result, bn_config(),
                                              input_shape=tuple(session.loaded.example_input(1).shape[1:]))
        _ESTIMATES.put(key, cached)
    return cached


@dataclass(frozen=True)
class RepairedFile:
    """A packed file and the repair it carries (``method`` ``none``: none)."""

    data: bytes
    method: str
    seconds: float  # the repair's wall time (0 for none; a cached repair's when it was made)
    changed: int  # state_dict tensors the repair changed
    n_images: int  # calibration images it was fitted on


def repaired_packed(session: ExploreSession, result: CompressionResult, method: str, *,
                    on_progress: Callable[[int, int, str], None] | None = None,
                    cancel: threading.Event | Callable[[], bool] | None = None) -> RepairedFile:
    """``result`` (the session's current setting) repaired with ``method``, as a packed file.

    ``none`` packs ``result`` as it is. Otherwise the repair runs as one job of the shared
    compute queue unless it is cached (``on_progress(done, total, layer)`` after each layer;
    ``cancel`` checked before each, raising :class:`core.measure.repair.RepairCancelled`); then
    the file is packed and verified. ``ValueError`` (a sentence) when the level does not apply here.
    """
    reason = unavailable(session, method)
    if reason is not None:
        raise ValueError(reason)
    loaded = session.loaded
    provenance = dict(arch=loaded.arch, arch_kwargs=loaded.arch_kwargs,
                      input_spec=None if loaded.preprocess is None else loaded.preprocess.to_dict())
    if method == "none":
        return RepairedFile(with_record(compressed_bytes(result, **provenance), loaded), "none", 0.0, 0, 0)
    if method in SHARED_LEVELS:
        fixed = session.repairs.run(result, method, on_progress=on_progress, cancel=cancel)
    else:
        images = _images(tuple(loaded.mean), tuple(loaded.std))
        with COMPUTE.job():
            fixed = repair_setting(loaded.model, session.engine, result, images, bn_config(),
                                   on_progress=on_progress, cancel=cancel)
    data = with_record(compressed_bytes(result, **provenance, repaired=fixed), loaded)  # a channel file's record again
    return RepairedFile(data, method, fixed.seconds, len(fixed.changed), fixed.n_images)
