"""Engine speed: ``python benchmarks/engine_speed.py [--models resnet18 resnet50] [--repeats 15]``.

Prints, in one run and on torchvision ResNets with random init (``weights=None``):

* the memory-bandwidth lower bound: one read + one write of all Conv/Linear weights
  (``copy_`` into a preallocated buffer);
* the engine's re-prune time per τ change (slider steps of 0.01, and one large jump),
  against a naive full recompute ``W · (|W| ≥ τ·max|W|)`` per layer;
* ``torch.nn.utils.prune.l1_unstructured`` layer by layer and ``global_unstructured``
  at the same sparsity;
* θ re-selection from the pre-quantized chunks against re-quantizing every layer at
  b_low and b_high for that θ;
* the chunk store's and the engine snapshot's extra bytes.

Timings are medians of ``repeats`` runs; nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.common.timing import Timing, time_call, time_interleaved  # noqa: E402
from core.method.config import CompressionConfig  # noqa: E402
from core.method.engine import Engine  # noqa: E402
from core.method.pruning import boundary_prune, prunable_layers  # noqa: E402
from core.method.quantization import dequantize  # noqa: E402


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median of exactly ``repeats`` timed calls after ``warmup`` untimed ones."""
    return time_interleaved({"fn": fn}, warmup=warmup, min_rounds=repeats, max_rounds=repeats)["fn"].median_ms


def bandwidth_bound_ms(weights: list[torch.Tensor], repeats: int) -> float:
    flat = torch.cat([w.reshape(-1) for w in weights])
    out = torch.empty_like(flat)
    return median_ms(lambda: out.copy_(flat), repeats, warmup=2)


def naive_reprune_ms(weights: list[torch.Tensor], tau: float, repeats: int) -> float:
    return median_ms(lambda: [boundary_prune(w, tau) for w in weights], repeats)


def torch_prune_ms(model: nn.Module, amount: float, how: str, repeats: int) -> float:
    """Median time of ``prune.l1_unstructured`` per layer, or ``global_unstructured``, on fresh copies."""
    times = []
    for _ in range(max(3, repeats // 3)):
        clone = copy.deepcopy(model)
        params = [(layer.module, layer.param) for layer in prunable_layers(clone)]

        def run():
            if how == "l1":
                for module, name in params:
                    prune.l1_unstructured(module, name, amount=amount)
            else:
                prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)

        times.append(time_call(run))
    return Timing(samples_s=tuple(times)).median_ms


def engine_step_ms(engine: Engine, configs: list[CompressionConfig]) -> float:
    """Median wall time of ``apply`` over a sequence of settings, each following the previous."""
    return Timing(samples_s=tuple(time_call(lambda c=config: engine.apply(c)) for config in configs)).median_ms


def requantize_ms(weights: list[torch.Tensor], tau: float, theta: float, low: int, high: int, repeats: int) -> float:
    """Quantize every layer at both bit-widths for this θ and select (no chunk store)."""

    def run():
        for w in weights:
            magnitude = w.abs()
            top = magnitude.max()
            value = torch.where(magnitude >= top * theta, dequantize(w, high), dequantize(w, low))
            torch.where(magnitude >= top * tau, value, 0.0)

    return median_ms(run, repeats)


def bench_model(name: str, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    weights = [layer.weight.detach() for layer in prunable_layers(model)]
    n_weights = sum(w.numel() for w in weights)
    start = time.perf_counter()
    engine = Engine(model)
    build_s = time.perf_counter() - start
    row: dict[str, float] = {"weights_M": n_weights / 1e6, "engine_build_s": build_s}
    row["bandwidth_bound_ms"] = bandwidth_bound_ms(weights, repeats)

    steps = [round(0.05 + 0.01 * i, 2) for i in range(26)]
    sweep = steps + steps[::-1]
    engine.apply(CompressionConfig(tau=steps[0]))
    row["engine_step_ms"] = engine_step_ms(engine, [CompressionConfig(tau=t) for t in sweep[1:]])
    jumps = [CompressionConfig(tau=t) for t in (0.0, 0.5) * ((repeats + 1) // 2)]
    row["engine_jump_0_to_0.5_ms"] = engine_step_ms(engine, jumps)
    row["naive_reprune_ms"] = naive_reprune_ms(weights, 0.2, repeats)

    result = engine.apply(CompressionConfig(tau=0.2))
    amount = 1 - result.retention
    row["sparsity_at_tau_0.2"] = amount
    row["torch_l1_unstructured_ms"] = torch_prune_ms(model, amount, "l1", repeats)
    row["torch_global_unstructured_ms"] = torch_prune_ms(model, amount, "global", repeats)

    engine.apply(CompressionConfig(tau=0.2, theta=0.3, b_low=4, b_high=8))  # builds the chunks once
    thetas = [round(0.2 + 0.01 * i, 2) for i in range(21)]
    row["theta_reselect_ms"] = engine_step_ms(
        engine, [CompressionConfig(tau=0.2, theta=t, b_low=4, b_high=8) for t in thetas + thetas[::-1]])
    row["requantize_ms"] = requantize_ms(weights, 0.2, 0.3, 4, 8, max(3, repeats // 3))
    row["chunk_store_MB"] = engine.chunk_store_bytes() / 1e6
    row["engine_snapshot_MB"] = engine.snapshot_bytes() / 1e6
    row["weights_fp32_MB"] = n_weights * 4 / 1e6
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"], help="torchvision model names")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per figure (median reported)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        row = bench_model(name, args.repeats)
        print(f"\n== {name} (random init), {row['weights_M']:.2f} M Conv/Linear weights ==")
        for key, value in row.items():
            print(f"  {key:32s} {value:10.3f}")
        print(f"  {'ratio step / bandwidth bound':32s} {row['engine_step_ms'] / row['bandwidth_bound_ms']:10.2f}")
        print(f"  {'ratio naive / step':32s} {row['naive_reprune_ms'] / row['engine_step_ms']:10.1f}")
        print(f"  {'ratio l1_unstructured / step':32s} {row['torch_l1_unstructured_ms'] / row['engine_step_ms']:10.1f}")
        print(f"  {'ratio global_unstructured / step':32s} {row['torch_global_unstructured_ms'] / row['engine_step_ms']:10.1f}")
        print(f"  {'ratio requantize / reselect':32s} {row['requantize_ms'] / row['theta_reselect_ms']:10.1f}")


if __name__ == "__main__":
    main()
