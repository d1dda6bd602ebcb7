"""Accuracy repair without retraining: BatchNorm recalibration, bias correction, layer-wise reconstruction.

A pruned (and possibly quantized) model is repaired against the dense model it came from,
on a few hundred unlabelled *training* images, with no gradient step::

    from core.measure.repair import RepairConfig, repair
    fixed = repair(dense, result.model, None, RepairConfig("reconstruct"))   # draws 512 training images
    fixed.model, fixed.seconds, fixed.changed, fixed.errors

The methods, each including the ones before it (``RepairConfig.method``):

* ``"none"``: the pruned model as it is (a copy, bit for bit);
* ``"bn"``: BatchNorm running statistics re-estimated on the calibration images
  (:func:`core.measure.accuracy.bn_recalibrate`, exactly as the app's BN option);
* ``"bias"``: one pass through the network in forward order (:class:`Lockstep`: the dense
  model and the model under repair side by side, on the same calibration images). At every
  BatchNorm the running mean and variance are re-estimated on the activations the repaired
  model really feeds it in eval mode, *after* the corrections upstream (the same estimate as
  ``bn_recalibrate``, which instead propagates batch statistics in train mode and runs
  before any correction); then each pruned layer's per-channel mean output on the
  calibration images is restored to the dense model's. Where a layer's output goes only
  into a BatchNorm (conv without bias → BN, every registry CNN) the correction goes into
  that BN's shift β and the mean restored is the BN output's; otherwise into the layer's own
  bias. β is the exact place: the BN output is ``γ·(z − μ)/σ + β``, so adding ``Δ`` to β moves
  each channel's mean by exactly ``Δ`` whatever γ and σ are (correcting ``running_mean``
  instead divides by γ/σ, ill-posed for γ ≈ 0, and is what the re-estimation overwrites).
  A layer with no bias that feeds no BatchNorm is left alone (its ``errors`` row says so).
  Measured on the shipped ResNet-20: restoring the means on top of ``bn_recalibrate``'s
  statistics *raised* the held-out logit error (the β corrections chase the mismatched
  variances downstream); with the statistics re-estimated in the same pass it lowers it;
* ``"reconstruct"``: layer-wise reconstruction, in the same pass. Each pruned layer's kept
  weights (the mask never changes) are re-solved so that, on the calibration images, its
  output *given the already-repaired model's inputs* matches the *dense model's* output:
  per output channel ``c`` the ridge least-squares problem over the kept columns ``S_c``

      min_w ‖X_S,c · w − y_c‖² + λ‖w‖²,   λ = ridge · mean(diag XᵀX / m)

  on the unfolded (im2col) inputs X, at ``positions`` randomly sampled output positions per
  image (all positions of a linear layer: one row per image, so keep ``n_images`` well above
  a linear layer's kept inputs per output). ``XᵀX`` and ``XᵀY`` are accumulated over batches
  (memory bounded by the layer's Gram matrix) and every channel is solved in float64, in
  batches of channels padded to a common size (Cholesky, one thread per factorisation). A
  layer with a bias solves it too (not penalised). Then the BatchNorm after it is
  re-estimated and the means restored, as in ``"bias"``.
  With a bit-width per weight (``quant``, e.g. from :func:`bit_widths` of a quantized engine
  result), each channel is solved, then quantized column by column at each weight's
  assigned bit-width, the rounding error of every column compensated on the channel's
  columns not yet quantized through the inverse of its (regularised) Gram matrix (GPTQ);
  the scales are the engine's rule (``max|W_c| / q_max(b)`` per output channel and
  bit-width) applied to the solved weights, and :attr:`RepairResult.quantized` holds the
  codes and scales (what a packed file needs).

Guarantees: the inputs (``dense``, ``pruned``, an engine's snapshot, a result's model) are
never modified; the repaired model is a new module; pruned weights stay exactly zero; the
calibration images come from the training split (or the caller); no labels are used.

Cancelling: ``cancel`` (a ``threading.Event`` or a callable returning True) is checked
before every layer, and within a reconstruction before every calibration batch and every
group of channel solves; when set, :class:`RepairCancelled` is raised and nothing is returned
(a half-repaired model is not a consistent one: later layers were never fitted).
"""
from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from core.measure.accuracy import bn_recalibrate
from core.measure.calibration import Lockstep, Step, TraceError, calibration_split
from core.method.pruning import layer_weight, prunable_layers
from core.method.quantization import FLOAT_PASSTHROUGH_BITS, SUPPORTED_BITS, channel_scales, q_max

METHODS: tuple[str, ...] = ("none", "bn", "bias", "reconstruct")
_BN = nn.modules.batchnorm._BatchNorm
#: The action of a pruned weight that is not a module's (an attention's ``in_proj_weight``).
ATTENTION_SKIP = "not repaired: an attention projection (multiplied inside nn.MultiheadAttention's forward)"
_SOLVE_ELEMENTS = 1 << 23  # float64 entries of one batch of channel systems (64 MiB)

__all__ = [
    "METHODS", "RepairConfig", "RepairResult", "QuantizedLayer", "RepairCancelled", "TraceError",
    "repair", "bit_widths", "masks_from_zeros", "estimate_seconds", "layer_errors",
    "levels", "repair_setting", "estimate_setting_seconds",
]


