"""``python -m core.tune --granularity channel``: one channel-pruned setting, repaired, measured and written.

    python -m core.tune --granularity channel --model resnet18 --tau 0.3 --repair reconstruct --out DIR
    python -m core.tune --granularity channel --model resnet18 --target-macs 0.5 --repair reconstruct --out DIR

``--tau`` is τ_ch (:mod:`core.method.channels`: β = τ_ch · max_c s_c per coupled group).
``--target-macs R`` instead picks the smallest τ_ch whose counted MACs are ≤ R × dense
(:func:`smallest_tau_for_macs`: bisection on τ_ch; counted MACs never grow with τ_ch); with
``--allocation SHAPE`` per-group counts of that shape for R, or with ``--allocation search`` the
shape judged best after the repair on training images (:mod:`core.measure.channel_allocation`),
then a few greedy MAC moves between groups judged the same way (:mod:`core.measure.channel_greedy`),
written as per-group τ_ch (``layer_tau_ch``).
``--theta TH`` (``--bits``) then quantizes the kept weights (the weight engine on the smaller
model, weight τ = 0). Every repair level up to ``--repair`` is evaluated
(:func:`core.measure.channel_repair.repair_channels`, fitted on CIFAR-10 *training* images).

Writes ``settings.json`` (granularity, τ_ch, the kept channels, the weight config, the repair,
the measured rows), ``sweep.csv`` (one row per repair level), ``model.packed`` (the packed
file with the kept channels in its header: ``core.deploy.channel_file.load_compressed`` rebuilds
it with no template), ``model.pt`` (the ``.pt`` bundle with the same record), and with
``--export onnx`` ``model.onnx`` (fp32, :func:`core.deploy.onnx_export.export_fp32`) and
``model.int8.onnx`` (QDQ int8, :func:`core.deploy.onnx_export.export_int8`; activations calibrated
on CIFAR-10 training images, the weight engine's codes when ``--theta`` is given).
Accuracy is on ``--max-images`` class-balanced CIFAR-10 *test* images (10000: all).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from core.measure.allocation_repair import scoring_split
from core.measure.channel_allocation import (
    ChannelJudge,
    ChannelSearchConfig,
    choose_channels,
    config_for_counts,
    shape_counts,
    smallest_tau_for_macs,
)
from core.measure.channel_greedy import refine
from core.measure.tune_inputs import BadInput
from core.method.channels import ChannelConfig, ChannelError, ChannelPruner

#: ``--allocation``: the name on the command line → the shape of :mod:`core.measure.channel_allocation` (or the search)
ALLOCATIONS: dict[str, str] = {"uniform": "uniform τ_ch", "equal-share": "equal share",
                               "streams-at-half": "streams at half", "inner-only": "inner only",
                               "mac-weighted": "MAC-weighted", "search": "search"}
DEPLOY_CALIBRATION_IMAGES = 256  # training images the int8 file's activation ranges are calibrated on


def _allocated(dense, pruner: ChannelPruner, args: argparse.Namespace) -> ChannelConfig:
    """``--allocation``'s per-group τ_ch for ``--target-macs`` (:mod:`core.measure.channel_allocation`)."""
    shape = ALLOCATIONS[args.allocation]
    if shape == "search":
        search = ChannelSearchConfig(args.target_macs)
        fit, score = scoring_split(search.repair.n_images, search.score_images)
        judge = ChannelJudge(dense, pruner, fit, score, search)

        def show(done: int, total: int, name: str) -> None:
            print(f"  [{done}/{total}] {name}", flush=True)

        choice, _ = refine(judge, choose_channels(judge, progress=show), show)
        print(choice.candidates.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"chosen after reconstruction on training images: {choice.shape}", flush=True)
        counts = choice.counts
    else:
        counts = shape_counts(pruner, shape, args.target_macs)
        if counts is None:
            raise ChannelError(f"the '{args.allocation}' allocation cannot reach {args.target_macs:g} × dense MACs")
    return config_for_counts(pruner, counts)


def _evaluate(model, data) -> float:
    from core.measure.accuracy import evaluate

    return float(evaluate(model, data).accuracy)


