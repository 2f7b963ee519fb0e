"""Verification: one pass over a shard's bytes. `scan_shard` checks a tar and its index against the manifest's
checksums, the index against the tar, both copies of every sample's labels and every image's structure, and
names each damaged sample (`Damaged`); `scan_parallel` runs it over a split's shards in worker processes."""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from ccl.errors import UserError
from ccl.pipeline.imagecheck import image_problem
from ccl.pipeline.manifest import MANIFEST
from ccl.pipeline.procs import die_with_parent, usable_cores
from ccl.pipeline.tarshard import (
    IMAGE_EXTS, LABELS_EXT, TAR_BLOCK, index_from_tar, parse_index_text, sample_key, sha256_bytes, split_member_name,
    unpack_labels,
)  # fmt: skip

# ----------------------------------------------------------------------------------------------------------------
# Verification: one pass over a shard's bytes


class Damaged(NamedTuple):
    """A sample the loaders skip: where it is and why."""

    split: str
    index: int
    key: str  # the sample's key in the tar (its zero-padded index)
    shard: str  # the tar's file name
    reason: str


@dataclass
class ShardScan:
    """What one pass over a shard found. `problems` make the shard unusable (an error); `damaged` samples are
    skipped. Arrays are [count], in index order; `label`/`clean` are -1 where a sample's labels are damaged."""

    file: str
    problems: list[str]
    damaged: dict[int, str]
    offset: np.ndarray  # int64: the image's data offset in the tar
    size: np.ndarray  # int64: the image's byte size
    png: np.ndarray  # bool: png (else jpg)
    label: np.ndarray  # int64
    clean: np.ndarray  # int64
    verified: bool  # checksums and image structure were checked
    seconds: float = 0.0
    bytes_read: int = 0


def _ascii_int(raw: bytes) -> int | None:
    return int(raw) if raw.isdigit() and len(raw) <= 18 else None


