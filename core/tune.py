"""``python -m core.tune``: tuning a shipped checkpoint from the command line, one mode per flag.

    python -m core.tune --sensitivity --model resnet20
    python -m core.tune --per-layer --model resnet20 --target-retention 0.3 --out DIR
    python -m core.tune --per-layer --model resnet18 --target-bytes 9000000 --out DIR
    python -m core.tune --per-layer --model resnet20 --max-drop 1 --out DIR

``--sensitivity`` prints the per-layer sensitivity table (:mod:`core.measure.sensitivity`:
one layer pruned at a time across a τ grid, the paired accuracy drop vs dense on a fixed
class-balanced set of training images), cached on disk, with progress on stderr.
``--per-layer`` measures (or reads) the same table, chooses a τ per layer for the target
(:mod:`core.measure.allocation`: the allocation from the summed single-layer drops, then the
best of it, global magnitude's per-layer τ and blends of the two, run whole on the
sensitivity's images; ``--additive-only`` skips that joint check), verifies it on the full test set in fp32 against uniform τ
and global magnitude pruning at the same retention, with and without BN recalibration,
prints the comparison and writes ``DIR/settings.json``: the setting in
``CompressionConfig.to_dict()`` form under ``"config"`` (``CompressionConfig.from_dict`` reads
the file back) beside the measured accuracies.

Without ``--sensitivity`` or ``--per-layer`` the mode is the **sweep** (:func:`run_sweep`, helpers
in :mod:`core.measure.tuning`), for any model and any labelled images:

    python -m core.tune --model resnet20 --data cifar10 --max-drop 1.0 --out tuned/
    python -m core.tune --model torchvision:resnet50 --weights my_weights.pt --data path/to/val \
        --image-size 224 --max-drop 1.0 --out tuned/

It evaluates the dense model, sweeps τ (and θ with ``--thetas``), prints the table (τ, retention,
accuracy, Δ vs dense with its paired 95 % interval, packed size) and the largest τ within
``--max-drop`` points of dense, with and without BN recalibration (``--bn-recalibrate``), and
writes ``DIR/settings.json`` (the chosen setting under ``"config"``), ``DIR/model.packed`` (its
packed file, loadable by ``load_compressed`` and the app's upload) and ``DIR/sweep.csv``.

``--tau T`` (with ``--theta TH``, relative, and ``--bits``) evaluates **one setting** instead
(:func:`run_setting`), at every repair level up to ``--repair`` (:mod:`core.measure.repair`:
none, bn, bias, reconstruct; each includes the ones before, each is run on its own):

    python -m core.tune --model resnet18 --data cifar10 --tau 0.2 --repair reconstruct --out repaired/

It prints one row per level (accuracy, Δ vs dense with its paired 95 % interval, retention,
packed bytes, repair seconds) and writes the same three files, ``model.packed`` carrying the
chosen level's repair (same mask and bit-widths; the header records the repair) and
``settings.json`` a ``"repair"`` block beside ``"config"``. The repairs are fitted on
``--repair-images`` (512) augmented CIFAR-10 *training* images, or on ``--calibration-data DIR``;
never on the evaluation images. In the sweep, ``--repair M`` adds a row after that repair for
every setting (the estimated total time is said first), and the chosen setting carries the
repair when it buys a larger τ. A repair estimated over 30 s is announced before it starts.

Each mode is one ``run_<mode>(args)`` function in :data:`MODES`; bad input exits with
status 2 and one line on stderr naming the problem; Ctrl-C stops with one line and status
130, and no output file is written (every mode writes its files together, at the end).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

PROG = "python -m core.tune"
#: a repair estimated to take longer than this (seconds) is announced before it starts
ANNOUNCE_REPAIR_S = 30.0


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(message)


# ---------------------------------------------------------------- shared pieces

def _progress(prefix: str) -> Callable[[int, int, str], None]:
    start = time.perf_counter()

    def report(done: int, total: int, label: str) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{prefix} [{done}/{total}] {time.perf_counter() - start:6.1f} s  {label:<40}", end=end,
              file=sys.stderr, flush=True)
    return report


def _load(args: argparse.Namespace):
    """(model, card) of the shipped checkpoint ``args.model``."""
    from core.workloads.models import PRETRAINED, load_card, load_pretrained

    if args.model not in PRETRAINED:
        raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(PRETRAINED)}")
    card = load_card(args.model)
    return load_pretrained(args.model), card


def _sensitivity_config(args: argparse.Namespace):
    from core.measure.sensitivity import SensitivityConfig

    try:
        return SensitivityConfig(taus=tuple(args.taus), n_images=args.images, source=args.source,
                                 precision=args.precision, bn_recalibration=args.bn_sensitivity,
                                 calibration_size=args.calibration_size)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from err


def _measure(args, model, card, engine=None):
    from core.measure.sensitivity import measure_sensitivity

    return measure_sensitivity(model, _sensitivity_config(args), model_id=f"sha256:{card['sha256']}",
                               mean=card["mean"], std=card["std"], engine=engine, use_cache=not args.no_cache,
                               cache_root=None if args.cache_dir is None else args.cache_dir / "sensitivity",
                               on_progress=_progress("sensitivity"))


def _sensitivity_table(sensitivity) -> str:
    table = (100 * sensitivity.drops()).map(lambda v: f"{v:+.1f}")
    table.columns = [f"τ={t:g}" for t in table.columns]
    table.insert(0, "share_%", (100 * sensitivity.shares()).map(lambda v: f"{v:.1f}"))
    return table.to_string()


# ---------------------------------------------------------------- the modes

def run_sensitivity(args: argparse.Namespace) -> int:
    """``--sensitivity``: the layer × τ table of paired accuracy drops (points; positive = worse)."""
    model, card = _load(args)
    _sensitivity_config(args)  # validate before loading data
    sensitivity = _measure(args, model, card)
    print(f"{args.model}: accuracy drop (points) with one layer pruned at a time, on {sensitivity.images}; "
          f"{sensitivity.precision}" + (", BN recalibrated" if sensitivity.bn_recalibration else "")
          + f"; dense accuracy on them {100 * sensitivity.dense_accuracy:.2f} %")
    print(_sensitivity_table(sensitivity))
    print(f"{len(sensitivity.layers)} layers × {len(sensitivity.taus)} τ: {sensitivity.seconds:.1f} s "
          f"({sensitivity.computed} layers measured, {sensitivity.cached} read from the cache)")
    if args.csv is not None:
        sensitivity.frame.to_csv(args.csv, index=False)
    return 0


def _target(args: argparse.Namespace):
    from core.measure.allocation import Target

    given = [(kind, value) for kind, value in (("retention", args.target_retention), ("bytes", args.target_bytes),
                                                ("max_drop", args.max_drop)) if value is not None]
    if len(given) != 1:
        raise UsageError("--per-layer needs exactly one of --target-retention, --target-bytes, --max-drop")
    kind, value = given[0]
    try:
        return Target(kind, value / 100 if kind == "max_drop" else value)
    except ValueError as err:
        raise UsageError(str(err)) from err


def run_per_layer(args: argparse.Namespace) -> int:
    """``--per-layer``: choose τ per layer for the target, verify, print the table, write DIR/settings.json."""
    from core.measure.allocation import (choose_jointly, compare_at_equal_retention, format_candidates,
                                         format_comparison, per_layer_tau, smallest_reachable, test_images)
    from core.method.engine import Engine

    target = _target(args)
    if args.out is None:
        raise UsageError("--per-layer needs --out DIR (where settings.json is written)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    if args.verify_images is not None and not 1 <= args.verify_images <= 10_000:
        raise UsageError(f"--verify-images must be in [1, 10000], got {args.verify_images}")
    config = _sensitivity_config(args)
    model, card = _load(args)
    engine = Engine(model)
    layers = engine.layer_names
    retention, size = smallest_reachable(engine, layers, max(config.taus))
    if target.kind == "retention" and target.value < retention:
        raise UsageError(f"--target-retention {target.value:g} is below what the τ grid reaches "
                         f"({retention:.4f} with every layer at τ={max(config.taus):g}); add larger --taus")
    if target.kind == "bytes" and target.value < size:
        raise UsageError(f"--target-bytes {target.value:.0f} is below what the τ grid reaches "
                         f"({size} bytes with every layer at τ={max(config.taus):g}); add larger --taus")
    sensitivity = _measure(args, model, card, engine)
    if args.additive_only or target.kind == "max_drop":
        allocation = per_layer_tau(sensitivity, engine, target)
    else:
        allocation = choose_jointly(model, sensitivity, engine, target, model_id=f"sha256:{card['sha256']}",
                                    mean=card["mean"], std=card["std"], use_cache=not args.no_cache,
                                    cache_root=None if args.cache_dir is None else args.cache_dir / "allocation",
                                    on_progress=_progress("joint check"))
    data = test_images(args.verify_images, card["mean"], card["std"])
    comparison = compare_at_equal_retention(
        model, allocation, engine=engine, data=data, calibration_size=args.calibration_size,
        bn_recalibration=not args.no_bn, model_id=f"sha256:{card['sha256']}", mean=card["mean"], std=card["std"],
        use_cache=not args.no_cache,
        cache_root=None if args.cache_dir is None else args.cache_dir / "allocation",
        on_progress=_progress("verification"))
    frame = comparison.frame
    if allocation.candidates is not None:
        attrs = allocation.candidates.attrs
        print(f"candidates at the same budget, each run whole on {attrs['images']} ({attrs['precision']}"
              + (", BN recalibrated" if attrs["bn_recalibrated"] else "") + "):")
        print(format_candidates(allocation.candidates))
    print(f"{args.model}: automatic per-layer τ ({allocation.method}) for {target.label()} (estimated drop "
          f"{100 * allocation.predicted_drop:.2f} points from the sensitivity on {sensitivity.images}); "
          f"verified on {comparison.images} in fp32"
          + ("" if args.no_bn else f", BN recalibration on {args.calibration_size} augmented training images"))
    print(format_comparison(frame))
    for bn in sorted(set(frame["bn_recalibrated"])):
        parts = []
        for other in ("uniform", "global_magnitude"):
            delta, low, high = comparison.difference("per_layer", other, bn)
            parts.append(f"{other.replace('_', ' ')} {100 * delta:+.2f} points (95 % {100 * low:+.2f} … {100 * high:+.2f})")
        print("per-layer τ vs " + "; vs ".join(parts) + (" — with BN recal" if bn else " — without BN recal"))
    settings = {
        "config": comparison.config.to_dict(),
        "model": args.model,
        "checkpoint_sha256": card["sha256"],
        "target": {"kind": target.kind, "value": target.value, "label": target.label()},
        "predicted_drop": allocation.predicted_drop,
        "method": allocation.method,
        "candidates": None if allocation.candidates is None else json.loads(
            allocation.candidates.to_json(orient="records")),
        "sensitivity": {"images": sensitivity.images, "n": sensitivity.n, "taus": list(sensitivity.taus),
                        "precision": sensitivity.precision, "bn_recalibration": sensitivity.bn_recalibration},
        "verification": {"images": comparison.images, "precision": "fp32",
                         "calibration_images": None if args.no_bn else args.calibration_size,
                         "uniform_tau": comparison.uniform_tau},
        "measured": json.loads(frame.drop(columns=["seconds", "cached"]).to_json(orient="records")),
    }
    _write_outputs(args.out, {"settings.json": json.dumps(settings, indent=1, ensure_ascii=False),
                              "comparison.csv": frame.to_csv(index=False),
                              "sensitivity.csv": sensitivity.frame.to_csv(index=False)})
    print(f"wrote {args.out / 'settings.json'}")
    return 0


class _ImagesDefault(int):
    """The default of ``--images`` (the sensitivity's), marked so that the sweep can tell it was not given."""


def _check_out(args: argparse.Namespace, mode: str) -> None:
    if args.out is None:
        raise UsageError(f"{mode} needs --out DIR (where settings.json, model.packed and sweep.csv are written)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")


def _repair_config(args: argparse.Namespace):
    """The repair's settings from ``--repair*`` (fitted images, ridge, seed), checked; no held-out error table."""
    import math

    from core.measure.repair import RepairConfig
    from core.measure.tuning import MAX_REPAIR_IMAGES

    if not 1 <= args.repair_images <= MAX_REPAIR_IMAGES:
        raise UsageError(f"--repair-images must be in [1, {MAX_REPAIR_IMAGES}], got {args.repair_images}")
    if not (math.isfinite(args.repair_ridge) and args.repair_ridge > 0):
        raise UsageError(f"--repair-ridge must be a finite number > 0 (relative to the Gram diagonal), "
                         f"got {args.repair_ridge}")
    if args.repair_seed < 0:
        raise UsageError(f"--repair-seed must be ≥ 0, got {args.repair_seed}")
    return RepairConfig(method=args.repair, n_images=args.repair_images, n_holdout=0, ridge=args.repair_ridge,
                        seed=args.repair_seed)


def _check_common(args: argparse.Namespace) -> None:
    """The checks the sweep and the single setting share (images, input, data, bits, repair)."""
    import math

    from core.method.quantization import SUPPORTED_BITS

    n_images = None if isinstance(args.images, _ImagesDefault) else args.images
    if n_images is not None and n_images < 1:
        raise UsageError(f"--images must be ≥ 1, got {n_images}")
    if not 1 <= args.max_images <= 100_000:
        raise UsageError(f"--max-images must be in [1, 100000], got {args.max_images}")
    for option, values in (("--mean", args.mean), ("--std", args.std)):
        if values is not None and (len(values) != 3 or not all(map(math.isfinite, values))):
            raise UsageError(f"{option} needs three finite numbers (R G B)")
    if args.std is not None and min(args.std) <= 0:
        raise UsageError("--std needs three positive numbers")
    if args.image_size is not None and not 8 <= args.image_size <= 1024:
        raise UsageError(f"--image-size must be in [8, 1024] pixels, got {args.image_size}")
    if args.data != "cifar10" and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data} is neither cifar10 nor a folder")
    if args.calibration_data not in (None, "cifar10") and not Path(args.calibration_data).is_dir():
        raise UsageError(f"--calibration-data {args.calibration_data} is neither cifar10 nor a folder")
    b_low, b_high = args.bits
    if b_low not in SUPPORTED_BITS or b_high not in SUPPORTED_BITS or b_low > b_high:
        raise UsageError(f"--bits needs b_low ≤ b_high from {', '.join(map(str, SUPPORTED_BITS))}")
    _repair_config(args)
    if args.repair != "none":
        if args.calibration_data is None and args.data != "cifar10":
            raise UsageError("--repair with --data DIR needs --calibration-data cifar10|DIR: images to fit the "
                             "repair on, not the ones it is evaluated on")
        if (args.calibration_data not in (None, "cifar10") and args.data != "cifar10"
                and Path(args.calibration_data).resolve() == Path(args.data).resolve()):
            raise UsageError("--calibration-data is the --data folder: a repair must not be fitted on the images "
                             "it is evaluated on")


