"""Execution paths that turn pruned zeros and low-bit weights into measured speed.

``build_runtime(result_or_model, path, batch_size, example_input)`` returns a new module
(the input is never modified) whose Conv2d/Linear layers each run one of these kernels:

* ``dense`` — the layer as it is: zeros are multiplied (the baseline);
* ``sparse`` — the weight as a CSR matrix (``torch.sparse`` → MKL on CPU, cuSPARSE on
  CUDA). Linear: ``y = (W_csr · xᵀ)ᵀ``. Conv2d: a *shifted-tap* CSR convolution: the
  zero-padded input is laid out once as a (C, N·H·W) matrix (one per stride phase), and
  each of the k×k taps adds ``W[:, :, i, j]_csr · X`` read at a constant offset into
  that matrix, so no k²-times-larger im2col matrix is built (it measured 2–5× faster
  than unfold + CSR on the development CPU). groups = 1, zero padding only;
* ``int8`` — weight-only int8 for Linear layers whose weights are exactly int8 codes ×
  a per-output-channel scale (as the engine's ≤ 8-bit chunks are when one chunk is used):
  either fused (``torch._weight_int8pack_mm``, where the device has it) or dequantized on
  the fly; when measuring, both are timed and the faster counts. Layers that are not
  int8-exact (pruning only, mixed 4/8) do not get this kernel: it would change outputs.

``path`` picks per layer:

* ``"dense"``: every layer dense;
* ``"sparse"`` / ``"int8"``: that kernel on each layer where it applies **and** measured
  faster than dense (``where_faster=False`` forces it wherever it applies);
* ``"auto"``: the fastest of all applicable kernels, per layer.

Measurements time each layer alone on its real input (captured from ``example_input``
repeated to ``batch_size``): warm-up, then interleaved rounds, median (a kernel whose
warm-up call already took 4× the fastest one's is not timed further). They are cached
per process (and in ``cache_file`` when given) by device, threads, layer geometry,
non-zeros and input shape, so each is taken once. The chosen kernel, every measured time
and why a kernel was not applicable are in ``module.runtime_report`` (a DataFrame).
"""
from __future__ import annotations

import copy
import json
import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from core.common.timing import time_interleaved
from core.deploy.kernels import INT8_IMPLS, KERNELS, int8_representation, int8pack_works, make_kernel, sparse_conv_supported

PATHS: tuple[str, ...] = ("dense", "sparse", "int8", "auto")
DROP_SLOWER_THAN = 4.0  # a kernel whose warm-up call is 4× the fastest one's is not timed further

# ---------------------------------------------------------------- timing

#: measured seconds per (layer, kernel, batch, machine); see :func:`_cache_key`
_CACHE: dict[str, float] = {}
_CACHE_LOCK = threading.Lock()


def clear_timing_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()}threads"


def _cache_key(module: nn.Module, kernel: str, inputs: torch.Tensor, nnz: int) -> str:
    geometry = [type(module).__name__, list(module.weight.shape), str(module.weight.dtype), module.bias is not None]
    if isinstance(module, nn.Conv2d):
        geometry += [list(module.stride), list(module.padding), list(module.dilation), module.groups]
    return json.dumps([_device_label(inputs.device), kernel, geometry, nnz, list(inputs.shape), str(inputs.dtype)])


# ---------------------------------------------------------------- building a runtime

@dataclass
class _Candidate:
    name: str
    module: nn.Module
    kind: str
    nnz: int
    int8: tuple[torch.Tensor, torch.Tensor] | None
    why_not: dict[str, str]
    int8_impl: str | None = None


