"""Boundary Explorer's engine: boundary pruning and on-the-fly quantization switching, as a library.

    from core import CompressionConfig, Engine, save_compressed
    engine = Engine(model)                                   # snapshots the weights; `model` is never modified
    result = engine.apply(CompressionConfig(tau=0.2, theta=0.3, b_low=4, b_high=8))
    result.model, result.stats, result.retention             # a new module, per-layer figures, ρ
    save_compressed(result, "model.packed.safetensors", arch="resnet20")

The packages, each importing only from those before it:

* ``core.common``    paths, the one timer, the formatters (no project imports)
* ``core.workloads`` the model registry and checkpoints, CIFAR-10, the user's images
* ``core.method``    the paper: pruning, quantization, the engine (pure torch, no I/O)
* ``core.deploy``    what a result becomes: the packed file, the execution paths
* ``core.measure``   accuracy, sweeps, latency, realized savings, the paper's benchmark suite
* ``core.services``  the Streamlit-free services behind the app's pages

and the commands ``python -m core.train``, ``python -m core.sweep`` and ``python -m core.tune``.
Torchvision models: ``build_torchvision("resnet50", {"num_classes": 10})``,
``load_torchvision_weights("resnet50", "weights.pt")`` (classes read from the file) and
``load_torchvision_pretrained("resnet50")`` (local torch hub cache only); each returns the model
first. ``save_compressed(result, path, arch="torchvision:resnet50", arch_kwargs=...)`` records it.
"""
from core.common.timing import Timing, time_interleaved
from core.deploy.packed_reader import load_compressed, read_compressed
from core.deploy.packed_writer import save_compressed
from core.deploy.runtime import build_runtime, compare_paths
from core.measure.accuracy import bn_recalibrate, eval_data, evaluate
from core.measure.realized import measure_realized
from core.measure.sweeps import SweepConfig, run_sweep
from core.method.config import CompressionConfig, ConfigError
from core.method.engine import CompressionResult, Engine
from core.method.pruning import BoundaryPruning, boundary_mask, boundary_prune, boundary_unstructured, prunable_layers
from core.method.quantization import dequantize, quantize
from core.workloads.data import load_cifar10
from core.workloads.image_folder import read_image_folder
from core.workloads.models import CheckpointError, build, load_pretrained
from core.workloads.torchvision_models import build as build_torchvision
from core.workloads.torchvision_models import load_pretrained as load_torchvision_pretrained
from core.workloads.torchvision_models import read_weights_file as load_torchvision_weights

__all__ = [
    # the method
    "CompressionConfig", "ConfigError", "CompressionResult", "Engine",
    "boundary_mask", "boundary_prune", "BoundaryPruning", "boundary_unstructured", "prunable_layers",
    "quantize", "dequantize",
    # what a result becomes
    "save_compressed", "load_compressed", "read_compressed", "build_runtime", "compare_paths",
    # measuring it
    "evaluate", "eval_data", "bn_recalibrate", "run_sweep", "SweepConfig", "measure_realized",
    "time_interleaved", "Timing",
    # models and data
    "build", "load_pretrained", "CheckpointError", "load_cifar10",
    "build_torchvision", "load_torchvision_pretrained", "load_torchvision_weights", "read_image_folder",
]