class RepairCancelled(RuntimeError):
    """The repair was stopped through its ``cancel`` argument; no model was produced."""

    def __init__(self, done: int, total: int):
        super().__init__(f"repair cancelled after {done} of {total} layers; nothing was changed or returned")
        self.done, self.total = done, total


@dataclass(frozen=True)
class RepairConfig:
    """How to repair.

    * ``method``: ``"none"``, ``"bn"``, ``"bias"`` or ``"reconstruct"`` (each includes the ones before).
    * ``n_images``: calibration images that fit the repair (at most, when images are given).
    * ``n_holdout``: further images, never fitted, on which the per-layer output error is
      measured before and after (0: no error table, and a little faster).
    * ``ridge``: λ relative to the mean of the Gram matrix's diagonal (reconstruction).
    * ``positions``: output positions sampled per image and conv layer for the Gram
      matrices (0: all); a layer with fewer positions uses all of them.
    * ``seed``: which training images are drawn, and which positions are sampled.
    * ``batch_size``: images per forward batch.
    """

    method: str = "reconstruct"
    n_images: int = 512
    n_holdout: int = 128
    ridge: float = 1e-3
    positions: int = 16
    seed: int = 0
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"repair method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name, low in (("n_images", 1), ("n_holdout", 0), ("positions", 0), ("seed", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a whole number, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be ≥ {low}, got {value}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)):
            raise TypeError(f"ridge must be a number, got {self.ridge!r}")
        if not (math.isfinite(self.ridge) and self.ridge > 0):
            raise ValueError(f"ridge must be a finite number > 0 (relative to the Gram diagonal), got {self.ridge}")
        object.__setattr__(self, "ridge", float(self.ridge))

    @property
    def level(self) -> int:
        return METHODS.index(self.method)


@dataclass(frozen=True)
class QuantizedLayer:
    """A reconstructed layer's quantized form: ``weight == codes · scales[bits][channel]`` exactly.

    ``bits``: per weight, 0 where pruned; ``codes``: int8 (0 where pruned or at 16 bits, whose
    values are the float16 weights themselves); ``scales``: per integer bit-width used, one
    fp32 scale per output channel (the engine's ``channel_scales`` of the solved weights).
    """

    bits: torch.Tensor
    codes: torch.Tensor
    scales: dict[int, torch.Tensor]


@dataclass(frozen=True)
class RepairResult:
    """A repaired model and what the repair did.

    ``seconds``: the repair's wall time (the held-out error table's is ``error_seconds``).
    ``n_images`` / ``n_holdout``: the calibration images fitted / measured on.
    ``changed``: the state_dict entries whose values differ from the pruned model's.
    ``quantized``: per reconstructed layer with bit-widths, its codes and scales.
    ``errors``: one row per pruned layer: ``name``, ``kind``, ``kept``, ``numel``, ``action``
    (what was done, or why not), ``err_before`` / ``err_after`` (relative squared error of the
    layer's output against the dense model's, ‖y − y_dense‖² / ‖y_dense‖², on the held-out
    images, for the pruned and the repaired model; NaN without held-out images) and
    ``seconds`` (the layer's own repair time).
    """

    model: nn.Module
    method: str
    seconds: float
    changed: tuple[str, ...]
    errors: pd.DataFrame
    n_images: int
    n_holdout: int
    config: RepairConfig
    quantized: dict[str, QuantizedLayer] = field(default_factory=dict, repr=False)
    error_seconds: float = 0.0


# ---------------------------------------------------------------- masks and bit-widths

def masks_from_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-mask (``weight != 0``) of every Conv/Linear weight of ``model``."""
    return {layer.name: (layer.weight.detach() != 0).cpu() for layer in prunable_layers(model)}


def bit_widths(engine, result) -> dict[str, torch.Tensor]:
    """Per-weight bit-width (int8; 0 where pruned) of a quantized engine result, from the engine's ranks.

    The engine keeps ranks ``[numel − kept, numel)`` of a layer and takes ranks
    ``[numel − n_high, numel)`` from the b_high chunk (:meth:`Engine.rank_order`); a kept
    weight that quantizes to 0 is still kept here, which is why masks are not read off zeros.
    """
    config = result.config
    if not config.quantized:
        raise ValueError("the result is not quantized (theta is None): there are no bit-widths to respect")
    out = {}
    norms = set(engine.norm_layer_names)
    for row in result.stats.itertuples():
        if row.name in norms:  # include_norm: a BatchNorm scale is not a connection to re-solve
            continue
        order = engine.rank_order(row.name).to(torch.int64)
        flat = torch.zeros(row.numel, dtype=torch.int8)
        flat[order[row.numel - row.kept:row.numel - row.n_high]] = config.b_low
        flat[order[row.numel - row.n_high:]] = config.b_high
        out[row.name] = flat.view(tuple(engine.original_weight(row.name).shape))
    return out


# ---------------------------------------------------------------- the per-channel solves

def _groups(k: torch.Tensor) -> list[torch.Tensor]:
    """Channels in batches of similar kept counts, each batch's padded systems within the memory budget."""
    order = torch.argsort(k, stable=True)
    groups, start = [], 0
    while start < len(order):
        size = max(int(k[order[start]]), 1)
        stop = start
        while stop < len(order):
            size_next = max(int(k[order[stop]]), 1)
            if (stop - start + 1) * size_next * size_next > _SOLVE_ELEMENTS and stop > start:
                break
            if size_next > 1.25 * size + 16 and stop > start:  # keep padding waste low
                break
            stop += 1
        groups.append(order[start:stop])
        start = stop
    return groups


