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

import ctypes
import hashlib
import io
import json
import mmap
import os
import re
import signal
import sys
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from ccl import files
from ccl.errors import UserError
from ccl.pipeline import manifest as schema
from ccl.pipeline.manifest import FORMAT_VERSION  # noqa: F401 - the writer's format, re-exported

MANIFEST = "manifest.json"
LABELS_EXT = "labels.i64"
IMAGE_EXTS = ("jpg", "png")
# DALI's wds2idx writes this version tag; its reader parses the same layout.
INDEX_VERSION = "v1.2"
_TAR_BLOCK = 512


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


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a hidden temporary sibling, fsync, then rename over `path` (`ccl.files.write_atomic`: a
    refused write is one line naming the path and the free space, and leaves no temporary file)."""
    files.write_atomic(path, data)


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, (dumps_json(obj) + "\n").encode())


def dumps_json(obj, indent: int = 1, _level: int = 0) -> str:
    """Indented JSON that keeps lists of scalars (mean, a transition-matrix row) on one line."""
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    if isinstance(obj, dict) and obj:
        body = ",\n".join(f"{inner}{json.dumps(str(k))}: {dumps_json(v, indent, _level + 1)}" for k, v in obj.items())
        return "{\n" + body + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (dict, list, tuple)) for v in obj):
        body = ",\n".join(inner + dumps_json(v, indent, _level + 1) for v in obj)
        return "[\n" + body + "\n" + pad + "]"
    return json.dumps(obj)


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
    h = bytearray(_TAR_BLOCK)
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


_TAR_RECORD = 20 * _TAR_BLOCK  # tar archives end on a whole record, as tarfile and GNU tar write them


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
            fields.append(f"{comp} {self._offset + _TAR_BLOCK} {size} {name}")  # data follow their header
            self._offset += _TAR_BLOCK + size + pad
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
        end = self._offset + 2 * _TAR_BLOCK
        self._file.write(bytes(2 * _TAR_BLOCK + (-end) % _TAR_RECORD))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        n = len(self.shards)
        name = shard_name(self.split, n)
        idx_text = f"{INDEX_VERSION} {len(self._index_lines)}\n" + "".join(line + "\n" for line in self._index_lines)
        idx_bytes = idx_text.encode()
        write_atomic(self.out_dir / index_name(name), idx_bytes)
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
    return (n + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


def build_index(tar_path: Path) -> str:
    """DALI's index text for an existing tar (the layout `wds2idx` writes), read with tarfile."""
    lines: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, comp = _split_path(member.name)
            # Like wds2idx: names without a key (hidden files, directories' entries) belong to no sample.
            if not key or key.endswith("/"):
                continue
            field = f"{comp} {member.offset_data} {member.size} {member.name}"
            if key != last_key:
                lines.append([field])
                last_key = key
            else:
                lines[-1].append(field)
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(" ".join(f) + "\n" for f in lines)


def _split_path(name: str) -> tuple[str, str]:
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
            if off_i % _TAR_BLOCK or off_i < _TAR_BLOCK:
                raise UserError(f"{where}:{n}: offset {off_i} of {comp} is not where a tar member's data can start")
            if tar_size is not None and off_i + size_i > tar_size:
                raise UserError(f"{where}:{n}: {comp} at {off_i}+{size_i} lies past the end of the tar ({tar_size} "
                                "bytes)")
            if comp in comps:
                raise UserError(f"{where}:{n}: component {comp!r} listed twice")
            comps[comp] = IndexField(off_i, size_i, name)
        samples.append(comps)
    return samples


def parse_index(path: Path, tar_size: int | None = None) -> list[dict[str, tuple[int, int]]]:
    """Per sample, {component: (data offset, size)} from a DALI index file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the index file ({e.strerror})") from None
    return [{c: (f.offset, f.size) for c, f in s.items()} for s in parse_index_text(raw, str(path), tar_size)]


_ZERO_BLOCK = bytes(_TAR_BLOCK)


def index_from_tar(data, where: str) -> str:
    """The index text `build_index` gives, from a tar's bytes: a walk over the USTAR headers (fast; checks each
    header's checksum). Archives with members our writer never makes (pax, GNU long names) go through tarfile."""
    lines: list[list[str]] = []
    last_key = None
    pos, n = 0, len(data)
    while pos + _TAR_BLOCK <= n:
        h = bytes(data[pos : pos + _TAR_BLOCK])
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
            key, comp = _split_path(name.decode("utf-8", "replace"))
            if key and not key.endswith("/"):
                field_ = f"{comp} {pos + _TAR_BLOCK} {size} {name.decode('utf-8', 'replace')}"
                if key != last_key:
                    lines.append([field_])
                    last_key = key
                else:
                    lines[-1].append(field_)
        pos += _TAR_BLOCK + _round_up(size)
    if pos > n:
        raise UserError(f"{where}: the last tar member runs past the end of the file (truncated)")
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(" ".join(f) + "\n" for f in lines)


