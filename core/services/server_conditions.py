"""What a server process runs under, in one JSON-ready dict: threads, OpenMP/oneDNN settings, GC freeze, job priority."""
from __future__ import annotations

import gc
import os

import torch

from core.services.compute_queue import COMPUTE, JOB_NICENESS, background_priority_available

#: environment variables that change how PyTorch computes on the CPU (absent ones are reported as None)
THREAD_ENV = ("BOUNDARY_TORCH_THREADS", "BOUNDARY_JOB_NICENESS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "MALLOC_ARENA_MAX",
              "MALLOC_MMAP_THRESHOLD_")


def server_conditions() -> dict:
    """The settings in effect in this process now (read back, not the intended values).

    ``torch_threads``: PyTorch's intra-op threads of the calling thread; ``compute_slots``: jobs
    the compute queue runs at once; ``gc_frozen``: objects moved out of the collector's reach by
    ``gc.freeze`` (0: the freeze did not run); ``background_priority``: whether queued jobs really
    run at nice +``job_niceness`` (it needs root, CAP_SYS_NICE or RLIMIT_NICE; see
    :func:`core.services.compute_queue.background_priority_available`).
    """
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "compute_slots": COMPUTE.slots,
        "job_niceness": JOB_NICENESS,
        "background_priority": background_priority_available(),
        "gc_frozen": gc.get_freeze_count(),
        "euid": os.geteuid(),
        "env": {name: os.environ.get(name) for name in THREAD_ENV},
    }