def _test_data(max_images: int):
    from core.measure.accuracy import balanced_subset, eval_data

    data = eval_data("test")
    if max_images >= len(data.labels):
        return data
    return balanced_subset(data, max(1, max_images // 10))


def run_channels(args: argparse.Namespace, progress: Callable[[str], Callable] | None = None,
                 write: Callable[[Path, dict], None] | None = None) -> int:
    """The channel mode of ``python -m core.tune`` (flags checked here; :class:`BadInput` on bad ones)."""
    from core.measure.channel_repair import (
        estimate_channel_repair_seconds,
        repair_channels,
    )
    from core.measure.repair import RepairConfig, levels
    from core.method.config import CompressionConfig
    from core.workloads.models import PRETRAINED, load_pretrained

    if args.model not in PRETRAINED:
        raise BadInput(f"--granularity channel takes a shipped checkpoint ({', '.join(PRETRAINED)}); got {args.model!r}")
    if (args.tau is None) == (args.target_macs is None):
        raise BadInput("--granularity channel needs exactly one of --tau T (τ_ch) and --target-macs R")
    if args.out is None:
        raise BadInput("--granularity channel needs --out DIR (where settings.json, sweep.csv, model.packed are written)")
    dense = load_pretrained(args.model)
    try:
        pruner = ChannelPruner(dense)
        allocation = getattr(args, "allocation", "uniform")
        if allocation != "uniform" and args.target_macs is None:
            raise BadInput("--allocation chooses per-group counts for a MAC target: give --target-macs R")
        if allocation != "uniform":
            config = _allocated(dense, pruner, args)
        elif args.target_macs is not None:
            config = ChannelConfig(tau=smallest_tau_for_macs(pruner, args.target_macs)[0])
        else:
            config = ChannelConfig(tau=args.tau)
        tau = config.tau
        result = pruner.apply(config)
        weight = (CompressionConfig(tau=0.0) if args.theta is None else
                  CompressionConfig(tau=0.0, theta=args.theta, theta_mode="relative", b_low=args.bits[0], b_high=args.bits[1]))
    except (ChannelError, ValueError) as err:
        raise BadInput(str(err).splitlines()[0]) from err
    setting = f"τ_ch = {tau:.4f}" if allocation == "uniform" else f"the {allocation} allocation"
    print(f"{setting}: MACs {result.macs:,} / {result.macs_dense:,} = {result.mac_ratio:.3f} × dense, "
          f"params {result.params:,} / {result.params_dense:,}", flush=True)
    data = _test_data(args.max_images)
    dense_acc = _evaluate(dense, data)
    rows, models = [], {}
    for method in levels(args.repair):
        repair = RepairConfig(method=method, n_images=args.repair_images, n_holdout=0, ridge=args.repair_ridge,
                              seed=args.repair_seed)
        if method == "none":
            model, seconds = result.model, 0.0
        else:
            estimate = estimate_channel_repair_seconds(result, repair)
            print(f"repair '{method}': estimated {estimate:.0f} s", flush=True)
            report = progress(f"repair {method}") if progress is not None else None
            fixed = repair_channels(dense, result, config=repair, on_progress=report)
            model, seconds = fixed.model, fixed.seconds
        models[method] = model
        acc = _evaluate(model, data)
        rows.append({"granularity": "channel", "tau_ch": tau, "repair": method, "macs": result.macs,
                     "mac_ratio": result.mac_ratio, "params": result.params, "accuracy": acc,
                     "delta_points": 100 * (acc - dense_acc), "dense_accuracy": dense_acc, "images": len(data.labels),
                     "repair_seconds": seconds})
        print(f"  repair {method:<11} accuracy {acc:.4f} (dense {dense_acc:.4f}, Δ {100 * (acc - dense_acc):+.2f} points)",
              flush=True)
    files = _files(args, dense, result, weight, models[args.repair], rows)
    if write is None:
        raise BadInput("no writer given")
    write(args.out, files)
    print(f"wrote {', '.join(str(args.out / name) for name in files)}")
    return 0


def _files(args, dense, result, weight, final, rows: list[dict]) -> dict[str, str | bytes]:
    from core.deploy.channel_file import channel_bundle_bytes, with_channels
    from core.deploy.packed_writer import compressed_bytes
    from core.method.engine import Engine

    record = result.record()
    engine = Engine(final)
    engine_result = engine.apply(weight)
    packed = with_channels(compressed_bytes(engine_result, args.model), record)
    settings = {
        "format": "boundary-explorer/settings/v1",
        "model": {"arch": args.model, "key": f"pretrained:{args.model}"},
        **result.config.to_dict(),  # granularity, τ_ch, the per-group τ_ch of an allocation, the score
        "channels": record,
        "config": weight.to_dict(),
        "repair": args.repair,
        "target_macs": args.target_macs,
        "allocation": getattr(args, "allocation", "uniform"),
        "result": {"macs": result.macs, "macs_dense": result.macs_dense, "mac_ratio": result.mac_ratio,
                   "params": result.params, "params_dense": result.params_dense, "rows": rows,
                   "groups": result.groups.to_dict("records")},
        "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_version": torch.__version__,
    }
    files: dict[str, str | bytes] = {
        "settings.json": json.dumps(settings, indent=2, default=float),
        "sweep.csv": pd.DataFrame(rows).to_csv(index=False),
        "model.packed": packed,
        "model.pt": channel_bundle_bytes(engine_result.model, record, args.model,
                                         settings=json.dumps({"granularity": "channel", "tau_ch": result.config.tau})),
    }
    if getattr(args, "export", None) == "onnx":
        files.update(_onnx_files(engine, engine_result))
    return files


def _onnx_files(engine, engine_result) -> dict[str, bytes]:
    """``model.onnx`` (fp32) and ``model.int8.onnx`` (QDQ, activations calibrated on CIFAR-10 *training* images)
    of the smaller model: with θ, its weights are the engine's own 4/8-bit codes on each channel's int8 grid
    (:func:`core.measure.deploy_export.setting_weights`), else ONNX Runtime quantizes them per channel."""
    from core.deploy.onnx_export import export_fp32, export_int8
    from core.measure.accuracy import calibration_images
    from core.measure.deploy_export import setting_weights

    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_fp32(engine_result.model, Path(tmp) / "model.onnx", torch.randn(1, 3, 32, 32))
        files["model.onnx"] = path.read_bytes()
        images = calibration_images(DEPLOY_CALIBRATION_IMAGES)
        weights = setting_weights(engine, engine_result) if engine_result.config.quantized else None
        export_int8(engine_result.model, Path(tmp) / "model.int8.onnx", images, weights=weights)
        files["model.int8.onnx"] = (Path(tmp) / "model.int8.onnx").read_bytes()
    return files