# ----------------------------------------------------------------------------------------------------------------
# Image structure: what the training decoders may be handed
#
# torchvision's PNG decoder (libpng) dies with SIGSEGV on *any* libpng error (a CRC error, a bad filter byte, a
# broken zlib stream), and DALI's decoder can crash on a JPEG with garbage markers. So the bytes are checked here
# first, completely for PNG (every chunk CRC, the zlib stream and its Adler-32, the size of the inflated rows and
# every row's filter byte: everything libpng refuses) and structurally for JPEG (markers, segment lengths, frame,
# Huffman and quantisation tables, scans; damage inside the entropy-coded data still decodes, to other pixels,
# which only the checksums catch). Stricter than the decoders is fine: the converter re-encodes what fails here.

MAX_PIXELS = 178_956_970  # PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type -> depths
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_JPEG_FRAMES = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}  # what every decoder here reads
# In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte), RST0-7, or more 0xFF fill before a marker.
_JPEG_MARKER_IN_SCAN = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


def image_problem(data, size: tuple[int, int] | None = None) -> str | None:
    """Why these bytes must not reach a decoder, or None for a well-formed PNG or JPEG (of `size` = (height,
    width), when given: a set of fixed-size images is batched without a resize, and DALI cannot stack an
    image of another size)."""
    data = bytes(data)
    kind = "PNG" if data.startswith(_PNG_SIGNATURE) else "JPEG"
    try:
        if kind == "PNG":
            got = _png_problem(data)
        elif data.startswith(b"\xff\xd8"):
            got = _jpeg_problem(data)
        else:
            return f"neither PNG nor JPEG (starts {data[:8].hex(' ') or 'empty'})"
    except (IndexError, ValueError, zlib.error) as e:  # a field read past the end, a broken zlib stream
        return f"{kind}: {e}"
    if isinstance(got, str):
        return got
    if size is not None and got != tuple(size):
        return f"{kind}: {got[1]}x{got[0]} pixels, but the set's images are {size[1]}x{size[0]}"
    return None


