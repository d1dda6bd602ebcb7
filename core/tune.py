"""``python -m core.tune``: tuning a checkpoint from the command line, one mode per flag.

    python -m core.tune --sensitivity --model resnet20
    python -m core.tune --per-layer --model resnet20 --target-retention 0.3 --out DIR
    python -m core.tune --per-layer --model resnet18 --target-bytes 9000000 --out DIR
    python -m core.tune --per-layer --model resnet20 --max-drop 1 --out DIR

``--sensitivity`` prints the per-layer sensitivity table of a shipped checkpoint (one layer pruned
at a time across a τ grid, the paired accuracy drop vs dense on a fixed class-balanced set of
training images), cached on disk, with progress on stderr. ``--per-layer`` measures (or reads) the
same table, chooses a τ per layer for the target (the allocation from the summed single-layer
drops, then the best of it, global magnitude's per-layer τ and blends of the two, run whole on the
sensitivity's images; ``--additive-only`` skips that joint check), verifies it on the full test set
in fp32 against uniform τ and global magnitude pruning at the same retention, with and without BN
recalibration, prints the comparison and writes ``DIR/settings.json``: the setting in
``CompressionConfig.to_dict()`` form under ``"config"`` (``CompressionConfig.from_dict`` reads the
file back) beside the measured accuracies (:mod:`core.measure.tune_per_layer`).

Without ``--sensitivity`` or ``--per-layer`` the mode is the **sweep**, for any model and any
labelled images (:func:`core.measure.tune_runs.run_tune_sweep`):

    python -m core.tune --model resnet20 --data cifar10 --max-drop 1.0 --out tuned/
    python -m core.tune --model torchvision:resnet50 --weights my_weights.pt --data path/to/val \
        --image-size 224 --max-drop 1.0 --out tuned/

It evaluates the dense model, sweeps τ (and θ with ``--thetas``), prints the table (τ, retention,
accuracy, Δ vs dense with its paired 95 % interval, packed size) and the largest τ within
``--max-drop`` points of dense, with and without BN recalibration (``--bn-recalibrate``), and
writes ``DIR/settings.json`` (the chosen setting under ``"config"``), ``DIR/model.packed`` (its
packed file, loadable by ``load_compressed`` and the app's upload) and ``DIR/sweep.csv``.

``--tau T`` (with ``--theta TH``, relative, and ``--bits``) evaluates **one setting** instead
(:func:`core.measure.tune_runs.run_one_setting`), at every repair level up to ``--repair``
(:mod:`core.measure.repair`: none, bn, bias, reconstruct; each includes the ones before, each is
run on its own):

    python -m core.tune --model resnet18 --data cifar10 --tau 0.2 --repair reconstruct --out repaired/
    python -m core.tune --model resnet20 --tau 0.2 --theta 0.3 --export onnx --out deployed/

It prints one row per level (accuracy, Δ vs dense with its paired 95 % interval, retention,
packed bytes, repair seconds) and writes the same three files, ``model.packed`` carrying the
chosen level's repair (same mask and bit-widths; the header records the repair) and
``settings.json`` a ``"repair"`` block beside ``"config"``. The repairs are fitted on
``--repair-images`` (512) augmented CIFAR-10 *training* images, or on ``--calibration-data DIR``;
never on the evaluation images. In the sweep, ``--repair M`` adds a row after every repair level
up to M for every setting (the estimated total time is said first), prints the largest τ within
``--max-drop`` for each level (from that level's own rows) and writes them under
``"largest_tau_within"`` in ``settings.json``; the chosen setting carries the lowest level that
buys the largest τ. A repair estimated over 30 s is announced before it starts.

This module is the command only: each mode (:data:`MODES`) checks its flags, calls one function
that does the work and returns the files to write, then prints and writes them. Bad input exits
with status 2 and one line on stderr naming the problem; Ctrl-C stops with one line and status
130, and no output file is written (every mode writes its files together, at the end).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the work's modules load torch: imported when a mode runs
    from core.measure.allocation import Target
    from core.measure.repair import RepairConfig
    from core.measure.sensitivity import SensitivityConfig
    from core.measure.tune_inputs import InputSpec
    from core.measure.tune_per_layer import CacheSpec

PROG = "python -m core.tune"
#: a repair estimated to take longer than this (seconds) is announced before it starts
ANNOUNCE_REPAIR_S = 30.0


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(message)


class _ImagesDefault(int):
    """The default of ``--images`` (the sensitivity's), marked so that the sweep can tell it was not given."""


def _progress(prefix: str) -> Callable[[int, int, str], None]:
    start = time.perf_counter()

    def report(done: int, total: int, label: str) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{prefix} [{done}/{total}] {time.perf_counter() - start:6.1f} s  {label:<40}", end=end,
              file=sys.stderr, flush=True)
    return report


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _say_estimate(seconds: float, what: str) -> None:
    print(f"{what}: estimated {seconds:.0f} s on this machine (an estimate; a busy machine takes longer). "
          "Ctrl-C stops it and writes nothing.", file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------- checking the flags

def _check_model(args: argparse.Namespace) -> None:
    from core.workloads.models import PRETRAINED

    if args.model not in PRETRAINED:
        raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(PRETRAINED)}")


