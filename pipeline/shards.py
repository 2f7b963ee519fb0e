"""WebDataset shard sets: the writer used by the converter and the reader everything else builds on.

On disk (one directory per data set):

    {split}-{n:06d}.tar   samples in index order; one sample = key f"{index:09d}" with the components
                          `jpg` or `png` (image bytes), `cls` (ASCII training label), `clean.cls` (ASCII true
                          label, only when known) and `labels.i64` (little-endian int64 index, label, clean or -1)
    {split}-{n:06d}.idx   DALI's webdataset index of that tar, so DALI never has to scan the tars
    manifest.json         written last: a directory without it is an unfinished conversion; it records the sha256
                          of every tar and of every index file

Tars are written byte-for-byte deterministically (USTAR headers with fixed mtime/owner/mode), under a hidden
temporary name, and renamed into place when complete.

Nothing read from a shard set is trusted (`ShardSet.scan`): the manifest passes a schema
(`ccl.pipeline.manifest`), the tars and index files match their checksums before a byte is used, every index
agrees with its tar, each sample's labels agree between their two copies (`labels.i64` and the `cls`/`clean.cls`
text), and every image is a well-formed PNG or JPEG (`image_problem`) before any decoder sees it. A damaged
sample is named and skipped; a damaged shard is an error.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from ccl.errors import UserError
from ccl.pipeline import manifest as schema
from ccl.pipeline.manifest import MANIFEST
from ccl.pipeline.scan import Damaged, SplitScan, scan_parallel
from ccl.pipeline.tarshard import IMAGE_EXTS, LABELS_EXT, parse_index_text, sample_key, split_member_name, unpack_labels



# ----------------------------------------------------------------------------------------------------------------
# Reader


class Sample(NamedTuple):
    index: int
    label: int
    clean: int  # -1 when unknown
    image: np.ndarray  # uint8 [H, W, 3] RGB


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [H, W, 3] RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@dataclass
class ShardSet:
    """A converted data set: its manifest (schema-checked) and the shards of each split."""

    root: Path
    manifest: dict
    _scans: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, path) -> "ShardSet":
        root = Path(path)
        if root.name == MANIFEST and root.is_file():
            root = root.parent
        if not root.exists():
            raise UserError(f"no shard set at {root}: the directory does not exist (convert one with tools/shard.py)")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise UserError(
                f"no shard set at {root}: {MANIFEST} is missing (an unfinished conversion? rerun tools/shard.py)"
            )
        manifest = load_manifest(mpath)
        found = schema.problems(manifest)
        if found:
            more = f" (and {len(found) - 1} more: `ccl check {root}` lists them)" if len(found) > 1 else ""
            raise UserError(f"{mpath}: {found[0]}{more}")
        return cls(root=root, manifest=manifest)

    # --- manifest fields
    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.manifest["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.manifest["std"])

    @property
    def image_size(self) -> tuple[int, int] | None:
        size = self.manifest.get("image_size")
        return tuple(size) if size else None

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise UserError(f"{self.root}: no split {split!r} (the manifest has {', '.join(self.splits)})") from None

    def count(self, split: str) -> int:
        return int(self._split(split)["count"])

    def has_clean(self, split: str) -> bool:
        return bool(self._split(split)["has_clean"])

    def shards(self, split: str) -> list[Path]:
        # Plain names (the schema checks), so every path stays inside root.
        return [self.root / s["file"] for s in self._split(split)["shards"]]

    def index_files(self, split: str) -> list[Path]:
        return [self.root / s["index"] for s in self._split(split)["shards"]]

    def scan(self, split: str, verify: bool = True, workers: int | None = None) -> SplitScan:
        """Check a split before it is used (see `scan_shard`) and locate its samples; done once per ShardSet.

        Raises UserError for a damaged shard (a checksum mismatch, a missing or truncated file, an index that
        disagrees with its tar, labels outside the classes); damaged samples are returned, for skipping.
        """
        meta = self._split(split)
        stamp = self._stamp(split)
        done = self._scans.get(split)
        if done is not None and done[0] == stamp and (done[1].verified or not verify):
            return done[1]
        tasks = [(self.root, rec, split, self.num_classes, bool(meta["has_clean"]), verify, False, self.image_size)
                 for rec in meta["shards"]]
        t0 = time.perf_counter()
        parts = []
        for s, part in enumerate(scan_parallel(tasks, workers)):
            if part.problems:
                more = f" (and {len(part.problems) - 1} more)" if len(part.problems) > 1 else ""
                raise UserError(f"{self.root}: split {split!r}: {part.problems[0]}{more}")
            parts.append(part)
        recs = meta["shards"]
        damaged = [
            Damaged(split, i, sample_key(i), rec["file"], why)
            for rec, part in zip(recs, parts)
            for i, why in sorted(part.damaged.items())
        ]
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        result = SplitScan(
            split=split,
            shard=np.concatenate([np.full(len(p.label), s, np.int32) for s, p in enumerate(parts)]),
            offset=cat("offset"), size=cat("size"), png=cat("png"), label=cat("label"), clean=cat("clean"),
            damaged=damaged, verified=verify, seconds=time.perf_counter() - t0,
        )  # fmt: skip
        self._scans[split] = (stamp, result)
        return result

    def _stamp(self, split: str) -> tuple:
        """What a scan's result depends on, cheaply: every file's size, mtime and inode (a file changed since
        the last scan is scanned again)."""
        out = []
        for p in self.shards(split) + self.index_files(split):
            try:
                st = p.stat()
                out.append((st.st_size, st.st_mtime_ns, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def verify(self, split: str) -> list[Damaged]:
        """Checksums of every tar and index file, index against tar, labels and image structure (`scan`).
        Raises UserError when a shard is damaged; returns the damaged samples."""
        return self.scan(split, verify=True).damaged

    def damaged(self, split: str) -> list[Damaged]:
        """Samples of `split` the loaders skip (after the cheapest scan done so far, or a label-only one)."""
        return self.scan(split, verify=False).damaged

    def labels(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(label, clean) int64 [N] arrays in index order; clean is -1 where unknown, and both are -1 for a
        sample whose two label copies disagree (it is damaged, listed by `damaged`, and never loaded)."""
        scan = self.scan(split, verify=False)
        return scan.label.copy(), scan.clean.copy()

    def iter_samples(self, split: str) -> Iterator[Sample]:
        """Decoded samples in index order, read where the shards' index files place them (`indexed_samples`)."""
        tars, fds = self.shards(split), {}
        try:
            for s, comps, image in indexed_samples(self, split):
                if LABELS_EXT not in comps:
                    raise UserError(f"{self.index_files(split)[s]}: a sample without {LABELS_EXT}")
                if s not in fds:
                    fds[s] = os.open(tars[s], os.O_RDONLY)
                read = lambda c: os.pread(fds[s], comps[c].size, comps[c].offset)  # noqa: E731
                index, label, clean = unpack_labels(read(LABELS_EXT))
                yield Sample(index, label, clean, decode_image(read(image)))
        finally:
            for fd in fds.values():
                os.close(fd)


