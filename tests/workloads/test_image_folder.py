"""Image folders and archives: the ImageFolder layout, safe extraction, decoding guards, classes → outputs."""
from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.workloads import image_folder as imf
from core.workloads.image_folder import ImageDataError, for_model, read_image_folder, read_image_zip
from core.workloads.preprocess import Preprocess

PRE = Preprocess.for_size(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def png(seed: int = 0, size: tuple[int, int] = (20, 24)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root: Path, classes: dict[str, int]) -> Path:
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(png(hash((name, i)) % 1000))
    return root


def make_zip(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width × height`` pixels and holds almost none: an image bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


# ---------------------------------------------------------------- layout

def test_a_labelled_folder_gives_normalised_images_labels_and_class_names(tmp_path):
    root = make_folder(tmp_path / "val", {"cat": 3, "dog": 2})
    (root / "README.txt").write_text("not an image")
    found = read_image_folder(root, PRE)
    assert found.images.shape == (5, 3, 16, 16) and found.images.dtype == torch.float32
    assert found.class_names == ("cat", "dog") and found.labels.tolist() == [0, 0, 0, 1, 1]
    assert found.not_images == 1 and "1 file that is not an image" in found.summary()
    assert found.images.min() < -1 and found.images.max() > 1  # normalised with mean 0.5, std 0.25


def test_a_plain_folder_of_images_is_unlabelled(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png(i))
    found = read_image_folder(tmp_path, PRE)
    assert not found.labelled and len(found) == 3 and "unlabelled" in found.summary()


def test_an_empty_folder_and_a_missing_one_are_sentences(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageDataError, match="holds no image files"):
        read_image_folder(tmp_path / "empty", PRE)
    with pytest.raises(ImageDataError, match="is not a folder"):
        read_image_folder(tmp_path / "missing", PRE)


def test_symbolic_links_in_a_folder_are_not_followed(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 2})
    outside = make_folder(tmp_path / "secret", {"dog": 2})
    os.symlink(outside / "dog", root / "dog")
    os.symlink(outside / "dog" / "0.png", root / "cat" / "link.png")
    found = read_image_folder(root, PRE)
    assert len(found) == 2 and found.symlinks == 2 and "symbolic links" in found.summary()


def test_a_zip_with_a_top_folder_reads_like_the_folder(tmp_path):
    root = make_folder(tmp_path / "val", {"cat": 2, "dog": 2})
    entries = {f"val/{p.relative_to(root).as_posix()}": p.read_bytes() for p in sorted(root.rglob("*.png"))}
    entries["__MACOSX/val/._0.png"] = b"junk"
    from_zip = read_image_zip(make_zip(entries), "val.zip", PRE)
    from_folder = read_image_folder(root, PRE)
    assert from_zip.class_names == ("cat", "dog") and from_zip.digest == from_folder.digest
    assert torch.equal(from_zip.images, from_folder.images) and from_zip.not_images == 1
    other = read_image_zip(make_zip(entries), "val.zip", Preprocess.for_size(8, PRE.mean, PRE.std))
    assert other.digest != from_zip.digest


def test_the_cap_keeps_a_class_balanced_sample_and_says_so(tmp_path):
    root = make_folder(tmp_path, {"a": 10, "b": 10, "c": 2})
    found = read_image_folder(root, PRE, max_images=6)
    assert len(found) == 6 and sorted(found.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert "class-balanced sample of the 22 found; at most 6 are used" in found.summary()
    small = read_image_folder(root, PRE, max_tensor_bytes=3 * 16 * 16 * 4 * 4)
    assert len(small) == 4


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path, {"cat": 2})
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    found = read_image_folder(root, PRE)
    assert len(found) == 2 and found.unreadable == 1 and "could not be decoded" in found.summary()


# ---------------------------------------------------------------- hostile archives

@pytest.mark.parametrize("name, words", [
    ("../escape.png", "climbs out of the folder"),
    ("val/../../escape.png", "climbs out of the folder"),
    ("/etc/passwd.png", "absolute path"),
    ("C:/windows/x.png", "absolute path"),
    ("..\\escape.png", "climbs out of the folder"),
])
def test_paths_outside_the_target_are_refused(name, words):
    with pytest.raises(ImageDataError, match=words):
        read_image_zip(make_zip({"cat/ok.png": png(), name: png(1)}), "evil.zip", PRE)


def test_symbolic_links_in_an_archive_are_refused():
    data = make_zip({"cat/ok.png": png()}, symlinks={"cat/link.png": "/etc/shadow"})
    with pytest.raises(ImageDataError, match="is a symbolic link"):
        read_image_zip(data, "links.zip", PRE)


def test_a_zip_bomb_is_refused_from_its_directory():
    data = make_zip({"cat/ok.png": png(), "cat/bomb.png": b"\x00" * (8 << 20)})
    with pytest.raises(ImageDataError, match=r"compressed more than 100:1 .* a zip bomb"):
        read_image_zip(data, "bomb.zip", PRE)


def test_archive_limits_are_checked_before_anything_is_unpacked(monkeypatch):
    data = make_zip({f"cat/{i}.png": png(i) for i in range(5)})
    with pytest.raises(ImageDataError, match="image archives may be at most 100 bytes"):
        read_image_zip(data, "big.zip", PRE, max_zip_bytes=100)
    monkeypatch.setattr(imf, "MAX_ZIP_ENTRIES", 3)
    with pytest.raises(ImageDataError, match="more than 3 entries"):
        read_image_zip(data, "many.zip", PRE)
    monkeypatch.setattr(imf, "MAX_ZIP_ENTRIES", 100)
    monkeypatch.setattr(imf, "MAX_UNZIPPED_BYTES", len(png()) * 2)
    with pytest.raises(ImageDataError, match="would unpack to more than"):
        read_image_zip(data, "large.zip", PRE)


def test_encrypted_entries_and_non_zips_are_refused():
    data = bytearray(make_zip({"cat/secret.png": png()}))
    directory = data.index(b"PK\x01\x02")
    data[directory + 8] |= 0x1  # the central directory's "encrypted" flag (zipfile never writes one)
    with pytest.raises(ImageDataError, match="is encrypted"):
        read_image_zip(bytes(data), "locked.zip", PRE)
    with pytest.raises(ImageDataError, match="not a readable zip archive"):
        read_image_zip(b"PK\x03\x04 cut short", "cut.zip", PRE)


def test_an_image_bomb_is_skipped_and_counted():
    data = make_zip({"cat/ok.png": png(), "cat/bomb.png": png_header(20_000, 20_000)})
    found = read_image_zip(data, "pixels.zip", PRE)
    assert len(found) == 1 and found.bombs == 1 and "decompression-bomb guard" in found.summary()
    from PIL import Image as PILImage
    assert PILImage.MAX_IMAGE_PIXELS <= imf.MAX_IMAGE_PIXELS  # lowered, never raised


def test_pil_s_own_guard_is_caught(monkeypatch):
    monkeypatch.setattr(imf, "MAX_IMAGE_PIXELS", 10**9)  # our header check passes; PIL's limit must still hold
    from PIL import Image as PILImage
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(imf.ImageBombError):
        imf.decode_image(png(size=(30, 30)), PRE)


def test_only_non_image_files_is_a_sentence():
    with pytest.raises(ImageDataError, match="holds no image files"):
        read_image_zip(make_zip({"notes.txt": b"x", "a/b.csv": b"1,2"}), "docs.zip", PRE)


# ---------------------------------------------------------------- classes → outputs

def test_folders_map_by_category_name_or_sorted_order(tmp_path):
    found = read_image_folder(make_folder(tmp_path, {"Great_White_Shark": 1, "tench": 1}), PRE)
    mapped, warnings = for_model(found, ["tench", "goldfish", "great white shark"], 3)
    assert mapped.labels.tolist() == [2, 0] and mapped.class_names[0] == "tench"
    assert "2 class folders and the model 3 outputs" in warnings[0] and "category names" in warnings[0]
    by_order, warnings = for_model(found, [], 2)
    assert by_order.labels.tolist() == [0, 1] and warnings == [] and by_order.digest != found.digest


def test_count_mismatch_drops_folders_without_an_output(tmp_path):
    found = read_image_folder(make_folder(tmp_path, {"a": 1, "b": 1, "c": 1}), PRE)
    mapped, warnings = for_model(found, [], 2)
    assert mapped.labels.tolist() == [0, 1] and len(mapped) == 2
    assert "3 class folders and the model 2 outputs" in warnings[0]
    assert "1 class folder maps to no output" in warnings[1]


def test_one_unknown_folder_is_unlabelled(tmp_path):
    found = read_image_folder(make_folder(tmp_path, {"photos": 2}), PRE)
    mapped, warnings = for_model(found, ["cat", "dog"], 2)
    assert not mapped.labelled and "treated as unlabelled" in warnings[0]


def test_the_preview_shows_what_the_model_sees(tmp_path):
    found = read_image_folder(make_folder(tmp_path, {"cat": 3}), PRE)
    shown = found.preview(2)
    assert len(shown) == 2 and shown[0][0].shape == (16, 16, 3) and shown[0][0].dtype == np.uint8
    assert shown[0][1] == "cat"
