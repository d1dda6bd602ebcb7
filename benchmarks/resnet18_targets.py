"""The issue's two ResNet-18 targets on the shipped checkpoint, measured quickly (about 30 s).

    python benchmarks/resnet18_targets.py

* file: τ = 0.1, 4/8 bit, θ = 0.1 relative → packed file vs fp32 safetensors state_dict, on disk;
* speed: τ = 0.15 (pruning only) → every execution path at batch 64, and auto's per-layer choice.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.method.config import CompressionConfig  # noqa: E402
from core.method.engine import Engine  # noqa: E402
from core.workloads.models import load_pretrained  # noqa: E402
from core.measure.realized import measure_file_sizes, measure_realized  # noqa: E402


def main() -> None:
    engine = Engine(load_pretrained("resnet18"))
    result = engine.apply(CompressionConfig(tau=0.1, theta=0.1, b_low=4, b_high=8))
    packed, reference = measure_file_sizes(result, "resnet18")
    print(f"τ = 0.1, 4/8 bit, θ = 0.1 relative: retention {result.retention:.2%}; packed file {packed:,} B, fp32 "
          f"state_dict {reference:,} B → {reference / packed:.2f}× smaller (target 10×); file / accounting "
          f"{packed / result.model_bytes_compressed:.4f}", flush=True)
    result = engine.apply(CompressionConfig(tau=0.15))
    realized = measure_realized(result, torch.randn(1, 3, 32, 32), arch="resnet18", batch_size=64, budget_s=0.05)
    auto_x = realized.ms("dense") / realized.ms("auto")
    print(f"τ = 0.15: retention {result.retention:.2%}; batch 64; auto {auto_x:.2f}× dense (target 1.5×)")
    print(realized.paths.to_string(index=False))
    print(realized.auto_layers[["name", "density", "dense_ms", "sparse_ms", "chosen"]].to_string(index=False))


if __name__ == "__main__":
    main()
