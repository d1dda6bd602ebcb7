"""The shared least-squares solver of layer-wise reconstruction: a layer's Gram matrices, per-channel ridge solves, GPTQ."""
from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from core.measure.repair.iterative import cheaper_than_factorising, masked_cg
from core.measure.repair.types import QuantizedLayer
from core.method.quantization import FLOAT_PASSTHROUGH_BITS, channel_scales, q_max

_SOLVE_ELEMENTS = 1 << 23  # float64 entries of one batch of channel systems (64 MiB)


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


def solve(gram: torch.Tensor, cross: torch.Tensor, support: torch.Tensor, lam: torch.Tensor,
          bits: torch.Tensor | None,
          check: Callable[[], None] | None = None,
          start: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor] | None]:
    """Per row c of ``support`` (C × K'), ``argmin ‖X_S w − y_c‖² + λ‖w‖²`` over S = support[c].

    ``gram`` K'×K' (XᵀX/m) and ``cross`` K'×C (XᵀY/m), float64; ``lam`` the per-column ridge.
    With ``bits`` (C × K', 0 = not quantized), the GPTQ pass follows each solve. Returns the
    weights (C × K', zero off the support) and, quantized, the scales per bit-width.
    ``check`` is called before every group of channels (a cancel raises from it).

    Unquantized, with ``start`` (C × K', the current weights) given, channels that keep only
    part of their inputs are solved exactly (one Cholesky factorisation each) or, where that
    costs more (:func:`~core.measure.repair.iterative.cheaper_than_factorising`: wide layers
    that keep much), all at once by conjugate gradients from ``start``
    (:func:`~core.measure.repair.iterative.masked_cg`), which is approximate.
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
    if bits is None and start is not None and cheaper_than_factorising(k[rest], width):
        weights[rest] = masked_cg(regularised, cross[:, rest].T, support[rest], start[rest], check)
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

def conv_rows(module: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, positions: int,
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


def add_gram(gram: torch.Tensor, xs: torch.Tensor) -> None:
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


# ---------------------------------------------------------------- the quantized form of a GPTQ solve

def decode(weight: torch.Tensor, bits: torch.Tensor, scales: dict[int, torch.Tensor],
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