def _quantize_column(col, scale, limit, integer, half):
    q = torch.clamp(torch.round(col / scale), -limit, limit) * scale
    q = torch.where(integer, q, col)
    return torch.where(half, col.to(torch.float16).to(col.dtype), q)


def _solve(gram: torch.Tensor, cross: torch.Tensor, support: torch.Tensor, lam: torch.Tensor,
           bits: torch.Tensor | None,
           check: Callable[[], None] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor] | None]:
    """Per row c of ``support`` (C × K'), ``argmin ‖X_S w − y_c‖² + λ‖w‖²`` over S = support[c].

    ``gram`` K'×K' (XᵀX/m) and ``cross`` K'×C (XᵀY/m), float64; ``lam`` the per-column ridge.
    With ``bits`` (C × K', 0 = not quantized), the GPTQ pass follows each solve. Returns the
    weights (C × K', zero off the support) and, quantized, the scales per bit-width.
    ``check`` is called before every group of channels (a cancel raises from it).
    """
    n_out, width = support.shape
    weights = torch.zeros(n_out, width, dtype=torch.float64)
    k = support.sum(1)
    # the regularised Gram matrix, with one extra all-zero row and column: the padding index
    padded = torch.zeros(width + 1, width + 1, dtype=torch.float64)
    regularised = padded[:width, :width]
    regularised.copy_(gram)
    regularised.diagonal().add_(lam)
    # rows that keep every column share one system: one factorisation, many right-hand sides
    full = (k == width).nonzero().flatten()
    if bits is None and len(full) > 0:
        factor = _cholesky(regularised.unsqueeze(0), regularised.diagonal().mean())[0]
        weights[full] = _cholesky_solve(cross[:, full], factor).T
    rest = torch.arange(n_out) if bits is not None else (k < width).nonzero().flatten()
    widths = sorted({int(b) for b in bits.unique() if 0 < int(b) < FLOAT_PASSTHROUGH_BITS}) if bits is not None else []
    scales = {b: torch.ones(n_out, dtype=torch.float32) for b in widths} if bits is not None else None
    if len(rest) == 0:
        return weights, scales
    padded = padded.reshape(-1)
    cross_padded = torch.cat([cross, cross.new_zeros(1, n_out)])
    ridge_scale = regularised.diagonal().mean()

    def solve_group(local: torch.Tensor) -> None:
        if check is not None:
            check()
        channels = rest[local]
        kc = k[channels]
        kmax = max(int(kc.max()), 1)
        # each channel's kept columns, ascending, then the padding index `width`
        row, col = support[channels].nonzero(as_tuple=True)
        offset = torch.cumsum(kc, 0) - kc
        index = torch.full((len(channels), kmax), width, dtype=torch.int64)
        index[row, torch.arange(len(row)) - offset[row]] = col
        valid = torch.arange(kmax).unsqueeze(0) < kc.unsqueeze(1)
        # index_select with int32 flat indices: ~2× faster than 2-D advanced indexing here
        index32 = index.to(torch.int32)
        flat = (index32.unsqueeze(2) * (width + 1) + index32.unsqueeze(1)).reshape(-1)
        a = padded.index_select(0, flat).view(len(channels), kmax, kmax)
        a.diagonal(dim1=1, dim2=2).add_((~valid).to(torch.float64))  # padding: identity, decoupled
        rhs = cross_padded[index, channels.unsqueeze(1)]
        if bits is None:
            factor = _cholesky(a, ridge_scale)
            solved = _cholesky_solve(rhs.unsqueeze(2), factor).squeeze(2)
        else:
            # H = R Rᵀ with R upper (the Cholesky factor of the reversed matrix, reversed): it solves
            # the system, and U = R⁻¹ is the upper factor of H⁻¹ = UᵀU that GPTQ needs
            upper_factor = _cholesky(a.flip(-1, -2), ridge_scale).flip(-1, -2)
            y = torch.linalg.solve_triangular(upper_factor, rhs.unsqueeze(2), upper=True)
            solved = torch.linalg.solve_triangular(upper_factor.transpose(-1, -2), y, upper=False).squeeze(2)
            eye = torch.eye(kmax, dtype=torch.float64).expand_as(upper_factor)
            inverse_upper = torch.linalg.solve_triangular(upper_factor, eye, upper=True)
            solved = _gptq(solved, inverse_upper, index, valid, channels, bits, width, scales)
        rows = channels.unsqueeze(1).expand_as(index)
        weights[rows[valid], index[valid]] = solved[valid]

    _parallel(solve_group, _groups(k[rest]))
    return weights, scales


