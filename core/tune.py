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

Each mode is one ``run_<mode>(args)`` function in :data:`MODES`; bad input exits with
status 2 and one line on stderr naming the problem.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

PROG = "python -m core.tune"


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
    args.out.mkdir(parents=True, exist_ok=True)
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
    (args.out / "settings.json").write_text(json.dumps(settings, indent=1, ensure_ascii=False))
    frame.to_csv(args.out / "comparison.csv", index=False)
    sensitivity.frame.to_csv(args.out / "sensitivity.csv", index=False)
    print(f"wrote {args.out / 'settings.json'}")
    return 0


class _ImagesDefault(int):
    """The default of ``--images`` (the sensitivity's), marked so that the sweep can tell it was not given."""


def _sweep_inputs(args: argparse.Namespace):
    """(model, data, settings, calibration images) of the sweep, every input checked first."""
    import math

    from core.measure import tuning
    from core.method.quantization import SUPPORTED_BITS
    from core.workloads.data import DataError
    from core.workloads.models import CheckpointError

    if args.out is None:
        raise UsageError("the sweep needs --out DIR (where settings.json, model.packed and sweep.csv are written)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    if args.max_drop is None or not math.isfinite(args.max_drop) or args.max_drop < 0:
        raise UsageError("the sweep needs --max-drop POINTS, a number ≥ 0 (the largest accuracy drop allowed)")
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
    try:
        configs = tuning.settings(args.taus, args.thetas, b_low, b_high)
        model = tuning.load_model(args.model, args.weights, args.image_size, args.mean, args.std)
        data = tuning.load_data(args.data, model, n_images, args.max_images)
        calibration = None
        if args.bn_recalibrate:
            calibration = tuning.calibration_set(args.calibration_data, model, data, args.calibration_size)
    except (CheckpointError, DataError, ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(" ".join(str(err).split())) from err
    return model, data, configs, calibration


def run_sweep(args: argparse.Namespace) -> int:
    """The default mode: sweep τ (and θ) on any model and labelled images; write settings, packed model, CSV."""
    from core.measure import tuning

    model, data, configs, calibration = _sweep_inputs(args)
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    frame = tuning.run_tuning_sweep(model, data, configs, calibration, on_progress=_progress("sweep"))
    dense = frame.iloc[0]
    print(f"{args.model} ({model.source}) on {data.description}; input: {model.preprocess.describe()}")
    print(f"dense accuracy {100 * dense['accuracy']:.2f} %; Δ is paired (same images), 95 % interval")
    print(tuning.format_sweep(frame))
    thetas = args.thetas or [None]
    b_low, b_high = args.bits
    choices = {}
    for bn in ([False, True] if calibration is not None and frame["bn_recalibrated"].any() else [False]):
        found = [c for c in (tuning.choose(frame, args.max_drop, bn, t, b_low=b_low, b_high=b_high) for t in thetas)
                 if c is not None]
        best = max(found, key=lambda c: (c.config.tau, -(c.config.theta or 0)), default=None)
        choices[bn] = best
        what = "with BN recalibration" if bn else "without BN recalibration"
        if best is None:
            print(f"largest τ within {args.max_drop:g} points of dense, {what}: none of the swept τ")
        else:
            print(f"largest τ within {args.max_drop:g} points of dense, {what}: τ = {best.config.tau:g}"
                  + (f", θ = {best.config.theta:g}" if best.config.quantized else "")
                  + f" (accuracy {100 * best.row['accuracy']:.2f} %, Δ {100 * best.row['delta']:+.2f} points, "
                    f"retention {100 * best.row['retention']:.2f} %, packed {best.row['packed_bytes'] / 1e6:.3f} MB)")
    chosen = choices.get(True) or choices.get(False)
    if chosen is not None and choices.get(False) is not None and chosen.config.tau <= choices[False].config.tau:
        chosen = choices[False]  # recalibration only when it buys a larger τ
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "sweep.csv", index=False)
    payload = _sweep_settings(args, model, data, frame, chosen)
    (args.out / "settings.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    if chosen is not None:
        (args.out / "model.packed").write_bytes(tuning.pack_choice(model, chosen, calibration))
        print(f"wrote {args.out / 'settings.json'}, {args.out / 'model.packed'}, {args.out / 'sweep.csv'}")
    else:
        print(f"wrote {args.out / 'settings.json'} (no setting chosen, no model.packed) and {args.out / 'sweep.csv'}")
    return 0


def _sweep_settings(args, model, data, frame, chosen) -> dict:
    """settings.json of the sweep: the chosen setting in ``CompressionConfig.to_dict()`` form, what it measured."""
    dense = frame.iloc[0]
    payload = {
        "config": None if chosen is None else chosen.config.to_dict(),
        "bn_recalibrated": None if chosen is None else chosen.bn_recalibrated,
        "model": {"spec": args.model, "arch": model.arch, "arch_kwargs": model.arch_kwargs, "source": model.source,
                  **({"input": model.input_spec} if model.input_spec else {})},
        "data": {"spec": args.data, "description": data.description, "images": len(data), "labelled": data.labelled},
        "max_drop_points": args.max_drop,
        "dense_accuracy": float(dense["accuracy"]),
    }
    if chosen is not None:
        row = chosen.row
        payload["measured"] = {key: float(row[key]) for key in ("accuracy", "accuracy_dense", "delta", "delta_low",
                                                                "delta_high", "retention")}
        payload["measured"].update(packed_bytes=int(row["packed_bytes"]), images=int(row["n"]))
    return payload


#: mode name (the ``dest`` of its flag) → the function that runs it; no flag: the sweep
MODES: dict[str, Callable[[argparse.Namespace], int]] = {
    "sensitivity": run_sensitivity,
    "per_layer": run_per_layer,
    "sweep": run_sweep,
}


def build_parser() -> argparse.ArgumentParser:
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
                       help="bit-widths of the low and high chunks with --thetas")
    group.add_argument("--bn-recalibrate", action="store_true",
                       help="also evaluate every setting after BatchNorm recalibration")
    group.add_argument("--calibration-data", default=None, metavar="cifar10|DIR",
                       help="images for BN recalibration (default: the evaluation images themselves)")
    group.add_argument("--max-images", type=int, default=2000,
                       help="images read from a folder at most (a fixed class-balanced sample beyond)")
    parser.set_defaults(images=_ImagesDefault(parser.get_default("images")))
    parser.add_argument("--no-cache", action="store_true", help="recompute everything and store nothing")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where cached results live (DIR/sensitivity, DIR/allocation; default: the project cache)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.calibration_size < 1:
            raise UsageError(f"--calibration-size must be ≥ 1, got {args.calibration_size}")
        mode = next((name for name in MODES if getattr(args, name, False)), "sweep")
        return MODES[mode](args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
