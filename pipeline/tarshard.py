"""The bytes of a shard: sample names, the labels component, USTAR tars written deterministically (`ShardWriter`),
DALI index files (written, parsed: `parse_index_text` is the one index parser) and the checksums the manifest
keeps. `ccl.pipeline.shards` describes the layout on disk."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ccl import files
from ccl.errors import UserError

LABELS_EXT = "labels.i64"
IMAGE_EXTS = ("jpg", "png")
# DALI's wds2idx writes this version tag; its reader parses the same layout.
INDEX_VERSION = "v1.2"
TAR_BLOCK = 512


def shard_name(split: str, n: int) -> str:
    return f"{split}-{n:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def sample_key(index: int) -> str:
    # No dots: webdataset and DALI both take everything after the first dot as the component name.
    return f"{index:09d}"


def pack_labels(index: int, label: int, clean: int) -> bytes:
    """The 24-byte `labels.i64` component: little-endian int64 (index, label, clean or -1)."""
    return np.asarray([index, label, clean], dtype="<i8").tobytes()


def unpack_labels(raw: bytes) -> tuple[int, int, int]:
    index, label, clean = np.frombuffer(raw, dtype="<i8", count=3)
    return int(index), int(label), int(clean)


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Writer


def ustar_header(name: str, size: int) -> bytes:
    """One 512-byte USTAR header with fixed metadata (mtime 0, mode 0644, owner ccl:ccl, uid/gid 0).

    Byte-for-byte what `tarfile` writes for such a TarInfo in USTAR format (a test checks it), built directly
    because tarfile's general-purpose header code was the converter's bottleneck.
    """
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"member name longer than 100 bytes: {name!r}")
    h = bytearray(TAR_BLOCK)
    h[0 : len(raw)] = raw
    h[100:108] = b"0000644\0"  # mode
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"  # mtime
    h[148:156] = b"        "  # checksum placeholder: spaces while summing
    h[156:157] = b"0"  # regular file
    h[257:265] = b"ustar\x0000"
    h[265:268] = b"ccl"  # uname
    h[297:300] = b"ccl"  # gname
    # devmajor/devminor stay NUL: they only mean something for device files
    h[148:155] = b"%06o\0" % sum(h)
    return bytes(h)


_TAR_RECORD = 20 * TAR_BLOCK  # tar archives end on a whole record, as tarfile and GNU tar write them


class ShardWriter:
    """Writes one split as consecutive shards of `shard_size` samples, each with its DALI index file.

    Samples must arrive in index order (0, 1, 2, ...). `close()` returns the shard records for the manifest.
    """

    def __init__(self, out_dir: Path, split: str, shard_size: int):
        if shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_size = shard_size
        self.count = 0
        self.shards: list[dict] = []
        self._file = None
        self._offset = 0
        self._tmp: Path | None = None
        self._index_lines: list[str] = []
        self._first = 0

    def write(self, index: int, image: bytes, ext: str, label: int, clean: int) -> None:
        try:
            self._write(index, image, ext, label, clean)
        except OSError as e:
            self.abort()
            raise files.write_error(self.out_dir, e) from None
        except UserError:  # the index file's write, refused
            self.abort()
            raise

    def close(self) -> list[dict]:
        try:
            if self._file is not None:
                self._finish_shard()
        except OSError as e:
            self.abort()
            raise files.write_error(self.out_dir, e) from None
        except UserError:
            self.abort()
            raise
        return self.shards

    def _write(self, index: int, image: bytes, ext: str, label: int, clean: int) -> None:
        if index != self.count:
            raise ValueError(f"{self.split}: sample {index} written out of order (expected {self.count})")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image component must be one of {IMAGE_EXTS}, got {ext!r}")
        if self._file is None:
            self._open_shard()
        key = sample_key(index)
        components = [(ext, image), ("cls", str(label).encode())]
        if clean >= 0:
            components.append(("clean.cls", str(clean).encode()))
        components.append((LABELS_EXT, pack_labels(index, label, clean)))
        fields = []
        for comp, data in components:
            name = f"{key}.{comp}"
            size = len(data)
            pad = _round_up(size) - size
            self._file.write(ustar_header(name, size))
            self._file.write(data)
            if pad:
                self._file.write(bytes(pad))
            fields.append(f"{comp} {self._offset + TAR_BLOCK} {size} {name}")  # data follow their header
            self._offset += TAR_BLOCK + size + pad
        self._index_lines.append(" ".join(fields))
        self.count += 1
        if self.count - self._first == self.shard_size:
            self._finish_shard()

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); finished shards stay for the caller to clean."""
        if self._file is not None:
            try:
                self._file.close()  # flushes its buffer, which fails again on a full disk
            except OSError:
                pass
            finally:
                self._file = None
        if self._tmp is not None:  # also when the shard was closed but its index could not be written
            self._tmp.unlink(missing_ok=True)

    def _open_shard(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.out_dir / f".{name}.partial"
        self._file = open(self._tmp, "wb", buffering=1 << 20)
        self._offset = 0
        self._index_lines = []
        self._first = self.count

    def _finish_shard(self) -> None:
        # End of archive: two zero blocks, then zeros up to a whole record.
        end = self._offset + 2 * TAR_BLOCK
        self._file.write(bytes(2 * TAR_BLOCK + (-end) % _TAR_RECORD))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        n = len(self.shards)
        name = shard_name(self.split, n)
        idx_text = f"{INDEX_VERSION} {len(self._index_lines)}\n" + "".join(line + "\n" for line in self._index_lines)
        idx_bytes = idx_text.encode()
        files.write_atomic(self.out_dir / index_name(name), idx_bytes)
        final = self.out_dir / name
        os.replace(self._tmp, final)
        self.shards.append(
            {
                "file": name,
                "index": index_name(name),
                "count": self.count - self._first,
                "first_index": self._first,
                "sha256": sha256_file(final),
                "bytes": final.stat().st_size,
                "index_sha256": sha256_bytes(idx_bytes),  # DALI and the torch reader trust offsets from it
            }
        )


def _round_up(n: int) -> int:
    return (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def build_index(tar_path: Path) -> str:
    """DALI's index text for an existing tar (the layout `wds2idx` writes), read with tarfile."""
    with tarfile.open(tar_path, "r:") as tar:
        return _index_text((m.name, m.offset_data, m.size) for m in tar if m.isreg())


def _index_text(members) -> str:
    """DALI's index text from a tar's regular members, (name, data offset, size) in tar order: one line per
    sample, its components in order. Like wds2idx, names without a key (hidden files, directories' entries)
    belong to no sample."""
    lines: list[list[str]] = []
    last_key = None
    for name, offset, size in members:
        key, comp = split_member_name(name)
        if not key or key.endswith("/"):
            continue
        field = f"{comp} {offset} {size} {name}"
        if key != last_key:
            lines.append([field])
            last_key = key
        else:
            lines[-1].append(field)
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(" ".join(f) + "\n" for f in lines)


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000000007.clean.cls' -> ('dir/000000007', 'clean.cls'): the key ends at the basename's first dot."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


# ----------------------------------------------------------------------------------------------------------------
# Index files


class IndexField(NamedTuple):
    offset: int  # of the member's data in the tar
    size: int
    name: str  # the tar member's name


_INDEX_HEADER = re.compile(r"^v\d+(\.\d+)* (\d+)$")


def parse_index_text(raw: bytes, where: str, tar_size: int | None = None) -> list[dict[str, IndexField]]:
    """Per sample, {component: IndexField} from the bytes of a DALI index file; UserError on anything else.

    Offsets must fall on tar blocks and, given `tar_size`, inside the tar: an index is data, and an offset is
    where a reader will seek.
    """
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise UserError(f"{where}: not a webdataset index file (binary content)") from None
    lines = text.split("\n")
    head = _INDEX_HEADER.match(lines[0].strip())
    if head is None:
        raise UserError(f"{where}: not a webdataset index file (header {lines[0][:40]!r})")
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != int(head.group(2)):
        raise UserError(f"{where}: header says {head.group(2)} samples, found {len(body)}")
    samples = []
    for n, line in enumerate(body, 2):
        parts = line.split()
        if len(parts) % 4:
            raise UserError(f"{where}:{n}: expected 'component offset size name' groups, got {line[:80]!r}")
        comps = {}
        for i in range(0, len(parts), 4):
            comp, off, size, name = parts[i : i + 4]
            if not (off.isdigit() and size.isdigit()):
                raise UserError(f"{where}:{n}: offset and size must be non-negative integers, got {off!r} {size!r}")
            off_i, size_i = int(off), int(size)
            if off_i % TAR_BLOCK or off_i < TAR_BLOCK:
                raise UserError(f"{where}:{n}: offset {off_i} of {comp} is not where a tar member's data can start")
            if tar_size is not None and off_i + size_i > tar_size:
                raise UserError(f"{where}:{n}: {comp} at {off_i}+{size_i} lies past the end of the tar ({tar_size} "
                                "bytes)")
            if comp in comps:
                raise UserError(f"{where}:{n}: component {comp!r} listed twice")
            comps[comp] = IndexField(off_i, size_i, name)
        samples.append(comps)
    return samples


_ZERO_BLOCK = bytes(TAR_BLOCK)


def index_from_tar(data, where: str) -> str:
    """The index text `build_index` gives, from a tar's bytes: a walk over the USTAR headers (fast; checks each
    header's checksum). Archives with members our writer never makes (pax, GNU long names) go through tarfile."""
    members: list[tuple[str, int, int]] = []
    pos, n = 0, len(data)
    while pos + TAR_BLOCK <= n:
        h = bytes(data[pos : pos + TAR_BLOCK])
        if h == _ZERO_BLOCK:
            break
        chk = h[148:156].rstrip(b" \0")
        want = sum(h[:148]) + 8 * 32 + sum(h[156:])
        if not chk.isdigit() or int(chk, 8) != want:
            raise UserError(f"{where}: the tar header at byte {pos} is damaged (bad header checksum)")
        kind = h[156:157]
        if kind not in (b"0", b"\0", b"5"):
            return build_index(io.BytesIO(bytes(data)))
        name = h[:100].split(b"\0", 1)[0]
        if h[257:262] == b"ustar" and h[345] != 0:
            name = h[345:500].split(b"\0", 1)[0] + b"/" + name
        raw_size = h[124:136].rstrip(b" \0")
        if not raw_size.isdigit():
            raise UserError(f"{where}: the tar header at byte {pos} has no valid size")
        size = int(raw_size, 8)
        if kind != b"5":
            members.append((name.decode("utf-8", "replace"), pos + TAR_BLOCK, size))
        pos += TAR_BLOCK + _round_up(size)
    if pos > n:
        raise UserError(f"{where}: the last tar member runs past the end of the file (truncated)")
    return _index_text(members)