def _load_inputs(args: argparse.Namespace, bn_calibration: bool):
    """(model, data, BN calibration images or None, (repair images, description) or None), every error a UsageError."""
    from core.measure import tuning
    from core.workloads.data import DataError
    from core.workloads.models import CheckpointError

    n_images = None if isinstance(args.images, _ImagesDefault) else args.images
    try:
        model = tuning.load_model(args.model, args.weights, args.image_size, args.mean, args.std)
        data = tuning.load_data(args.data, model, n_images, args.max_images)
        calibration = None
        if bn_calibration:
            calibration = tuning.calibration_set(args.calibration_data, model, data, args.calibration_size)
        repair_images = None
        if args.repair != "none":
            repair_images = tuning.repair_calibration(args.calibration_data, model, args.repair_images,
                                                      args.repair_seed)
    except (CheckpointError, DataError, ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(" ".join(str(err).split())) from err
    return model, data, calibration, repair_images


def _sweep_inputs(args: argparse.Namespace):
    """(model, data, settings, BN calibration images, repair images) of the sweep, every input checked first."""
    import math

    from core.measure import tuning

    _check_out(args, "the sweep")
    if args.max_drop is None or not math.isfinite(args.max_drop) or args.max_drop < 0:
        raise UsageError("the sweep needs --max-drop POINTS, a number ≥ 0 (the largest accuracy drop allowed)")
    if args.theta is not None:
        raise UsageError("--theta goes with --tau (one setting); the sweep takes --thetas")
    _check_common(args)
    b_low, b_high = args.bits
    try:
        configs = tuning.settings(args.taus, args.thetas, b_low, b_high)
    except (ValueError, TypeError) as err:
        raise UsageError(" ".join(str(err).split())) from err
    model, data, calibration, repair_images = _load_inputs(args, args.bn_recalibrate)
    return model, data, configs, calibration, repair_images


def _write_outputs(out: Path, files: dict[str, str | bytes]) -> None:
    """Write every file into ``out`` at once: into a hidden folder there first, then moved into place.

    Interrupted (Ctrl-C) or failing, nothing new is left in ``out`` (nor ``out`` itself when this
    created it): no half-written file, and no partial set.
    """
    import os
    import shutil
    import tempfile

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".core-tune-", dir=out))
    moved: list[Path] = []
    try:
        for name, content in files.items():
            target = staging / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        for name in files:
            os.replace(staging / name, out / name)
            moved.append(out / name)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()


