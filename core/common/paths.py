"""Well-known locations: the repository root, the shipped assets and the local cache."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS_DIR = REPO_ROOT / "assets"
CHECKPOINT_DIR = ASSETS_DIR / "checkpoints"


def cache_dir() -> Path:
    """Git-ignored cache folder (override with ``BOUNDARY_CACHE_DIR``); created on demand."""
    path = Path(os.environ.get("BOUNDARY_CACHE_DIR", REPO_ROOT / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path
