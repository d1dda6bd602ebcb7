"""What the machine can do natively, probed once (no project imports)."""
from __future__ import annotations

import functools

import torch


@functools.cache
def native_bf16(device_type: str = "cpu") -> bool:
    """Whether the device runs bf16 matmuls/convolutions natively (CUDA, or a CPU with AMX / AVX-512-BF16)."""
    if device_type == "cuda":
        return True
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
