"""Realized savings: measured latency per execution path, peak memory and file size on disk.

    python benchmarks/realized.py            # the full table (minutes)
    python benchmarks/realized.py --quick    # a fast subset

For the synthetic MLP (paper size 6×128 and 4096 wide), ``resnet20`` and ``resnet18`` at
retention ρ ∈ {100, 50, 20, 10, 5} % (one global τ per ρ, found by bisection on the
engine's sorted magnitudes), quantized 4/8-bit with θ = 0.1 relative:

* latency (median ms of a forward pass, ``torch.inference_mode``) of the ``dense``
  model (zeros multiplied), ``sparse`` (every layer with a sparse kernel forced to it),
  ``int8`` (every int8-exact Linear forced to it) and ``auto`` (per layer the fastest
  kernel as measured by :func:`core.deploy.runtime.build_runtime`), at batch 1, 64, 256;
* memory (``memory_profiler``, MiB) in a fresh process per path that loads the packed
  file, builds the path and runs a forward pass: the peak while loading and building,
  the resident memory after (freed heap returned with ``malloc_trim``), and the peak
  during a forward pass, each above that process's RSS after its imports;
* the packed file's size on disk (:func:`core.deploy.packed_writer.save_compressed`) against the
  fp32 state_dict saved with safetensors;
* the dense-vs-sparse crossover: single layers swept over sparsity, and per model the
  largest retention at which ``auto`` beat dense.

Weights: the shipped trained checkpoint where one exists (``assets/checkpoints``),
otherwise random initialisation (seed 0); the ``weights`` column says which. Inputs are
N(0, 1) batches (latency does not depend on the values). Nothing here asserts a speed;
the targets of the issue are printed with their measured figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.method.config import CompressionConfig  # noqa: E402
from core.method.engine import Engine  # noqa: E402
from core.workloads.models import REGISTRY, build, load_pretrained  # noqa: E402
from core.deploy.packed_writer import save_compressed, state_dict_file_bytes  # noqa: E402
from core.common.timing import time_interleaved  # noqa: E402
from core.deploy.kernels import KERNELS  # noqa: E402
from core.deploy.runtime import build_runtime, runtime_summary  # noqa: E402

MODELS: dict[str, tuple[str, dict]] = {
    "mlp": ("mlp", {}),
    "mlp4096": ("mlp", {"in_dim": 4096, "out_dim": 4096, "hidden": 4096}),
    "resnet20": ("resnet20", {}),
    "resnet18": ("resnet18", {}),
}
RHOS = (1.0, 0.5, 0.2, 0.1, 0.05)
BATCHES = (1, 64, 256)
THETA, B_LOW, B_HIGH = 0.1, 4, 8


def load_model(key: str) -> tuple[nn.Module, str, str, dict]:
    arch, kwargs = MODELS[key]
    if not kwargs:
        try:
            return load_pretrained(arch), "trained", arch, kwargs
        except (FileNotFoundError, ValueError, KeyError):
            pass
    torch.manual_seed(0)
    return build(arch, **kwargs).eval(), "random init", arch, kwargs


def example_input(key: str, batch: int, device: torch.device) -> torch.Tensor:
    arch, kwargs = MODELS[key]
    generator = torch.Generator().manual_seed(1)
    if REGISTRY[arch].input_kind == "vector":
        return torch.randn(batch, kwargs.get("in_dim", 128), generator=generator).to(device)
    return torch.randn(batch, 3, 32, 32, generator=generator).to(device)


def tau_for_retention(engine: Engine, rho: float, iterations: int = 40) -> float:
    """Global τ whose retention is closest to ρ (bisection; counts from the engine's sorted |W|)."""
    if rho >= 1:
        return 0.0
    layers = [(engine.sorted_magnitudes(n), engine.max_abs(n)) for n in engine.layer_names]
    total = sum(s.numel() for s, _ in layers)

    def retention(tau: float) -> float:
        kept = 0
        for sorted_abs, top in layers:
            beta = torch.tensor([top * tau], dtype=sorted_abs.dtype)
            kept += sorted_abs.numel() - int(torch.searchsorted(sorted_abs, beta, side="left"))
        return kept / total

    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if retention(mid) > rho:
            lo = mid
        else:
            hi = mid
    return hi if abs(retention(hi) - rho) <= abs(retention(lo) - rho) else lo


def rss_mib() -> float:
    from memory_profiler import memory_usage

    return float(memory_usage(-1, interval=0.01, timeout=0.03, max_usage=True))


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS shows live memory."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_probe(file: str, key: str, path: str, batch: int, cache: str, device: str) -> dict:
    """In a fresh process: load the packed file, build ``path``, run one forward pass; MiB above the RSS after imports."""
    from memory_profiler import memory_usage

    from core.deploy.packed_reader import load_compressed

    release_freed_memory()
    base = rss_mib()
    x = example_input(key, batch, torch.device(device))
    holder = {}

    def load_and_build():
        model = load_compressed(file).to(device)
        holder["module"] = build_runtime(model, path, batch_size=batch, example_input=x,
                                         where_faster=path != "sparse", cache_file=cache)
        del model

    load_peak = float(memory_usage((load_and_build, (), {}), interval=0.005, max_usage=True))
    release_freed_memory()
    resident = rss_mib()

    def forward():
        with torch.inference_mode():
            holder["module"](x)

    forward()  # first call's one-off allocations
    release_freed_memory()
    forward_peak = float(memory_usage((forward, (), {}), interval=0.002, max_usage=True))
    return {"load_peak": load_peak - base, "resident": resident - base, "forward_peak": forward_peak - base}


def probe_memory(file: Path, key: str, path: str, batch: int, cache: Path, device: torch.device) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", str(file), key, path, str(batch),
               str(cache), str(device), str(torch.get_num_threads())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_mib(module: nn.Module) -> float:
    """MiB of the module's parameters and buffers (a CSR buffer counts its indices and values)."""
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.layout == torch.sparse_csr:
            parts = (tensor.crow_indices(), tensor.col_indices(), tensor.values())
            total += sum(p.numel() * p.element_size() for p in parts)
        else:
            total += tensor.numel() * tensor.element_size()
    return total / 2**20


def file_sizes(engine: Engine, result, arch: str, kwargs: dict, fp32: int, tau: float, folder: Path) -> dict:
    """Sizes on disk; the 4/8-bit packed file stays in ``folder`` as ``packed.safetensors``."""
    save_compressed(result, folder / "packed.safetensors", arch=arch, arch_kwargs=kwargs)
    packed = os.path.getsize(folder / "packed.safetensors")
    pruned_only = engine.apply(CompressionConfig(tau=tau))
    save_compressed(pruned_only, folder / "pruned.safetensors", arch=arch, arch_kwargs=kwargs)
    pruned = os.path.getsize(folder / "pruned.safetensors")
    os.remove(folder / "pruned.safetensors")
    return {"file_fp32_kb": fp32 / 1e3, "file_pruned_kb": pruned / 1e3, "file_q48_kb": packed / 1e3,
            "acct_q48_kb": result.model_bytes_compressed / 1e3, "x_smaller": fp32 / packed}


def bench_setting(key, result, batches, device, budget_s, cache: Path) -> list[dict]:
    rows = []
    for batch in batches:
        x = example_input(key, batch, device)
        modules = {"dense": build_runtime(result, "dense"),
                   "sparse": build_runtime(result, "sparse", where_faster=False),
                   "int8": build_runtime(result, "int8", where_faster=False),
                   "auto": build_runtime(result, "auto", batch_size=batch, example_input=x, budget_s=budget_s,
                                         cache_file=cache)}
        for module in modules.values():
            module.to(device)
        with torch.inference_mode():
            reference = modules["dense"](x)
            for name, module in modules.items():
                error = (module(x) - reference).abs().max().item()
                if not error <= 1e-4 * max(reference.abs().max().item(), 1.0):
                    raise RuntimeError(f"{key}: the {name} path differs from dense by {error}")
        runners = {name: (lambda m: (lambda: m(x)))(module) for name, module in modules.items()}
        load = os.getloadavg()[0]
        with torch.inference_mode():
            stats = time_interleaved(runners, device, warmup=1, min_rounds=7, budget_s=max(4 * budget_s, 1.0), max_s=60)
        times = {k: v.median_s for k, v in stats.items()}
        report = modules["auto"].runtime_report
        rows.append({"batch": batch, "load1": load, **{f"{k}_ms": times[k] * 1e3 for k in modules},
                     **{f"{k}_min_ms": stats[k].min_s * 1e3 for k in modules},
                     "auto_x": times["dense"] / times["auto"],
                     "auto_x_min": stats["dense"].min_s / stats["auto"].min_s,
                     "auto_layers": " ".join(f"{k}:{v}" for k, v in sorted(runtime_summary(modules["auto"]).items())),
                     "auto_layer_sum_ms": float(report[[f"{k}_ms" for k in KERNELS]].min(axis=1).sum()),
                     "dense_layer_sum_ms": float(report["dense_ms"].sum()),
                     "w_dense_mib": weight_mib(modules["dense"]), "w_sparse_mib": weight_mib(modules["sparse"]),
                     "w_auto_mib": weight_mib(modules["auto"])})
        del modules, runners
        gc.collect()
    return rows


def crossover_sweep(batches, sparsities, device, budget_s) -> pd.DataFrame:
    """Single layers, dense vs sparse kernel, over sparsity: where does sparse start to win?"""
    from core.deploy.kernels import make_kernel

    layers = {
        "Linear 4096×4096": (lambda: nn.Linear(4096, 4096), lambda b: torch.randn(b, 4096)),
        "Conv 64→64 3×3 @32×32": (lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), lambda b: torch.randn(b, 64, 32, 32)),
        "Conv 256→256 3×3 @8×8": (lambda: nn.Conv2d(256, 256, 3, padding=1, bias=False), lambda b: torch.randn(b, 256, 8, 8)),
    }
    rows = []
    torch.manual_seed(0)
    for label, (make, data) in layers.items():
        for batch in batches:
            x = data(batch).to(device)
            for sparsity in sparsities:
                layer = make().to(device).eval()
                with torch.no_grad():
                    layer.weight[torch.rand_like(layer.weight) < sparsity] = 0
                kernels = {"dense": layer, "sparse": make_kernel(layer, "sparse")}
                with torch.inference_mode():
                    timings = time_interleaved({k: (lambda m: (lambda: m(x)))(m) for k, m in kernels.items()},
                                               device, warmup=2, min_rounds=5, budget_s=budget_s)
                times = {k: t.median_s for k, t in timings.items()}
                with torch.inference_mode():
                    out = layer(x)
                macs = layer.weight.numel() * (out[0, 0].numel() if out.ndim > 2 else 1) * batch
                kept_macs = macs * float((layer.weight != 0).float().mean())
                rows.append({"layer": label, "batch": batch, "sparsity": sparsity,
                             "dense_ms": times["dense"] * 1e3, "sparse_ms": times["sparse"] * 1e3,
                             "sparse_x": times["dense"] / times["sparse"],
                             "dense_gmac_s": macs / times["dense"] / 1e9,
                             "sparse_kept_gmac_s": kept_macs / times["sparse"] / 1e9})
    return pd.DataFrame(rows)