def _sensitivity_config(args: argparse.Namespace) -> SensitivityConfig:
    from core.measure.sensitivity import SensitivityConfig

    try:
        return SensitivityConfig(taus=tuple(args.taus), n_images=args.images, source=args.source,
                                 precision=args.precision, bn_recalibration=args.bn_sensitivity,
                                 calibration_size=args.calibration_size)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from err


def _cache(args: argparse.Namespace) -> CacheSpec:
    from core.measure.tune_per_layer import CacheSpec

    return CacheSpec(use=not args.no_cache, root=args.cache_dir)


def _target(args: argparse.Namespace) -> Target:
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


def _check_out(args: argparse.Namespace, mode: str, files: str) -> None:
    if args.out is None:
        raise UsageError(f"{mode} needs --out DIR (where {files} written)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")


def _repair_config(args: argparse.Namespace) -> RepairConfig:
    """The repair's settings from ``--repair*`` (fitted images, ridge, seed), checked; no held-out error table."""
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


def _input_spec(args: argparse.Namespace) -> InputSpec:
    """What the sweep and the single setting load, after the checks they share (images, input, data, bits, repair)."""
    from core.measure.tune_inputs import InputSpec
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
    return InputSpec(model=args.model, data=args.data, weights=args.weights, image_size=args.image_size,
                     mean=None if args.mean is None else tuple(args.mean),
                     std=None if args.std is None else tuple(args.std), images=n_images,
                     max_images=args.max_images, calibration_data=args.calibration_data,
                     calibration_size=args.calibration_size)


def _one_line(err: Exception) -> UsageError:
    return UsageError(" ".join(str(err).split()))


# ---------------------------------------------------------------- the modes

def run_sensitivity(args: argparse.Namespace) -> int:
    """``--sensitivity``: the layer × τ table of paired accuracy drops (points; positive = worse)."""
    from core.measure.tune_per_layer import sensitivity_report, shipped_sensitivity

    _check_model(args)
    sensitivity = shipped_sensitivity(args.model, _sensitivity_config(args), _cache(args), _progress)
    print(sensitivity_report(args.model, sensitivity))
    if args.csv is not None:
        sensitivity.frame.to_csv(args.csv, index=False)
    return 0


