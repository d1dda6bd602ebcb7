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
import functools
import json
import math
import os
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from core.common.timing import time_interleaved

PATHS: tuple[str, ...] = ("dense", "sparse", "int8", "auto")
DROP_SLOWER_THAN = 4.0  # a kernel whose warm-up call is 4× the fastest one's is not timed further
KERNELS: tuple[str, ...] = ("dense", "sparse", "int8")

# ---------------------------------------------------------------- kernels

def _csr(matrix: torch.Tensor) -> torch.Tensor:
    """CSR copy of a 2-D weight, with int32 indices where they fit (MKL's native width: ~15 % faster)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
        csr = matrix.detach().contiguous().to_sparse_csr()
    if csr.values().numel() < 2**31 - 1 and max(matrix.shape) < 2**31 - 1:
        csr = torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                      csr.values(), tuple(csr.shape), check_invariants=False)
    return csr


class SparseLinear(nn.Module):
    """``nn.Linear`` with its weight as a CSR matrix: ``y = (W_csr · xᵀ)ᵀ + b``."""

    kernel = "sparse"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_csr", _csr(linear.weight), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        weight = self.weight_csr
        if self.bias is None:
            out = torch.sparse.mm(weight, flat.t())
        else:
            out = torch.addmm(self.bias.unsqueeze(1), weight, flat.t())
        return out.t().contiguous().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.weight_csr.values().numel()}"


def sparse_conv_supported(conv: nn.Module) -> str | None:
    """None when :class:`SparseConv2d` can run ``conv``, else why not."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__}: only Conv2d has a sparse kernel"
    if conv.groups != 1:
        return "grouped convolution"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    return None


