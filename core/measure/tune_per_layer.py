"""The sensitivity and per-layer runs of ``python -m core.tune`` on a shipped checkpoint: measured, chosen, verified.

* :func:`shipped_sensitivity` (``--sensitivity``): the layer × τ table of paired accuracy drops
  (:func:`core.measure.sensitivity.measure_sensitivity`), cached on disk;
* :func:`run_per_layer_tuning` (``--per-layer``): the same table, a τ per layer for the target
  (:mod:`core.measure.allocation`: the additive allocation, or the best of the candidates run
  whole), verified on the test set against uniform τ and global magnitude pruning, and the files
  to write (``settings.json``, ``comparison.csv``, ``sensitivity.csv``).

Nothing here prints or writes; a target the τ grid cannot reach raises
:class:`~core.measure.tune_inputs.BadInput`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from core.measure.allocation import Allocation, Target, per_layer_tau, smallest_reachable
from core.measure.allocation_joint import choose_jointly, format_candidates
from core.measure.allocation_verify import Comparison, compare_at_equal_retention, format_comparison, test_images
from core.measure.sensitivity import Sensitivity, SensitivityConfig, measure_sensitivity
from core.measure.tune_inputs import BadInput, ProgressFor, quiet
from core.method.engine import Engine
from core.workloads.models import load_card, load_pretrained

@dataclass(frozen=True)
class CacheSpec:
    """Whether results are cached, and where (None: the project cache; else DIR/sensitivity, DIR/allocation)."""

    use: bool = True
    root: Path | None = None

    def under(self, name: str) -> Path | None:
        return None if self.root is None else self.root / name


def sensitivity_report(name: str, sensitivity: Sensitivity) -> str:
    """The sensitivity in words: what it was measured on, the layer × τ drops (points) with each layer's share."""
    table = (100 * sensitivity.drops()).map(lambda v: f"{v:+.1f}")
    table.columns = [f"τ={t:g}" for t in table.columns]
    table.insert(0, "share_%", (100 * sensitivity.shares()).map(lambda v: f"{v:.1f}"))
    return "\n".join([
        f"{name}: accuracy drop (points) with one layer pruned at a time, on {sensitivity.images}; "
        f"{sensitivity.precision}" + (", BN recalibrated" if sensitivity.bn_recalibration else "")
        + f"; dense accuracy on them {100 * sensitivity.dense_accuracy:.2f} %",
        table.to_string(),
        f"{len(sensitivity.layers)} layers × {len(sensitivity.taus)} τ: {sensitivity.seconds:.1f} s "
        f"({sensitivity.computed} layers measured, {sensitivity.cached} read from the cache)"])


@dataclass(frozen=True)
class PerLayerOutcome:
    """The per-layer run: the sensitivity it used, the allocation chosen, its verification and the files to write."""

    name: str
    target: Target
    sensitivity: Sensitivity
    allocation: Allocation
    comparison: Comparison
    calibration_size: int | None  # BN recalibration images of the verification (None: without)
    files: dict[str, str]  # settings.json, comparison.csv, sensitivity.csv

    def report(self) -> str:
        """The run in words: the candidates (when judged jointly), the choice, the verified table, the differences."""
        allocation, comparison, frame = self.allocation, self.comparison, self.comparison.frame
        lines = []
        if allocation.candidates is not None:
            attrs = allocation.candidates.attrs
            lines += [f"candidates at the same budget, each run whole on {attrs['images']} ({attrs['precision']}"
                      + (", BN recalibrated" if attrs["bn_recalibrated"] else "") + "):",
                      format_candidates(allocation.candidates)]
        lines += [f"{self.name}: automatic per-layer τ ({allocation.method}) for {self.target.label()} (estimated "
                  f"drop {100 * allocation.predicted_drop:.2f} points from the sensitivity on "
                  f"{self.sensitivity.images}); verified on {comparison.images} in fp32"
                  + ("" if self.calibration_size is None else
                     f", BN recalibration on {self.calibration_size} augmented training images"),
                  format_comparison(frame)]
        for bn in sorted(set(frame["bn_recalibrated"])):
            parts = []
            for other in ("uniform", "global_magnitude"):
                delta, low, high = comparison.difference("per_layer", other, bn)
                parts.append(f"{other.replace('_', ' ')} {100 * delta:+.2f} points "
                             f"(95 % {100 * low:+.2f} … {100 * high:+.2f})")
            lines.append("per-layer τ vs " + "; vs ".join(parts)
                         + (" — with BN recal" if bn else " — without BN recal"))
        return "\n".join(lines)


