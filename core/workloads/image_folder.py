"""A labelled image folder (torchvision's ImageFolder layout), read safely, as a model's input tensor.

Layout: ``<root>/<class name>/<image>`` (images may sit deeper inside a class folder); a folder
of images without class folders is *unlabelled* (fidelity to the dense model replaces accuracy).
Inside an archive, leading folders that every entry shares (``val/cat/1.jpg``) are the root.
Two sources:

* :func:`read_image_folder`: a local directory (the command line). Symbolic links are not
  followed (each is skipped and counted); at most :data:`MAX_FOLDER_FILES` files are listed.
* :func:`read_image_zip`: a ``.zip`` uploaded in the browser, read from memory (nothing is
  written to disk). The archive is refused, with a sentence saying why, when it is over
  ``max_zip_bytes``, lists more than :data:`MAX_ZIP_ENTRIES` entries, would unpack to more than
  :data:`MAX_UNZIPPED_BYTES`, compresses an entry over 1 MB more than :data:`MAX_ZIP_RATIO`:1
  (a zip bomb), is encrypted, or holds an absolute path, a ``..`` component or a symbolic link.
  Each entry is read with a bound (:data:`MAX_IMAGE_FILE_BYTES`), whatever the directory says.

Both then decode at most ``max_images`` images (default :data:`DEFAULT_MAX_IMAGES`; fewer when
the float tensor would exceed ``max_tensor_bytes``), chosen class-balanced with a fixed seed when
there are more. Decoding is guarded against decompression bombs: PIL's ``Image.MAX_IMAGE_PIXELS``
is lowered to :data:`MAX_IMAGE_PIXELS` (never raised), its warning is turned into an error, and
the header's size is checked before the pixels are read; such images are skipped and counted.
Files whose name is not an image's (:data:`IMAGE_SUFFIXES`), hidden files and ``__MACOSX``
entries are skipped and counted; so are images PIL cannot read.

Pre-processing is a :class:`core.workloads.preprocess.Preprocess`; the result is an
:class:`ImageSet` (normalised float32 N×3×S×S, labels or None, class names, counts, a SHA256
digest of what was read). :func:`for_model` maps class folders to a model's outputs.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import struct
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from core.common.formatting import printable
from core.workloads.data import DataError
from core.workloads.preprocess import Preprocess

DEFAULT_MAX_IMAGES = 2_000
#: The normalised float tensor of the images is kept under this (about 1,100 images at 224 px).
DEFAULT_MAX_TENSOR_BYTES = 640 * 2**20
#: An uploaded archive (the browser's limit, as for checkpoints): 200·10⁶ bytes.
MAX_ZIP_BYTES = 200 * 10**6
MAX_ZIP_ENTRIES = 100_000
MAX_UNZIPPED_BYTES = 2 * 10**9
MAX_ZIP_RATIO = 100
ZIP_RATIO_FLOOR = 1 << 20
MAX_FOLDER_FILES = 2_000_000
#: One image file (a 50 MB JPEG is already far beyond any data set's).
MAX_IMAGE_FILE_BYTES = 50 * 10**6
#: Pixels of one decoded image (width × height): 40 M, a 7,300 × 5,500 photograph.
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SAMPLE_SEED = 0
_ZIP_DIRECTORY_ENTRY = b"PK\x01\x02"


class ImageDataError(DataError):
    """The image folder or archive is refused or holds no usable image; the message says why."""


# ---------------------------------------------------------------- listing

@dataclass(frozen=True)
class _File:
    """One image file: its path relative to the root (POSIX parts) and how to read its bytes."""

    parts: tuple[str, ...]
    read: Callable[[], bytes]

    @property
    def path(self) -> str:
        return "/".join(self.parts)


@dataclass
class _Listing:
    files: list[_File] = field(default_factory=list)
    not_images: int = 0  # other files, hidden files, __MACOSX entries
    symlinks: int = 0
    too_large: int = 0


def _is_image_name(parts: Sequence[str]) -> bool | None:
    """True for an image file name, False for another file, None for a hidden or ``__MACOSX`` entry."""
    if any(part.startswith(".") or part == "__MACOSX" for part in parts):
        return None
    return parts[-1].lower().endswith(IMAGE_SUFFIXES)


def _zip_parts(name: str, label: str) -> tuple[str, ...]:
    """The path components of a zip entry, refusing absolute paths and ``..`` (the archive is hostile)."""
    shown = printable(name, 80)
    if "\x00" in name:
        raise ImageDataError(f"{label} is refused: an entry name holds a NUL character ('{shown}').")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise ImageDataError(f"{label} is refused: the entry '{shown}' has an absolute path, which would point "
                             "outside the folder it unpacks to.")
    parts = tuple(p for p in PurePosixPath(unified).parts if p not in ("", "."))
    if ".." in parts:
        raise ImageDataError(f"{label} is refused: the entry '{shown}' climbs out of the folder with '..'.")
    return parts


def _list_zip(data: bytes, label: str, max_zip_bytes: int) -> tuple[_Listing, zipfile.ZipFile]:
    if len(data) > max_zip_bytes:
        raise ImageDataError(f"{label} is {len(data):,} bytes; image archives may be at most {max_zip_bytes:,} bytes.")
    if data.count(_ZIP_DIRECTORY_ENTRY) > MAX_ZIP_ENTRIES:
        raise ImageDataError(f"{label} is refused: it lists more than {MAX_ZIP_ENTRIES:,} entries.")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OverflowError, EOFError, OSError, NotImplementedError,
            struct.error) as err:
        raise ImageDataError(f"{label} is not a readable zip archive: its directory is damaged or cut short, "
                             "or it is another kind of file.") from err
    listing = _Listing()
    total = 0
    for entry in entries:
        parts = _zip_parts(entry.filename, label)
        shown = printable(entry.filename, 80)
        if stat.S_ISLNK(entry.external_attr >> 16):
            raise ImageDataError(f"{label} is refused: the entry '{shown}' is a symbolic link, which could point "
                                 "anywhere on the server.")
        if entry.is_dir() or not parts:
            continue
        if entry.flag_bits & 0x1:
            raise ImageDataError(f"{label} is refused: the entry '{shown}' is encrypted.")
        if entry.file_size > ZIP_RATIO_FLOOR and entry.file_size > MAX_ZIP_RATIO * max(entry.compress_size, 1):
            raise ImageDataError(f"{label} is refused: the entry '{shown}' is compressed more than {MAX_ZIP_RATIO}:1 "
                                 f"({entry.compress_size:,} bytes unpack to {entry.file_size:,}), a zip bomb.")
        total += entry.file_size
        if total > MAX_UNZIPPED_BYTES:
            raise ImageDataError(f"{label} is refused: it would unpack to more than {MAX_UNZIPPED_BYTES:,} bytes.")
        kind = _is_image_name(parts)
        if not kind:
            listing.not_images += 1
        elif entry.file_size > MAX_IMAGE_FILE_BYTES:
            listing.too_large += 1
        else:
            listing.files.append(_File(parts, lambda e=entry: _read_entry(archive, e)))
    return listing, archive


def _read_entry(archive: zipfile.ZipFile, entry: zipfile.ZipInfo) -> bytes:
    with archive.open(entry) as handle:  # zipfile stops at the declared size and checks the CRC
        return handle.read(MAX_IMAGE_FILE_BYTES + 1)


def _read_file(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(MAX_IMAGE_FILE_BYTES + 1)


def _list_directory(root: Path) -> _Listing:
    if not root.is_dir():
        raise ImageDataError(f"{root} is not a folder. Give a folder of class folders of images "
                             "(class_name/image.jpg) or a folder of images.")
    listing = _Listing()
    seen = 0
    for folder, dirs, names in os.walk(root, followlinks=False):
        base = Path(folder)
        for name in list(dirs):
            if (base / name).is_symlink():
                listing.symlinks += 1
                dirs.remove(name)
        dirs.sort()
        for name in sorted(names):
            seen += 1
            if seen > MAX_FOLDER_FILES:
                raise ImageDataError(f"{root} holds more than {MAX_FOLDER_FILES:,} files; point at a smaller folder.")
            path = base / name
            parts = path.relative_to(root).parts
            if path.is_symlink():
                listing.symlinks += 1
                continue
            kind = _is_image_name(parts)
            if not kind:
                listing.not_images += 1
            elif path.stat().st_size > MAX_IMAGE_FILE_BYTES:
                listing.too_large += 1
            else:
                listing.files.append(_File(parts, lambda p=path: _read_file(p)))
    return listing


def _strip_common_folder(files: list[_File]) -> list[_File]:
    """Drop leading folders every file shares while some file sits two or more folders deeper
    (``val/cat/1.jpg`` → ``cat/1.jpg``); a lone class folder (``cat/1.jpg``) stays."""
    while files and all(len(f.parts) > 1 for f in files) and len({f.parts[0] for f in files}) == 1 \
            and any(len(f.parts) > 2 for f in files):
        files = [replace(f, parts=f.parts[1:]) for f in files]
    return files


# ---------------------------------------------------------------- decoding

def _lower_pil_limit() -> None:
    """Lower PIL's decompression-bomb limit to :data:`MAX_IMAGE_PIXELS` (never raise it)."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageBombError(ValueError):
    """An image whose pixel count is over :data:`MAX_IMAGE_PIXELS` (a decompression bomb)."""


