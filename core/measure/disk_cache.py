"""The on-disk result caches' shared parts: JSON entries filed under a hash of their context, and that context's common keys.

Sweeps, the sensitivity map and the per-layer checks each cache their measured rows as one JSON
file per entry, ``<root>/<hash of context>/<hash of key>.json``. The *context* says what every
entry of a folder was measured with (code version, torch, device, model, images, calibration);
a change to any of them is a new folder, so a stale row is never read back.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from core.measure.accuracy import CALIBRATION_RECIPE, EvalData
from core.workloads.models import state_dict_digest

_DIGESTS: dict[int, str] = {}


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA256 of a tensor's dtype, shape and bytes (memoised per tensor object; treat it as read-only)."""
    key = id(tensor)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    data = tensor.detach().cpu().contiguous()
    if data.numel():
        digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    value = digest.hexdigest()
    _DIGESTS[key] = value
    weakref.finalize(tensor, _DIGESTS.pop, key, None)
    return value


def key_hash(obj: object) -> str:
    """The first 32 hex digits of the SHA256 of ``obj`` as sorted JSON (a folder or file name)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class JsonCache:
    """One JSON file per entry under ``<root>/<hash of context>/<hash of key>.json`` (atomic writes).

    ``get`` returns ``None`` for a missing, damaged or mismatching entry; with ``enabled=False``
    nothing is read or written.
    """

    def __init__(self, root: Path, context: dict, enabled: bool = True):
        self.enabled = enabled
        self.context = context
        self.folder = Path(root) / key_hash(context)

    def _path(self, key: dict) -> Path:
        return self.folder / f"{key_hash(key)}.json"

    def get(self, key: dict) -> dict | None:
        if not self.enabled:
            return None
        path = self._path(key)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # a missing or damaged entry is recomputed
        if not isinstance(stored, dict) or stored.get("key") != json.loads(json.dumps(key)) \
                or not isinstance(stored.get("values"), dict):
            return None
        return stored["values"]

    def put(self, key: dict, values: dict) -> None:
        if not self.enabled:
            return
        context_file = self.folder / "context.json"
        if not context_file.is_file():
            atomic_write(context_file, json.dumps(self.context, indent=1, sort_keys=True))
        atomic_write(self._path(key), json.dumps({"key": key, "values": values}))


def model_key(model: nn.Module, model_id: str | None) -> str:
    """``model_id`` (a stable name of the weights, e.g. a checkpoint's SHA256) or a digest of the state_dict."""
    return model_id if model_id is not None else "state_dict:" + state_dict_digest(model)


def base_context(version: int, model: nn.Module, model_id: str | None, device: str | torch.device) -> dict:
    """The keys every cache context starts with: the cache's format ``version``, torch, the device type, the model."""
    return {"version": version, "torch": torch.__version__, "device": torch.device(device).type,
            "model": model_key(model, model_id)}


def images_key(data: EvalData) -> dict:
    """What a measurement ran on, when given its images: ``{"images": digest, "labels": digest}`` (:func:`tensor_digest`)."""
    return {"images": tensor_digest(data.images), "labels": tensor_digest(data.labels)}


def calibration_key(calibration: torch.Tensor | None, n: int, seed: int,
                    mean: Sequence[float], std: Sequence[float]) -> dict:
    """What BN recalibration ran on: the given images' digest, or the recipe that draws ``n`` training images."""
    if calibration is not None:
        return {"images": tensor_digest(calibration)}
    return {"split": "train", "n": n, "seed": seed, "recipe": CALIBRATION_RECIPE, "mean": list(mean), "std": list(std)}
