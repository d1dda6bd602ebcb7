"""Channel vs weight granularity: accuracy, counted MACs and measured torch eager latency (issue 21).

    python benchmarks/structured.py                       # ResNet-20 and ResNet-18, 2,000 test images
    python benchmarks/structured.py --models resnet18 --images 10000 --target-macs 0.5
    python benchmarks/structured.py --models resnet18 --curve 0.8 0.6 0.5 --images 1000
    python benchmarks/structured.py --models resnet18 --layer-tau conv1=0   # the first stage's stream kept whole
    python benchmarks/structured.py --torchvision         # random-weight torchvision models: valid, loads back, exports
    python benchmarks/structured.py --models resnet18 --images 10000 --deploy   # + ONNX Runtime / OpenVINO int8

Per shipped model (``load_choice("pretrained:NAME")``):

* **First paint**: :meth:`ChannelPruner.apply` (the smaller module + per-group and per-layer
  figures) timed over a grid of τ_ch after one warm-up: median and p95 (the live slider's call).
* **Rows**, each on the same class-balanced CIFAR-10 *test* images (``--images``; 10000 = all):
  the dense model; channel granularity at the smallest τ_ch whose counted MACs ≤ ``--target-macs``
  × dense, without and with the least-squares repair (:func:`repair_channels`, on
  ``--repair-images`` CIFAR-10 *training* images); weight granularity at the τ whose retention
  equals the channel model's parameter ratio, without and with the weight-level reconstruction
  (:func:`repair_setting`). MACs are counted (per image, Conv/Linear): the channel model's are
  what it executes; a weight-pruned model executes the dense MACs (its zeros are multiplied),
  its non-zero MACs are shown beside. Latency: torch eager fp32, batch ``--batch`` (64), the
  project's one timer (:func:`time_interleaved`: warm-up, interleaved rounds, median).
* ``--curve R …``: accuracy against counted MACs for several MAC ratios (``--allocation``'s
  counts at each), without and with repair, and the kept/channels per group at each.

The run's conditions (commit, CPU, load average, threads) are printed first. Nothing here asserts.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd
import torch
from run_conditions import machine_conditions

from core.common.timing import percentile, time_interleaved
from core.measure.accuracy import balanced_subset, eval_data, evaluate
from core.measure.channel_allocation import SHAPES, config_for_counts, shape_counts
from core.measure.channel_repair import repair_channels
from core.measure.repair import RepairConfig, repair_setting
from core.measure.tune_channels import smallest_tau_for_macs
from core.method.channels import ChannelConfig, ChannelPruner
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.services.choices import load_choice

DEFAULT_TARGETS = {"resnet18": 0.5, "resnet20": 1 / 1.5, "cifar_cnn": 0.5}


def first_paint(pruner: ChannelPruner, share: bool, n: int = 30) -> tuple[float, float]:
    """Median and p95 seconds of ``pruner.apply`` (model, counted MACs, the group table a page shows) over
    ``n`` τ_ch values in [0, 0.9], shuffled, after a warm-up."""
    taus = [0.9 * i / (n - 1) for i in range(n)]
    random.Random(0).shuffle(taus)
    pruner.apply(ChannelConfig(0.5), share=share)
    samples = []
    for tau in taus:
        start = time.perf_counter()
        _ = pruner.apply(ChannelConfig(tau), share=share).groups  # the table a page shows, built too
        samples.append(time.perf_counter() - start)
    return percentile(samples, 50), percentile(samples, 95)


def paint_line(pruner: ChannelPruner) -> str:
    parts = []
    for share in (True, False):
        p50, p95 = first_paint(pruner, share)
        parts.append(f"{'share=True (live view)' if share else 'share=False (own copy)'}: median {p50 * 1e3:.1f} ms, "
                     f"p95 {p95 * 1e3:.1f} ms")
    return "first paint (ChannelPruner.apply over 30 τ_ch) " + "; ".join(parts)


def weight_tau_for_retention(engine: Engine, retention: float) -> float:
    """The weight-level τ whose retention is closest to ``retention`` (bisection: retention falls as τ grows)."""
    low, high = 0.0, 1.0
    for _ in range(30):
        mid = (low + high) / 2
        if engine.apply(CompressionConfig(tau=mid)).retention > retention:
            low = mid
        else:
            high = mid
    return high


def latency(models: dict[str, torch.nn.Module], batch: int, budget_s: float) -> dict[str, float]:
    """Median seconds per batch of each model, torch eager fp32, timed in interleaved rounds."""
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        timings = time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, warmup=2, min_rounds=5,
                                   max_rounds=30, budget_s=budget_s)
    return {k: t.median_s for k, t in timings.items()}


def run_model(name: str, args: argparse.Namespace, data) -> None:
    print(f"\n=== {name} ===", flush=True)
    dense = load_choice(f"pretrained:{name}").model
    start = time.perf_counter()
    pruner = ChannelPruner(dense)
    print(f"ChannelPruner (Torch-Pruning trace, scores): {time.perf_counter() - start:.2f} s; "
          f"{len(pruner.groups)} groups, {sum(g.prunable for g in pruner.groups)} prunable")
    print(paint_line(pruner) + " (target ≤ 100 ms p95 for ResNet-18)", flush=True)
    if args.paint_only:
        return
    target = args.target_macs if args.target_macs is not None else DEFAULT_TARGETS.get(name, 0.5)
    repair = RepairConfig("reconstruct", n_images=args.repair_images, n_holdout=0, positions=args.positions)
    dense_acc = evaluate(dense, data).accuracy
    rows = [{"model": name, "granularity": "dense", "setting": "-", "repair": "-", "accuracy": dense_acc,
             "macs": pruner.macs_dense, "nonzero_macs": pruner.macs_dense, "params": pruner.params_dense}]
    models = {"dense": dense}
    overrides = dict(item.split("=") for item in args.layer_tau)
    base = ChannelConfig(layer_tau={k: float(v) for k, v in overrides.items()})
    tau, result = channel_at(pruner, args.allocation, target, base)
    fixed = repair_channels(dense, result, config=repair)
    print(f"channel {args.allocation} (τ_ch = {tau:.4f}): MACs {result.mac_ratio:.3f} × dense; "
          f"repair {fixed.seconds:.1f} s", flush=True)
    for label, model in (("none", result.model), ("reconstruct", fixed.model)):
        rows.append({"model": name, "granularity": "channel", "setting": f"τ_ch={tau:.3f}" if not result.config.layer_tau else args.allocation, "repair": label,
                     "accuracy": evaluate(model, data).accuracy, "macs": result.macs, "nonzero_macs": result.macs,
                     "params": result.params})
        models[f"channel/{label}"] = model
    engine = Engine(dense)
    w_tau = weight_tau_for_retention(engine, result.params / result.params_dense)
    weight = engine.apply(CompressionConfig(tau=w_tau))
    weight_fixed = repair_setting(dense, engine, weight, config=repair)
    nonzero = round(pruner.macs_dense * (1 - weight.compute_reduction))
    for label, model in (("none", weight.model), ("reconstruct", weight_fixed.model)):
        rows.append({"model": name, "granularity": "weight", "setting": f"τ={w_tau:.3f} (ρ={weight.retention:.3f})",
                     "repair": label, "accuracy": evaluate(model, data).accuracy, "macs": pruner.macs_dense,
                     "nonzero_macs": nonzero, "params": round(pruner.params_dense * weight.retention)})
        models[f"weight/{label}"] = model
    timed = latency({"dense": dense, "channel": result.model, "weight": weight.model}, args.batch, args.budget)
    table = pd.DataFrame(rows)
    table["Δ points"] = 100 * (table["accuracy"] - dense_acc)
    table["MACs × dense"] = table["macs"] / pruner.macs_dense
    table["latency ms"] = [1e3 * timed["dense" if g == "dense" else g] for g in table["granularity"]]
    table["speed-up"] = timed["dense"] / table["latency ms"] * 1e3
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    groups = result.groups[result.groups["prunable"]]
    print("kept channels per group at the target:",
          ", ".join(f"{r.name} {r.kept}/{r.channels}" for r in groups.itertuples()))
    if args.deploy:
        deploy_rows(dense, fixed.model, data, args)
    for ratio in args.curve:
        t, r = channel_at(pruner, args.allocation, ratio, base)
        f = repair_channels(dense, r, config=repair)
        kept = r.groups[r.groups["prunable"]]
        print(f"curve ({args.allocation}): MACs {r.mac_ratio:.3f} × dense (τ_ch {t:.3f}): accuracy "
              f"{evaluate(r.model, data).accuracy:.4f} without repair, {evaluate(f.model, data).accuracy:.4f} with "
              f"(dense {dense_acc:.4f}); kept {', '.join(f'{k}/{n}' for k, n in zip(kept.kept, kept.channels))}",
              flush=True)


def channel_at(pruner: ChannelPruner, allocation: str, ratio: float, base: ChannelConfig) -> tuple[float, object]:
    """(τ_ch, the channel result) at ≤ ``ratio`` × dense MACs: uniform τ_ch (with ``base``'s per-layer overrides) or
    the per-group counts of one shape of :mod:`core.measure.channel_allocation` as per-group τ_ch (τ_ch shown as 0)."""
    if allocation == "uniform τ_ch":
        tau, _ = smallest_tau_for_macs(pruner, ratio, base)
        return tau, pruner.apply(ChannelConfig(tau, layer_tau=dict(base.layer_tau)))
    counts = shape_counts(pruner, allocation, ratio)
    if counts is None:
        raise SystemExit(f"the '{allocation}' allocation cannot reach {ratio:g} × dense MACs")
    return 0.0, pruner.apply(config_for_counts(pruner, counts))


def deploy_rows(dense: torch.nn.Module, channel_model: torch.nn.Module, data, args: argparse.Namespace) -> None:
    """The repaired channel model exported (fp32 and QDQ int8 ONNX) and run where users deploy it.

    The smaller model goes through the deploy issue's path as it is: an :class:`Engine` on it at
    weight τ = 0 (nothing more is pruned), with ``--deploy-theta`` its weights on the engine's
    4/8-bit codes (else ONNX Runtime quantizes them per channel at 8 bits), int8 activations
    calibrated on 512 CIFAR-10 *training* images; timed at batch ``--batch`` against torch eager
    fp32 dense (:func:`measure_deployment`, 1 thread per runtime as in ``benchmarks/deploy.py``),
    accuracy of the int8 rows from each runtime's own outputs on the same test images.
    """
    from core.measure.accuracy import calibration_images
    from core.measure.deploy_export import export_setting
    from core.measure.deploy_table import TORCH, DeployConfig, measure_deployment

    theta = args.deploy_theta
    config = (CompressionConfig(tau=0.0) if theta is None else
              CompressionConfig(tau=0.0, theta=theta, theta_mode="relative", b_low=4, b_high=8))
    engine = Engine(channel_model, palette=(4, 8))
    result = engine.apply(config)
    rows = ((TORCH, "fp32", "compressed"), ("onnxruntime", "int8", "compressed"), ("openvino", "int8", "compressed"))
    with tempfile.TemporaryDirectory(prefix="structured-deploy-") as folder:
        files = export_setting(dense, engine, result, folder, calibration_images(512, seed=0))
        table = measure_deployment(dense, result.model, files, data, config=DeployConfig(
            batches=(args.batch,), threads=1, eval_images=len(data.labels), budget_s=args.budget, accuracy_rows=rows))
    frame = table.table
    print(f"\ndeploy: the repaired channel model, weights {'4/8-bit codes (θ = ' + str(theta) + ' relative)' if theta else 'int8 per channel (ORT)'}, "
          f"batch {args.batch}, 1 thread per runtime")
    print(frame[["runtime", "precision", "model", "batch", "latency_ms", "speedup_vs_torch_dense", "accuracy",
                 "delta", "n_images"]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for note in table.notes:
        print("note:", note)


def run_torchvision(names: list[str]) -> None:
    """Random-weight torchvision models cut to ≤ 0.7 × dense MACs: output shape, loading back, ONNX fp32 export."""
    from core.deploy.channel_file import channel_bundle_bytes, load_channel_bundle
    from core.deploy.onnx_export import export_fp32
    from core.workloads.torchvision_models import build as build_tv

    for name in names:
        print(f"\n=== torchvision:{name} (random weights) ===", flush=True)
        try:
            size = 32 if name.startswith("vit") else 64  # a small input keeps the trace and the checks quick
            kwargs = {"num_classes": 10, **({"image_size": size} if name.startswith("vit") else {})}
            model = build_tv(name, kwargs).eval()
            x = torch.randn(1, 3, size, size)
            start = time.perf_counter()
            pruner = ChannelPruner(model, x)
            tau, _ = smallest_tau_for_macs(pruner, 0.7)
            result = pruner.apply(ChannelConfig(tau))
            with torch.no_grad():
                same = result.model(x).shape == model(x).shape
            stuck = [f"{g.name}: {g.reason}" for g in pruner.groups if not g.prunable]
            back = load_channel_bundle(channel_bundle_bytes(result.model, result.record(), f"torchvision:{name}", kwargs))
            with torch.no_grad():
                equal = torch.allclose(back(x), result.model(x))
            with tempfile.TemporaryDirectory() as tmp:
                export_fp32(result.model, Path(tmp) / "m.onnx", x)
            print(f"MACs {result.mac_ratio:.3f} × dense at τ_ch {tau:.3f} (input {size} px); same output shape {same}; loads back {equal}; "
                  f"ONNX fp32 export ok; {len(pruner.groups)} groups, {len(stuck)} not prunable; "
                  f"{time.perf_counter() - start:.1f} s")
            for line in stuck[:5]:
                print("  not pruned:", line)
        except Exception as err:  # noqa: BLE001 - a benchmark reports any failure per model, it does not stop
            print(f"cannot be channel-pruned here: {type(err).__name__}: {str(err)[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet18"])
    parser.add_argument("--images", type=int, default=2000, help="class-balanced test images (10000: all)")
    parser.add_argument("--target-macs", type=float, default=None, help="MAC ratio (default per model: 0.667, 0.5)")
    parser.add_argument("--repair-images", type=int, default=512)
    parser.add_argument("--positions", type=int, default=RepairConfig.positions,
                        help="sampled output positions per image and layer of the repairs")
    parser.add_argument("--allocation", default="uniform τ_ch", choices=SHAPES,
                        help="the channel model's per-group counts at the target (core.measure.channel_allocation)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timed rounds per latency table")
    parser.add_argument("--curve", type=float, nargs="*", default=[])
    parser.add_argument("--layer-tau", nargs="*", default=[], metavar="LAYER=T",
                        help="per-layer τ_ch overrides kept fixed while --target-macs picks the uniform τ_ch "
                             "(e.g. conv1=0: the stem's residual stream untouched)")
    parser.add_argument("--paint-only", action="store_true", help="only the first-paint timing")
    parser.add_argument("--deploy", action="store_true",
                        help="also export the repaired channel model and time it in ONNX Runtime and OpenVINO int8")
    parser.add_argument("--deploy-theta", type=float, default=None,
                        help="with --deploy: 4/8-bit weights at this relative θ (default: int8 weights per channel)")
    parser.add_argument("--torchvision", nargs="*", default=None,
                        help="random-weight torchvision models (default: resnet50 mobilenet_v3_small vit_b_16)")
    args = parser.parse_args()
    print("conditions:", machine_conditions(ROOT), f"torch threads {torch.get_num_threads()}", flush=True)
    if args.torchvision is not None:
        run_torchvision(args.torchvision or ["resnet50", "mobilenet_v3_small", "vit_b_16"])
        return
    full = eval_data("test")
    data = full if args.images >= len(full.labels) else balanced_subset(full, max(1, args.images // 10))
    print(f"accuracy on {len(data.labels)} CIFAR-10 test images; repairs on {args.repair_images} training images")
    for name in args.models:
        run_model(name, args, data)


if __name__ == "__main__":
    main()