def _measure(model: nn.Module, card: dict, config: SensitivityConfig, cache: CacheSpec, progress: ProgressFor,
             engine: Engine | None = None) -> Sensitivity:
    return measure_sensitivity(model, config, model_id=f"sha256:{card['sha256']}", mean=card["mean"],
                               std=card["std"], engine=engine, use_cache=cache.use,
                               cache_root=cache.under("sensitivity"), on_progress=progress("sensitivity"))


def shipped_sensitivity(name: str, config: SensitivityConfig, cache: CacheSpec = CacheSpec(),
                        progress: ProgressFor = quiet) -> Sensitivity:
    """The sensitivity of the shipped checkpoint ``name`` (one of ``PRETRAINED``) under ``config``."""
    card = load_card(name)
    return _measure(load_pretrained(name), card, config, cache, progress)


def run_per_layer_tuning(name: str, config: SensitivityConfig, target: Target, *, verify_images: int | None,
                         calibration_size: int, bn_recalibration: bool, additive_only: bool,
                         cache: CacheSpec = CacheSpec(), progress: ProgressFor = quiet) -> PerLayerOutcome:
    """τ per layer of the shipped checkpoint ``name`` for ``target``, verified on ``verify_images`` test images.

    The allocation is the additive one (``additive_only``, or a ``max_drop`` target) or the best of
    the candidates run whole on the sensitivity's images; the verification (fp32) compares it with
    uniform τ and global magnitude pruning at the same retention, also after BN recalibration on
    ``calibration_size`` training images when ``bn_recalibration``. Raises
    :class:`~core.measure.tune_inputs.BadInput` when the τ grid cannot reach a retention or bytes target.
    """
    card = load_card(name)
    model = load_pretrained(name)
    engine = Engine(model)
    retention, size = smallest_reachable(engine, engine.layer_names, max(config.taus))
    if target.kind == "retention" and target.value < retention:
        raise BadInput(f"--target-retention {target.value:g} is below what the τ grid reaches "
                       f"({retention:.4f} with every layer at τ={max(config.taus):g}); add larger --taus")
    if target.kind == "bytes" and target.value < size:
        raise BadInput(f"--target-bytes {target.value:.0f} is below what the τ grid reaches "
                       f"({size} bytes with every layer at τ={max(config.taus):g}); add larger --taus")
    sensitivity = _measure(model, card, config, cache, progress, engine)
    model_id = f"sha256:{card['sha256']}"
    if additive_only or target.kind == "max_drop":
        allocation = per_layer_tau(sensitivity, engine, target)
    else:
        allocation = choose_jointly(model, sensitivity, engine, target, model_id=model_id, mean=card["mean"],
                                    std=card["std"], use_cache=cache.use, cache_root=cache.under("allocation"),
                                    on_progress=progress("joint check"))
    data = test_images(verify_images, card["mean"], card["std"])
    comparison = compare_at_equal_retention(
        model, allocation, engine=engine, data=data, calibration_size=calibration_size,
        bn_recalibration=bn_recalibration, model_id=model_id, mean=card["mean"], std=card["std"],
        use_cache=cache.use, cache_root=cache.under("allocation"), on_progress=progress("verification"))
    frame = comparison.frame
    calibration = calibration_size if bn_recalibration else None
    settings = {
        "config": comparison.config.to_dict(),
        "model": name,
        "checkpoint_sha256": card["sha256"],
        "target": {"kind": target.kind, "value": target.value, "label": target.label()},
        "predicted_drop": allocation.predicted_drop,
        "method": allocation.method,
        "candidates": None if allocation.candidates is None else json.loads(
            allocation.candidates.to_json(orient="records")),
        "sensitivity": {"images": sensitivity.images, "n": sensitivity.n, "taus": list(sensitivity.taus),
                        "precision": sensitivity.precision, "bn_recalibration": sensitivity.bn_recalibration},
        "verification": {"images": comparison.images, "precision": "fp32",
                         "calibration_images": calibration,
                         "uniform_tau": comparison.uniform_tau},
        "measured": json.loads(frame.drop(columns=["seconds", "cached"]).to_json(orient="records")),
    }
    files = {"settings.json": json.dumps(settings, indent=1, ensure_ascii=False),
             "comparison.csv": frame.to_csv(index=False), "sensitivity.csv": sensitivity.frame.to_csv(index=False)}
    return PerLayerOutcome(name, target, sensitivity, allocation, comparison, calibration, files)
