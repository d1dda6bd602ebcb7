"""CIFAR-10 and synthetic data sources.

CIFAR-10 comes from one of three places:

* ``jpeg`` (default): the checksummed JPEG archives ``cifar10-{train,test}.tar.gz`` in
  ``../shared/data/cifar10/`` (or ``$BOUNDARY_CIFAR10_DIR``, or the ``root`` argument).
  Each archive's SHA256 is checked against ``SHA256SUMS`` before use; the images are
  decoded once, in parallel, and cached as uint8 tensors keyed by that checksum.
* ``torchvision``: a torchvision ``CIFAR10`` root (``download=True`` only on request).
* ``imagefolder``: a directory ``<root>/<split>/<class>/*.png|jpg``.

Every source returns a :class:`CifarSplit`: ``images`` uint8 ``N×3×32×32``, ``labels``
int64 ``N``, in torchvision's label order.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.common.paths import REPO_ROOT, cache_dir

#: per-channel mean and std of the CIFAR-10 training images, the normalisation every shipped model was trained with
CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
SPLITS = ("train", "test")
EXPECTED_COUNTS = {"train": 50_000, "test": 10_000}
ENV_VAR = "BOUNDARY_CIFAR10_DIR"
DEFAULT_JPEG_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10"


class DataError(RuntimeError):
    """The data set is missing, incomplete or does not match its checksum."""


@dataclass(frozen=True)
class CifarSplit:
    """One CIFAR-10 split as tensors: ``images`` uint8 N×3×32×32, ``labels`` int64 N."""

    images: torch.Tensor
    labels: torch.Tensor
    split: str
    source: str

    def __len__(self) -> int:
        return int(self.labels.numel())


def jpeg_dir(root: str | os.PathLike | None = None) -> Path:
    """The JPEG archive folder: ``root`` argument, else ``$BOUNDARY_CIFAR10_DIR``, else the default."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_VAR, DEFAULT_JPEG_DIR))


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _expected_checksums(folder: Path) -> dict[str, str]:
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise DataError(
            f"CIFAR-10 checksum list not found at {sums}. Expected the JPEG copy in {folder} "
            f"(set ${ENV_VAR} or pass root= to point elsewhere)."
        )
    expected = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            expected[parts[1].lstrip("*")] = parts[0].lower()
    return expected