def run_per_layer(args: argparse.Namespace) -> int:
    """``--per-layer``: choose τ per layer for the target, verify, print the table, write DIR/settings.json."""
    from core.measure.tune_per_layer import run_per_layer_tuning

    target = _target(args)
    _check_out(args, "--per-layer", "settings.json is")
    if args.verify_images is not None and not 1 <= args.verify_images <= 10_000:
        raise UsageError(f"--verify-images must be in [1, 10000], got {args.verify_images}")
    config = _sensitivity_config(args)
    _check_model(args)
    if args.repair != "none":  # chosen after that repair, and packed with it (core.measure.tune_per_layer_repair)
        from core.measure.tune_per_layer_repair import run_per_layer_command
        return run_per_layer_command(args, target, config, _repair_config(args), _cache(args), _progress,
                                     _write_outputs)
    run = run_per_layer_tuning(args.model, config, target, verify_images=args.verify_images,
                               calibration_size=args.calibration_size, bn_recalibration=not args.no_bn,
                               additive_only=args.additive_only, cache=_cache(args), progress=_progress)
    print(run.report())
    _write_outputs(args.out, run.files)
    print(f"wrote {args.out / 'settings.json'}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """The default mode: sweep τ (and θ) on any model and labelled images; write settings, packed model, CSV."""
    from core.measure import tuning
    from core.measure.tune_runs import run_tune_sweep

    repair = _repair_config(args)
    _check_out(args, "the sweep", "settings.json, model.packed and sweep.csv are")
    if args.max_drop is None or not math.isfinite(args.max_drop) or args.max_drop < 0:
        raise UsageError("the sweep needs --max-drop POINTS, a number ≥ 0 (the largest accuracy drop allowed)")
    if args.theta is not None:
        raise UsageError("--theta goes with --tau (one setting); the sweep takes --thetas")
    spec = _input_spec(args)
    try:
        configs = tuning.settings(args.taus, args.thetas, *args.bits)
    except (ValueError, TypeError) as err:
        raise _one_line(err) from err

    def announce(seconds: float, method: str, calibration: str) -> None:
        _say_estimate(seconds, f"repair '{method}' at {len(configs)} settings on {calibration}")

    run = run_tune_sweep(spec, configs, repair, max_drop=args.max_drop, thetas=args.thetas,
                         bits=tuple(args.bits), bn_recalibrate=args.bn_recalibrate, progress=_progress,
                         on_note=_note, on_estimate=announce)
    print(run.report())
    _write_outputs(args.out, run.files)
    if run.chosen is not None:
        print(f"wrote {args.out / 'settings.json'}, {args.out / 'model.packed'}, {args.out / 'sweep.csv'}")
    else:
        print(f"wrote {args.out / 'settings.json'} (no setting chosen, no model.packed) and {args.out / 'sweep.csv'}")
    return 0


def run_setting(args: argparse.Namespace) -> int:
    """``--tau T`` (``--theta TH``): one setting at every repair level up to ``--repair``; the sweep's three files."""
    from core.measure.tune_runs import run_one_setting
    from core.method.config import CompressionConfig

    _check_out(args, "--tau", "settings.json, model.packed and sweep.csv are")
    if args.thetas is not None:
        raise UsageError("--thetas belongs to the sweep; with --tau give one --theta")
    if args.max_drop is not None:
        raise UsageError("--max-drop chooses among the sweep's settings; --tau evaluates the one given")
    if args.bn_recalibrate:
        raise UsageError("--bn-recalibrate belongs to the sweep; with --tau use --repair bn")
    spec = _input_spec(args)
    b_low, b_high = args.bits
    try:
        config = (CompressionConfig(tau=args.tau) if args.theta is None else
                  CompressionConfig(tau=args.tau, theta=args.theta, theta_mode="relative", b_low=b_low, b_high=b_high))
    except (ValueError, TypeError) as err:
        raise _one_line(err) from err
    repair = _repair_config(args)

    def announce(seconds: float, method: str, calibration: str) -> None:
        if seconds > ANNOUNCE_REPAIR_S:
            _say_estimate(seconds, f"\nrepair '{method}' on {calibration}")

    run = run_one_setting(spec, config, repair, progress=_progress, on_note=_note,
                          on_estimate=announce)
    print(run.report())
    files = dict(run.files)
    if args.export == "onnx":  # model.onnx, model.int8.onnx, deploy.csv (core.measure.deploy_run)
        from core.measure.deploy_run import deploy_outputs
        onnx_files, table = deploy_outputs(run, repair, progress=_progress)
        files.update(onnx_files)
        print(table.table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    _write_outputs(args.out, files)
    print(f"wrote {args.out / 'settings.json'}, {args.out / 'model.packed'} (repair '{repair.method}'), "
          f"{args.out / 'sweep.csv'}" + (", model.onnx, model.int8.onnx, deploy.csv" if args.export else ""))
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
    """The command's flags, one group per mode (``--help`` lists them); bad flags raise :class:`UsageError`."""
    from core.measure.repair import METHODS
    from core.measure.sensitivity import DEFAULT_IMAGES, DEFAULT_TAUS, SOURCES

    parser = _Parser(prog=PROG, description="Tune a shipped checkpoint: per-layer sensitivity and automatic "
                                            "per-layer τ.")
    modes = parser.add_mutually_exclusive_group(required=False)  # neither: the sweep
    modes.add_argument("--sensitivity", action="store_true", help="measure and print the per-layer sensitivity")
    modes.add_argument("--per-layer", action="store_true", help="choose τ per layer for a target and verify it")
    parser.add_argument("--model", default="resnet20", help="a shipped checkpoint: resnet20, resnet18, cifar_cnn")
    sensitivity, per_layer, sweep, setting, repair = (parser.add_argument_group(title) for title in (
        "sensitivity", "per-layer",
        "sweep (the default mode; also uses --model, --taus, --images, --max-drop, --out, --calibration-size)",
        "one setting (--tau; also uses the sweep's --model, --weights, --data, --images, --bits, --out, input and "
        "calibration options)",
        "repair without retraining (--tau: every level up to this one; the sweep: a row after it for every setting)"))
    sensitivity.add_argument("--taus", type=float, nargs="+", default=list(DEFAULT_TAUS),
                             help="the τ grid, each in (0, 1]")
    sensitivity.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="class-balanced images to measure on")
    sensitivity.add_argument("--source", choices=SOURCES, default="train",
                             help="measure on training images without augmentation (default; not the test images "
                                  "the result is verified on) or on test images")
    sensitivity.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                             help="inference precision of the estimate (auto: bf16 where native)")
    sensitivity.add_argument("--bn-sensitivity", action="store_true",
                             help="recalibrate BatchNorm after pruning each layer while measuring (slower)")
    sensitivity.add_argument("--csv", type=Path, default=None, help="--sensitivity: also write the table to this CSV")
    per_layer.add_argument("--target-retention", type=float, default=None, metavar="R",
                           help="keep at most this fraction of the Conv/Linear weights")
    per_layer.add_argument("--target-bytes", type=float, default=None, metavar="B",
                           help="stored size of the whole model at most B bytes")
    per_layer.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                           help="estimated accuracy drop at most POINTS percentage points")
    per_layer.add_argument("--out", type=Path, default=None, metavar="DIR", help="where settings.json is written")
    per_layer.add_argument("--additive-only", action="store_true",
                           help="take the allocation from the summed single-layer drops as it is (no joint check of "
                                "candidates on the sensitivity images)")
    per_layer.add_argument("--no-bn", action="store_true", help="verify without the BN-recalibrated rows")
    per_layer.add_argument("--calibration-size", type=int, default=2000, help="training images for BN recalibration")
    per_layer.add_argument("--verify-images", type=int, default=None, metavar="N",
                           help="verify on the first N of a class-balanced order of the test set (default: all 10,000)")
    sweep.add_argument("--weights", default=None, metavar="FILE|pretrained",
                       help="a state_dict file (.pt/.pth/.safetensors), or 'pretrained' for torchvision's own weights "
                            "from the local torch hub cache (the default for torchvision:<name>)")
    sweep.add_argument("--data", default="cifar10", metavar="cifar10|DIR",
                       help="cifar10 (the test set) or a folder of class folders of images (ImageFolder layout)")
    sweep.add_argument("--image-size", type=int, default=None, metavar="PX", help="the model's input size")
    sweep.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                       help="per-channel mean of the normalisation")
    sweep.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                       help="per-channel standard deviation of the normalisation")
    sweep.add_argument("--thetas", type=float, nargs="+", default=None, metavar="THETA",
                       help="also quantize: θ (relative: θ·max|W| per layer) at every τ")
    sweep.add_argument("--bits", type=int, nargs=2, default=[4, 8], metavar=("B_LOW", "B_HIGH"),
                       help="bit-widths of the low and high chunks with --thetas or --theta")
    sweep.add_argument("--bn-recalibrate", action="store_true",
                       help="also evaluate every setting after BatchNorm recalibration")
    sweep.add_argument("--calibration-data", default=None, metavar="cifar10|DIR",
                       help="images for BN recalibration (default: the evaluation images themselves) and for "
                            "--repair (default: CIFAR-10's training split; never the evaluation images)")
    sweep.add_argument("--max-images", type=int, default=2000,
                       help="images read from a folder at most (a fixed class-balanced sample beyond)")
    setting.add_argument("--tau", type=float, default=None, metavar="T",
                         help="evaluate this one τ (instead of a sweep) and write the sweep's three files for it")
    setting.add_argument("--theta", type=float, default=None, metavar="TH",
                         help="with --tau: also quantize, θ relative (θ·max|W| per layer), with --bits")
    setting.add_argument("--export", choices=("onnx",), default=None,
                         help="also write model.onnx, model.int8.onnx and deploy.csv (runtimes timed and evaluated)")
    repair.add_argument("--repair", choices=METHODS, default="none",
                        help="none; bn (BatchNorm statistics); bias (+ per-channel mean correction); reconstruct "
                             "(+ layer-wise least squares of the kept weights); each includes the ones before")
    repair.add_argument("--repair-images", type=int, default=512, metavar="N",
                        help="calibration images the repair is fitted on (at most 4096)")
    repair.add_argument("--repair-ridge", type=float, default=1e-3, metavar="λ",
                        help="reconstruction's ridge, relative to the mean of the Gram matrix's diagonal")
    repair.add_argument("--repair-seed", type=int, default=0, metavar="S",
                        help="which training images are drawn and which positions sampled")
    parser.set_defaults(images=_ImagesDefault(parser.get_default("images")))
    parser.add_argument("--granularity", choices=("weight", "channel"), default="weight",
                        help="channel: remove whole channels, --tau is τ_ch (core.measure.tune_channels)")
    parser.add_argument("--target-macs", type=float, default=None, metavar="R",
                        help="--granularity channel: the smallest τ_ch whose counted MACs are ≤ R × dense")
    from core.measure.tune_channels import ALLOCATIONS

    parser.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                        help="with --target-macs: uniform τ_ch, one shape of per-group counts, or 'search' (every "
                             "shape judged after the repair on training images; core.measure.channel_allocation)")
    parser.add_argument("--no-cache", action="store_true", help="recompute everything and store nothing")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where cached results live (DIR/sensitivity, DIR/allocation; default: the project cache)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the mode the arguments name; 0 done, 2 bad input (one line on stderr), 130 interrupted (Ctrl-C)."""
    from core.measure.tune_inputs import BadInput

    try:
        args = build_parser().parse_args(argv)
        if args.calibration_size < 1:
            raise UsageError(f"--calibration-size must be ≥ 1, got {args.calibration_size}")
        if args.granularity == "channel":
            from core.measure.tune_channels import run_channels
            return run_channels(args, progress=_progress, write=_write_outputs)
        mode = _mode(args)
        if args.export and mode != "setting":
            raise UsageError("--export onnx exports one setting: give --tau (and --theta)")
        return MODES[mode](args)
    except (UsageError, BadInput) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; no output files were written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