class SparseConv2d(nn.Module):
    """``nn.Conv2d`` (groups = 1, zero padding) as a sum of k×k CSR products over shifted input views.

    With the input zero-padded and split into its stride phases, each laid out as a
    (C, N·Hg·Wg) matrix, tap (i, j) reads phase ``(i·d % s, j·d % s)`` at the constant
    offset ``(i·d // s)·Wg + (j·d // s)``; all taps accumulate into one (O, N·Hg·Wg) output
    of which the top-left Ho×Wo of each sample is the convolution.
    """

    kernel = "sparse"

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        reason = sparse_conv_supported(conv)
        if reason:
            raise ValueError(f"no sparse kernel for this layer: {reason}")
        weight = conv.weight.detach()
        self.out_channels, self.in_channels, self.kh, self.kw = weight.shape
        self.stride, self.padding, self.dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)
        sh, sw = self.stride
        dh, dw = self.dilation
        self.taps: list[tuple[int, int, int, int]] = []  # phase row, phase col, shift row, shift col
        for i in range(self.kh):
            for j in range(self.kw):
                tap = weight[:, :, i, j]
                if bool(tap.any()):
                    self.taps.append(((i * dh) % sh, (j * dw) % sw, (i * dh) // sh, (j * dw) // sw))
                    self.register_buffer(f"tap{len(self.taps) - 1}", _csr(tap), persistent=False)
        bias = None if conv.bias is None else conv.bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)
        self.nnz = int((weight != 0).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        hp, wp = h + 2 * ph, w + 2 * pw
        ho = (hp - dh * (self.kh - 1) - 1) // sh + 1
        wo = (wp - dw * (self.kw - 1) - 1) // sw + 1
        hg, wg = -(-hp // sh), -(-wp // sw)
        length = n * hg * wg
        out = x.new_zeros(self.out_channels, length)
        if self.taps and ho > 0 and wo > 0:
            max_offset = max(r * wg + q for _, _, r, q in self.taps)
            padded = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
            by_channel = padded.transpose(0, 1)  # (C, N, Hp, Wp) view
            phases: dict[tuple[int, int], torch.Tensor] = {}
            for k, (pr, pq, r, q) in enumerate(self.taps):
                if (pr, pq) not in phases:
                    buffer = x.new_zeros(c, length + max_offset)
                    sub = by_channel[:, :, pr::sh, pq::sw]
                    buffer[:, :length].view(c, n, hg, wg)[:, :, :sub.shape[2], :sub.shape[3]].copy_(sub)
                    phases[(pr, pq)] = buffer
                offset = r * wg + q
                torch.addmm(out, getattr(self, f"tap{k}"), phases[(pr, pq)][:, offset:offset + length], out=out)
        result = out.view(self.out_channels, n, hg, wg)[:, :, :ho, :wo].permute(1, 0, 2, 3)
        if self.bias is not None:
            result = result + self.bias.view(1, -1, 1, 1)
        return result.contiguous()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({self.kh}, {self.kw}), stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, taps={len(self.taps)}, nnz={self.nnz}")


def int8_representation(weight: torch.Tensor, scales: torch.Tensor | None = None,
                        rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 codes, fp32 per-row scales) with ``codes · scale == weight`` to float rounding, or None.

    ``scales`` (e.g. the engine's chunk scales) are tried as given; otherwise each row's
    scale is inferred as ``max|W_row| / q`` for q = 2^(b−1)−1, b = 8…2 (an engine chunk's
    largest kept code in a row is ±q_max, its largest weight).
    """
    w = weight.detach().float().reshape(weight.shape[0], -1)
    top = w.abs().amax(1)

    def attempt(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes = torch.round(w / s[:, None])
        if codes.abs().max() > 127:
            return None
        if not torch.all((codes * s[:, None] - w).abs() <= rtol * top[:, None] + 0.0):
            return None
        return codes.to(torch.int8).reshape(weight.shape), s.contiguous()

    if scales is not None:
        return attempt(scales.detach().float().reshape(-1))
    for bits in range(8, 1, -1):
        found = attempt(top / ((1 << (bits - 1)) - 1))
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _int8pack_works(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        x = torch.ones(2, 32, device=device, dtype=dtype)
        w = torch.ones(8, 32, device=device, dtype=torch.int8)
        s = torch.ones(8, device=device, dtype=dtype)
        return bool(torch.allclose(torch._weight_int8pack_mm(x, w, s).float(), torch.full((2, 8), 32.0, device=device)))
    except Exception:  # not built for this device / dtype
        return False


INT8_IMPLS: tuple[str, ...] = ("fused", "dequant")


class Int8Linear(nn.Module):
    """Weight-only int8 ``nn.Linear``: ``y = x · (codes · scale)ᵀ + b``, activations stay float.

    ``impl``: ``"fused"`` (``torch._weight_int8pack_mm``, where this device and dtype have it)
    or ``"dequant"`` (the int8 weight is dequantized on the fly, then a float matmul). None:
    fused on CUDA where available, dequant on CPU (where the fused kernel measured up to
    50× slower than dense on the development machine); ``build_runtime`` measures both.
    """

    kernel = "int8"

    def __init__(self, linear: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, impl: str | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        device, dtype = linear.weight.device, linear.weight.dtype
        self.register_buffer("codes", codes.to(device).contiguous(), persistent=False)
        self.register_buffer("scales", scales.to(device, dtype), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)
        if impl is None:
            impl = "fused" if device.type == "cuda" and _int8pack_works(device, dtype) else "dequant"
        if impl not in INT8_IMPLS:
            raise ValueError(f"impl must be one of {INT8_IMPLS}, got {impl!r}")
        if impl == "fused" and not _int8pack_works(device, dtype):
            raise RuntimeError(f"torch._weight_int8pack_mm does not run on {device} with {dtype}")
        self.impl = impl

    @property
    def packed(self) -> bool:
        return self.impl == "fused"

    @packed.setter
    def packed(self, value: bool) -> None:
        self.impl = "fused" if value else "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.impl == "fused":
            out = torch._weight_int8pack_mm(flat.contiguous(), self.codes, self.scales)
        else:
            out = F.linear(flat, self.codes.to(flat.dtype) * self.scales.unsqueeze(1))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, impl={self.impl}"


def make_kernel(module: nn.Module, kernel: str, int8: tuple[torch.Tensor, torch.Tensor] | None = None,
                int8_impl: str | None = None) -> nn.Module:
    """``module`` (Conv2d/Linear) re-expressed with ``kernel``; ``dense`` returns a copy."""
    if kernel == "dense":
        return copy.deepcopy(module)
    if kernel == "sparse":
        return SparseLinear(module) if isinstance(module, nn.Linear) else SparseConv2d(module)
    if kernel == "int8":
        if int8 is None:
            raise ValueError("the int8 kernel needs the layer's int8 representation")
        return Int8Linear(module, *int8, impl=int8_impl)
    raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")


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
            if impl == "fused" and not _int8pack_works(inputs.device, cand.module.weight.dtype):
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
