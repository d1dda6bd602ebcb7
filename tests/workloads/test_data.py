"""core.workloads.data: the checksummed JPEG loader, its cache, the other sources, synthetic data."""
from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from core.workloads import data
from core.workloads.data import (
    CLASSES,
    ENV_VAR,
    DataError,
    gaussian_batches,
    jpeg_dir,
    load_cifar10,
    load_jpeg_sample,
    normalize,
    sha256_of,
    verify_archive,
)

REAL_DIR = data.DEFAULT_JPEG_DIR
needs_data = pytest.mark.skipif(not (REAL_DIR / "SHA256SUMS").is_file(),
                                reason=f"CIFAR-10 JPEG copy not found at {REAL_DIR}")


def expected_sums() -> dict[str, str]:
    lines = (REAL_DIR / "SHA256SUMS").read_text().split("\n")
    return {parts[1].lstrip("*"): parts[0] for parts in (line.split() for line in lines) if len(parts) == 2}


def copy_archive(folder: Path, split: str = "test") -> Path:
    """The real archive and SHA256SUMS, copied into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REAL_DIR / "SHA256SUMS", folder / "SHA256SUMS")
    target = folder / f"cifar10-{split}.tar.gz"
    shutil.copyfile(REAL_DIR / target.name, target)
    target.chmod(0o644)
    return target


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@needs_data
def test_checksum_verified():
    archive, checksum = verify_archive("test")
    assert archive == REAL_DIR / "cifar10-test.tar.gz"
    assert checksum == sha256_of(archive) == expected_sums()["cifar10-test.tar.gz"]


@needs_data
def test_test_split_shapes_and_classes():
    split = load_cifar10("test")
    assert split.images.shape == (10_000, 3, 32, 32) and split.images.dtype == torch.uint8
    assert split.labels.shape == (10_000,) and split.labels.dtype == torch.int64
    assert torch.bincount(split.labels, minlength=len(CLASSES)).tolist() == [1000] * 10
    assert split.source == "jpeg" and split.split == "test"
    assert split.images.float().std() > 30  # real pictures, not a blank tensor


@pytest.mark.slow
@needs_data
def test_train_split_shapes_and_classes():
    split = load_cifar10("train")
    assert split.images.shape == (50_000, 3, 32, 32) and split.images.dtype == torch.uint8
    assert torch.bincount(split.labels, minlength=len(CLASSES)).tolist() == [5000] * 10


@needs_data
@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_damaged_archive_is_a_clear_error(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("BOUNDARY_CACHE_DIR", str(tmp_path / "cache"))
    archive = copy_archive(tmp_path / "cifar10")
    blob = archive.read_bytes()
    if damage == "truncated":
        archive.write_bytes(blob[: len(blob) // 2])
    else:  # same size, one byte flipped
        archive.write_bytes(blob[:1000] + bytes([blob[1000] ^ 0xFF]) + blob[1001:])
    with pytest.raises(DataError, match="truncated or altered") as err:
        load_cifar10("test", root=tmp_path / "cifar10")
    assert str(archive) in str(err.value)
    assert not (tmp_path / "cache" / "cifar10").exists()  # nothing was decoded or cached


def test_missing_archive_names_the_expected_place(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar10("test", root=tmp_path)
    assert str(tmp_path) in str(err.value) and ENV_VAR in str(err.value)


@needs_data
def test_missing_checksum_list(tmp_path):
    copy_archive(tmp_path)
    (tmp_path / "SHA256SUMS").unlink()
    with pytest.raises(DataError, match="checksum list not found"):
        verify_archive("test", root=tmp_path)


def test_checksummed_but_incomplete_archive_is_refused(tmp_path, monkeypatch):
    """A smaller data set with a matching checksum is still an error, never a silent subset."""
    monkeypatch.setenv("BOUNDARY_CACHE_DIR", str(tmp_path / "cache"))
    from PIL import Image

    archive = tmp_path / "cifar10-test.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(3):
            buffer = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(buffer, format="JPEG")
            info = tarfile.TarInfo(f"test/airplane/{i:04d}.jpg")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    (tmp_path / "SHA256SUMS").write_text(f"{sha256_of(archive)}  cifar10-test.tar.gz\n")
    with pytest.raises(DataError, match="holds 3 images"):
        load_cifar10("test", root=tmp_path)


@needs_data
def test_environment_variable_override(tmp_path, monkeypatch):
    assert jpeg_dir() == REAL_DIR
    archive = copy_archive(tmp_path / "elsewhere")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    assert jpeg_dir() == tmp_path / "elsewhere"
    assert verify_archive("test")[0] == archive
    assert jpeg_dir(REAL_DIR) == REAL_DIR  # an explicit root wins over the variable
    from_env = load_cifar10("test")
    default = load_cifar10("test", root=REAL_DIR)
    assert torch.equal(from_env.images, default.images) and torch.equal(from_env.labels, default.labels)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "empty"))):
        load_cifar10("test")


@needs_data
def test_cache_matches_a_fresh_decode_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    reference = load_cifar10("test")
    monkeypatch.setenv("BOUNDARY_CACHE_DIR", str(tmp_path))
    fresh = load_cifar10("test")  # decoded from the archive into an empty cache
    assert torch.equal(fresh.images, reference.images) and torch.equal(fresh.labels, reference.labels)
    (cache_file,) = (tmp_path / "cifar10").glob("test-*.pt")
    assert cache_file.name.startswith("test-" + verify_archive("test")[1][:16])
    cache_file.write_bytes(b"not a tensor file")
    rebuilt = load_cifar10("test")
    assert torch.equal(rebuilt.images, reference.images)


@needs_data
def test_a_sample_decodes_only_its_images_and_matches_the_full_split(tmp_path, monkeypatch):
    reference = load_cifar10("test")
    index = torch.tensor([9_999, 0, 4_321, 17, 4_321])
    monkeypatch.setenv("BOUNDARY_CACHE_DIR", str(tmp_path))
    fresh = load_jpeg_sample("test", index)  # no cache: only these five JPEGs are decoded
    assert not list(tmp_path.glob("cifar10/*.pt"))
    assert torch.equal(fresh.images, reference.images[index]) and torch.equal(fresh.labels, reference.labels[index])
    load_cifar10("test")
    cached = load_jpeg_sample("test", index)  # from the decoded cache
    assert torch.equal(cached.images, fresh.images) and torch.equal(cached.labels, fresh.labels)


def test_imagefolder_source(tmp_path):
    from PIL import Image

    for label, name in [(0, "airplane"), (3, "cat")]:
        (tmp_path / "test" / name).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 10 * label, dtype=np.uint8)).save(tmp_path / "test" / name / "a.png")
    split = load_cifar10("test", source="imagefolder", root=tmp_path)
    assert split.labels.tolist() == [0, 3]
    assert split.images.shape == (2, 3, 32, 32) and int(split.images[1].max()) == 30
    with pytest.raises(DataError):
        load_cifar10("train", source="imagefolder", root=tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        load_cifar10("validation")
    with pytest.raises(ValueError):
        load_cifar10("test", source="imagefolder")  # needs a root
    with pytest.raises(ValueError):
        load_cifar10("test", source="pickle", root=tmp_path)
    with pytest.raises(DataError):  # no download unless asked for
        load_cifar10("test", source="torchvision", root=tmp_path)


def test_normalize():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize(pixels, (0.0, 0.2, 0.5), (1.0, 0.5, 0.25))
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx([0.0, 0.0, 2.0])


def test_gaussian_batches():
    batches = gaussian_batches(5, 64, 128, seed=42)
    assert len(batches) == 5 and all(b.shape == (64, 128) and b.dtype == torch.float32 for b in batches)
    again = gaussian_batches(5, 64, 128, seed=42)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not torch.equal(gaussian_batches(1, 64, 128, seed=7)[0], batches[0])
    assert not torch.equal(batches[0], batches[1])
    values = torch.cat(batches)
    assert abs(float(values.mean())) < 0.02 and abs(float(values.std()) - 1) < 0.02  # 40,960 N(0,1) draws
    for bad in [(0, 1, 1), (1, 0, 1), (1, 1, 0)]:
        with pytest.raises(ValueError):
            gaussian_batches(*bad)
