"""The sweep and the one-setting runs of ``python -m core.tune``: evaluated, chosen, and the files to write.

* :func:`run_tune_sweep` (the default mode): every setting evaluated (:func:`core.measure.tuning.run_tuning_sweep`),
  the largest τ within the allowed drop per variant (without / with BN recalibration, after the
  repair), the one chosen, and ``sweep.csv``, ``settings.json``, ``model.packed``;
* :func:`run_one_setting` (``--tau``): one setting at every repair level up to the chosen one
  (:func:`core.measure.tuning.evaluate_setting`), and the same three files.

Both load their inputs first (:func:`core.measure.tune_inputs.load_inputs`; :class:`BadInput`
when unusable), report through optional callbacks, print nothing and write nothing: the files
come back as ``{name: content}``.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from core.measure import tuning
from core.measure.repair import RepairConfig, levels
from core.measure.tune_inputs import InputSpec, ProgressFor, TuneInputs, load_inputs, quiet
from core.measure.tuning import Choice
from core.method.config import CompressionConfig

#: ``on_estimate(seconds, method, calibration)``: a repair's estimated time, before it starts
OnEstimate = Callable[[float, str, str], None]


def _ignore(note: str) -> None:
    pass


def _header(spec: InputSpec, inputs: TuneInputs) -> str:
    model = inputs.model
    return f"{spec.model} ({model.source}) on {inputs.data.description}; input: {model.preprocess.describe()}"


def describe_setting(config: CompressionConfig) -> str:
    """``config`` in words: ``τ = 0.2``, or ``τ = 0.2, θ = 0.3 (relative), 4/8 bit``."""
    return (f"τ = {config.tau:g}" + (f", θ = {config.theta:g} ({config.theta_mode}), "
                                     f"{config.b_low}/{config.b_high} bit" if config.quantized else ""))


@dataclass(frozen=True)
class SweepOutcome:
    """The sweep: what it ran on, its rows, the best setting per variant, the one chosen and the files to write."""

    spec: InputSpec
    inputs: TuneInputs
    repair: RepairConfig
    max_drop: float  # points
    frame: pd.DataFrame  # columns :data:`core.measure.tuning.COLUMNS`; the dense row first
    #: (BN recalibrated, repair method) → the largest τ within the drop (None: none of the swept τ), in report order
    choices: dict[tuple[bool, str], Choice | None]
    chosen: Choice | None  # what model.packed holds (None: no setting passes, no model.packed)
    files: dict[str, str | bytes]

    def report(self) -> str:
        """The sweep in words: model and data, dense accuracy, the table, the largest τ per variant."""
        repair = (f"; repair '{self.repair.method}' on {self.inputs.repair_description}"
                  if self.repair.method != "none" else "")
        lines = [_header(self.spec, self.inputs),
                 f"dense accuracy {100 * self.frame.iloc[0]['accuracy']:.2f} %; Δ is paired (same images), "
                 f"95 % interval{repair}",
                 tuning.format_sweep(self.frame)]
        for (bn, method), best in self.choices.items():
            what = (f"after repair '{method}'" if method != "none" else
                    "with BN recalibration" if bn else "without BN recalibration")
            found = "none of the swept τ" if best is None else (
                f"τ = {best.config.tau:g}" + (f", θ = {best.config.theta:g}" if best.config.quantized else "")
                + f" (accuracy {100 * best.row['accuracy']:.2f} %, Δ {100 * best.row['delta']:+.2f} points, "
                  f"retention {100 * best.row['retention']:.2f} %, packed {best.row['packed_bytes'] / 1e6:.3f} MB)")
            lines.append(f"largest τ within {self.max_drop:g} points of dense, {what}: {found}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SettingOutcome:
    """One setting at every repair level: what it ran on, the rows (dense first) and the files to write."""

    spec: InputSpec
    inputs: TuneInputs
    config: CompressionConfig
    frame: pd.DataFrame
    files: dict[str, str | bytes]

    def report(self) -> str:
        """The setting in words: model and data, retention and dense accuracy, one row per repair level."""
        frame, inputs = self.frame, self.inputs
        return "\n".join([
            _header(self.spec, inputs),
            f"{describe_setting(self.config)}: retention {100 * frame.iloc[1]['retention']:.2f} %; dense accuracy "
            f"{100 * frame.iloc[0]['accuracy']:.2f} %; Δ is paired (same images), 95 % interval"
            + (f"; repairs fitted on {inputs.repair_description}" if inputs.repair_images is not None else ""),
            tuning.format_sweep(frame.iloc[1:], repair_columns=True)])


def run_tune_sweep(spec: InputSpec, configs: Sequence[CompressionConfig], repair: RepairConfig, *,
                   max_drop: float, thetas: Sequence[float] | None, bits: tuple[int, int], bn_recalibrate: bool,
                   progress: ProgressFor = quiet, on_note: Callable[[str], None] = _ignore,
                   on_estimate: OnEstimate | None = None) -> SweepOutcome:
    """Load ``spec``, evaluate ``configs`` (with BN recalibration when asked, and after ``repair``), choose.

    Per variant the largest τ whose accuracy is at most ``max_drop`` points below dense (over every θ
    of ``thetas``, or pruning only); the chosen setting is the one without BN recalibration unless
    recalibration, then the repair, buys a larger τ. ``on_note`` receives the data's notes after
    loading; ``on_estimate`` the repair's estimated total before the sweep (a repair only).
    Raises :class:`~core.measure.tune_inputs.BadInput` for unusable inputs.
    """
    inputs = load_inputs(spec, repair, bn_recalibrate)
    model, data, calibration = inputs.model, inputs.data, inputs.calibration
    for note in data.notes:
        on_note(note)
    repairing = repair.method != "none"
    engine = tuning.make_engine(model)
    if repairing and on_estimate is not None:
        on_estimate(tuning.estimate_repair_seconds(model, configs, repair, engine=engine), repair.method,
                    inputs.repair_description)
    kept: dict = {}
    frame = tuning.run_tuning_sweep(model, data, configs, calibration, on_progress=progress("sweep"),
                                    repair=repair if repairing else None,
                                    repair_images=inputs.repair_images if repairing else None, keep_packed=kept,
                                    engine=engine)
    variants = [(bn, "none") for bn in ([False, True] if calibration is not None and frame["bn_recalibrated"].any()
                                        else [False])]
    if repairing:
        variants += [(False, method) for method in levels(repair.method)[1:]]
    b_low, b_high = bits
    choices = {}
    for bn, method in variants:
        found = [c for c in (tuning.choose(frame, max_drop, bn, t, b_low=b_low, b_high=b_high, repair=method)
                             for t in thetas or [None]) if c is not None]
        choices[(bn, method)] = max(found, key=lambda c: (c.config.tau, -(c.config.theta or 0)), default=None)
    plain = choices.get((False, "none"))
    chosen = choices.get((True, "none")) or plain
    if chosen is not None and plain is not None and chosen.config.tau <= plain.config.tau:
        chosen = plain  # recalibration only when it buys a larger τ
    for method in levels(repair.method)[1:] if repairing else ():
        fixed = choices.get((False, method))
        if fixed is not None and (chosen is None or fixed.config.tau > chosen.config.tau):
            chosen = fixed  # a repair level too, only when it buys a larger τ than every level below it
    files: dict[str, str | bytes] = {"sweep.csv": frame.to_csv(index=False),
                                     "settings.json": _json(sweep_settings(spec, inputs, frame, chosen, repair,
                                                                           max_drop, choices))}
    if chosen is not None:
        method = chosen.row.get("repair", "none")
        files["model.packed"] = (kept[(chosen.config, method)] if method != "none"
                                 else tuning.pack_choice(model, chosen, calibration))
    return SweepOutcome(spec, inputs, repair, max_drop, frame, choices, chosen, files)


def run_one_setting(spec: InputSpec, config: CompressionConfig, repair: RepairConfig, *,
                        progress: ProgressFor = quiet, on_note: Callable[[str], None] = _ignore,
                    on_estimate: OnEstimate | None = None) -> SettingOutcome:
    """Load ``spec`` and evaluate ``config`` at every repair level up to ``repair.method``, each on its own.

    ``on_estimate`` receives each repair's estimate before it starts; ``model.packed`` carries the
    last level's repair and ``settings.json`` a ``"repair"`` block and one ``"levels"`` entry per level.
    Raises :class:`~core.measure.tune_inputs.BadInput` for unusable inputs.
    """
    inputs = load_inputs(spec, repair, bn_calibration=False)
    for note in inputs.data.notes:
        on_note(note)

    def estimate(method: str, seconds: float) -> None:
        if on_estimate is not None:
            on_estimate(seconds, method, inputs.repair_description)

    run = tuning.evaluate_setting(inputs.model, inputs.data, config, repair, inputs.repair_images,
                                  on_progress=progress("setting"), on_repair_progress=progress("repair"),
                                  on_estimate=estimate)
    frame = run.frame
    last = frame.iloc[-1]
    payload = {
        "config": config.to_dict(),
        "repair": _repair_block(repair, inputs, float(last["repair_seconds"])),
        "bn_recalibrated": False,
        **_provenance(spec, inputs),
        "dense_accuracy": float(frame.iloc[0]["accuracy"]),
        "measured": _measured(last),
        "levels": [_measured(row) for _, row in frame.iloc[1:].iterrows()],
    }
    files = {"sweep.csv": frame.to_csv(index=False), "model.packed": run.packed, "settings.json": _json(payload)}
    return SettingOutcome(spec, inputs, config, frame, files)


def sweep_settings(spec: InputSpec, inputs: TuneInputs, frame: pd.DataFrame, chosen: Choice | None,
                   repair: RepairConfig, max_drop: float,
                   choices: dict[tuple[bool, str], Choice | None] | None = None) -> dict:
    """settings.json of the sweep: the chosen setting in ``CompressionConfig.to_dict()`` form, what it measured,
    and (``choices``) the largest τ within ``max_drop`` of every variant: one entry per repair level
    (``"bn"`` for the BN-recalibrated rows), ``config`` and ``measured`` None where no swept τ passes."""
    payload = {
        "config": None if chosen is None else chosen.config.to_dict(),
        "bn_recalibrated": None if chosen is None else chosen.bn_recalibrated,
        **_provenance(spec, inputs),
        "max_drop_points": max_drop,
        "dense_accuracy": float(frame.iloc[0]["accuracy"]),
    }
    if repair.method != "none":
        payload["repair"] = {**_repair_block(repair, inputs),
                             "chosen": chosen is not None and chosen.row.get("repair") == repair.method,
                             "chosen_level": None if chosen is None else str(chosen.row.get("repair", "none"))}
    if chosen is not None:
        payload["measured"] = _measured(chosen.row)
    if choices is not None:
        payload["largest_tau_within"] = [
            {"level": "bn" if bn else method, "bn_recalibrated": bn,
             "config": None if best is None else best.config.to_dict(),
             "measured": None if best is None else _measured(best.row)}
            for (bn, method), best in choices.items()]
    return payload


def _json(payload: dict) -> str:
    return json.dumps(payload, indent=1, ensure_ascii=False)


def _repair_block(repair: RepairConfig, inputs: TuneInputs, seconds: float | None = None) -> dict:
    images = inputs.repair_images
    block = {"method": repair.method, "n_images": None if images is None else int(len(images)),
             "ridge": repair.ridge, "seed": repair.seed, "positions": repair.positions,
             "calibration": inputs.repair_description}
    if seconds is not None:
        block["seconds"] = seconds
    return block


def _provenance(spec: InputSpec, inputs: TuneInputs) -> dict:
    model, data = inputs.model, inputs.data
    return {
        "model": {"spec": spec.model, "arch": model.arch, "arch_kwargs": model.arch_kwargs, "source": model.source,
                  **({"input": model.input_spec} if model.input_spec else {})},
        "data": {"spec": spec.data, "description": data.description, "images": len(data), "labelled": data.labelled},
    }


def _measured(row) -> dict:
    measured = {key: float(row[key]) for key in ("accuracy", "accuracy_dense", "delta", "delta_low", "delta_high",
                                                  "retention")}
    measured.update(packed_bytes=int(row["packed_bytes"]), images=int(row["n"]), repair=str(row["repair"]),
                    repair_seconds=float(row["repair_seconds"]))
    return measured
