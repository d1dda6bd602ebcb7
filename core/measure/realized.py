"""Realized savings of one compressed setting: what a user actually gets on disk and in time.

The engine *counts* retention and *computes* the compressed bytes from the storage format.
:func:`measure_realized` measures instead:

* ``file_bytes``: the size on disk of the packed file (:func:`core.deploy.packed_writer.save_compressed`:
  keep-mask as bitmap, indices or Elias-Fano code, bit-packed chunk codes, scales, selector, the rest of the state_dict);
* ``state_dict_bytes``: the size on disk of the same model's plain state_dict saved with
  safetensors (the uncompressed reference file, at the model's own dtype);
* ``paths``: the median latency of one forward pass of each execution path of
  :mod:`core.deploy.runtime` (dense = zeros multiplied, sparse CSR, weight-only int8, auto = the
  fastest kernel per layer as measured here), with ``speedup`` = dense ms / path ms;
* ``auto_layers``: auto's per-layer report (measured ms per kernel, the chosen one, why a
  kernel did not apply).

``times_smaller`` = state_dict_bytes / file_bytes.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from core.deploy.packed_writer import packed_file_bytes, state_dict_file_bytes
from core.deploy.runtime import PATHS, build_paths, time_paths


@dataclass(frozen=True)
class RealizedSavings:
    """Measured file sizes and per-path latency of one compressed setting (see the module doc)."""

    file_bytes: int
    state_dict_bytes: int
    accounted_bytes: int
    paths: pd.DataFrame
    auto_layers: pd.DataFrame
    batch: int
    device: str
    seconds: float

    @property
    def times_smaller(self) -> float:
        """state_dict file bytes / packed file bytes (both measured on disk)."""
        return self.state_dict_bytes / self.file_bytes

    @property
    def file_vs_accounting(self) -> float:
        """Packed file bytes / the engine's computed compressed bytes (1.0 = the accounting is exact)."""
        return self.file_bytes / self.accounted_bytes if self.accounted_bytes else float("nan")

    def ms(self, path: str) -> float:
        """Measured milliseconds of ``path`` (KeyError if it was not measured)."""
        rows = self.paths.loc[self.paths["path"] == path, "ms"]
        if rows.empty:
            raise KeyError(f"path {path!r} was not measured; measured: {list(self.paths['path'])}")
        return float(rows.iloc[0])

    @property
    def fastest(self) -> str:
        """The measured fastest path."""
        return str(self.paths.loc[self.paths["ms"].idxmin(), "path"])


def measure_file_sizes(result, arch: str | None = None, arch_kwargs: Mapping | None = None) -> tuple[int, int]:
    """(packed file bytes, plain safetensors state_dict bytes) of ``result``, both written and measured."""
    with tempfile.TemporaryDirectory() as folder:
        reference = state_dict_file_bytes(result.model, Path(folder) / "dense.safetensors")
    return packed_file_bytes(result, arch, arch_kwargs), reference


def measure_realized(result, example_input: torch.Tensor, *, arch: str | None = None,
                     arch_kwargs: Mapping | None = None, model: nn.Module | None = None, batch_size: int = 64,
                     paths: Iterable[str] = PATHS, budget_s: float = 0.1,
                     cache_file: str | os.PathLike | None = None) -> RealizedSavings:
    """Measure the packed file and each execution path of the engine result ``result``.

    ``example_input``: one input batch on the device to time on (repeated to ``batch_size``).
    ``model``: the module to time instead of ``result.model`` (e.g. its BatchNorm-recalibrated
    copy; same weights), on the example's device. ``budget_s``: timing effort per layer and
    kernel for auto's choice, and per path for the whole-model timing. Nothing given is modified.
    """
    start = time.perf_counter()
    file_bytes, state_dict_bytes = measure_file_sizes(result, arch, arch_kwargs)
    device = example_input.device
    if model is not None:
        source = model
    elif device.type == "cpu":
        source = result  # the result carries the chunk scales that make int8 exact
    else:
        source = result.model.to(device)
    modules = build_paths(source, example_input, batch_size, paths, budget_s=budget_s, cache_file=cache_file)
    table = time_paths(modules, example_input, batch_size, budget_s=budget_s)
    auto = modules.get("auto")
    auto_layers = auto.runtime_report if auto is not None else pd.DataFrame()
    return RealizedSavings(file_bytes=file_bytes, state_dict_bytes=state_dict_bytes,
                           accounted_bytes=int(result.model_bytes_compressed), paths=table, auto_layers=auto_layers,
                           batch=batch_size, device=device.type, seconds=time.perf_counter() - start)