def _unwrap(result_or_model) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The module to run and, for an engine result, exact int8 scales per layer where one chunk is used."""
    if isinstance(result_or_model, nn.Module):
        return result_or_model, {}
    model = getattr(result_or_model, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"build_runtime needs an nn.Module or a CompressionResult, got {type(result_or_model).__name__}")
    scales: dict[str, torch.Tensor] = {}
    config, engine = result_or_model.config, getattr(result_or_model, "_engine", None)
    if engine is not None and config.quantized:
        for row in result_or_model.stats.to_dict("records"):
            widths = {b for b, n in ((config.b_high, row["n_high"]), (config.b_low, row["n_low"])) if n > 0}
            if len(widths) == 1 and (bits := widths.pop()) <= 8:
                scales[row["name"]] = engine.chunk(row["name"], bits).scales
    return model, scales


def _candidates(model: nn.Module, scales: dict[str, torch.Tensor], layers: Iterable[str] | None) -> list[_Candidate]:
    wanted = None if layers is None else set(layers)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if wanted is not None and name not in wanted:
            continue
        why_not: dict[str, str] = {}
        if not isinstance(module, nn.Linear) and (reason := sparse_conv_supported(module)) is not None:
            why_not["sparse"] = reason
        int8 = None
        if not isinstance(module, nn.Linear):
            why_not["int8"] = "weight-only int8 kernel exists for Linear only"
        else:
            int8 = int8_representation(module.weight, scales.get(name))
            if int8 is None:
                why_not["int8"] = "weights are not int8 codes × per-channel scale (mixed or unquantized)"
        nnz = int((module.weight != 0).sum())
        found.append(_Candidate(name, module, type(module).__name__, nnz, int8, why_not))
    return found


def _capture_inputs(model: nn.Module, example: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(
        lambda m, args, name=name: captured.setdefault(name, args[0].detach().clone()))
        for name, module in model.named_modules() if name in names]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _batch(example: torch.Tensor, batch_size: int) -> torch.Tensor:
    if example.shape[0] == batch_size:
        return example
    reps = math.ceil(batch_size / example.shape[0])
    return example.repeat(reps, *([1] * (example.ndim - 1)))[:batch_size].contiguous()


def _load_cache_file(path: Path | None) -> None:
    if path is None or not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    with _CACHE_LOCK:
        for key, value in stored.items():
            _CACHE.setdefault(key, float(value))


def _save_cache_file(path: Path | None) -> None:
    if path is None:
        return
    with _CACHE_LOCK:
        data = dict(_CACHE)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def build_runtime(result_or_model, path: str = "auto", batch_size: int = 64,
                  example_input: torch.Tensor | None = None, *, where_faster: bool = True,
                  layers: Iterable[str] | None = None, cache_file: str | os.PathLike | None = None,
                  budget_s: float = 0.3, min_rounds: int = 5) -> nn.Module:
    """A copy of the model whose Conv/Linear layers run the kernels ``path`` selects (see the module doc).

    ``result_or_model``: a :class:`core.method.engine.CompressionResult` (its ``model`` is used,
    and its chunk scales make int8 exact) or any ``nn.Module``; never modified.
    ``example_input``: one input (any batch size; repeated to ``batch_size``); needed
    whenever a kernel is chosen by measurement. ``layers``: restrict to these module
    names (others stay dense). ``budget_s`` / ``min_rounds``: timing effort per layer
    (seconds, and the least number of interleaved rounds). Returns the new module in eval mode with
    ``runtime_report``, a DataFrame: one row per Conv/Linear layer with the measured
    milliseconds of each applicable kernel (NaN = not measured / not applicable, with
    ``why_not``) and the ``chosen`` kernel.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    source, scales = _unwrap(result_or_model)
    with torch.no_grad():
        runtime = copy.deepcopy(source).eval()
    candidates = _candidates(runtime, scales, layers)
    if path == "dense":
        allowed: tuple[str, ...] = ("dense",)
    elif path == "auto":
        allowed = KERNELS
    else:
        allowed = ("dense", path)
    measure = path != "dense" and (path == "auto" or where_faster)
    inputs: dict[str, torch.Tensor] = {}
    if measure:
        if example_input is None:
            raise ValueError(f"path={path!r} measures each layer: pass example_input (one input batch)")
        cache_path = None if cache_file is None else Path(cache_file)
        _load_cache_file(cache_path)
        example = _batch(example_input.to(next(runtime.parameters()).device), batch_size)
        inputs = _capture_inputs(runtime, example, {c.name for c in candidates})
    rows = []
    for cand in candidates:
        usable = [k for k in allowed if k not in cand.why_not]
        times: dict[str, float] = {}
        if not measure:  # "dense", or a kernel forced wherever it applies
            chosen = usable[-1]
        elif cand.name not in inputs or len(usable) == 1:
            chosen = "dense"  # nothing to choose, or the example input never reaches the layer
        else:
            times = _measure(cand, usable, inputs[cand.name], budget_s, min_rounds)
            chosen = min(times, key=times.get)
        if chosen != "dense":
            _replace(runtime, cand.name, make_kernel(cand.module, chosen, cand.int8, cand.int8_impl))
        rows.append({
            "name": cand.name, "type": cand.kind, "shape": "×".join(map(str, cand.module.weight.shape)),
            "density": cand.nnz / max(cand.module.weight.numel(), 1),
            "input_shape": "×".join(map(str, inputs[cand.name].shape)) if cand.name in inputs else "",
            **{f"{k}_ms": times.get(k, math.nan) * 1e3 for k in KERNELS},
            "chosen": chosen,
            "int8_impl": (cand.int8_impl or "dequant") if "int8" not in cand.why_not and "int8" in allowed else "",
            "speedup": times["dense"] / times[chosen] if times else math.nan,
            "why_not": "; ".join(f"{k}: {v}" for k, v in cand.why_not.items()),
        })
    if measure:
        _save_cache_file(None if cache_file is None else Path(cache_file))
    runtime.runtime_report = pd.DataFrame(rows)
    runtime.runtime_path = path
    return runtime