def _say_estimate(seconds: float, what: str) -> None:
    print(f"{what}: estimated {seconds:.0f} s on this machine (an estimate; a busy machine takes longer). "
          "Ctrl-C stops it and writes nothing.", file=sys.stderr, flush=True)


def _describe_setting(config) -> str:
    return (f"τ = {config.tau:g}" + (f", θ = {config.theta:g} ({config.theta_mode}), "
                                     f"{config.b_low}/{config.b_high} bit" if config.quantized else ""))


def run_sweep(args: argparse.Namespace) -> int:
    """The default mode: sweep τ (and θ) on any model and labelled images; write settings, packed model, CSV."""
    from core.measure import tuning

    repair = _repair_config(args)
    model, data, configs, calibration, repair_images = _sweep_inputs(args)
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    repairing = repair.method != "none"
    engine = tuning.make_engine(model)
    if repairing:
        estimate = tuning.estimate_repair_seconds(model, configs, repair, engine=engine)
        _say_estimate(estimate, f"repair '{repair.method}' at {len(configs)} settings on {repair_images[1]}")
    kept: dict = {}
    frame = tuning.run_tuning_sweep(model, data, configs, calibration, on_progress=_progress("sweep"),
                                    repair=repair if repairing else None,
                                    repair_images=repair_images[0] if repairing else None, keep_packed=kept,
                                    engine=engine)
    dense = frame.iloc[0]
    print(f"{args.model} ({model.source}) on {data.description}; input: {model.preprocess.describe()}")
    print(f"dense accuracy {100 * dense['accuracy']:.2f} %; Δ is paired (same images), 95 % interval"
          + (f"; repair '{repair.method}' on {repair_images[1]}" if repairing else ""))
    print(tuning.format_sweep(frame))
    thetas = args.thetas or [None]
    b_low, b_high = args.bits
    variants = [(bn, "none") for bn in ([False, True] if calibration is not None and frame["bn_recalibrated"].any()
                                        else [False])]
    if repairing:
        variants.append((False, repair.method))
    choices = {}
    for bn, method in variants:
        found = [c for c in (tuning.choose(frame, args.max_drop, bn, t, b_low=b_low, b_high=b_high, repair=method)
                             for t in thetas) if c is not None]
        best = max(found, key=lambda c: (c.config.tau, -(c.config.theta or 0)), default=None)
        choices[(bn, method)] = best
        what = (f"after repair '{method}'" if method != "none" else
                "with BN recalibration" if bn else "without BN recalibration")
        if best is None:
            print(f"largest τ within {args.max_drop:g} points of dense, {what}: none of the swept τ")
        else:
            print(f"largest τ within {args.max_drop:g} points of dense, {what}: τ = {best.config.tau:g}"
                  + (f", θ = {best.config.theta:g}" if best.config.quantized else "")
                  + f" (accuracy {100 * best.row['accuracy']:.2f} %, Δ {100 * best.row['delta']:+.2f} points, "
                    f"retention {100 * best.row['retention']:.2f} %, packed {best.row['packed_bytes'] / 1e6:.3f} MB)")
    plain = choices.get((False, "none"))
    chosen = choices.get((True, "none")) or plain
    if chosen is not None and plain is not None and chosen.config.tau <= plain.config.tau:
        chosen = plain  # recalibration only when it buys a larger τ
    fixed = choices.get((False, repair.method)) if repairing else None
    if fixed is not None and (chosen is None or fixed.config.tau > chosen.config.tau):
        chosen = fixed  # the repair too, only when it buys a larger τ
    files = {"sweep.csv": frame.to_csv(index=False),
             "settings.json": json.dumps(_sweep_settings(args, model, data, frame, chosen, repair, repair_images),
                                         indent=1, ensure_ascii=False)}
    if chosen is not None:
        method = chosen.row.get("repair", "none")
        files["model.packed"] = (kept[(chosen.config, method)] if method != "none"
                                 else tuning.pack_choice(model, chosen, calibration))
    _write_outputs(args.out, files)
    if chosen is not None:
        print(f"wrote {args.out / 'settings.json'}, {args.out / 'model.packed'}, {args.out / 'sweep.csv'}")
    else:
        print(f"wrote {args.out / 'settings.json'} (no setting chosen, no model.packed) and {args.out / 'sweep.csv'}")
    return 0


