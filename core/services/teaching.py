"""A small worked example for the Learn page: one 8×8 weight matrix under τ and θ.

Computed straight from the formulas (:func:`core.method.pruning.boundary_mask` and
:func:`core.method.quantization.dequantize`), so it doubles as a readable reference for what the
engine does to every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.method.pruning import boundary_mask, check_tau
from core.method.quantization import check_bits, dequantize

PAPER_PSEUDOCODE = '''# the paper's pseudocode (section 3.3): prunes in place, any layer with a weight
def dynamic_prune_and_quantize(model, tau, theta, bits=[b_low, b_high]):
    for layer in model.modules():
        if hasattr(layer, 'weight'):
            W = layer.weight.data
            beta = tau * W.abs().max()
            mask = (W.abs() >= beta).float()
            W.mul_(mask)
            # Bit-Weite Zuweisung
            bw = torch.where(W.abs() >= theta, bits[1], bits[0])
            layer.quantize(bw)'''

OUR_CODE = '''# this project (core.method.engine): the model is never modified
from core import CompressionConfig, Engine

engine = Engine(model)               # snapshot + rank each Conv/Linear weight once
result = engine.apply(CompressionConfig(
    tau=0.2,                         # β = τ · max|W| per layer; keep |W| ≥ β
    theta=0.3, theta_mode="relative",  # θ = 0.3 · max|W|: |W| ≥ θ → b_high chunk
    b_low=4, b_high=8,               # chunks quantized once, per output channel
    include_norm=False,              # True = the paper's hasattr(layer, 'weight')
))
result.model        # a new nn.Module; `model` keeps its weights
result.stats        # per layer: beta, kept, n_high, n_low, switches, bytes
engine.apply(CompressionConfig(tau=0.2, theta=0.5, b_low=4, b_high=8)).switches
                    # θ move: chunks re-selected, never re-quantized'''


@dataclass(frozen=True)
class WorkedExample:
    """The matrix, β, θ (absolute), the keep-mask, the chunk per cell and the resulting weights.

    ``chunk``: 0 where pruned, else the bit-width the cell's value comes from (32 = kept
    in full precision when θ is off).
    """

    weights: np.ndarray
    tau: float
    beta: float
    theta: float | None
    keep: np.ndarray
    high: np.ndarray
    chunk: np.ndarray
    compressed: np.ndarray
    b_low: int
    b_high: int

    @property
    def retention(self) -> float:
        return float(self.keep.mean())

    @property
    def n_high(self) -> int:
        return int((self.keep & self.high).sum())


def example_matrix(seed: int = 7, size: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, size, generator=generator) * 0.5).round(decimals=2)


def worked_example(tau: float, theta: float | None, b_low: int = 4, b_high: int = 8,
                   seed: int = 7, size: int = 8) -> WorkedExample:
    """The example under τ and a relative θ (θ · max|W|; None = no quantization)."""
    tau = check_tau(tau)
    check_bits(b_low)
    check_bits(b_high)
    if b_low > b_high:
        raise ValueError(f"b_low ({b_low}) must not exceed b_high ({b_high})")
    w = example_matrix(seed, size)
    magnitude = w.abs()
    top = magnitude.max()
    keep = boundary_mask(w, tau)
    if theta is None:
        high = torch.ones_like(keep)
        value = w
        chunk = torch.where(keep, 32, 0)
        theta_abs = None
    else:
        theta_abs = top * float(theta)
        high = magnitude >= theta_abs
        value = torch.where(high, dequantize(w, b_high), dequantize(w, b_low))
        chunk = torch.where(keep, torch.where(high, b_high, b_low), 0)
    compressed = torch.where(keep, value, torch.zeros(()))
    return WorkedExample(w.numpy(), tau, float(top * tau), None if theta_abs is None else float(theta_abs),
                         keep.numpy(), high.numpy(), chunk.numpy(), compressed.numpy(), b_low, b_high)