def crossover_points(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per layer and batch: the lowest swept sparsity from which sparse is faster at every higher one."""
    rows = []
    for (layer, batch), group in sweep.groupby(["layer", "batch"], sort=False):
        group = group.sort_values("sparsity")
        faster = (group["sparse_ms"] < group["dense_ms"]).tolist()
        point = None
        for i in range(len(faster)):
            if all(faster[i:]):
                point = group["sparsity"].iloc[i]
                break
        rows.append({"layer": layer, "batch": batch,
                     "sparse wins from sparsity": "never (in sweep)" if point is None else f"{point:.0%}"})
    return pd.DataFrame(rows)


def print_memory(memory_rows, memory_batch, fmt) -> None:
    print(f"\n== Memory (memory_profiler, MiB above a fresh process's RSS after imports; batch {memory_batch}): "
          "load = peak while loading the packed file and building the path, resident = after (freed heap "
          "returned), forward = peak during one forward pass ==")
    print(pd.DataFrame(memory_rows).to_string(index=False, float_format=fmt))


def model_crossover(table: pd.DataFrame, margin: float = 1.05) -> pd.DataFrame:
    """Per model and batch: the largest ρ from which auto beats dense by ≥ ``margin`` at every smaller ρ."""
    rows = []
    for (key, batch), group in table.groupby(["model", "batch"], sort=False):
        group = group.sort_values("rho")
        point = None
        for _, row in group.iterrows():
            if row["dense_ms"] >= margin * row["auto_ms"]:
                point = row["rho"]
            else:
                break
        rows.append({"model": key, "batch": batch,
                     "auto faster from": "never" if point is None else f"ρ ≤ {point:.0%}",
                     "auto_x at smallest ρ": group.iloc[0]["auto_x"]})
    return pd.DataFrame(rows)


def run_sweep(args, batches, device, fmt) -> None:
    sparsities = (0.5, 0.7, 0.9, 0.95) if args.quick else (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
    sweep = crossover_sweep(batches, sparsities, device, args.budget)
    print("\n== Single-layer sweep: dense vs sparse kernel (median ms; GMAC/s: dense over all weights, "
          "sparse over the kept ones) ==")
    print(sweep.to_string(index=False, float_format=fmt))
    print(crossover_points(sweep).to_string(index=False))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-probe"]:
        file, key, path, batch, cache, device, threads = argv[1:8]
        torch.set_num_threads(int(threads))
        print(json.dumps(memory_probe(file, key, path, int(batch), cache, device)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast subset: fewer ρ, batch 64 only, short sweep")
    parser.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS),
                        help="models to run (none: only the single-layer sweep)")
    parser.add_argument("--rhos", nargs="+", type=float, default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per measurement (more = steadier)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--no-sweep", action="store_true", help="skip the single-layer sparsity sweep")
    parser.add_argument("--memory-only", action="store_true", help="only file sizes and the memory probes")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the main table here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rhos = args.rhos or ((1.0, 0.2, 0.1) if args.quick else RHOS)
    batches = args.batches or ((64,) if args.quick else BATCHES)
    memory_batch = 64 if 64 in batches else batches[0]
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
          + f", load average {os.getloadavg()[0]:.2f} at start", flush=True)

    started = time.perf_counter()
    rows, targets, memory_rows, files = [], [], [], []
    file_target = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cache = folder / "timings.json"
        for key in args.models:
            model, weights, arch, kwargs = load_model(key)
            fp32 = state_dict_file_bytes(model, folder / "fp32.safetensors")
            os.remove(folder / "fp32.safetensors")
            engine = Engine(model)
            settings = [(rho, tau_for_retention(engine, rho)) for rho in rhos]
            target_rho = None
            if key == "resnet18":  # the target: τ = 0.15 on the trained model (≈ 22 % retention)
                if weights == "trained":
                    settings.append((engine.apply(CompressionConfig(tau=0.15)).retention, 0.15))
                else:
                    settings.append((0.22, tau_for_retention(engine, 0.22)))
                target_rho = settings[-1][0]
            elif key == "mlp4096":
                target_rho = 0.10
                if target_rho not in rhos:
                    settings.append((0.10, tau_for_retention(engine, 0.10)))
            for rho, tau in settings:
                config = CompressionConfig(tau=tau, theta=THETA, b_low=B_LOW, b_high=B_HIGH)
                sizes = file_sizes(engine, engine.apply(config), arch, kwargs, fp32, tau, folder)
                result = engine.apply(config)
                setting_batches = tuple(batches) if rho != target_rho or 64 in batches else tuple(batches) + (64,)
                if args.memory_only:
                    setting_batches = ()
                    build_runtime(result, "auto", batch_size=memory_batch, example_input=example_input(
                        key, memory_batch, device), budget_s=args.budget, cache_file=cache)  # auto's choices, cached
                    files.append({"model": key, "weights": weights, "rho": result.retention, "tau": tau, **sizes})
                for row in bench_setting(key, result, setting_batches, device, args.budget, cache):
                    full = {"model": key, "weights": weights, "rho_target": rho, "tau": tau,
                            "rho": result.retention, **row, **sizes}
                    rows.append(full)
                    print(f"  {key} ρ={result.retention:.3f} batch {row['batch']}: dense {row['dense_ms']:.2f} ms, "
                          f"sparse {row['sparse_ms']:.2f}, int8 {row['int8_ms']:.2f}, auto {row['auto_ms']:.2f} "
                          f"({row['auto_layers']}), file {sizes['file_q48_kb']:.0f} kB "
                          f"[{time.perf_counter() - started:.0f} s]", flush=True)
                    if rho == target_rho and row["batch"] == 64:
                        targets.append(full)
                if not args.no_memory:
                    memory = {"model": key, "rho": result.retention, "batch": memory_batch}
                    for path in ("dense", "auto"):
                        probe = probe_memory(folder / "packed.safetensors", key, path, memory_batch, cache, device)
                        memory.update({f"{path}_{k}_mib": v for k, v in probe.items()})
                    memory_rows.append(memory)
                del result
                gc.collect()
            if key == "resnet18":  # the file-size target: τ = 0.1, 4/8-bit, θ = 0.1 relative
                result = engine.apply(CompressionConfig(tau=0.1, theta=THETA, b_low=B_LOW, b_high=B_HIGH))
                file_target = {"weights": weights, "rho": result.retention,
                               **file_sizes(engine, result, arch, kwargs, fp32, 0.1, folder)}
            del engine, model
            gc.collect()

    fmt = lambda v: f"{v:.3g}"  # noqa: E731
    if not rows:
        if memory_rows:
            print_memory(memory_rows, memory_batch, fmt)
            print(pd.DataFrame(files).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if not args.no_sweep:
            run_sweep(args, batches, device, fmt)
        return 0
    table = pd.DataFrame(rows)
    print("\n== Latency: median ms per forward pass (torch.inference_mode), interleaved rounds; auto_x = dense / auto; "
          "load1 = 1-min load average when timed ==")
    columns = ["model", "weights", "rho", "tau", "batch", "load1"] + [
        f"{k}_ms" for k in ("dense", "sparse", "int8", "auto")] + ["auto_x", "auto_layers"]
    print(table[columns].to_string(index=False, float_format=fmt))
    print("\n== Latency: fastest round (min ms; least disturbed by other processes); per-layer sums from auto's "
          "measurements ==")
    columns = ["model", "rho", "batch"] + [f"{k}_min_ms" for k in ("dense", "sparse", "int8", "auto")] + [
        "auto_x_min", "dense_layer_sum_ms", "auto_layer_sum_ms"]
    print(table[columns].to_string(index=False, float_format=fmt))
    print("\n== Weights held in memory (MiB; CSR counts its int32 indices and values) ==")
    print(table.drop_duplicates(["model", "rho"])[["model", "rho", "w_dense_mib", "w_sparse_mib", "w_auto_mib"]]
          .to_string(index=False, float_format=fmt))
    if memory_rows:
        print_memory(memory_rows, memory_batch, fmt)
    print("\n== File size on disk (4/8-bit, θ = 0.1 relative; 'pruned' = pruning only, fp32 values) ==")
    files = table.drop_duplicates(["model", "rho"])[
        ["model", "weights", "rho", "tau", "file_fp32_kb", "file_pruned_kb", "file_q48_kb", "acct_q48_kb", "x_smaller"]]
    files = files.assign(file_vs_acct=files["file_q48_kb"] / files["acct_q48_kb"])
    print(files.to_string(index=False, float_format=lambda v: f"{v:.4g}"))

    print("\n== Dense-vs-sparse crossover per model: auto beats dense by ≥ 5 % at this retention and every "
          "smaller one measured ==")
    print(model_crossover(table).to_string(index=False))
    if not args.no_sweep:
        run_sweep(args, batches, device, fmt)

    print("\n== Targets (batch 64) ==")
    for row in targets:
        goal = 2.5 if row["model"] == "mlp4096" else 1.5
        verdict = "MET" if row["auto_x"] >= goal else "NOT MET"
        print(f"  {row['model']} ({row['weights']}) at ρ = {row['rho']:.3f}: median dense {row['dense_ms']:.2f} ms, "
              f"auto {row['auto_ms']:.2f} ms → {row['auto_x']:.2f}× (goal ≥ {goal}×): {verdict}; fastest rounds: "
              f"dense {row['dense_min_ms']:.2f} ms, auto {row['auto_min_ms']:.2f} ms → {row['auto_x_min']:.2f}×; "
              f"load1 {row['load1']:.2f}")
    if file_target is not None:
        ft = file_target
        verdict = "MET" if ft["x_smaller"] >= 10 else "NOT MET"
        print(f"  resnet18 ({ft['weights']}) τ = 0.1, θ = 0.1, 4/8-bit (ρ = {ft['rho']:.3f}): file {ft['file_q48_kb']:.0f} kB "
              f"vs fp32 {ft['file_fp32_kb']:.0f} kB → {ft['x_smaller']:.2f}× smaller (goal ≥ 10×): {verdict}; "
              f"file / accounting = {ft['file_q48_kb'] / ft['acct_q48_kb']:.4f}")
    print(f"  load average {os.getloadavg()[0]:.2f} at end; {time.perf_counter() - started:.0f} s in all")
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