def _repair_block(repair, repair_images, seconds: float | None = None) -> dict:
    block = {"method": repair.method, "n_images": None if repair_images is None else int(len(repair_images[0])),
             "ridge": repair.ridge, "seed": repair.seed, "positions": repair.positions,
             "calibration": None if repair_images is None else repair_images[1]}
    if seconds is not None:
        block["seconds"] = seconds
    return block


def _provenance(args, model, data) -> dict:
    return {
        "model": {"spec": args.model, "arch": model.arch, "arch_kwargs": model.arch_kwargs, "source": model.source,
                  **({"input": model.input_spec} if model.input_spec else {})},
        "data": {"spec": args.data, "description": data.description, "images": len(data), "labelled": data.labelled},
    }


def _measured(row) -> dict:
    measured = {key: float(row[key]) for key in ("accuracy", "accuracy_dense", "delta", "delta_low", "delta_high",
                                                  "retention")}
    measured.update(packed_bytes=int(row["packed_bytes"]), images=int(row["n"]), repair=str(row["repair"]),
                    repair_seconds=float(row["repair_seconds"]))
    return measured


def _sweep_settings(args, model, data, frame, chosen, repair, repair_images) -> dict:
    """settings.json of the sweep: the chosen setting in ``CompressionConfig.to_dict()`` form, what it measured."""
    dense = frame.iloc[0]
    payload = {
        "config": None if chosen is None else chosen.config.to_dict(),
        "bn_recalibrated": None if chosen is None else chosen.bn_recalibrated,
        **_provenance(args, model, data),
        "max_drop_points": args.max_drop,
        "dense_accuracy": float(dense["accuracy"]),
    }
    if repair.method != "none":
        payload["repair"] = {**_repair_block(repair, repair_images),
                             "chosen": chosen is not None and chosen.row.get("repair") == repair.method}
    if chosen is not None:
        payload["measured"] = _measured(chosen.row)
    return payload