def scan_labels_fast(root: Path, rec: dict, num_classes: int, has_clean: bool):
    """What `scan_shard(root, rec, ..., verify=False)` finds for a regular, undamaged shard, with numpy instead of
    a Python loop per sample: (offset, size, png, label, clean) arrays [count]. None when the shard is not
    regular (lines with other components, names with folders, a label that disagrees or is out of range):
    `scan_shard`'s loop then finds and names the problem, so the result is the same either way. `scan_shard`
    takes this path for verify=False; at 2.4M samples it is what keeps the loader's start-up to seconds.

    Regular = every index line lists the same components in the same order, as the converter writes them. The
    index is split into tokens once (bytes.split, in C); the labels are read with one fancy index over the mmap.
    """
    count, first = int(rec["count"]), int(rec["first_index"])
    raw = (Path(root) / rec["index"]).read_bytes()
    head, _, body = raw.partition(b"\n")
    k = len(body.split(b"\n", 1)[0].split()) // 4  # components per sample, from the first line
    if not k or len(head.split()) != 2:
        return None
    # Tokens straight from the bytes: start and end of every run of non-blanks.
    b = np.frombuffer(body, np.uint8)
    blank = (b == 32) | (b == 10) | (b == 9) | (b == 13)
    starts = np.flatnonzero(~blank & np.concatenate([[True], blank[:-1]]))
    ends = np.flatnonzero(~blank & np.concatenate([blank[1:], [True]])) + 1
    if len(starts) != 4 * k * count:
        return None
    newlines = np.flatnonzero(b == 10)
    if len(newlines) < count or (np.searchsorted(starts, newlines[:count]) != 4 * k * np.arange(1, count + 1)).any():
        return None  # every line holds exactly 4k tokens
    starts, lens = starts.reshape(count, k, 4), (ends - starts).reshape(count, k, 4)
    comps = [bytes(body[starts[0, j, 0] : starts[0, j, 0] + lens[0, j, 0]]).decode("ascii", "replace")
             for j in range(k)]
    images = [c for c in comps if c in IMAGE_EXTS]
    if len(set(comps)) != k or len(images) != 1 or LABELS_EXT not in comps or "cls" not in comps:
        return None
    if first + count > 10**9:
        return None  # sample_key grows past 9 digits
    index = np.arange(first, first + count, dtype=np.int64)
    key = (index[:, None] // 10 ** np.arange(8, -1, -1) % 10 + ord("0")).astype(np.uint8)  # [count, 9]
    for j, c in enumerate(comps):
        if not _tokens_equal(b, starts[:, j, 0], lens[:, j, 0], np.frombuffer(c.encode(), np.uint8)[None]):
            return None  # another component in this column on some line
        want = np.concatenate([key, np.frombuffer(b"." + c.encode(), np.uint8)[None].repeat(count, 0)], axis=1)
        if not _tokens_equal(b, starts[:, j, 3], lens[:, j, 3], want):
            return None  # a name other than KEY.COMP (a folder, another key)
    off = _ascii_ints(b, starts[:, :, 1].reshape(-1), lens[:, :, 1].reshape(-1))
    size = _ascii_ints(b, starts[:, :, 2].reshape(-1), lens[:, :, 2].reshape(-1))
    if off is None or size is None:
        return None
    off, size = off.reshape(count, k), size.reshape(count, k)
    tar = Path(root) / rec["file"]
    tar_size = tar.stat().st_size
    if tar_size != int(rec["bytes"]) or (off % TAR_BLOCK).any() or (off < TAR_BLOCK).any():
        return None
    if (off + size > tar_size).any():
        return None
    col = {c: j for j, c in enumerate(comps)}
    if (size[:, col[LABELS_EXT]] != 24).any():
        return None
    with open(tar, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = np.frombuffer(mm, np.uint8)
        triple = data[off[:, col[LABELS_EXT], None] + np.arange(24)].copy().view("<i8")  # [count, 3]
        text = [_ascii_ints(data, off[:, col[c]], size[:, col[c]]) if c in col else None for c in ("cls", "clean.cls")]
        del data  # the mmap closes only once no array views it
    text_label, text_clean = text
    if text_label is None or (text_clean is None and "clean.cls" in col):
        return None
    clean_col = text_clean if text_clean is not None else np.full(count, -1, np.int64)
    label, clean = triple[:, 1], triple[:, 2]
    if ((triple[:, 0] != index) | (label != text_label) | (clean != clean_col)).any():
        return None
    if ((label < 0) | (label >= num_classes) | (clean < -1) | (clean >= num_classes)).any():
        return None
    if has_clean and (clean < 0).any():
        return None
    img = col[images[0]]
    return off[:, img].copy(), size[:, img].copy(), np.full(count, images[0] == "png"), label.copy(), clean.copy()


def _tokens_equal(data: np.ndarray, start: np.ndarray, length: np.ndarray, want: np.ndarray) -> bool:
    """Whether every token data[start:start+length] equals its row of want ([count or 1, width] uint8)."""
    width = want.shape[1]
    if (length != width).any():
        return False
    got = data[np.minimum(start[:, None] + np.arange(width), len(data) - 1)]
    return bool((got == want).all())


def _ascii_ints(data: np.ndarray, off: np.ndarray, size: np.ndarray) -> np.ndarray | None:
    """The non-negative ASCII integers of 1-18 digits at data[off:off+size], or None if any is not one."""
    if (size < 1).any() or (size > 18).any():
        return None
    width = int(size.max())
    pos = np.arange(width)
    inside = pos < size[:, None]  # [count, width]
    digits = data[np.minimum(off[:, None] + pos, len(data) - 1)].astype(np.int64) - ord("0")
    if ((digits < 0) | (digits > 9))[inside].any():
        return None
    power = np.where(inside, 10 ** np.clip(size[:, None] - 1 - pos, 0, None), 0)
    return (digits * power).sum(1)


def scan_shard(root: Path, rec: dict, split: str, num_classes: int, has_clean: bool, verify: bool = True,
               tar_walk: bool = False, image_size: tuple[int, int] | None = None, fast: bool = True) -> ShardScan:
    """Check one shard of a split against its manifest record `rec` (already schema-checked).

    verify=True reads every byte: the tar's sha256, the index's sha256 (or, for manifests written before index
    checksums, the index against a walk over the tar's headers; `tar_walk` forces that walk too), and each
    image's structure (and size, given the set's fixed `image_size`). verify=False reads only the index and each sample's label components (for callers that
    opted out of the full pass). Both check that the two copies of every sample's labels agree and lie in range.
    With verify=False and `fast`, a regular shard is read by `scan_labels_fast`; anything else by the loop below.
    """
    t0 = time.perf_counter()
    count, first = int(rec["count"]), int(rec["first_index"])
    tar, idx = Path(root) / rec["file"], Path(root) / rec["index"]
    problems: list[str] = []
    damaged: dict[int, str] = {}
    offset = np.zeros(count, np.int64)
    size = np.zeros(count, np.int64)
    png = np.zeros(count, bool)
    label = np.full(count, -1, np.int64)
    clean = np.full(count, -1, np.int64)
    out = ShardScan(rec["file"], problems, damaged, offset, size, png, label, clean, verify)
    for p in (tar, idx):
        if not p.is_file():
            problems.append(f"{p.name} is missing (listed in {MANIFEST})")
    if problems:
        return out
    got = tar.stat().st_size
    if got != int(rec["bytes"]):
        problems.append(f"{tar.name}: {got} bytes, the manifest says {rec['bytes']} (truncated or replaced; "
                        "reconvert or recopy the shards)")
        return out
    if fast and not verify:
        found = scan_labels_fast(root, rec, num_classes, has_clean)
        if found is not None:
            out.offset, out.size, out.png, out.label, out.clean = found
            out.seconds = time.perf_counter() - t0
            return out
    idx_raw = idx.read_bytes()
    with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if verify:
            digest = sha256_bytes(data)
            out.bytes_read = len(data) + len(idx_raw)
            if digest != rec["sha256"]:
                problems.append(f"{tar.name}: sha256 {digest[:12]}... does not match the manifest "
                                f"({rec['sha256'][:12]}...): the file changed since conversion")
                return out
            want_idx = rec.get("index_sha256")
            if want_idx is not None and sha256_bytes(idx_raw) != want_idx:
                problems.append(f"{idx.name}: sha256 does not match the manifest: the index changed since conversion")
                return out
            if want_idx is None or tar_walk:
                try:
                    derived = index_from_tar(data, tar.name)
                except UserError as e:
                    problems.append(str(e))
                    return out
                if derived.encode() != idx_raw:
                    problems.append(f"{idx.name} disagrees with {tar.name} (rebuild it, or reconvert)")
                    return out
        try:
            entries = parse_index_text(idx_raw, idx.name, tar_size=len(data))
        except UserError as e:
            problems.append(str(e))
            return out
        if len(entries) != count:
            problems.append(f"{idx.name}: {len(entries)} samples, the manifest says {count}")
            return out
        for k, comps in enumerate(entries):
            index = first + k
            key = sample_key(index)
            for comp, fld in comps.items():
                if split_member_name(fld.name)[0].rsplit("/", 1)[-1] != key:
                    problems.append(f"{idx.name}: line {k + 2} names member {fld.name!r}, expected sample {key}")
                    return out
            images = [e for e in IMAGE_EXTS if e in comps]
            lab = comps.get(LABELS_EXT)
            if len(images) != 1:
                damaged[index] = "no image component" if not images else "two image components"
            else:
                offset[k], size[k] = comps[images[0]].offset, comps[images[0]].size
                png[k] = images[0] == "png"
            if lab is None or lab.size != 24:
                damaged[index] = f"no 24-byte {LABELS_EXT} component"
                continue
            triple = unpack_labels(data[lab.offset : lab.offset + 24])
            cls = comps.get("cls")
            text_label = _ascii_int(data[cls.offset : cls.offset + cls.size]) if cls else None
            cc = comps.get("clean.cls")
            text_clean = _ascii_int(data[cc.offset : cc.offset + cc.size]) if cc else -1
            if triple != (index, text_label, text_clean):
                damaged[index] = (f"labels disagree: {LABELS_EXT} says (index, label, clean) = {triple}, the tar "
                                  f"member names and cls/clean.cls say ({index}, {text_label}, {text_clean})")
                continue
            label[k], clean[k] = triple[1], triple[2]
            if not 0 <= label[k] < num_classes or not -1 <= clean[k] < num_classes:
                problems.append(f"{tar.name}: sample {index} has label {label[k]} (clean {clean[k]}), outside "
                                f"0..{num_classes - 1}: num_classes in {MANIFEST} is wrong, or the labels are")
                return out
            if has_clean and clean[k] < 0:
                problems.append(f"{tar.name}: sample {index} has no clean label, but the manifest says the split "
                                f"{split!r} has them (has_clean)")
                return out
            if verify and index not in damaged:
                why = image_problem(data[offset[k] : offset[k] + size[k]], image_size)
                if why is not None:
                    damaged[index] = why
    out.seconds = time.perf_counter() - t0
    return out


def scan_task(args) -> ShardScan:
    """`scan_shard(*args)`: what a process pool maps (ccl check's too)."""
    return scan_shard(*args)


@dataclass
class SplitScan:
    """A whole split, concatenated from its shards' scans (arrays [N] in index order)."""

    split: str
    shard: np.ndarray  # int32: which shard (position in the manifest's list)
    offset: np.ndarray
    size: np.ndarray
    png: np.ndarray
    label: np.ndarray
    clean: np.ndarray
    damaged: list[Damaged]
    verified: bool
    seconds: float


def scan_parallel(tasks: list[tuple], workers: int | None = None) -> Iterator[ShardScan]:
    """`scan_shard(*task)` for each task, in order; over a pool of processes when there is enough to read.

    Forked processes, like DataLoader workers: the work is numpy, hashlib and zlib only, and a fork is
    started in milliseconds.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = min(len(tasks), usable_cores() if workers is None else max(1, workers))
    total = sum(int(t[1]["bytes"]) for t in tasks)
    if workers <= 1 or total < (64 << 20) or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(scan_task, tasks)
        return
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        yield from pool.map(scan_task, tasks)


