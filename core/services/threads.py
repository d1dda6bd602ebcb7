"""PyTorch's thread count for the interactive app."""
from __future__ import annotations

import os

import torch

from core.common.memory import limit_malloc_arenas, map_large_blocks

THREADS_ENV = "BOUNDARY_TORCH_THREADS"


def configure_threads(default: int = 1) -> int:
    """Set PyTorch's intra-op threads for the interactive app: ``$BOUNDARY_TORCH_THREADS`` or ``default``.

    One thread by default: on a small shared CPU (and with several sessions computing at
    once) two OpenMP threads fighting for two busy cores made a ResNet-20 update 20× slower
    here, while one thread stays within the latency budget. Returns the thread count set.
    """
    limit_malloc_arenas()  # before the sessions' threads allocate: see core.common.memory
    map_large_blocks()  # large tensors' pages go back to the OS when freed: see core.common.memory
    try:
        threads = int(os.environ.get(THREADS_ENV, default))
    except ValueError:
        threads = default
    threads = max(1, threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