def run_setting(args: argparse.Namespace) -> int:
    """``--tau T`` (``--theta TH``): one setting at every repair level up to ``--repair``; the sweep's three files."""
    from core.measure import tuning
    from core.method.config import CompressionConfig

    _check_out(args, "--tau")
    if args.thetas is not None:
        raise UsageError("--thetas belongs to the sweep; with --tau give one --theta")
    if args.max_drop is not None:
        raise UsageError("--max-drop chooses among the sweep's settings; --tau evaluates the one given")
    if args.bn_recalibrate:
        raise UsageError("--bn-recalibrate belongs to the sweep; with --tau use --repair bn")
    _check_common(args)
    b_low, b_high = args.bits
    try:
        config = (CompressionConfig(tau=args.tau) if args.theta is None else
                  CompressionConfig(tau=args.tau, theta=args.theta, theta_mode="relative", b_low=b_low, b_high=b_high))
    except (ValueError, TypeError) as err:
        raise UsageError(" ".join(str(err).split())) from err
    repair = _repair_config(args)
    model, data, _, repair_images = _load_inputs(args, bn_calibration=False)
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)

    def announce(method: str, seconds: float) -> None:
        if seconds > ANNOUNCE_REPAIR_S:
            _say_estimate(seconds, f"\nrepair '{method}' on {repair_images[1]}")

    run = tuning.evaluate_setting(model, data, config, repair, None if repair_images is None else repair_images[0],
                                  on_progress=_progress("setting"), on_repair_progress=_progress("repair"),
                                  on_estimate=announce)
    frame = run.frame
    print(f"{args.model} ({model.source}) on {data.description}; input: {model.preprocess.describe()}")
    print(f"{_describe_setting(config)}: retention {100 * frame.iloc[1]['retention']:.2f} %; dense accuracy "
          f"{100 * frame.iloc[0]['accuracy']:.2f} %; Δ is paired (same images), 95 % interval"
          + (f"; repairs fitted on {repair_images[1]}" if repair_images is not None else ""))
    print(tuning.format_sweep(frame.iloc[1:], repair_columns=True))
    last = frame.iloc[-1]
    payload = {
        "config": config.to_dict(),
        "repair": _repair_block(repair, repair_images, float(last["repair_seconds"])),
        "bn_recalibrated": False,
        **_provenance(args, model, data),
        "dense_accuracy": float(frame.iloc[0]["accuracy"]),
        "measured": _measured(last),
        "levels": [_measured(row) for _, row in frame.iloc[1:].iterrows()],
    }
    _write_outputs(args.out, {"sweep.csv": frame.to_csv(index=False), "model.packed": run.packed,
                              "settings.json": json.dumps(payload, indent=1, ensure_ascii=False)})
    print(f"wrote {args.out / 'settings.json'}, {args.out / 'model.packed'} (repair '{repair.method}'), "
          f"{args.out / 'sweep.csv'}")
    return 0


