"""Image structure: what the training decoders may be handed. `image_problem` walks a PNG's chunks (CRCs, IHDR,
the zlib stream) or a JPEG's markers and Huffman tables without decoding pixels, so that no image libpng or
libjpeg would refuse (or crash on) reaches them."""

from __future__ import annotations

import re
import zlib

import numpy as np


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