def verify_archive(split: str, root: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Return ``(archive path, sha256)`` after checking it against ``SHA256SUMS``.

    Raises :class:`DataError` naming the expected location if the archive is missing,
    truncated or altered.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = jpeg_dir(root)
    name = f"cifar10-{split}.tar.gz"
    archive = folder / name
    if not archive.is_file():
        raise DataError(
            f"CIFAR-10 archive {name} not found in {folder}. Expected the JPEG copy there "
            f"(set ${ENV_VAR} or pass root= to point elsewhere)."
        )
    expected = _expected_checksums(folder).get(name)
    if expected is None:
        raise DataError(f"{folder / 'SHA256SUMS'} has no entry for {name}.")
    actual = sha256_of(archive)
    if actual != expected:
        raise DataError(
            f"CIFAR-10 archive {archive} is truncated or altered: SHA256 {actual[:16]}… "
            f"does not match the expected {expected[:16]}…. Restore the original file."
        )
    return archive, actual


def _decode_jpegs(blobs: list[bytes]) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(blobs), 32, 32, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as image:
            out[i] = np.asarray(image.convert("RGB"))
    return out


def _read_archive(archive: Path, split: str) -> tuple[list[bytes], list[int]]:
    blobs: list[bytes] = []
    labels: list[int] = []
    index = {name: i for i, name in enumerate(CLASSES)}
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for member in members:
            parts = Path(member.name).parts
            if len(parts) != 3 or parts[0] != split or parts[1] not in index:
                continue
            blobs.append(tar.extractfile(member).read())
            labels.append(index[parts[1]])
    return blobs, labels


def _decode_parallel(blobs: list[bytes], workers: int) -> np.ndarray:
    if workers <= 1 or len(blobs) < 2000:
        return _decode_jpegs(blobs)
    step = -(-len(blobs) // (workers * 4))
    parts = [blobs[i:i + step] for i in range(0, len(blobs), step)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return np.concatenate(list(pool.map(_decode_jpegs, parts)))


def load_jpeg_split(split: str, root: str | os.PathLike | None = None) -> CifarSplit:
    """Load a split from the checksummed JPEG archive, decoding once and caching by checksum."""
    archive, checksum = verify_archive(split, root)
    cache = cache_dir() / "cifar10" / f"{split}-{checksum[:16]}.pt"
    if cache.is_file():
        try:
            stored = torch.load(cache, weights_only=True)
            return CifarSplit(stored["images"], stored["labels"], split, "jpeg")
        except Exception:  # a damaged cache is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    blobs, labels = _read_archive(archive, split)
    if len(blobs) != EXPECTED_COUNTS[split]:
        raise DataError(
            f"{archive} holds {len(blobs)} images for '{split}', expected {EXPECTED_COUNTS[split]}."
        )
    pixels = _decode_parallel(blobs, workers=os.cpu_count() or 1)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    result = CifarSplit(images, torch.tensor(labels, dtype=torch.int64), split, "jpeg")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # two processes decoding at once never share it
    torch.save({"images": result.images, "labels": result.labels}, tmp)
    tmp.replace(cache)
    return result


def load_jpeg_sample(split: str, index: torch.Tensor, root: str | os.PathLike | None = None) -> CifarSplit:
    """The images ``index`` of a split (same order and pixels as ``load_jpeg_split(split)[index]``).

    From the decoded cache when it exists; otherwise only the chosen JPEGs are decoded, so that a
    few hundred calibration images cost well under a second instead of decoding all 50,000.
    """
    archive, checksum = verify_archive(split, root)
    if (cache_dir() / "cifar10" / f"{split}-{checksum[:16]}.pt").is_file():
        full = load_jpeg_split(split, root)
        return CifarSplit(full.images[index], full.labels[index], split, "jpeg")
    blobs, labels = _read_archive(archive, split)
    if len(blobs) != EXPECTED_COUNTS[split]:
        raise DataError(
            f"{archive} holds {len(blobs)} images for '{split}', expected {EXPECTED_COUNTS[split]}."
        )
    chosen = [int(i) for i in index]
    pixels = _decode_jpegs([blobs[i] for i in chosen])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return CifarSplit(images, torch.tensor([labels[i] for i in chosen], dtype=torch.int64), split, "jpeg")


def load_torchvision_split(split: str, root: str | os.PathLike, download: bool = False) -> CifarSplit:
    """Load a split from a torchvision ``CIFAR10`` root; downloads only if ``download=True``."""
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(str(root), train=(split == "train"), download=download)
    except RuntimeError as err:
        raise DataError(f"No torchvision CIFAR-10 at {root}: {err}") from err
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    return CifarSplit(images, torch.tensor(dataset.targets, dtype=torch.int64), split, "torchvision")


def load_imagefolder_split(split: str, root: str | os.PathLike) -> CifarSplit:
    """Load ``<root>/<split>/<class>/*`` (class folder names as in :data:`CLASSES`)."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise DataError(f"No image folder at {folder} (expected {folder}/<class>/<image>).")
    files, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((folder / name).glob("*")):
            if path.is_file():
                files.append(path.read_bytes())
                labels.append(label)
    if not files:
        raise DataError(f"No images under {folder}/<class>/ for classes {', '.join(CLASSES)}.")
    pixels = _decode_parallel(files, workers=os.cpu_count() or 1)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return CifarSplit(images, torch.tensor(labels, dtype=torch.int64), split, "imagefolder")


def load_cifar10(
    split: str = "test",
    source: str = "jpeg",
    root: str | os.PathLike | None = None,
    download: bool = False,
) -> CifarSplit:
    """Load CIFAR-10 ``split`` from ``source`` (``jpeg`` | ``torchvision`` | ``imagefolder``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "jpeg":
        return load_jpeg_split(split, root)
    if root is None:
        raise ValueError(f"source={source!r} needs a root folder")
    if source == "torchvision":
        return load_torchvision_split(split, root, download)
    if source == "imagefolder":
        return load_imagefolder_split(split, root)
    raise ValueError(f"unknown CIFAR-10 source {source!r}: use jpeg, torchvision or imagefolder")


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N×3×H×W → float32 ``(x/255 − mean)/std`` per RGB channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - m) / s


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32×32 crop of the 4-pixel zero-padded batch, then a random horizontal flip."""
    n = batch.shape[0]
    padded = F.pad(batch, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    idx = torch.arange(32)
    rows = (dy[:, None] + idx[None, :]).to(batch.device)  # n×32
    cols = (dx[:, None] + idx[None, :]).to(batch.device)
    out = padded[torch.arange(n, device=batch.device)[:, None, None, None],
                 torch.arange(3, device=batch.device)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = (torch.rand(n, generator=generator) < 0.5).to(batch.device)
    out[flip] = out[flip].flip(-1)
    return out


def gaussian_batches(
    n_batches: int, batch_size: int, dim: int, seed: int = 42
) -> list[torch.Tensor]:
    """The paper's synthetic inputs: ``n_batches`` tensors of shape ``batch_size×dim`` from N(0, 1)."""
    if n_batches < 1 or batch_size < 1 or dim < 1:
        raise ValueError("n_batches, batch_size and dim must all be ≥ 1")
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, dim, generator=generator) for _ in range(n_batches)]
