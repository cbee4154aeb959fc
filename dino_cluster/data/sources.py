"""Image sources that `pack` turns into shards: an image folder, a list file, Fashion-MNIST IDX.

Each source is a sized, ordered iterable of SourceImage. Order is deterministic (sorted paths,
file order, IDX order) so that packing the same source twice gives the same shards.
"""

from __future__ import annotations

import gzip
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FOLDER_IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_MAX_LIST_FILE_BYTES = 1 << 30
_MAX_LABEL = (1 << 63) - 1  # labels become int64 tensors


@dataclass
class SourceImage:
    name: str  # for messages: a path or "train[123]"
    label: int  # -1 when unlabeled
    path: Path | None = None  # encoded image file on disk, or
    pixels: np.ndarray | None = None  # raw HxW (grey) or HxWx3 uint8 pixels


class Source(ABC):
    """Base: `len()` gives the number of images, iteration yields them in a fixed order."""

    kind = "source"
    classes: list[str] | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[SourceImage]: ...


class FolderSource(Source):
    """root/<class>/**/*.jpg (class = first sub-folder); images directly in root are unlabeled."""

    kind = "image-folder"

    def __init__(self, root: Path) -> None:
        self.root = root
        subdirs = sorted(
            p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        items: list[tuple[Path, int]] = []
        classes: list[str] = []
        for entry in sorted(root.iterdir()):
            if entry.is_file() and entry.suffix.lower() in FOLDER_IMAGE_EXTS:
                items.append((entry, -1))
        for name in subdirs:
            files = sorted(
                Path(dirpath) / f
                for dirpath, _, filenames in os.walk(root / name)
                for f in filenames
                if Path(f).suffix.lower() in FOLDER_IMAGE_EXTS and not f.startswith(".")
            )
            if files:
                items.extend((f, len(classes)) for f in files)
                classes.append(name)
        if not items:
            raise ValueError(f"no images ({', '.join(sorted(FOLDER_IMAGE_EXTS))}) under {root}")
        self.items = items
        self.classes = classes or None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[SourceImage]:
        for path, label in self.items:
            yield SourceImage(str(path), label, path=path)


class ListFileSource(Source):
    """One `path [label]` per line; relative paths are relative to the list file."""

    kind = "list-file"

    def __init__(self, list_path: Path) -> None:
        if list_path.stat().st_size > _MAX_LIST_FILE_BYTES:
            raise ValueError(f"{list_path}: list file larger than {_MAX_LIST_FILE_BYTES} bytes")
        base = list_path.parent
        items: list[tuple[Path, int]] = []
        missing: list[str] = []
        text = list_path.read_text(encoding="utf-8")
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            label = -1
            head, _, tail = line.rpartition(" ")
            # isascii: str.isdigit also takes "²" or "５", which int() then refuses or reads.
            if head and tail.isascii() and tail.lstrip("-").isdigit():
                line, label = head.strip(), int(tail)
                if not 0 <= label <= _MAX_LABEL:
                    raise ValueError(
                        f"{list_path}:{lineno}: label must be in [0, {_MAX_LABEL}], got {label}"
                    )
            path = Path(line) if os.path.isabs(line) else base / line
            if not path.is_file():
                missing.append(f"{list_path}:{lineno}: {line}")
            items.append((path, label))
        if missing:
            shown = "\n  ".join(missing[:5])
            more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"{len(missing)} listed image(s) not found:\n  {shown}{more}")
        if not items:
            raise ValueError(f"{list_path}: no images listed")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[SourceImage]:
        for path, label in self.items:
            yield SourceImage(str(path), label, path=path)


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path, *, expect_dims: int) -> np.ndarray:
    """Read an IDX file (unsigned byte data) as used by (Fashion-)MNIST."""
    with _open_maybe_gz(path) as f:
        header = f.read(4)
        if len(header) != 4 or header[:2] != b"\x00\x00" or header[2] != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        ndim = header[3]
        if ndim != expect_dims:
            raise ValueError(f"{path}: IDX has {ndim} dimensions, expected {expect_dims}")
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        count = int(np.prod(dims))
        if count > 1 << 34:
            raise ValueError(f"{path}: IDX dimensions {dims} are implausibly large")
        data = f.read(count)
    if len(data) != count:
        raise ValueError(f"{path}: IDX data truncated ({len(data)} of {count} bytes)")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def find_idx_files(root: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _IDX_PREFIX.get(split)
    if prefix is None:
        return None
    for suffix in (".gz", ""):
        images = root / f"{prefix}-images-idx3-ubyte{suffix}"
        labels = root / f"{prefix}-labels-idx1-ubyte{suffix}"
        if images.is_file() and labels.is_file():
            return images, labels
    return None


class IdxSource(Source):
    """Fashion-MNIST (or MNIST) IDX files: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""

    kind = "fashion-mnist"

    def __init__(self, root: Path, split: str, limit: int | None = None) -> None:
        found = find_idx_files(root, split)
        if found is None:
            raise ValueError(
                f"{root}: no IDX files for split {split!r} (expected "
                f"{_IDX_PREFIX.get(split, '?')}-images-idx3-ubyte.gz and -labels-idx1-ubyte.gz;"
                f" split must be one of {sorted(_IDX_PREFIX)})"
            )
        images = read_idx(found[0], expect_dims=3)
        labels = read_idx(found[1], expect_dims=1)
        if len(images) != len(labels):
            raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.images, self.labels, self.split = images, labels, split
        self.classes = list(FASHION_MNIST_CLASSES) if int(labels.max(initial=0)) < 10 else None

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[SourceImage]:
        for i in range(len(self.images)):
            yield SourceImage(f"{self.split}[{i}]", int(self.labels[i]), pixels=self.images[i])


def open_source(src: str | os.PathLike[str], *, split: str = "train", limit: int | None = None):
    """Pick the source kind from what `src` is: a list file, an IDX folder or an image folder."""
    if "://" in str(src) and not str(src).startswith("file://"):
        raise ValueError(f"pack reads images from a local folder or list file, not {str(src)!r}")
    path = Path(str(src).removeprefix("file://"))
    if not path.exists():
        raise ValueError(f"source {str(src)!r} does not exist")
    if path.is_file():
        return ListFileSource(path)
    if not path.is_dir():
        raise ValueError(f"source {str(src)!r} is neither a file nor a folder")
    if any(path.glob("*-images-idx3-ubyte*")):
        return IdxSource(path, split, limit)
    return FolderSource(path)