def _png_problem(data: bytes) -> str | tuple[int, int]:
    """The problem, or (height, width) of a well-formed PNG."""
    pos, n = len(_PNG_SIGNATURE), len(data)
    ihdr = None
    idat: list[bytes] = []
    idat_done = have_plte = False
    while True:
        if pos + 12 > n:
            return "PNG: truncated (no IEND chunk)"
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype = data[pos + 4 : pos + 8]
        if length > 0x7FFFFFFF or pos + 12 + length > n:
            return f"PNG: truncated, or a bad length: the chunk at byte {pos} runs past the end ({length} bytes)"
        if not ctype.isalpha():  # bytes.isalpha: ASCII letters only
            return f"PNG: bad chunk type {ctype!r} at byte {pos}"
        body = data[pos + 8 : pos + 8 + length]
        if zlib.crc32(body, zlib.crc32(ctype)) != int.from_bytes(data[pos + 8 + length : pos + 12 + length], "big"):
            return f"PNG: CRC mismatch in chunk {ctype.decode()}"
        pos += 12 + length
        name = ctype.decode()
        if ihdr is None:
            if name != "IHDR" or length != 13:
                return "PNG: does not start with a 13-byte IHDR chunk"
            w, h = int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big")
            depth, color, comp, filt, interlace = body[8:13]
            if not (0 < w <= 1_000_000 and 0 < h <= 1_000_000) or w * h > MAX_PIXELS:
                return f"PNG: image size {w}x{h} out of range"
            if depth not in _PNG_DEPTHS.get(color, ()):
                return f"PNG: bit depth {depth} with colour type {color} is invalid"
            if depth == 16:  # torchvision decodes it to uint16, which an 8-bit batch would misread (as black)
                return "PNG: 16-bit samples; the loaders read 8 bits (tools/shard.py stores such images as 8-bit)"
            if comp or filt or interlace > 1:
                return "PNG: unknown compression, filter or interlace method"
            ihdr = (w, h, depth, color, interlace)
            continue
        if name == "IHDR":
            return "PNG: second IHDR chunk"
        if name == "PLTE":
            if idat or have_plte or length % 3 or not 0 < length <= 768 or ihdr[3] in (0, 4):
                return "PNG: misplaced or invalid PLTE chunk"
            have_plte = True
        elif name == "IDAT":
            if idat_done:
                return "PNG: IDAT chunks are not consecutive"
            idat.append(body)
            continue
        elif name == "IEND":
            break
        elif ctype[0] & 0x20 == 0:  # an unknown critical chunk: libpng refuses the image
            return f"PNG: unknown critical chunk {name}"
        if idat:
            idat_done = True
    if not idat:
        return "PNG: no image data (IDAT)"
    w, h, depth, color, interlace = ihdr
    if color == 3 and not have_plte:
        return "PNG: palette image without PLTE"
    bits = _PNG_CHANNELS[color] * depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    rows = []  # (row count, stride incl. the filter byte) per pass
    for x0, y0, dx, dy in passes:
        pw, ph = (w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy
        if pw > 0 and ph > 0:
            rows.append((ph, 1 + (pw * bits + 7) // 8))
    expect = sum(r * s for r, s in rows)
    z = zlib.decompressobj()
    raw = z.decompress(b"".join(idat), expect + 1)  # at most one byte more than needed: no inflate bomb
    if len(raw) > expect:
        return f"PNG: image data inflates to more than the {expect} bytes of a {w}x{h} image"
    if len(raw) < expect:
        return f"PNG: image data inflates to {len(raw)} bytes, a {w}x{h} image needs {expect}"
    if not z.eof:
        return "PNG: image data stream does not end"
    at = 0
    buf = np.frombuffer(raw, dtype=np.uint8)
    for r, stride in rows:
        if buf[at : at + r * stride].reshape(r, stride)[:, 0].max() > 4:
            return "PNG: bad row filter type"
        at += r * stride
    return h, w


def _huffman_ok(counts: bytes) -> bool:
    """libjpeg's check of a DHT table (jdhuff.c, "Bogus Huffman table definition")."""
    last = max((i for i, c in enumerate(counts, 1) if c), default=0)
    code = 0
    for length in range(1, last + 1):
        code += counts[length - 1]
        if code >= 1 << length:
            return False
        code <<= 1
    return True


def _jpeg_problem(data: bytes) -> str | tuple[int, int]:
    """The problem, or (height, width) of a structurally sound JPEG."""
    pos, n = 2, len(data)
    frame = None  # {component id: (quant table, blocks per MCU)}
    size_hw = (0, 0)
    qt: set[int] = set()
    dc: set[int] = set()
    ac: set[int] = set()
    scans = 0
    progressive = False
    while True:
        if pos >= n or data[pos] != 0xFF:
            return "JPEG: truncated (no EOI marker)" if pos >= n else f"JPEG: expected a marker at byte {pos}"
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            return "JPEG: truncated (no EOI marker)"
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return (size_hw if scans else "JPEG: ends before any image data")
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            return f"JPEG: unexpected marker 0xFF{marker:02X}"
        if pos + 2 > n:
            return "JPEG: truncated segment"
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            return f"JPEG: segment 0xFF{marker:02X} has a bad length {length}"
        if pos + length > n:
            return f"JPEG: truncated, or a bad length: segment 0xFF{marker:02X} runs past the end ({length} bytes)"
        seg = data[pos + 2 : pos + length]
        pos += length
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _JPEG_FRAMES:
                return f"JPEG: unsupported coding (SOF 0xFF{marker:02X}: lossless, hierarchical or arithmetic)"
            if frame is not None:
                return "JPEG: second frame header"
            if len(seg) < 6 or seg[0] != 8:
                return "JPEG: frame header is not 8-bit"
            h, w, nf = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5]
            if not (h and w) or h * w > MAX_PIXELS or nf not in (1, 3, 4) or len(seg) != 6 + 3 * nf:
                return f"JPEG: bad frame header ({w}x{h}, {nf} components)"
            size_hw = (h, w)
            frame = {}
            for c in range(nf):
                cid, hv, tq = seg[6 + 3 * c : 9 + 3 * c]
                if not (1 <= hv >> 4 <= 4 and 1 <= hv & 15 <= 4) or tq > 3 or cid in frame:
                    return "JPEG: bad frame component"
                frame[cid] = (tq, (hv >> 4) * (hv & 15))
            progressive = marker == 0xC2
        elif marker == 0xC4:
            at = 0
            while at < len(seg):
                tc, th = seg[at] >> 4, seg[at] & 15
                counts = seg[at + 1 : at + 17]
                total = sum(counts)
                if tc > 1 or th > 3 or len(counts) != 16 or total > 256 or at + 17 + total > len(seg):
                    return "JPEG: bad Huffman table"
                symbols = seg[at + 17 : at + 17 + total]
                if not _huffman_ok(counts) or (tc == 0 and total and max(symbols) > 15):
                    return "JPEG: bogus Huffman table"
                (ac if tc else dc).add(th)
                at += 17 + total
        elif marker == 0xDB:
            at = 0
            while at < len(seg):
                pq, tq = seg[at] >> 4, seg[at] & 15
                size = 64 * (pq + 1)
                if pq > 1 or tq > 3 or at + 1 + size > len(seg):
                    return "JPEG: bad quantisation table"
                qt.add(tq)
                at += 1 + size
        elif marker == 0xDD:
            if length != 4:
                return "JPEG: bad restart interval segment"
        elif marker == 0xDA:
            if frame is None:
                return "JPEG: scan before the frame header"
            ns = seg[0] if seg else 0
            if not 1 <= ns <= 4 or len(seg) != 4 + 2 * ns:
                return "JPEG: bad scan header"
            ss, se, ahl = seg[1 + 2 * ns], seg[2 + 2 * ns], seg[3 + 2 * ns]
            if progressive:
                if ss > se or se > 63 or (ss == 0 and se) or ahl >> 4 > 13 or ahl & 15 > 13:
                    return "JPEG: bad progressive scan parameters"
            elif ss or se != 63 or ahl:
                return "JPEG: bad sequential scan parameters"
            blocks = 0
            for c in range(ns):
                cid, tables = seg[1 + 2 * c], seg[2 + 2 * c]
                if cid not in frame or frame[cid][0] not in qt:
                    return "JPEG: scan names an unknown component or undefined quantisation table"
                blocks += frame[cid][1]
                if (ss == 0 and (tables >> 4) not in dc) or (se > 0 and (tables & 15) not in ac):
                    return "JPEG: scan uses an undefined Huffman table"
            if ns > 1 and blocks > 10:
                return "JPEG: too many blocks per MCU"
            scans += 1
            m = _JPEG_MARKER_IN_SCAN.search(data, pos)
            if m is None:
                return "JPEG: truncated (no EOI marker)"
            pos = m.start()
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:
            pass  # APPn (JFIF, Exif, ICC) and comments
        else:
            return f"JPEG: unsupported marker 0xFF{marker:02X}"


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
    if tar_size != int(rec["bytes"]) or (off % _TAR_BLOCK).any() or (off < _TAR_BLOCK).any():
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
                if _split_path(fld.name)[0].rsplit("/", 1)[-1] != key:
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


def _scan_task(args) -> ShardScan:
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

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(len(tasks), cores if workers is None else max(1, workers))
    total = sum(int(t[1]["bytes"]) for t in tasks)
    if workers <= 1 or total < (64 << 20) or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(_scan_task, tasks)
        return
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        yield from pool.map(_scan_task, tasks)


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
        """Decoded samples in index order."""
        for tar in self.shards(split):
            for comps in _iter_tar_samples(tar):
                index, label, clean = unpack_labels(comps[LABELS_EXT])
                data = comps.get("jpg", comps.get("png"))
                if data is None:
                    raise UserError(f"{tar}: sample {index} has no jpg or png component")
                yield Sample(index, label, clean, decode_image(data))


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
    """Where each sample of a split lives, from the split's index files (read by `parse_index_text`)."""
    tars = shards.shards(split)
    n = shards.count(split)
    shard = np.empty(n, np.int32)
    offset = np.empty(n, np.int64)
    size = np.empty(n, np.int64)
    ext: list[str] = []
    key: list[str] = []
    pos = 0
    for s, idx in enumerate(shards.index_files(split)):
        try:
            raw = idx.read_bytes()
        except OSError as e:
            raise UserError(f"{idx}: cannot read ({e.strerror}); every shard has a DALI index next to it "
                            "(reconvert with tools/shard.py)") from None
        for comps in parse_index_text(raw, str(idx)):
            image = next((e for e in IMAGE_EXTS if e in comps), None)
            if image is None:
                raise UserError(f"{idx}: sample {pos} has no {' or '.join(IMAGE_EXTS)} component")
            if pos >= n:
                raise UserError(f"split {split!r}: the shards hold more samples than the manifest's {n}")
            field_ = comps[image]
            shard[pos], offset[pos], size[pos] = s, field_.offset, field_.size
            ext.append(image)
            key.append(_split_path(field_.name)[0])
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


def _iter_tar_samples(tar_path: Path) -> Iterator[dict[str, bytes]]:
    """Group a tar's members into {component: bytes} dicts by key (everything before the first dot)."""
    current_key, comps = None, {}
    with tarfile.open(tar_path, "r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, comp = _split_path(member.name)
            if key != current_key:
                if comps:
                    yield comps
                current_key, comps = key, {}
            comps[comp] = tar.extractfile(member).read()
    if comps:
        yield comps


# ----------------------------------------------------------------------------------------------------------------
# Processes


def die_with_parent(parent: int) -> None:
    """Make this (child) process end when `parent` does, even by kill -9 (which runs no cleanup in the parent).

    Linux: the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG). Elsewhere: a daemon thread
    polls the parent pid. Used as the initializer of every worker pool here, so that killing the converter or
    the trainer leaves no worker blocked on a queue nobody reads.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0:  # 1 = PR_SET_PDEATHSIG
                if os.getppid() != parent:  # the parent died before the call: the signal will never come
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="die-with-parent").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)
