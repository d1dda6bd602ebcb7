"""The packed file against ``torch.save(model.state_dict())`` of the fp32 model, and what its bytes hold (prints; no asserts).

    python benchmarks/packed_size.py                        # ResNet-18 and ResNet-20, τ = 0.2, θ = 0.3 relative, 4/8 bit
    python benchmarks/packed_size.py --models resnet20 --no-repair

For each shipped model, the setting's packed file without and with the reconstruction repair
(:mod:`core.measure.repair`, 512 CIFAR-10 training images; ResNet-18 takes 20–60 s on 2 cores):
raw file bytes against the raw bytes of ``torch.save`` of the fp32 state_dict, the ratio, the
breakdown of the file (keep mask, codes, selector, scales, other tensors, container), the mask and
selector encodings chosen per layer, the masks' entropy bound (Σ numel · H(kept/numel)), and what the
same data would take in the version-1 layout (bitmap/index masks, bitmap selectors). Write and read
times are single runs after one untimed write (which has the engine build its chunks), with
``verify=False`` (the app writes with verification, about one extra read), as wall-clock and as
this process's CPU time (which a loaded, shared machine inflates far less).
Every file is read back and compared with the model it stores, bit for bit. Nothing is cached.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
from run_conditions import machine_conditions

from core.deploy.packed_layout import (
    FORMAT_VERSION,
    LayerRecord,
    code_bytes,
    dtype_from_name,
    layer_bytes,
    mask_bytes,
    mask_kind,
    selector_stored_bytes,
)
from core.deploy.packed_reader import PackedFile, parse_compressed
from core.deploy.packed_writer import compressed_bytes, state_dict_file_bytes
from core.measure.repair import RepairConfig, repair_setting
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.method.quantization import FLOAT_PASSTHROUGH_BITS
from core.workloads.models import load_pretrained


def torch_save_bytes(model: torch.nn.Module) -> int:
    """Raw bytes of ``torch.save(model.state_dict())``."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def safetensors_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state_dict saved with safetensors (the app's uncompressed reference file)."""
    with tempfile.TemporaryDirectory() as folder:
        return state_dict_file_bytes(model, Path(folder) / "dense.safetensors")


def breakdown(packed: PackedFile) -> dict[str, int]:
    """The file's bytes by what they hold; the parts add up to the file size."""
    parts = Counter()
    for record in packed.layers:
        parts["mask"] += mask_bytes(record)
        parts["selector"] += selector_stored_bytes(record)
        if record.b_high is None:
            parts["values (pruning only)"] += record.kept * dtype_from_name(record.dtype).itemsize
        for _, count, bits in record.streams if record.b_high is not None else ():
            parts["codes"] += code_bytes(count, bits)
            parts["scales"] += 0 if bits == FLOAT_PASSTHROUGH_BITS else 4 * record.channels
    parts["other tensors"] = sum(entry.nbytes for entry in packed.state)
    parts["container"] = packed.file_bytes - int(packed.data.size)
    assert sum(parts.values()) == packed.file_bytes
    return dict(parts)


def version1_data_bytes(packed: PackedFile) -> int:
    """The same records' data in the version-1 layout (bitmap/index masks, bitmap selectors)."""
    total = sum(entry.nbytes for entry in packed.state)
    for r in packed.layers:
        old = LayerRecord(r.name, r.shape, r.dtype, r.kept, r.n_high, r.n_low, r.b_high, r.b_low,
                          mask_kind(r.numel, r.kept, 1), r.key, version=1)
        total += layer_bytes(old)
    return total


def entropy_bytes(packed: PackedFile) -> float:
    def h(p: float) -> float:
        return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return sum(r.numel * h(r.kept / r.numel) for r in packed.layers) / 8


class Clock:
    """Wall-clock and process CPU seconds of a ``with`` block."""

    def __enter__(self) -> Self:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def __str__(self) -> str:
        return f"{self.wall:.2f} s wall / {self.cpu:.2f} s CPU"


def report(label: str, data: bytes, write: Clock, reference: dict[str, torch.Tensor], fp32: int) -> None:
    with Clock() as read:
        packed = parse_compressed(data, label)
        state = packed.decode()
    same = state.keys() == reference.keys() and all(torch.equal(state[k], v) for k, v in reference.items())
    parts = breakdown(packed)
    old_file = packed.file_bytes - int(packed.data.size) + version1_data_bytes(packed)
    masks = Counter(r.mask for r in packed.layers)
    selectors = Counter(r.selector for r in packed.layers if r.selector is not None)
    print(f"  {label}: packed {packed.file_bytes:,} B = {fp32 / packed.file_bytes:.2f}× smaller than torch.save fp32 "
          f"({fp32:,} B); loads back bit for bit: {same}; write {write}, read+decode {read}")
    print("    breakdown: " + ", ".join(f"{part} {size:,} B ({100 * size / packed.file_bytes:.1f} %)"
                                        for part, size in parts.items()))
    print(f"    masks: {dict(masks)}; selectors: {dict(selectors)}; mask entropy bound {entropy_bytes(packed):,.0f} B")
    print(f"    version-1 layout of the same data: {old_file:,} B = {fp32 / old_file:.2f}× "
          f"(this file, version {FORMAT_VERSION}, is {100 * (1 - packed.file_bytes / old_file):.1f} % smaller)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet20"])
    parser.add_argument("--tau", type=float, default=0.2)
    parser.add_argument("--theta", type=float, default=0.3)
    parser.add_argument("--bits", type=int, nargs=2, default=[4, 8], metavar=("B_LOW", "B_HIGH"))
    parser.add_argument("--n-images", type=int, default=512)
    parser.add_argument("--no-repair", action="store_true", help="skip the reconstruction repair")
    args = parser.parse_args(argv)
    print("conditions:", machine_conditions(ROOT), f"torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    config = CompressionConfig(tau=args.tau, theta=args.theta, b_low=args.bits[0], b_high=args.bits[1])
    print(f"setting: τ = {args.tau:g}, θ = {args.theta:g} relative, {args.bits[0]}/{args.bits[1]} bit; "
          f"packed format version {FORMAT_VERSION}")
    for name in args.models:
        model = load_pretrained(name)
        fp32 = torch_save_bytes(model)
        engine = Engine(model)
        result = engine.apply(config)
        print(f"{name}: retention {100 * result.retention:.2f} %; computed stored size "
              f"{result.model_bytes_compressed:,} B; fp32 files: torch.save {fp32:,} B, safetensors "
              f"{safetensors_bytes(model):,} B", flush=True)
        compressed_bytes(result, name, verify=False)  # warm-up: the engine builds its chunks on first use
        with Clock() as write:
            data = compressed_bytes(result, name, verify=False)
        report("no repair", data, write, result.model.state_dict(), fp32)
        if args.no_repair:
            continue
        fixed = repair_setting(model, engine, result, None,
                               RepairConfig("reconstruct", n_images=args.n_images, n_holdout=0))
        with Clock() as write:
            data = compressed_bytes(result, name, verify=False, repaired=fixed)
        report(f"reconstruction repair ({fixed.seconds:.0f} s)", data, write, fixed.model.state_dict(), fp32)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