def indexed_samples(shards: "ShardSet", split: str) -> Iterator[tuple[int, dict, str]]:
    """(shard position, {component: IndexField}, image component) per sample of a split, in index order, from
    the split's index files (read by `parse_index_text`)."""
    for s, idx in enumerate(shards.index_files(split)):
        try:
            raw = idx.read_bytes()
        except OSError as e:
            raise UserError(f"{idx}: cannot read ({e.strerror}); every shard has a DALI index next to it "
                            "(reconvert with tools/shard.py)") from None
        for k, comps in enumerate(parse_index_text(raw, str(idx))):
            image = next((e for e in IMAGE_EXTS if e in comps), None)
            if image is None:
                raise UserError(f"{idx}: sample {k} of the file has no {' or '.join(IMAGE_EXTS)} component")
            yield s, comps, image


@dataclass(frozen=True)
class SampleLocations:
    """Per sample of one split, in index order: the shard it is in, its key, and its image's bytes' location."""

    tars: list[Path]
    shard: np.ndarray  # int32 [N]
    offset: np.ndarray  # int64 [N]
    size: np.ndarray  # int64 [N]
    ext: list[str]  # "jpg" or "png", [N]
    key: list[str]  # the sample's key in the tar (everything before the first dot of its members' names), [N]

    def read(self, i: int) -> bytes:
        with open(self.tars[int(self.shard[i])], "rb") as f:
            return os.pread(f.fileno(), int(self.size[i]), int(self.offset[i]))


def sample_locations(shards: "ShardSet", split: str) -> SampleLocations:
    """Where each sample of a split lives, from the split's index files (`indexed_samples`)."""
    tars = shards.shards(split)
    n = shards.count(split)
    shard = np.empty(n, np.int32)
    offset = np.empty(n, np.int64)
    size = np.empty(n, np.int64)
    ext: list[str] = []
    key: list[str] = []
    pos = 0
    for s, comps, image in indexed_samples(shards, split):
        if pos >= n:
            raise UserError(f"split {split!r}: the shards hold more samples than the manifest's {n}")
        field_ = comps[image]
        shard[pos], offset[pos], size[pos] = s, field_.offset, field_.size
        ext.append(image)
        key.append(split_member_name(field_.name)[0])
        pos += 1
    if pos != n:
        raise UserError(f"split {split!r}: the shards hold {pos} samples, the manifest says {n}")
    return SampleLocations(list(tars), shard, offset, size, ext, key)


def load_manifest(mpath: Path):
    """The parsed manifest.json (not yet schema-checked); UserError when it is not JSON."""
    try:
        return json.loads(Path(mpath).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{mpath}: not valid JSON ({e})") from None
