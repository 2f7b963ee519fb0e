"""What every source reader returns (`Item`, `Source`), the conversion options, and the helpers readers share."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ccl.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_SEED = 0  # the train/test split and sample order never depend on the noise seed
MAX_IMAGE_BYTES = 256 << 20  # the default cap on one image file: far above any real image, far below a machine



@dataclass(frozen=True)
class Item:
    """One source sample: an image file (`path`) or pixels (`array`, uint8 [H, W, 3]) and its source label."""

    name: str  # path relative to SRC (or a description): shown in messages and the manifest's skipped list
    label: int
    path: str | None = None
    array: np.ndarray | None = None


@dataclass
class Source:
    dataset: str
    classes: list[str]
    splits: dict[str, list[Item]]  # "train" first, then "test", then any extra test splits
    train_clean: bool  # are the source's train labels true labels? (not for web-crawled or crowd-labelled sets)
    shuffle: bool = False  # write in a seeded permuted order (sources listed class by class)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ConvertOptions:
    labels: str | None = None  # a label file replacing the train labels
    label_key: str | None = None
    noise: str = "none"
    noise_rate: float = 0.0
    seed: int = 0
    num_classes: int | None = None
    shard_size: int = 5000
    workers: int | None = None  # None: all cores
    overwrite: bool = False
    strict: bool = False  # undecodable images are an error instead of skipped
    skip_missing: bool = False  # file-list entries without a file are skipped instead of an error
    test_fraction: float = 0.2  # folder format without train/ and test/ subtrees
    webvision_lists: tuple[str, ...] = ("google",)
    imagenet_val: str | None = None
    imagenet_labels: str | None = None
    progress: bool = True
    max_image_bytes: int = MAX_IMAGE_BYTES  # a larger file is skipped (and listed), never read
    allow_empty_classes: bool = False  # folder format: keep class folders without images (else an error)



def stratified_holdout(labels: np.ndarray, fraction: float, total: int | None = None) -> np.ndarray:
    """bool [N]: a seeded, per-class held-out subset (largest-remainder rounding hits `total` exactly)."""
    classes, counts = np.unique(labels, return_counts=True)
    total = int(round(fraction * len(labels))) if total is None else total
    quota = counts * (total / len(labels))
    take = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - take), kind="stable")[: total - take.sum()]:
        take[j] += 1
    rng = np.random.default_rng(SPLIT_SEED)
    held = np.zeros(len(labels), dtype=bool)
    for c, k in zip(classes, take):
        members = np.flatnonzero(labels == c)
        held[members[rng.permutation(members.size)[:k]]] = True
    return held



def check_missing(source: Source, skip: bool) -> None:
    """File lists can name files that are not there: an error (naming the first) or, with skip, a record."""
    for split, items in source.splits.items():
        missing = [it for it in items if it.path is not None and not os.path.isfile(it.path)]
        if not missing:
            continue
        if not skip:
            raise UserError(
                f"{split}: {len(missing)} listed image(s) missing, first: {missing[0].path} "
                "(pass --skip-missing to skip them and list them in the manifest)"
            )
        gone = {id(it) for it in missing}
        source.splits[split] = [it for it in items if id(it) not in gone]
        source.skipped += [{"split": split, "path": it.name, "reason": "missing file"} for it in missing]



class NotAnImage(Exception):
    """An input path that is not read: not a regular file (a device, FIFO, socket), or over the size cap."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def read_image_file(path, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (symlinks followed), or NotAnImage saying why not.

    Nothing here can block or read without end: a FIFO, a device (a link to /dev/zero) or a socket is refused
    from its stat before it is opened, the open does not wait, and at most max_bytes + 1 bytes are read."""
    def check(st) -> None:
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "special")
            raise NotAnImage(f"not a regular file ({kind})")
        if st.st_size > max_bytes:
            raise NotAnImage(f"{st.st_size} bytes, over the cap of {max_bytes} bytes (--max-image-bytes)")

    check(os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        check(os.fstat(fd))  # the same file as the one just checked, not one swapped in since
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > max_bytes:  # it grew while read
        raise NotAnImage(f"over the cap of {max_bytes} bytes (--max-image-bytes)")
    return b"".join(chunks)


def image_files(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(found)


def require_dir(src, what: str) -> Path:
    if src is None or str(src) in ("", "-"):
        raise UserError(f"{what} is required for this format: the folder holding the raw data set")
    path = Path(src)
    if not path.is_dir():
        raise UserError(f"{what} {path}: no such directory")
    return path