def _parallel(work: Callable[[torch.Tensor], None], groups: list[torch.Tensor]) -> None:
    """Run ``work`` on every group, one single-threaded LAPACK call per worker thread.

    MKL's multi-threaded Cholesky of a few-hundred-wide matrix is many times slower than one
    thread per matrix (measured 10-20× on a shared 2-core machine), so the groups are spread
    over ``torch.get_num_threads()`` Python threads (torch releases the GIL) with torch's own
    intra-op parallelism set to 1 meanwhile, and restored after.
    """
    threads = torch.get_num_threads()
    if threads <= 1 or len(groups) <= 1:
        for group in groups:
            work(group)
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for future in [pool.submit(work, group) for group in groups]:
                future.result()
    finally:
        torch.set_num_threads(threads)


def _cholesky_solve(rhs: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(L Lᵀ)⁻¹ rhs`` by two triangular solves (several times faster than ``torch.cholesky_solve`` on CPU)."""
    y = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.transpose(-1, -2), y, upper=True)


def _cholesky(a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Batched Cholesky factors; a system that is not numerically positive definite gets more ridge."""
    factor, info = torch.linalg.cholesky_ex(a)
    boost = 1e-8 * float(scale) if float(scale) > 0 else 1e-8
    while bool((info > 0).any()):
        bad = (info > 0).nonzero().flatten()
        a = a.clone()
        a[bad] += boost * torch.eye(a.shape[-1], dtype=a.dtype)
        factor[bad], info[bad] = torch.linalg.cholesky_ex(a[bad])
        boost *= 10
    return factor


def _gptq(solved, upper, index, valid, channels, bits, width, scales, block: int = 64):
    """Quantize each channel's solved weights column by column, compensating the rest (GPTQ).

    Channel c's Hessian is its regularised Gram matrix H; with H⁻¹ = UᵀU (``upper`` = U),
    column j's rounding error e_j is carried to the columns after it as ``w[j+1:] −= e_j/U_jj ·
    U_j,j+1:`` (the optimal update of the remaining weights for the quadratic objective).
    The updates are applied lazily: within a block of columns at once, to the columns after
    the block in one batched product.
    """
    n_cols = width - 1 if bits.shape[1] == width - 1 else width  # bits exclude the intercept
    bits_padded = torch.zeros(bits.shape[0], width + 1, dtype=torch.int64)
    bits_padded[:, :bits.shape[1]] = bits.to(torch.int64)
    element_bits = torch.where(valid, bits_padded[channels.unsqueeze(1), index], 0)
    # the engine's scales, from the solved weights of each channel (intercept excluded)
    weight_rows = torch.zeros(len(channels), width + 1, dtype=torch.float64)
    weight_rows.scatter_(1, index, torch.where(valid, solved, 0))
    weight_rows = weight_rows[:, :n_cols].to(torch.float32)
    scale = torch.ones_like(solved)
    limit = torch.ones_like(solved)
    for b, table in scales.items():
        channel_scale = channel_scales(weight_rows, b)
        table[channels] = channel_scale
        at = element_bits == b
        scale = torch.where(at, channel_scale.to(torch.float64).unsqueeze(1), scale)
        limit = torch.where(at, torch.full_like(limit, q_max(b)), limit)
    integer = (element_bits > 0) & (element_bits < FLOAT_PASSTHROUGH_BITS)
    half = element_bits == FLOAT_PASSTHROUGH_BITS
    w = solved.clone()
    n = w.shape[1]
    for start in range(0, n, block):
        stop = min(start + block, n)
        errors = torch.zeros(len(w), stop - start, dtype=w.dtype)
        for j in range(start, stop):
            col = w[:, j]
            q = _quantize_column(col, scale[:, j], limit[:, j], integer[:, j], half[:, j])
            err = (col - q) / upper[:, j, j]
            w[:, j + 1:stop] -= err.unsqueeze(1) * upper[:, j, j + 1:stop]
            w[:, j] = q
            errors[:, j - start] = err
        if stop < n:
            w[:, stop:] -= torch.bmm(errors.unsqueeze(1), upper[:, start:stop, stop:]).squeeze(1)
    return w


# ---------------------------------------------------------------- Gram matrices of a layer's inputs

def _conv_rows(module: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, positions: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfolded input patches (rows × Cin·kh·kw) and outputs (rows × Cout) at sampled output positions."""
    n, _, h_out, w_out = y.shape
    n_pos = h_out * w_out
    if positions and positions < n_pos:
        pick = torch.rand(n, n_pos, generator=generator).argsort(1)[:, :positions]
    else:
        pick = torch.arange(n_pos).expand(n, n_pos)
    oy, ox = pick // w_out, pick % w_out
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = module.kernel_size, module.stride, module.dilation, module.padding
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # N × H × W × C (a view)
    rows_y = (oy * sh).unsqueeze(2).unsqueeze(3) + (torch.arange(kh) * dh).view(1, 1, kh, 1)
    rows_x = (ox * sw).unsqueeze(2).unsqueeze(3) + (torch.arange(kw) * dw).view(1, 1, 1, kw)
    image = torch.arange(n).view(n, 1, 1, 1)
    patches = padded[image, rows_y, rows_x]  # N × P × kh × kw × C
    patches = patches.permute(0, 1, 4, 2, 3).reshape(-1, module.weight[0].numel())
    targets = y.permute(0, 2, 3, 1)[torch.arange(n).view(n, 1), oy, ox].reshape(-1, y.shape[1])
    return patches, targets


_GRAM_BLOCK = 1024


def _add_gram(gram: torch.Tensor, xs: torch.Tensor) -> None:
    """``gram += xsᵀ xs`` on and above the diagonal blocks only (the lower ones are mirrored later).

    For wide inputs (the 4,608 columns of a 512-channel 3×3 conv) this skips ~40% of the
    multiply-adds: blocks of 1,024 columns, the products for block pairs i ≤ j.
    """
    width = xs.shape[1]
    if width <= 2 * _GRAM_BLOCK:
        gram += (xs.T @ xs).double()
        return
    n_blocks = math.ceil(width / _GRAM_BLOCK)
    edges = [round(i * width / n_blocks) for i in range(n_blocks + 1)]
    for i in range(n_blocks):
        a = xs[:, edges[i]:edges[i + 1]]
        for j in range(i, n_blocks):
            gram[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] += (a.T @ xs[:, edges[j]:edges[j + 1]]).double()


def _why_not(module: nn.Module) -> str | None:
    """Why a layer cannot be reconstructed (None: it can)."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not reconstructed (Conv2d and Linear are)"
    if module.groups != 1:
        return "grouped convolution is not reconstructed"
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        return "only numeric zero padding is reconstructed"
    return None


# ---------------------------------------------------------------- the lock-step repair

def _channel_stats(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per channel (dim 1) mean and summed squared deviation over every other dimension and batch.

    Each batch is reduced in its own dtype (pairwise sums), the batches are combined in float64
    (Chan et al.'s parallel formula), so no float64 copy of the activations is made.
    """
    means, squares, counts = [], [], []
    for t in batches:
        dims = [d for d in range(t.ndim) if d != 1]
        var, mean = torch.var_mean(t, dims, correction=0) if dims else (torch.zeros_like(t), t)
        n = t.numel() // t.shape[1]
        means.append(mean.double())
        squares.append(var.double() * n)
        counts.append(n)
    total = sum(counts)
    mean = sum(m * n for m, n in zip(means, counts)) / total
    m2 = sum(q + n * (m - mean) ** 2 for q, m, n in zip(squares, means, counts))
    return mean, m2, total


def _channel_mean(batches: list[torch.Tensor]) -> torch.Tensor:
    """Mean over every dimension but 1 (channels), over all batches, in float64."""
    means, total = 0, 0
    for t in batches:
        dims = [d for d in range(t.ndim) if d != 1]
        n = t.numel() // t.shape[1]
        means = means + (t.mean(dims) if dims else t).double() * n
        total += n
    return means / total


class _Repair:
    """The hooks the lock-step runner calls at every pruned layer and every BatchNorm."""

    def __init__(self, config: RepairConfig, masks: dict[str, torch.Tensor], bits: dict[str, torch.Tensor] | None,
                 order: list[str], on_progress, cancel, root: nn.Module):
        self.root = root
        self.config, self.masks, self.bits = config, masks, bits or {}
        self.order = [name for name in order if name in masks]
        self.on_progress, self.cancel = on_progress, cancel
        self.done = 0
        self.actions: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.quantized: dict[str, QuantizedLayer] = {}
        self.pending_bn: dict[str, str] = {}  # BN name → the pruned layer whose mean it restores

    def check_cancel(self) -> None:
        _cancel_check(self.cancel, self.done, len(self.order))

    def layer(self, step: Step) -> list[torch.Tensor]:
        start = time.perf_counter()
        module = step.module
        actions = []
        if self.config.level >= METHODS.index("reconstruct"):
            reason = _why_not(module)
            if reason is None:
                self._reconstruct(step)
                actions.append("reconstructed" + (" + quantized (GPTQ)" if step.name in self.bits else ""))
            else:
                actions.append(reason)
        feeds_bn = len(step.users) == 1 and isinstance(self._module_or_none(step.users[0]), _BN)
        outputs = step.forward()
        if feeds_bn:
            self.pending_bn[step.users[0]] = step.name
            actions.append(f"mean restored at {step.users[0]} (BN shift)")
        elif getattr(module, "bias", None) is not None:
            delta = _channel_mean(step.dense_outputs) - _channel_mean(outputs)
            module.bias.add_(delta.to(module.bias.dtype))
            outputs = step.forward()
            actions.append("mean restored (bias)")
        else:
            actions.append("no bias to restore the mean")
        self.actions[step.name] = "; ".join(actions)
        self.seconds[step.name] = time.perf_counter() - start
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(self.done, len(self.order), step.name)
        return outputs

    def _module_or_none(self, name: str) -> nn.Module | None:
        try:
            return self.root.get_submodule(name)
        except AttributeError:
            return None

    def batchnorm(self, step: Step) -> list[torch.Tensor]:
        bn = step.module
        if bn.track_running_stats and bn.running_mean is not None:
            mean, m2, count = _channel_stats(step.inputs)
            bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
            bn.running_var.copy_((m2 / max(count - 1, 1)).to(bn.running_var.dtype))
        outputs = step.forward()
        if step.name in self.pending_bn:
            delta = _channel_mean(step.dense_outputs) - _channel_mean(outputs)
            if bn.affine:
                bn.bias.add_(delta.to(bn.bias.dtype))
            else:  # no shift: move the mean the BN subtracts (γ = 1, so exact up to σ)
                bn.running_mean.sub_((delta * torch.sqrt(bn.running_var.double() + bn.eps)).to(bn.running_mean.dtype))
            outputs = step.forward()
        return outputs

    def _reconstruct(self, step: Step) -> None:
        module = step.module
        weight = module.weight
        n_out = weight.shape[0]
        n_in = weight[0].numel()
        has_bias = module.bias is not None
        width = n_in + int(has_bias)
        gram = torch.zeros(width, width, dtype=torch.float64)
        cross = torch.zeros(width, n_out, dtype=torch.float64)
        rows = 0
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.order.index(step.name))
        for x, y in zip(step.inputs, step.dense_outputs):
            self.check_cancel()  # a large layer takes seconds: a cancel need not wait for its end
            if isinstance(module, nn.Conv2d):
                xs, ys = _conv_rows(module, x, y, self.config.positions, generator)
            else:
                xs, ys = x.reshape(-1, n_in), y.reshape(-1, n_out)
            xs, ys = xs.float().cpu(), ys.float().cpu()  # the solves run on the CPU, in float64
            if has_bias:
                xs = torch.cat([xs, xs.new_ones(len(xs), 1)], 1)
            _add_gram(gram, xs)
            cross += (xs.T @ ys).double()
            rows += len(xs)
        gram = torch.triu(gram) + torch.triu(gram, 1).T  # only the upper blocks were accumulated
        gram /= rows
        cross /= rows
        lam = torch.full((width,), self.config.ridge * float(gram.diagonal()[:n_in].mean()), dtype=torch.float64)
        if has_bias:
            lam[-1] = 0.0
        support = self.masks[step.name].reshape(n_out, n_in)
        if has_bias:
            support = torch.cat([support, support.new_ones(n_out, 1)], 1)
        bits = self.bits.get(step.name)
        bits_2d = None if bits is None else bits.reshape(n_out, n_in)
        solved, scales = _solve(gram, cross, support, lam, bits_2d, check=self.check_cancel)
        new_weight = solved[:, :n_in]
        if bits_2d is not None:
            new_weight, record = _decode(new_weight, bits_2d, scales, weight.dtype)
            self.quantized[step.name] = QuantizedLayer(bits.clone(), record.codes.view(weight.shape), record.scales)
        else:
            new_weight = new_weight.to(weight.dtype)
        new_weight = torch.where(support[:, :n_in], new_weight, torch.zeros((), dtype=weight.dtype))
        weight.copy_(new_weight.view_as(weight))
        if has_bias:
            module.bias.copy_(solved[:, -1].to(module.bias.dtype))


def _decode(weight: torch.Tensor, bits: torch.Tensor, scales: dict[int, torch.Tensor],
            dtype: torch.dtype) -> tuple[torch.Tensor, QuantizedLayer]:
    """The engine's decode of GPTQ's values: ``code · scale`` (fp32), codes in int8; fp16 values at 16 bits."""
    codes = torch.zeros(bits.shape, dtype=torch.int8)
    out = torch.zeros(bits.shape, dtype=dtype)
    for b, table in scales.items():
        at = bits == b
        scale = table.unsqueeze(1).expand_as(weight)
        code = torch.round(weight / scale.double()).clamp_(-q_max(b), q_max(b))
        codes[at] = code[at].to(torch.int8)
        out[at] = (code[at].to(torch.float32) * scale[at]).to(dtype)
    half = bits == FLOAT_PASSTHROUGH_BITS
    out[half] = weight[half].to(torch.float16).to(dtype)
    return out, QuantizedLayer(bits.clone(), codes, {b: t.clone() for b, t in scales.items()})


# ---------------------------------------------------------------- per-layer errors on held-out images

def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Images in channels-last memory order (CPU convolutions run ~20% faster); values unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


@torch.no_grad()
def layer_errors(dense: nn.Module, models: Mapping[str, nn.Module], images: torch.Tensor, names: list[str],
                 batch_size: int = 128) -> dict[str, dict[str, float]]:
    """``{model key: {layer: ‖y − y_dense‖² / ‖y_dense‖²}}`` of each named layer's output over ``images``."""
    sums = {key: {name: 0.0 for name in names} for key in models}
    norms = {name: 0.0 for name in names}
    modes = [(m, m.training) for m in (dense, *models.values())]
    for m, _ in modes:
        m.eval()
    try:
        for start in range(0, len(images), batch_size):
            x = _fast_layout(images[start:start + batch_size])
            reference: dict[str, torch.Tensor] = {}
            hooks = [dense.get_submodule(name).register_forward_hook(
                lambda mod, args, out, name=name: reference.__setitem__(name, out.detach().clone()))
                for name in names]
            try:
                dense(x)
            finally:
                for h in hooks:
                    h.remove()
            for name in names:  # a layer the forward never calls as a module (an attention's out_proj): NaN
                if name in reference:
                    norms[name] += float(reference[name].pow(2).sum(dtype=torch.float64))
            for key, model in models.items():
                def record(mod, args, out, name, key=key):
                    sums[key][name] += float((out - reference[name]).pow(2).sum(dtype=torch.float64))
                hooks = [model.get_submodule(name).register_forward_hook(
                    lambda mod, args, out, name=name, record=record: record(mod, args, out, name)) for name in names]
                try:
                    model(x)
                finally:
                    for h in hooks:
                        h.remove()
    finally:
        for m, mode in modes:
            m.train(mode)
    return {key: {name: sums[key][name] / norms[name] if norms[name] > 0 else float("nan") for name in names}
            for key in models}


# ---------------------------------------------------------------- the entry point

def _check_models(dense: nn.Module, pruned: nn.Module) -> None:
    a, b = dense.state_dict(), pruned.state_dict()
    if a.keys() != b.keys():
        extra = sorted(set(a) ^ set(b))
        raise ValueError(f"the dense and pruned models differ in their tensors (e.g. '{extra[0]}'): "
                         "repair needs the same architecture")
    for key in a:
        if a[key].shape != b[key].shape:
            raise ValueError(f"'{key}' has shape {tuple(a[key].shape)} in the dense model but "
                             f"{tuple(b[key].shape)} in the pruned one")


def _check_masks(pruned: nn.Module, masks: Mapping[str, torch.Tensor] | None,
                 quant: Mapping[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    derived = masks_from_zeros(pruned)
    out = dict(derived)
    bits = None
    if quant is not None:
        bits = {}
        for name, b in quant.items():
            if name not in derived:
                raise ValueError(f"quant names '{name}', which is not a Conv/Linear layer of the model")
            b = torch.as_tensor(b).cpu()
            if tuple(b.shape) != tuple(derived[name].shape):
                raise ValueError(f"quant['{name}'] has shape {tuple(b.shape)}, the weight {tuple(derived[name].shape)}")
            used = {int(v) for v in b.unique()} - {0}
            bad = sorted(used - set(SUPPORTED_BITS))
            if bad:
                raise ValueError(f"quant['{name}'] holds bit-width {bad[0]}; the palette is {SUPPORTED_BITS}")
            bits[name] = b.to(torch.int8)
            out[name] = b != 0
    if masks is not None:
        for name, m in masks.items():
            if name not in derived:
                raise ValueError(f"masks names '{name}', which is not a Conv/Linear layer of the model")
            m = torch.as_tensor(m).to(device="cpu", dtype=torch.bool)
            if tuple(m.shape) != tuple(derived[name].shape):
                raise ValueError(f"masks['{name}'] has shape {tuple(m.shape)}, the weight {tuple(derived[name].shape)}")
            if bits is not None and name in bits and not torch.equal(m, bits[name] != 0):
                raise ValueError(f"masks['{name}'] and quant['{name}'] disagree on which weights are kept")
            out[name] = m
    for name, m in out.items():
        weight = layer_weight(pruned, name).detach().cpu()
        if bool((weight[~m] != 0).any()):
            raise ValueError(f"layer '{name}' has nonzero weights outside its mask")
    return out, bits


def _split(images: torch.Tensor | None, holdout: torch.Tensor | None,
           config: RepairConfig) -> tuple[torch.Tensor, torch.Tensor]:
    if images is None:
        fit, held = calibration_split(config.n_images, config.n_holdout if holdout is None else 0, seed=config.seed)
        return fit, (held if holdout is None else holdout)
    if not isinstance(images, torch.Tensor) or images.ndim < 2 or len(images) == 0:
        raise ValueError("images must be a non-empty tensor of calibration inputs (N × ...)")
    fit = images[:config.n_images]
    if holdout is None:
        holdout = images[config.n_images:config.n_images + config.n_holdout]
    return fit, holdout


def repair(dense: nn.Module, pruned: nn.Module, images: torch.Tensor | None = None,
           config: RepairConfig = RepairConfig(), *, holdout: torch.Tensor | None = None,
           masks: Mapping[str, torch.Tensor] | None = None, quant: Mapping[str, torch.Tensor] | None = None,
           on_progress: Callable[[int, int, str], None] | None = None,
           cancel: threading.Event | Callable[[], bool] | None = None) -> RepairResult:
    """Repair ``pruned`` against ``dense`` (same architecture) on calibration images; see the module doc.

    * ``images``: calibration inputs, already normalised; the first ``config.n_images`` fit the
      repair and, unless ``holdout`` is given, the next ``config.n_holdout`` measure it. None:
      drawn from the CIFAR-10 *training* split (:func:`calibration_split`, ``config.seed``).
    * ``masks``: keep-masks by layer name (default: the pruned weights' nonzeros); ``quant``:
      per-weight bit-widths by layer name (0 = pruned; see :func:`bit_widths`), which also
      fix the masks.
    * ``on_progress(done, total, layer)`` after each layer; ``cancel`` checked before each.
    """
    if not isinstance(config, RepairConfig):
        raise TypeError(f"config must be a RepairConfig, got {type(config).__name__}")
    start = time.perf_counter()
    _check_models(dense, pruned)
    layer_masks, bits = _check_masks(pruned, masks, quant)
    fit, held = _split(images, holdout, config)
    device = next(pruned.parameters()).device
    fit = fit.to(device)
    with torch.no_grad():
        model = copy.deepcopy(pruned).eval()
    layers = prunable_layers(model)
    # the repair runs at modules: an attention projection (in_proj_weight) is multiplied inside
    # nn.MultiheadAttention's own forward, where no hook sees its output; it stays as pruned
    names = [layer.name for layer in layers if layer.param == "weight"]
    skipped = {layer.name: ATTENTION_SKIP for layer in layers if layer.param != "weight"}
    repairer = None
    if config.method == "bn":
        _cancel_check(cancel, 0, 1)
        model = bn_recalibrate(model, fit, batch_size=config.batch_size)
        if on_progress is not None:
            on_progress(1, 1, "BatchNorm statistics")
    elif config.level >= METHODS.index("bias"):
        batches = [_fast_layout(fit[i:i + config.batch_size]) for i in range(0, len(fit), config.batch_size)]
        runner = Lockstep(dense, model, batches)
        shared = [name for name in names if runner.calls.get(name, 0) > 1]
        if shared:
            raise TraceError(f"layer '{shared[0]}' is called more than once in the forward pass; "
                             "a shared layer cannot be fitted to each call")
        repairer = _Repair(config, layer_masks, bits, runner.module_order(), on_progress, cancel, model)
        hooks = {name: repairer.layer for name in names if name in runner.calls}
        hooks.update({name: repairer.batchnorm for name, m in model.named_modules()
                      if isinstance(m, _BN) and name in runner.calls})
        runner.run(hooks, between=repairer.check_cancel)
    model.eval()
    seconds = time.perf_counter() - start
    error_start = time.perf_counter()
    if len(held):
        errors = layer_errors(dense, {"before": pruned, "after": model}, held.to(device), names, config.batch_size)
    else:
        errors = {"before": {n: float("nan") for n in names}, "after": {n: float("nan") for n in names}}
    error_seconds = time.perf_counter() - error_start
    rows = []
    for layer in layers:
        mask = layer_masks[layer.name]
        if layer.name in skipped:
            action = skipped[layer.name]
        elif repairer is not None:
            action = repairer.actions.get(layer.name, "not called by the forward pass")
        else:
            action = {"none": "unchanged", "bn": "BatchNorm statistics re-estimated"}[config.method]
        rows.append({"name": layer.name, "kind": layer.kind, "kept": int(mask.sum()), "numel": mask.numel(),
                     "action": action, "err_before": errors["before"].get(layer.name, float("nan")),
                     "err_after": errors["after"].get(layer.name, float("nan")),
                     "seconds": repairer.seconds.get(layer.name, 0.0) if repairer is not None else 0.0})
    before, after = pruned.state_dict(), model.state_dict()
    changed = tuple(key for key in after if not torch.equal(before[key], after[key]))
    return RepairResult(model=model, method=config.method, seconds=seconds, changed=changed,
                        errors=pd.DataFrame(rows), n_images=len(fit), n_holdout=len(held), config=config,
                        quantized=dict(repairer.quantized) if repairer is not None else {},
                        error_seconds=error_seconds)


def _cancel_check(cancel, done: int, total: int) -> None:
    if cancel is None:
        return
    stop = cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())
    if stop:
        raise RepairCancelled(done, total)


# ---------------------------------------------------------------- time estimate

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

    x = _fast_layout(torch.randn((8,) + tuple(input_shape), device=next(model.parameters()).device))
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
    (``Σ_c k_c³/3`` for the Cholesky factorisations, ``Σ_c k_c²`` entries gathered), with the
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
            solves = float((kept ** 3).sum()) / 3 / chol + float((kept ** 2).sum()) / (_GATHER_RATE * threads)
            seconds += solves * (_GPTQ_FACTOR if quantized else 1.0)
    return seconds


# ---------------------------------------------------------------- an engine's result, as the front ends repair it

def levels(method: str) -> tuple[str, ...]:
    """The methods up to and including ``method``, in order (``"bias"`` → none, bn, bias)."""
    if method not in METHODS:
        raise ValueError(f"repair method must be one of {', '.join(METHODS)}; got {method!r}")
    return METHODS[:METHODS.index(method) + 1]


def repair_setting(dense: nn.Module, engine, result, images: torch.Tensor | None = None,
                   config: RepairConfig = RepairConfig(), *,
                   on_progress: Callable[[int, int, str], None] | None = None,
                   cancel: threading.Event | Callable[[], bool] | None = None) -> RepairResult:
    """:func:`repair` of an engine result (``engine.apply(...)``) against ``dense``, the engine's model.

    The masks are the engine's; a quantized result is repaired with its bit-widths
    (:func:`bit_widths`), so :attr:`RepairResult.quantized` holds the codes and scales a packed
    file of the same size needs (``core.deploy.packing.compressed_bytes(result, repaired=...)``).
    Neither ``dense`` nor the result is modified.
    """
    quant = bit_widths(engine, result) if result.config.quantized else None
    return repair(dense, result.model, images, config, quant=quant, on_progress=on_progress, cancel=cancel)


def estimate_setting_seconds(result, config: RepairConfig = RepairConfig(), *,
                             input_shape: tuple[int, ...] | None = None) -> float:
    """:func:`estimate_seconds` of :func:`repair_setting` for an engine result (an estimate, see there)."""
    return estimate_seconds(result.model, config, quantized=result.config.quantized, input_shape=input_shape)