def decode_image(blob: bytes, preprocess: Preprocess) -> torch.Tensor:
    """One image file's bytes → uint8 3×S×S after :meth:`Preprocess.resize_crop`.

    Raises :class:`ImageBombError` for images over :data:`MAX_IMAGE_PIXELS` (checked from the header before the
    pixels are decoded, and by PIL's own guard) and ``ValueError`` for anything PIL cannot read.
    """
    from PIL import Image

    _lower_pil_limit()
    if len(blob) > MAX_IMAGE_FILE_BYTES:
        raise ValueError("file too large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageBombError()
                rgb = image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageBombError() from err
    except ImageBombError:
        raise
    except Exception as err:  # UnidentifiedImageError, truncated files, broken headers, …
        raise ValueError("unreadable image") from err
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    return preprocess.resize_crop(pixels).contiguous()


# ---------------------------------------------------------------- the result

@dataclass(frozen=True)
class ImageSet:
    """Decoded, pre-processed images; ``labels`` index ``class_names`` (None: unlabelled).

    ``found`` images were listed, ``len(self)`` decoded (class-balanced sample when capped);
    ``not_images``, ``symlinks``, ``too_large``, ``unreadable`` and ``bombs`` count what was
    skipped. ``digest`` is a SHA256 of the decoded files' paths and bytes, the labels and the
    pre-processing: two sets with the same digest hold the same tensors.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: tuple[str, ...]
    files: tuple[str, ...]
    preprocess: Preprocess
    digest: str
    source: str
    found: int
    cap: int
    not_images: int = 0
    symlinks: int = 0
    too_large: int = 0
    unreadable: int = 0
    bombs: int = 0
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    @property
    def key(self) -> str:
        return f"images:{self.digest[:24]}"

    def summary(self) -> str:
        """One paragraph: what was read, what was skipped and why."""
        what = (f"{len(self):,} images in {len(self.class_names)} classes" if self.labelled
                else f"{len(self):,} unlabelled images")
        text = f"{self.source}: {what}"
        if self.found > len(self) + self.unreadable + self.bombs:
            text += f" (a fixed class-balanced sample of the {self.found:,} found; at most {self.cap:,} are used)"
        text += f", pre-processed: {self.preprocess.describe()}."
        skipped = [(self.not_images, "file", "that {} not an image (by name), hidden or __MACOSX"),
                   (self.symlinks, "symbolic link", "(not followed)"),
                   (self.too_large, "image file", f"over {MAX_IMAGE_FILE_BYTES:,} bytes"),
                   (self.unreadable, "image", "that could not be decoded"),
                   (self.bombs, "image", f"over {MAX_IMAGE_PIXELS:,} pixels (decompression-bomb guard)")]
        parts = [f"{n:,} {what}{'' if n == 1 else 's'} " + why.format("is" if n == 1 else "are")
                 for n, what, why in skipped if n]
        if parts:
            text += " Skipped: " + "; ".join(parts) + "."
        return " ".join([text, *self.notes])

    def preview(self, n: int = 8) -> list[tuple[np.ndarray, str]]:
        """Up to ``n`` processed images (H×W×3 uint8, as the model sees them before normalisation) with captions."""
        shown = []
        for i in range(min(n, len(self))):
            pixels = self.preprocess.denormalize(self.images[i]).permute(1, 2, 0).numpy()
            caption = self.class_names[int(self.labels[i])] if self.labelled else Path(self.files[i]).name
            shown.append((pixels, printable(caption, 40)))
        return shown


def _sample(files: list[_File], classes: list[str] | None, limit: int) -> list[_File]:
    """At most ``limit`` files, class-balanced (classes in turn, each shuffled with a fixed seed)."""
    if len(files) <= limit:
        return files
    rng = random.Random(SAMPLE_SEED)
    groups: dict[str, list[_File]] = {}
    for f in files:
        groups.setdefault(f.parts[0] if classes is not None else "", []).append(f)
    queues = []
    for key in sorted(groups):
        members = list(groups[key])
        rng.shuffle(members)
        queues.append(members)
    chosen: list[_File] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return chosen


def _decode_all(listing: _Listing, source: str, preprocess: Preprocess, max_images: int,
                max_tensor_bytes: int, strip: bool) -> ImageSet:
    files = sorted(listing.files, key=lambda f: f.parts)
    if strip:
        files = _strip_common_folder(files)
    if not files:
        raise ImageDataError(f"{source} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                             f"{listing.not_images:,} other files were skipped.")
    labelled = all(len(f.parts) >= 2 for f in files)
    notes = []
    if not labelled and any(len(f.parts) >= 2 for f in files):
        loose = [f for f in files if len(f.parts) == 1]
        notes.append(f"{len(loose):,} images outside any class folder were left out.")
        files = [f for f in files if len(f.parts) >= 2]
        labelled = True
    classes = sorted({f.parts[0] for f in files}) if labelled else None
    per_image = 3 * preprocess.image_size ** 2 * 4
    cap = max(1, min(max_images, max_tensor_bytes // per_image))
    chosen = _sample(files, classes, cap)
    out = torch.empty((len(chosen), 3, preprocess.image_size, preprocess.image_size), dtype=torch.uint8)
    labels, names, digest = [], [], hashlib.sha256(repr(preprocess.key()).encode())
    unreadable = bombs = 0
    index = {name: i for i, name in enumerate(classes or [])}
    for f in chosen:
        blob = f.read()
        try:
            pixels = decode_image(blob, preprocess)
        except ImageBombError:
            bombs += 1
            continue
        except ValueError:
            unreadable += 1
            continue
        out[len(names)] = pixels
        names.append(f.path)
        if labelled:
            labels.append(index[f.parts[0]])
        digest.update(f.path.encode("utf-8", "surrogateescape") + b"\x00" + len(blob).to_bytes(8, "little"))
        digest.update(blob)
    if not names:
        raise ImageDataError(f"{source}: none of its {len(chosen):,} images could be decoded "
                             f"({unreadable:,} unreadable, {bombs:,} over {MAX_IMAGE_PIXELS:,} pixels).")
    images = preprocess.normalize(out[:len(names)])
    label_tensor = torch.tensor(labels, dtype=torch.int64) if labelled else None
    if label_tensor is not None:
        digest.update(label_tensor.numpy().tobytes())
    return ImageSet(images, label_tensor, tuple(classes or ()), tuple(names), preprocess, digest.hexdigest(), source,
                    len(files), cap, listing.not_images, listing.symlinks, listing.too_large, unreadable, bombs,
                    tuple(notes))


def read_image_folder(root: str | os.PathLike, preprocess: Preprocess, max_images: int = DEFAULT_MAX_IMAGES,
                      max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> ImageSet:
    """The images under local directory ``root`` (ImageFolder layout, or a plain folder of images)."""
    root = Path(root)
    listing = _list_directory(root)
    return _decode_all(listing, str(root), preprocess, max_images, max_tensor_bytes, strip=False)


def read_image_zip(data: bytes, name: str, preprocess: Preprocess, max_images: int = DEFAULT_MAX_IMAGES,
                   max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES, max_zip_bytes: int = MAX_ZIP_BYTES) -> ImageSet:
    """The images of a zip archive held in memory (ImageFolder layout inside, a common top folder allowed).

    ``name`` is only shown in messages, never used as a path.
    """
    label = printable(name, 80) or "the archive"
    listing, archive = _list_zip(bytes(data), label, max_zip_bytes)
    with archive:
        return _decode_all(listing, label, preprocess, max_images, max_tensor_bytes, strip=True)


# ---------------------------------------------------------------- classes → the model's outputs

def _normal(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def for_model(images: ImageSet, categories: Sequence[str], num_classes: int) -> tuple[ImageSet, list[str]]:
    """The set with labels as the model's output indices, and warnings (whole sentences).

    Class folders map to outputs by the weights' category names where every folder matches one
    (case, ``_`` and ``-`` ignored); otherwise in sorted order (torchvision ImageFolder's
    convention: the i-th folder is output i). When the counts disagree, a warning says so and
    folders without an output are left out. One folder whose name is not a category carries no
    label information: the set is treated as unlabelled.
    """
    if not images.labelled:
        return images, []
    warnings_out: list[str] = []
    lookup = {_normal(c): i for i, c in enumerate(categories)}
    names = images.class_names
    matched = {n: lookup[_normal(n)] for n in names if _normal(n) in lookup}
    if len(names) == 1 and not matched:
        warnings_out.append(f"The data has one class folder ('{printable(names[0], 60)}'), not a category of the "
                            "model: it is treated as unlabelled, and fidelity to the dense model replaces accuracy.")
        return replace(images, labels=None, class_names=()), warnings_out
    if len(matched) == len(names):
        mapping = matched
        how = "by the weights' category names"
    elif matched and len(names) != num_classes:
        mapping = matched
        how = f"by category name for the {len(matched)} folders that match one"
    else:
        mapping = {n: i for i, n in enumerate(names) if i < num_classes}
        how = "in sorted order (the i-th folder is output i)"
    if len(names) != num_classes:
        warnings_out.append(f"The data has {len(names)} class folders and the model {num_classes} outputs; "
                            f"folders are mapped {how}.")
    dropped = [n for n in names if n not in mapping]
    if dropped:
        plural = len(dropped) != 1
        warnings_out.append(f"{len(dropped)} class folder{'s' if plural else ''} map{'' if plural else 's'} to no "
                            f"output of the model and {'are' if plural else 'is'} left out "
                            f"(for example '{printable(dropped[0], 60)}').")
    table = torch.tensor([mapping.get(n, -1) for n in names], dtype=torch.int64)
    outputs = table[images.labels]
    keep = outputs >= 0
    if not bool(keep.any()):
        raise ImageDataError("No class folder of the data maps to an output of the model.")
    digest = hashlib.sha256((images.digest + repr(sorted(mapping.items()))).encode()).hexdigest()
    folder_of = {i: n for n, i in mapping.items()}
    names_out = tuple(categories[i] if i < len(categories) else folder_of.get(i, str(i)) for i in range(num_classes))
    files = tuple(f for f, k in zip(images.files, keep.tolist()) if k)
    return replace(images, images=images.images[keep], labels=outputs[keep], class_names=names_out, files=files,
                   digest=digest, notes=images.notes + (f"Class folders map to the model's outputs {how}.",)), \
        warnings_out