def _measure(cand: _Candidate, kernels: list[str], inputs: torch.Tensor, budget_s: float,
             min_rounds: int) -> dict[str, float]:
    """Median seconds of each kernel on ``inputs`` (cached); for int8 the faster implementation counts."""
    variants: dict[str, tuple[str, str | None]] = {}  # measured name → (kernel, int8 impl)
    for kernel in kernels:
        if kernel != "int8":
            variants[kernel] = (kernel, None)
            continue
        for impl in INT8_IMPLS:
            if impl == "fused" and not int8pack_works(inputs.device, cand.module.weight.dtype):
                continue
            variants[f"int8_{impl}"] = ("int8", impl)
    keys = {name: _cache_key(cand.module, name, inputs, cand.nnz) for name in variants}
    with _CACHE_LOCK:
        cached = {name: _CACHE[key] for name, key in keys.items() if key in _CACHE}
    missing = [name for name in variants if name not in cached]
    if missing:
        def runner(module):
            def run():
                with torch.inference_mode():
                    module(inputs)
            return run

        runners = {}
        for name in missing:
            kernel, impl = variants[name]
            try:
                module = make_kernel(cand.module, kernel, cand.int8, impl).eval()
                runner(module)()
            except (RuntimeError, NotImplementedError) as err:  # e.g. no sparse kernel for this dtype/device
                if kernel == "dense":
                    raise
                cand.why_not.setdefault(kernel, f"failed here: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                continue
            runners[name] = runner(module)
        timings = time_interleaved(runners, inputs.device, warmup=2, min_rounds=min_rounds, budget_s=budget_s,
                                   drop_slower_than=DROP_SLOWER_THAN)
        measured = {name: timing.median_s for name, timing in timings.items()}
        with _CACHE_LOCK:
            for name, seconds in measured.items():
                _CACHE[keys[name]] = seconds
        cached.update(measured)
    times: dict[str, float] = {}
    for name, seconds in cached.items():
        kernel, impl = variants[name]
        if kernel not in times or seconds < times[kernel]:
            times[kernel] = seconds
            if kernel == "int8":
                cand.int8_impl = impl
    if "int8" in times:
        cand.why_not.pop("int8", None)
    return times


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_paths(result_or_model, example_input: torch.Tensor, batch_size: int = 64,
                paths: Iterable[str] = PATHS, *, budget_s: float = 0.3,
                cache_file: str | os.PathLike | None = None) -> dict[str, nn.Module]:
    """One runtime module per path (``"dense"`` always first): ``sparse`` and ``int8`` forced on every
    layer they apply to, ``auto`` chosen per layer by measurement (see :func:`build_runtime`)."""
    x = _batch(example_input, batch_size)
    return {path: build_runtime(result_or_model, path, batch_size=batch_size, example_input=x,
                                where_faster=path == "auto", budget_s=budget_s, cache_file=cache_file)
            for path in dict.fromkeys(["dense", *paths])}


def time_paths(modules: dict[str, nn.Module], example_input: torch.Tensor, batch_size: int = 64, *,
               budget_s: float = 0.3) -> pd.DataFrame:
    """Measured whole-model latency of each module of :func:`build_paths` (median ms, interleaved rounds).

    One row per path: ``path``, ``ms``, ``speedup`` (dense ms / ms), ``layers`` (kernel counts).
    """
    x = _batch(example_input, batch_size)

    def runner(module):
        def run():
            with torch.inference_mode():
                module(x)
        return run

    timings = time_interleaved({p: runner(m) for p, m in modules.items()}, x.device, warmup=1, min_rounds=5,
                               budget_s=max(budget_s, 0.5))
    times = {p: timing.median_s for p, timing in timings.items()}
    return pd.DataFrame([{"path": p, "ms": times[p] * 1e3, "speedup": times["dense"] / times[p],
                          "layers": " ".join(f"{k}:{v}" for k, v in sorted(runtime_summary(m).items()))}
                         for p, m in modules.items()])


def compare_paths(result_or_model, example_input: torch.Tensor, batch_size: int = 64,
                  paths: Iterable[str] = PATHS, *, budget_s: float = 0.3,
                  cache_file: str | os.PathLike | None = None) -> pd.DataFrame:
    """:func:`build_paths` then :func:`time_paths`: one row per path with its measured ms and speedup."""
    modules = build_paths(result_or_model, example_input, batch_size, paths, budget_s=budget_s, cache_file=cache_file)
    return time_paths(modules, example_input, batch_size, budget_s=budget_s)


def runtime_summary(module: nn.Module) -> dict[str, int]:
    """How many layers run each kernel."""
    report = getattr(module, "runtime_report", None)
    if report is None or report.empty:
        return {}
    return {k: int(v) for k, v in report["chosen"].value_counts().items()}
