"""Estimates of a repair's seconds before it starts, from timed forward passes and this machine's measured rates."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import lru_cache

import torch
from torch import nn

from core.measure.repair.api import fast_layout, masks_from_zeros
from core.measure.repair.iterative import EXPECTED_STEPS, cheaper_than_factorising
from core.measure.repair.types import RepairConfig
from core.method.pruning import prunable_layers

_GATHER_RATE = 1e8  # float64 matrix entries gathered per second and thread (measured, 2-core EPYC)
_GPTQ_FACTOR = 1.6  # the quantized solves (inverse factor, column sweep) against the plain ones (measured)


def _timed(work: Callable[[], object], repeat: int = 3) -> float:
    """Fastest seconds of ``work()`` over ``repeat`` runs, after a warm-up run (kernel choice, allocation).

    The fastest, not the median: on a shared machine one run can be several times slower
    than the machine's speed, and an estimate should not jump with it.
    """
    work()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


@lru_cache(maxsize=4)
def _rates(threads: int) -> tuple[float, float]:
    """(fp32 matmul, float64 Cholesky) FLOP/s of this machine now, as the repair uses them (~0.1 s)."""
    a, b = torch.randn(2048, 1024), torch.randn(2048, 1024)
    gemm = 2 * 1024 * 1024 * 2048 / max(_timed(lambda: a.T @ b), 1e-9)
    m = torch.randn(4, 256, 300, dtype=torch.float64)
    m = m @ m.transpose(1, 2)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the solves: one thread per factorisation, `threads` at once
    try:
        chol = 4 * 256 ** 3 / 3 / max(_timed(lambda: torch.linalg.cholesky_ex(m)), 1e-9) * threads
    finally:
        torch.set_num_threads(previous)
    return gemm, chol


@torch.no_grad()
def _layer_shapes(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[float, list[dict]]:
    """Seconds per image of a forward pass (timed on 8 inputs), and each prunable layer's sizes."""
    layers = [layer for layer in prunable_layers(model) if layer.param == "weight"]  # see repair()
    if input_shape is None:
        first = layers[0].module
        input_shape = (first.in_channels, 32, 32) if isinstance(first, nn.Conv2d) else (first.weight.shape[1],)
    found: dict[str, dict] = {}

    def record(module, args, out, name):
        per_output = module.weight[0].numel()
        positions = out[0, 0].numel() if isinstance(module, nn.Conv2d) else out[0].numel() // out.shape[-1]
        found[name] = {"name": name, "K": per_output + int(module.bias is not None), "out": module.weight.shape[0],
                       "positions": positions}

    x = fast_layout(torch.randn((8,) + tuple(input_shape), device=next(model.parameters()).device))
    was = model.training
    model.eval()
    hooks = [layer.module.register_forward_hook(lambda m, a, o, name=layer.name: record(m, a, o, name))
             for layer in layers]
    try:
        model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    try:
        per_image = _timed(lambda: model(x)) / len(x)
    finally:
        model.train(was)
    return per_image, [found[layer.name] for layer in layers if layer.name in found]


def estimate_seconds(model: nn.Module, config: RepairConfig = RepairConfig(), *,
                     masks: Mapping[str, torch.Tensor] | None = None, quantized: bool = False,
                     input_shape: tuple[int, ...] | None = None) -> float:
    """An *estimate* of the seconds :func:`repair` will take for ``model`` under ``config``, before starting.

    Counted: the forward passes (two per calibration image for ``bias``/``reconstruct``, one
    for ``bn``; three per held-out image), timed here on 8 random inputs; the Gram matrices
    (``rows · K²`` per layer) at this machine's fp32 matmul rate; and the per-channel systems
    (``Σ_c k_c³/3`` for the Cholesky factorisations, ``Σ_c k_c²`` entries gathered; or, where the
    solver takes conjugate gradients instead, ~40 float32 products of ``2·C·K²``), with the
    kept counts from ``masks``, else from ``model``'s zeros. The rates are measured once per
    process (about 0.2 s); a machine that gets busier meanwhile takes longer (on a 2-core
    machine shared with other work, the repair's wall time was up to 3× this). ``quantized``:
    the reconstruction respects bit-widths (GPTQ), whose solves cost about 1.6× more.
    ``input_shape`` (one sample) defaults to 3×32×32 for a conv net.
    """
    if not isinstance(config, RepairConfig):
        raise TypeError(f"config must be a RepairConfig, got {type(config).__name__}")
    if config.method == "none" and config.n_holdout == 0:
        return 0.0
    threads = torch.get_num_threads()
    per_image, layers = _layer_shapes(model, input_shape)
    n, held = config.n_images, config.n_holdout
    seconds = per_image * ({"none": 0, "bn": n, "bias": 3 * n, "reconstruct": 2 * n}[config.method] + 3 * held)
    if config.method == "reconstruct":
        gemm, chol = _rates(threads)
        masks = masks_from_zeros(model) if masks is None else masks
        for info in layers:
            rows = n * (min(config.positions, info["positions"]) if config.positions else info["positions"])
            seconds += 2 * rows * info["K"] * (0.6 * info["K"] + info["out"]) / gemm
            mask = torch.as_tensor(masks[info["name"]]).reshape(info["out"], -1)
            kept = mask.sum(1).double() + (info["K"] - mask.shape[1])
            partial = kept[kept < info["K"]]
            if not quantized and len(partial) and cheaper_than_factorising(partial, info["K"]):
                seconds += EXPECTED_STEPS * 2 * len(partial) * info["K"] ** 2 / gemm
                continue
            solves = float((kept ** 3).sum()) / 3 / chol + float((kept ** 2).sum()) / (_GATHER_RATE * threads)
            seconds += solves * (_GPTQ_FACTOR if quantized else 1.0)
    return seconds


def estimate_setting_seconds(result, config: RepairConfig = RepairConfig(), *,
                             input_shape: tuple[int, ...] | None = None) -> float:
    """:func:`estimate_seconds` of :func:`repair_setting` for an engine result (an estimate, see there)."""
    return estimate_seconds(result.model, config, quantized=result.config.quantized, input_shape=input_shape)