#: mode name → the function that runs it; the mode is the flag given (``--tau`` for ``setting``), else the sweep
MODES: dict[str, Callable[[argparse.Namespace], int]] = {
    "sensitivity": run_sensitivity,
    "per_layer": run_per_layer,
    "setting": run_setting,
    "sweep": run_sweep,
}


def _mode(args: argparse.Namespace) -> str:
    flagged = [name for name in ("sensitivity", "per_layer") if getattr(args, name)]
    if args.tau is not None:
        if flagged:
            raise UsageError(f"--tau (one setting) is not allowed with --{flagged[0].replace('_', '-')}")
        return "setting"
    return flagged[0] if flagged else "sweep"


def build_parser() -> argparse.ArgumentParser:
    from core.measure.repair import METHODS
    from core.measure.sensitivity import DEFAULT_IMAGES, DEFAULT_TAUS, SOURCES

    parser = _Parser(prog=PROG, description="Tune a shipped checkpoint: per-layer sensitivity and automatic "
                                            "per-layer τ.")
    modes = parser.add_mutually_exclusive_group(required=False)  # neither: the sweep
    modes.add_argument("--sensitivity", action="store_true", help="measure and print the per-layer sensitivity")
    modes.add_argument("--per-layer", action="store_true", help="choose τ per layer for a target and verify it")
    parser.add_argument("--model", default="resnet20", help="a shipped checkpoint: resnet20, resnet18, cifar_cnn")
    group = parser.add_argument_group("sensitivity")
    group.add_argument("--taus", type=float, nargs="+", default=list(DEFAULT_TAUS), help="the τ grid, each in (0, 1]")
    group.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="class-balanced images to measure on")
    group.add_argument("--source", choices=SOURCES, default="train",
                       help="measure on training images without augmentation (default; not the test images "
                            "the result is verified on) or on test images")
    group.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="inference precision of the estimate (auto: bf16 where native)")
    group.add_argument("--bn-sensitivity", action="store_true",
                       help="recalibrate BatchNorm after pruning each layer while measuring (slower)")
    group.add_argument("--csv", type=Path, default=None, help="--sensitivity: also write the table to this CSV")
    group = parser.add_argument_group("per-layer")
    group.add_argument("--target-retention", type=float, default=None, metavar="R",
                       help="keep at most this fraction of the Conv/Linear weights")
    group.add_argument("--target-bytes", type=float, default=None, metavar="B",
                       help="stored size of the whole model at most B bytes")
    group.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                       help="estimated accuracy drop at most POINTS percentage points")
    group.add_argument("--out", type=Path, default=None, metavar="DIR", help="where settings.json is written")
    group.add_argument("--additive-only", action="store_true",
                       help="take the allocation from the summed single-layer drops as it is (no joint check of "
                            "candidates on the sensitivity images)")
    group.add_argument("--no-bn", action="store_true", help="verify without the BN-recalibrated rows")
    group.add_argument("--calibration-size", type=int, default=2000, help="training images for BN recalibration")
    group.add_argument("--verify-images", type=int, default=None, metavar="N",
                       help="verify on the first N of a class-balanced order of the test set (default: all 10,000)")
    group = parser.add_argument_group("sweep (the default mode; also uses --model, --taus, --images, --max-drop, "
                                      "--out, --calibration-size)")
    group.add_argument("--weights", default=None, metavar="FILE|pretrained",
                       help="a state_dict file (.pt/.pth/.safetensors), or 'pretrained' for torchvision's own weights "
                            "from the local torch hub cache (the default for torchvision:<name>)")
    group.add_argument("--data", default="cifar10", metavar="cifar10|DIR",
                       help="cifar10 (the test set) or a folder of class folders of images (ImageFolder layout)")
    group.add_argument("--image-size", type=int, default=None, metavar="PX", help="the model's input size")
    group.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                       help="per-channel mean of the normalisation")
    group.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                       help="per-channel standard deviation of the normalisation")
    group.add_argument("--thetas", type=float, nargs="+", default=None, metavar="THETA",
                       help="also quantize: θ (relative: θ·max|W| per layer) at every τ")
    group.add_argument("--bits", type=int, nargs=2, default=[4, 8], metavar=("B_LOW", "B_HIGH"),
                       help="bit-widths of the low and high chunks with --thetas or --theta")
    group.add_argument("--bn-recalibrate", action="store_true",
                       help="also evaluate every setting after BatchNorm recalibration")
    group.add_argument("--calibration-data", default=None, metavar="cifar10|DIR",
                       help="images for BN recalibration (default: the evaluation images themselves) and for "
                            "--repair (default: CIFAR-10's training split; never the evaluation images)")
    group.add_argument("--max-images", type=int, default=2000,
                       help="images read from a folder at most (a fixed class-balanced sample beyond)")
    group = parser.add_argument_group("one setting (--tau; also uses the sweep's --model, --weights, --data, "
                                      "--images, --bits, --out, input and calibration options)")
    group.add_argument("--tau", type=float, default=None, metavar="T",
                       help="evaluate this one τ (instead of a sweep) and write the sweep's three files for it")
    group.add_argument("--theta", type=float, default=None, metavar="TH",
                       help="with --tau: also quantize, θ relative (θ·max|W| per layer), with --bits")
    group = parser.add_argument_group("repair without retraining (--tau: every level up to this one; the sweep: "
                                      "a row after it for every setting)")
    group.add_argument("--repair", choices=METHODS, default="none",
                       help="none; bn (BatchNorm statistics); bias (+ per-channel mean correction); reconstruct "
                            "(+ layer-wise least squares of the kept weights); each includes the ones before")
    group.add_argument("--repair-images", type=int, default=512, metavar="N",
                       help="calibration images the repair is fitted on (at most 4096)")
    group.add_argument("--repair-ridge", type=float, default=1e-3, metavar="λ",
                       help="reconstruction's ridge, relative to the mean of the Gram matrix's diagonal")
    group.add_argument("--repair-seed", type=int, default=0, metavar="S",
                       help="which training images are drawn and which positions sampled")
    parser.set_defaults(images=_ImagesDefault(parser.get_default("images")))
    parser.add_argument("--no-cache", action="store_true", help="recompute everything and store nothing")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where cached results live (DIR/sensitivity, DIR/allocation; default: the project cache)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the mode the arguments name; 0 done, 2 bad input (one line on stderr), 130 interrupted (Ctrl-C)."""
    try:
        args = build_parser().parse_args(argv)
        if args.calibration_size < 1:
            raise UsageError(f"--calibration-size must be ≥ 1, got {args.calibration_size}")
        return MODES[_mode(args)](args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; no output files were written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
