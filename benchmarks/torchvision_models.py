"""Every torchvision classification architecture through the engine and the packed file: a table.

    python benchmarks/torchvision_models.py                     # every architecture up to 100 M parameters
    python benchmarks/torchvision_models.py resnet18 vit_b_16   # some of them
    python benchmarks/torchvision_models.py --csv out.csv

Per architecture (random initialisation, seed 0, 1000 classes, the smallest square input it runs
on: 32 px for most, 63 for AlexNet, 75 for Inception-v3, 224 for the ViTs and MaxViT): its
parameters; the seconds to build it, to snapshot it (``Engine(model)``: ranking every weight)
and to apply τ = 0.2, θ = 0.3 relative at 4/8 bit (the first apply quantizes both chunks);
the engine's memory against the fp32 bytes of the prunable weights, counted (rank orders,
chunks, its working buffer; the weights themselves are the model's, read without a copy) and
measured (in a fresh process per architecture: the growth of the resident memory from the built
model to after ``Engine(model)`` and the first apply, each read after a collection and
``malloc_trim``, with torch's kernels warmed up on a small model first); the packed file (:func:`core.deploy.packed_writer.compressed_bytes`)
against the fp32 state_dict saved with safetensors; whether the packed file loads back bit-exact
(without a template: ``torchvision:<name>`` is recorded) and gives the compressed model's
outputs. Nothing is asserted on speed; one thread unless ``--threads``.
"""
from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.common.memory import process_rss_bytes, release_memory  # noqa: E402
from core.deploy.packed_reader import parse_compressed  # noqa: E402
from core.deploy.packed_writer import compressed_bytes, state_dict_file_bytes  # noqa: E402
from core.method.config import CompressionConfig  # noqa: E402
from core.method.engine import Engine  # noqa: E402
from core.workloads import torchvision_models as tv  # noqa: E402

CONFIG = CompressionConfig(tau=0.2, theta=0.3, theta_mode="relative", b_low=4, b_high=8)


def input_size(name: str) -> int:
    return tv.MIN_INPUT.get(name, 224 if name.startswith("vit_") else 32)


def engine_rss_growth(name: str) -> int:
    """Bytes the process's resident memory grows by for ``Engine(model)`` + the first apply (a fresh process)."""
    child = subprocess.run([sys.executable, __file__, "--rss-growth-of", name], capture_output=True, text=True,
                           check=True)
    return int(child.stdout.split()[-1])


def _print_rss_growth(name: str) -> None:
    torch.manual_seed(0)
    warm = Engine(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 10)))
    warm.apply(CONFIG)  # torch's sort, index and quantization kernels and thread pool, once
    model = tv.build(name, {})
    example = torch.randn(1, 3, input_size(name), input_size(name))
    with torch.inference_mode():
        model.eval()(example)
    del warm
    release_memory()
    before = process_rss_bytes()
    engine = Engine(model, example_input=example)
    engine.apply(CONFIG)
    release_memory()
    print(process_rss_bytes() - before)


def measure(name: str) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    model = tv.build(name, {})
    built = time.perf_counter() - start
    size = input_size(name)
    example = torch.randn(1, 3, size, size)
    start = time.perf_counter()
    engine = Engine(model, example_input=example)
    snapshot_s = time.perf_counter() - start
    start = time.perf_counter()
    result = engine.apply(CONFIG)
    apply_s = time.perf_counter() - start
    weights_bytes = sum(engine.snapshot.layer(n).numel * 4 for n in engine.layer_names + engine.norm_layer_names)
    engine_bytes = engine.snapshot.nbytes + engine.working_bytes()
    start = time.perf_counter()
    data = compressed_bytes(result, tv.arch_name(name), {})
    pack_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = parse_compressed(data, name).load()
    load_s = time.perf_counter() - start
    exact = all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), result.model.state_dict().values()))
    with torch.inference_mode():
        same = torch.equal(loaded(example), result.model(example))
    with tempfile.TemporaryDirectory() as folder:
        fp32_file = state_dict_file_bytes(model, Path(folder) / "dense.safetensors")
    row = {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "input_px": size,
           "build_s": built, "snapshot_s": snapshot_s, "apply_s": apply_s, "retention_%": 100 * result.retention,
           "engine_MB": engine_bytes / 1e6, "engine_x_weights": engine_bytes / weights_bytes,
           "rss_growth_x_weights": engine_rss_growth(name) / weights_bytes,
           "packed_MB": len(data) / 1e6, "fp32_file_MB": fp32_file / 1e6, "file_x_smaller": fp32_file / len(data),
           "pack_s": pack_s, "load_s": load_s, "bit_exact": exact, "same_output": same}
    del model, engine, result, loaded, data
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="architectures (default: every one up to 100 M parameters)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table to this CSV")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads")
    parser.add_argument("--rss-growth-of", default=None, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_growth_of is not None:
        _print_rss_growth(args.rss_growth_of)
        return 0
    names = args.names or list(tv.architectures_within())
    rows = []
    total = time.perf_counter()
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", file=sys.stderr, flush=True)
        rows.append(measure(name))
    frame = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"{len(rows)} architectures in {time.perf_counter() - total:.0f} s; τ = 0.2, θ = 0.3 relative, 4/8 bit; "
          f"every packed file bit-exact: {bool(frame['bit_exact'].all())}; same outputs: "
          f"{bool(frame['same_output'].all())}")
    if args.csv is not None:
        frame.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
