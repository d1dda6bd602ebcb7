"""The layer kernels an execution path is built from: dense, sparse (CSR) and weight-only int8.

* ``SparseLinear`` — the weight as a CSR matrix (``torch.sparse`` → MKL on CPU, cuSPARSE on
  CUDA): ``y = (W_csr · xᵀ)ᵀ``.
* ``SparseConv2d`` — a *shifted-tap* CSR convolution: the zero-padded input is laid out once
  as a (C, N·H·W) matrix (one per stride phase), and each of the k×k taps adds
  ``W[:, :, i, j]_csr · X`` read at a constant offset into that matrix, so no k²-times-larger
  im2col matrix is built (it measured 2–5× faster than unfold + CSR on the development CPU).
  groups = 1, zero padding only.
* ``Int8Linear`` — weight-only int8 for Linear layers whose weights are exactly int8 codes ×
  a per-output-channel scale: fused (``torch._weight_int8pack_mm``) or dequantized on the fly.

:func:`make_kernel` builds one from a dense layer; :mod:`core.deploy.runtime` chooses among them.
"""
from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

KERNELS: tuple[str, ...] = ("dense", "sparse", "int8")


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
def int8pack_works(device: torch.device, dtype: torch.dtype) -> bool:
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
            impl = "fused" if device.type == "cuda" and int8pack_works(device, dtype) else "dequant"
        if impl not in INT8_IMPLS:
            raise ValueError(f"impl must be one of {INT8_IMPLS}, got {impl!r}")
        if impl == "fused" and not int8pack_works(device, dtype):
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
