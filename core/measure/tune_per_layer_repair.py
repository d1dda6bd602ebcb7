"""``python -m core.tune --per-layer --repair LEVEL``: per-layer τ chosen after the repair, verified, packed.

:func:`run_per_layer_repaired` measures (or reads) the sensitivity of a shipped checkpoint, builds
the candidate allocations for a retention target (sensitivity, global magnitude's per-layer
counts, blends), judges each after the repair on labelled *training* images disjoint from the
repair's fitting images, runs the greedy search from the best (:mod:`core.measure.allocation_repair`),
and verifies the choice on the test set in fp32 against uniform τ, global magnitude and the
sensitivity allocation at the same retention, every one after the same repair on the same
fitting images (:func:`verify_after_repair`). The files: ``settings.json`` (the per-layer τ
under ``"config"``, the repair under ``"repair"``), ``comparison.csv``, ``candidates.csv`` and
``model.packed``, the chosen setting with its repair (loadable by ``load_compressed``).

Nothing here prints or writes; an unreachable or unsupported target raises
:class:`~core.measure.tune_inputs.BadInput`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from core.common.steps import interruptible
from core.deploy.packed_writer import compressed_bytes
from core.measure.accuracy import EvalData, predict
from core.measure.allocation import (
    Allocation,
    Target,
    layer_options,
    smallest_reachable,
)
from core.measure.allocation_joint import candidate_allocations, magnitude_kept
from core.measure.allocation_repair import (
    RepairedChoice,
    RepairJudge,
    SearchConfig,
    choose_after_repair,
    format_choice,
    scoring_split,
)
from core.measure.allocation_verify import test_images, uniform_tau_for_kept
from core.measure.paired import paired_interval
from core.measure.repair import RepairConfig
from core.measure.sensitivity import Sensitivity, SensitivityConfig, measure_sensitivity
from core.measure.tune_inputs import BadInput, ProgressFor, quiet
from core.measure.tune_per_layer import CacheSpec
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads.models import load_card, load_pretrained

VERIFY_COLUMNS: tuple[str, ...] = ("method", "kept", "retention", "accuracy", "n", "drop", "newly_wrong",
                                   "newly_right", "repair_seconds")


@dataclass(frozen=True)
class Verification:
    """The test-set table (:data:`VERIFY_COLUMNS`, dense first) and each row's predictions on ``labels``' images."""

    frame: pd.DataFrame
    labels: torch.Tensor
    predictions: dict[str, torch.Tensor]
    images: str
    #: row → (engine result, its repair) for the rows asked to be kept (the packed file's)
    repaired: dict[str, tuple] = dataclasses.field(default_factory=dict, repr=False)

    def difference(self, a: str, b: str) -> tuple[float, float, float]:
        """Accuracy of row ``a`` minus row ``b`` on the same images, with the paired 95 % interval."""
        right_a, right_b = self.predictions[a] == self.labels, self.predictions[b] == self.labels
        gained, lost, n = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum()), len(self.labels)
        low, high = paired_interval(gained, lost, n, population=10 ** 12)
        return (gained - lost) / n, low, high


def baseline_settings(judge: RepairJudge, allocation: Allocation) -> dict[str, CompressionConfig]:
    """Uniform τ (the τ whose kept count is closest to the allocation's) and global magnitude pruning
    of the same number of weights (its per-layer counts as per-layer τ), over the allocation's layers."""
    layers = list(allocation.layer_tau)
    uniform = uniform_tau_for_kept(judge.engine, layers, allocation.total_kept)
    magnitude, _ = judge.config_for(magnitude_kept(list(judge.options.values()), allocation.total_kept))
    return {"uniform τ": CompressionConfig(layer_tau={name: uniform for name in layers}),
            "global magnitude": magnitude}


def verify_after_repair(judge: RepairJudge, settings: Mapping[str, CompressionConfig], data: EvalData,
                        progress: ProgressFor = quiet, keep: tuple[str, ...] = ()) -> Verification:
    """Each setting repaired by ``judge`` (its repair, its fitting images) and run in fp32 on ``data``.

    ``keep``: rows whose engine result and repair are returned in :attr:`Verification.repaired`.

    ``drop`` = dense accuracy − the row's, from paired counts on the same images (positive = worse).
    """
    report = progress("verification")
    layers = list(judge.options)
    dense_model = judge.engine.apply(CompressionConfig()).model
    plan = [("dense", None)] + list(settings.items())
    report(0, len(plan), "dense")
    predictions, rows, kept_repairs = {}, [], {}
    for done, (method, config) in enumerate(plan, start=1):
        start = time.perf_counter()
        if config is None:
            model, kept, seconds = dense_model, sum(o.numel for o in judge.options.values()), 0.0
        else:
            result, fixed, model = judge.repaired(config)
            if method in keep:
                kept_repairs[method] = (result, fixed)
            stats = result.stats.set_index("name")
            kept, seconds = int(stats.loc[layers, "kept"].sum()), (fixed.seconds if fixed is not None else 0.0)
        run = model.to(memory_format=torch.channels_last)
        with interruptible(run):
            predictions[method] = predict(run, data.images, batch_size=1000, precision="fp32")
        rows.append({"method": method, "kept": kept, "repair_seconds": seconds,
                     "seconds": time.perf_counter() - start})
        report(done, len(plan), method)
    dense_right = predictions["dense"] == data.labels
    numel = sum(o.numel for o in judge.options.values())
    for row in rows:
        right = predictions[row["method"]] == data.labels
        row.update(retention=row["kept"] / numel, accuracy=float(right.float().mean()), n=len(data),
                   newly_wrong=int((dense_right & ~right).sum()), newly_right=int((~dense_right & right).sum()))
        row["drop"] = (row["newly_wrong"] - row["newly_right"]) / len(data)
    frame = pd.DataFrame.from_records(rows, columns=list(VERIFY_COLUMNS))
    return Verification(frame, data.labels, predictions, f"{len(data):,} {data.split} images", kept_repairs)


def format_verification(frame: pd.DataFrame) -> str:
    """The verified table, printable (percentages, points)."""
    out = pd.DataFrame({
        "method": frame["method"], "retention_%": (100 * frame["retention"]).map("{:.2f}".format),
        "kept": frame["kept"].map("{:,}".format), "accuracy_%": (100 * frame["accuracy"]).map("{:.2f}".format),
        "drop_pts": (100 * frame["drop"]).map("{:+.2f}".format), "repair_s": frame["repair_seconds"].map("{:.1f}".format),
    })
    return out.to_string(index=False)


@dataclass(frozen=True)
class RepairedPerLayerOutcome:
    """The run: the sensitivity, the choice after repair, its verification and the files to write."""

    name: str
    target: Target
    sensitivity: Sensitivity
    choice: RepairedChoice
    verification: Verification
    files: dict[str, str | bytes]

    def report(self) -> str:
        """The candidates after repair, the greedy steps, the verified table and the differences."""
        choice, frame = self.choice, self.choice.allocation.candidates
        attrs = frame.attrs
        lines = [(f"candidates at the same budget, each repaired ('{attrs['repair']}' on {attrs['fit_images']} "
                  f"augmented training images) and scored on {attrs['images']}, fp32; lowest {attrs['criterion']} "
                  "wins:"), format_choice(frame)]
        if choice.greedy is not None:
            g = choice.greedy
            lines.append(f"greedy after repair: {len(g.steps)} steps tried, {int(g.steps['accepted'].sum())} kept, "
                         f"{g.evaluations} repaired evaluations, {g.seconds:.1f} s")
            if len(g.steps):
                lines.append(g.steps.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        lines += [(f"{self.name}: per-layer τ ({choice.allocation.method}) for {self.target.label()}, verified on "
                   f"{self.verification.images} in fp32, every row after the same repair"),
                  format_verification(self.verification.frame)]
        for other in ("uniform τ", "global magnitude", "sensitivity allocation"):
            if other in self.verification.predictions:
                delta, low, high = self.verification.difference("per-layer τ", other)
                lines.append(f"per-layer τ vs {other}: {100 * delta:+.2f} points (95 % {100 * low:+.2f} … "
                             f"{100 * high:+.2f})")
        return "\n".join(lines)


def run_per_layer_repaired(name: str, config: SensitivityConfig, target: Target, search: SearchConfig, *,
                           verify_images: int | None, cache: CacheSpec | None = None,
                           verify_repair: RepairConfig | None = None,
                           progress: ProgressFor = quiet) -> RepairedPerLayerOutcome:
    """τ per layer of the shipped checkpoint ``name`` for a retention ``target``, chosen after ``search.repair``.

    ``verify_repair``: the repair of the verified rows and of ``model.packed`` (default:
    ``search.repair``; a cheaper search repair, e.g. fewer fitting images, may be verified with the
    full one, same seed).

    Raises :class:`~core.measure.tune_inputs.BadInput` for a target other than retention, or one
    the τ grid cannot reach.
    """
    cache = cache if cache is not None else CacheSpec()
    if target.kind != "retention":
        raise BadInput("--per-layer with --repair takes --target-retention (the greedy search moves weights "
                       "at a constant count)")
    card = load_card(name)
    model = load_pretrained(name)
    engine = Engine(model)
    retention, _ = smallest_reachable(engine, engine.layer_names, max(config.taus))
    if target.value < retention:
        raise BadInput(f"--target-retention {target.value:g} is below what the τ grid reaches "
                       f"({retention:.4f} with every layer at τ={max(config.taus):g}); add larger --taus")
    model_id = f"sha256:{card['sha256']}"
    sensitivity = measure_sensitivity(model, config, model_id=model_id, mean=card["mean"], std=card["std"],
                                      engine=engine, use_cache=cache.use, cache_root=cache.under("sensitivity"),
                                      on_progress=progress("sensitivity"))
    candidates = candidate_allocations(sensitivity, engine, target)
    fit, score = scoring_split(search.repair.n_images, search.score_images, search.repair.seed, card["mean"],
                               card["std"])
    judge = RepairJudge(model, engine, layer_options(sensitivity, engine), fit, score, search)
    choice = choose_after_repair(judge, candidates, progress("candidates after repair"),
                                 progress("greedy after repair"))
    allocation = choice.allocation
    settings = {"per-layer τ": allocation.config(), **baseline_settings(judge, allocation),
                "sensitivity allocation": candidates[0].config()}
    if choice.greedy is not None and allocation.method.startswith("greedy"):
        best = next(c for c in candidates if c.kept == choice.greedy.start)
        settings["best candidate"] = best.config()
    final = judge
    if verify_repair is not None and verify_repair != search.repair:
        final_search = dataclasses.replace(search, repair=verify_repair)
        fit_final, _ = scoring_split(verify_repair.n_images, 1, verify_repair.seed, card["mean"], card["std"])
        final = RepairJudge(model, engine, list(judge.options.values()), fit_final, score, final_search)
    verification = verify_after_repair(final, settings, test_images(verify_images, card["mean"], card["std"]),
                                       progress, keep=("per-layer τ",))
    result, fixed = verification.repaired["per-layer τ"]
    packed = compressed_bytes(result, card["arch"], card.get("arch_kwargs") or {}, repaired=fixed)
    frame = verification.frame
    repair = final.repair_config
    payload = {
        "config": allocation.config().to_dict(),
        "repair": {"method": repair.method, "n_images": len(final.fit), "ridge": repair.ridge, "seed": repair.seed,
                   "positions": repair.positions,
                   "calibration": f"{len(final.fit)} augmented CIFAR-10 training images (seed {repair.seed})"},
        "model": name,
        "checkpoint_sha256": card["sha256"],
        "target": {"kind": target.kind, "value": target.value, "label": target.label()},
        "method": allocation.method,
        "search": {"criterion": search.criterion, "score_images": len(score), "fit_images": len(fit),
                   "steps": search.steps,
                   "move": search.move, "scoring": allocation.candidates.attrs["images"],
                   "seconds": choice.seconds,
                   "greedy_steps": None if choice.greedy is None else json.loads(
                       choice.greedy.steps.to_json(orient="records"))},
        "candidates": json.loads(allocation.candidates.to_json(orient="records")),
        "verification": {"images": verification.images, "precision": "fp32"},
        "measured": json.loads(frame.to_json(orient="records")),
    }
    files: dict[str, str | bytes] = {
        "settings.json": json.dumps(payload, indent=1, ensure_ascii=False),
        "comparison.csv": frame.to_csv(index=False),
        "candidates.csv": allocation.candidates.to_csv(index=False),
        "model.packed": packed,
    }
    return RepairedPerLayerOutcome(name, target, sensitivity, choice, verification, files)


def run_per_layer_command(args, target: Target, config: SensitivityConfig, repair, cache: CacheSpec,
                          progress: ProgressFor, write) -> int:
    """``python -m core.tune --per-layer --repair LEVEL`` after core.tune checked the flags: run, print, write."""
    search = SearchConfig(repair=repair)
    run = run_per_layer_repaired(args.model, config, target, search, verify_images=args.verify_images, cache=cache,
                                 progress=progress)
    print(run.report())
    write(args.out, run.files)
    print(f"wrote {', '.join(str(args.out / name) for name in run.files)} (repair '{repair.method}')")
    return 0
