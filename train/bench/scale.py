"""`ccl bench scale`: what grows with the training set on the way to WebVision size (2.4M samples).

For each N it writes a synthetic set laid out like WebVision (N samples in shards of `--shard-size`, 1,000
classes, no clean labels) and measures, in a fresh process so that the peak RSS is that step's own:

- loader start-up: opening the manifest, the label scan of every shard (`ShardSet.scan(verify=False)`, what
  `make_loader(..., checksum=False)` does before the first batch), the loader, and the first epoch's plan;
- one GMM fit: `gmm_confidence` (RoLR's settings) on N per-sample losses drawn from two overlapping modes;
- the per-sample buffers of a twin method (w and sample_loss, [2, N] float32 each) and the loader's index arrays;
- peak RSS after start-up and after the GMM, and the baseline after the imports.

The measured steps read no image: the tars hold only what the label scan reads (each sample's `cls` text and
24-byte `labels.i64`) at the offsets the index files name, and a zero-length `png` entry per sample, so the set
takes about 1 KB per sample on disk (2.4 GB at 2.4M) instead of WebVision's hundreds of GB. The scan runs on a
warm page cache here; on a cold disk it also pays one random read per sample.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional  # the command's annotations are evaluated in this module

import numpy as np

from ccl.errors import UserError

NUM_CLASSES = 1000  # WebVision 1.0
BLOCK = 512  # a tar block: every member's data starts on one


# ----------------------------------------------------------------------------------------------------------------
# The synthetic set


def write_synthetic(root: Path, n: int, shard_size: int, seed: int = 0) -> Path:
    """N samples in ceil(N / shard_size) shards + index files + manifest.json under root (reused if complete)."""
    from ccl.pipeline.shards import (
        INDEX_VERSION,
        LABELS_EXT,
        MANIFEST,
        index_name,
        sha256_bytes,
        sha256_file,
        shard_name,
        write_json_atomic,
    )

    root.mkdir(parents=True, exist_ok=True)
    if (root / MANIFEST).is_file():
        return root
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, n)
    shards = []
    for s, first in enumerate(range(0, n, shard_size)):
        count = min(shard_size, n - first)
        index = np.arange(first, first + count, dtype=np.int64)
        lab = labels[first : first + count]
        # One sample = two data blocks: [cls text][labels.i64]; the first block of the file stays empty.
        body = np.zeros((count, 2 * BLOCK), np.uint8)
        body[:, :4] = (lab[:, None] // np.array([1000, 100, 10, 1]) % 10 + ord("0")).astype(np.uint8)  # "0042"
        triples = np.stack([index, lab, np.full(count, -1)], axis=1).astype("<i8")  # [count, 3]
        body[:, BLOCK : BLOCK + 24] = triples.view(np.uint8).reshape(count, 24)
        tar = root / shard_name("train", s)
        with open(tar, "wb") as f:
            f.write(bytes(BLOCK))
            f.write(body.tobytes())
            f.write(bytes(2 * BLOCK))
        off = BLOCK + 2 * BLOCK * np.arange(count)
        lines = [f"png {o} 0 {k:09d}.png cls {o} 4 {k:09d}.cls {LABELS_EXT} {o + BLOCK} 24 {k:09d}.{LABELS_EXT}"
                 for o, k in zip(off.tolist(), index.tolist())]
        idx = f"{INDEX_VERSION} {count}\n" + "\n".join(lines) + "\n"
        (root / index_name(tar.name)).write_text(idx)
        shards.append({"file": tar.name, "index": index_name(tar.name), "count": count, "first_index": first,
                       "sha256": sha256_file(tar), "bytes": tar.stat().st_size,
                       "index_sha256": sha256_bytes(idx.encode())})
    manifest = {"format_version": 1, "dataset": "webvision-synthetic", "num_classes": NUM_CLASSES,
                "classes": [f"c{i}" for i in range(NUM_CLASSES)], "image_size": None,
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                "splits": {"train": {"count": n, "has_clean": False, "shards": shards}},
                "notes": ["ccl bench scale: label members only, no image bytes"]}
    write_json_atomic(root / MANIFEST, manifest)  # last: a set without it is unfinished
    return root


# ----------------------------------------------------------------------------------------------------------------
# The label scan, vectorised: a proposal for ccl.pipeline.shards.scan_shard(verify=False)


def label_scan_vectorised(root: Path, rec: dict, num_classes: int, has_clean: bool):
    """What `scan_shard(root, rec, ..., verify=False)` finds for a regular, undamaged shard, with numpy instead of
    a Python loop per sample: (offset, size, png, label, clean) arrays [count]. None when the shard is not
    regular (lines with other components, names with folders, a label that disagrees or is out of range):
    `scan_shard`'s loop then finds and names the problem, so the result is the same either way.

    Regular = every index line lists the same components in the same order, as the converter writes them. The
    index is split into tokens once (bytes.split, in C); the labels are read with one fancy index over the mmap.
    """
    import mmap

    from ccl.pipeline.shards import IMAGE_EXTS, LABELS_EXT

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
    if tar_size != int(rec["bytes"]) or (off % BLOCK).any() or (off < BLOCK).any() or (off + size > tar_size).any():
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


def label_scan_seconds(root: Path) -> float:
    """Time of the vectorised label scan over every shard of the train split (serial, one process)."""
    from ccl.pipeline.shards import ShardSet

    shards = ShardSet.open(root)
    meta = shards.manifest["splits"]["train"]
    t0 = time.perf_counter()
    for rec in meta["shards"]:
        if label_scan_vectorised(root, rec, shards.num_classes, meta["has_clean"]) is None:
            raise ValueError(f"{rec['file']}: not regular")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------------
# The measurement (in a fresh process per N)


def _rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(root: Path, batch_size: int = 256) -> dict:
    """Loader start-up, one GMM fit and the per-sample memory for the set at root (run in its own process)."""
    import torch
    from ccl.pipeline.loader import make_loader
    from ccl.pipeline.shards import ShardSet
    from ccl.train.losses.confidence import gmm_confidence

    base = _rss_mb()
    t0 = time.perf_counter()
    shards = ShardSet.open(root)
    t_open = time.perf_counter() - t0
    loader = make_loader(shards, "train", batch_size=batch_size, train=True, device="cpu", num_workers=0,
                         checksum=False)
    t_loader = time.perf_counter() - t0
    plan = loader.plan()  # the first epoch's index batches (a permutation of N)
    t_start = time.perf_counter() - t0
    labels, _ = shards.labels("train")  # what the loop keeps for the detection metrics (cached scan: a copy)
    rss_start = _rss_mb()
    n = shards.count("train")

    # The per-sample buffers of a twin method (Method.__init__): w and sample_loss, [2, N] float32.
    w, sample_loss = torch.ones(2, n), torch.zeros(2, n)
    gen = np.random.default_rng(0)
    noisy = gen.random(n) < 0.2  # losses from two overlapping modes, as after warm-up
    losses = np.where(noisy, gen.normal(3.0, 1.0, n), gen.gamma(1.5, 0.3, n)).clip(0).astype(np.float32)
    sample_loss[1] = torch.from_numpy(losses)
    t1 = time.perf_counter()
    w[0] = torch.from_numpy(gmm_confidence(sample_loss[1].numpy(), seed=0))  # one net's fit (Eq. 16)
    t_gmm = time.perf_counter() - t1
    t_vec = label_scan_seconds(root)  # the proposed replacement of the scan's per-sample loop, serial
    ix = loader.index
    index_bytes = sum(a.nbytes for a in (ix.shard, ix.offset, ix.size, ix.label, ix.clean, ix.keep))
    return {
        "n": n, "shards": len(shards.shards("train")),
        "startup_s": t_start, "open_manifest_s": t_open, "scan_s": shards.scan("train", verify=False).seconds,
        "loader_s": t_loader, "plan_s": t_start - t_loader, "gmm_s": t_gmm, "vectorised_scan_s": t_vec,
        "buffers_mb": (w.nbytes + sample_loss.nbytes) / 2**20, "index_mb": index_bytes / 2**20,
        "labels_mb": labels.nbytes / 2**20, "plan_mb": sum(b.nbytes for b in plan) / 2**20,
        "rss_baseline_mb": base, "rss_after_startup_mb": rss_start, "rss_peak_mb": _rss_mb(),
        "mean_w_clean": float(w[0][torch.from_numpy(~noisy)].mean()),
        "mean_w_noisy": float(w[0][torch.from_numpy(noisy)].mean()),
    }


# ----------------------------------------------------------------------------------------------------------------
# The command


def bench_scale(ns: tuple[int, ...], shard_size: int, root: Path | None, keep: bool, json_path: Path | None,
                console) -> list[dict]:
    if any(n < 2 for n in ns) or shard_size < 1:
        raise UserError("--n must be at least 2 and --shard-size at least 1")
    tmp = root is None
    root = Path(tempfile.mkdtemp(prefix="ccl-bench-scale-")) if tmp else Path(root)
    rows = []
    try:
        for n in ns:
            t0 = time.perf_counter()
            data = write_synthetic(root / f"n{n}-s{shard_size}", n, shard_size)
            made = time.perf_counter() - t0
            # A fresh interpreter per N: its peak RSS is this N's alone.
            code = ("import json, sys, pathlib; from ccl.train.bench.scale import measure; "
                    "print(json.dumps(measure(pathlib.Path(sys.argv[1]))))")
            out = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True, text=True,
                                 timeout=1800, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"measuring N={n} failed:\n{out.stderr[-4000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1]) | {"write_s": made}
            rows.append(row)
            console.print(f"N={n:,}: start-up {row['startup_s']:.2f} s (scan {row['scan_s']:.2f} s), GMM "
                          f"{row['gmm_s']:.2f} s, buffers {row['buffers_mb']:.1f} MB, peak RSS "
                          f"{row['rss_peak_mb']:.0f} MB (baseline {row['rss_baseline_mb']:.0f} MB)")
    finally:
        if tmp and not keep:
            shutil.rmtree(root, ignore_errors=True)
    _table(rows, console)
    if json_path:
        Path(json_path).write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=2) + "\n")
    return rows


def _table(rows: list[dict], console) -> None:
    from rich.table import Table

    t = Table(title="ccl bench scale: per-sample costs (synthetic WebVision layout, no image bytes)")
    cols = [("N", "n", "{:,}"), ("shards", "shards", "{}"), ("start-up s", "startup_s", "{:.2f}"),
            ("of it: scan s", "scan_s", "{:.2f}"), ("vectorised scan s", "vectorised_scan_s", "{:.2f}"), ("GMM fit s", "gmm_s", "{:.2f}"),
            ("buffers MB", "buffers_mb", "{:.1f}"), ("index MB", "index_mb", "{:.1f}"),
            ("peak RSS MB", "rss_peak_mb", "{:.0f}"), ("RSS baseline MB", "rss_baseline_mb", "{:.0f}")]
    for name, _, _ in cols:
        t.add_column(name, justify="right")
    for r in rows:
        t.add_row(*(fmt.format(r[key]) for _, key, fmt in cols))
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        per = (b["rss_peak_mb"] - a["rss_peak_mb"]) * 2**20 / max(b["n"] - a["n"], 1)
        t.caption = (f"peak RSS grows {per:.0f} bytes per sample from N={a['n']:,} to N={b['n']:,}; the O(N) "
                     f"arrays (buffers, index, labels, plan) account for "
                     f"{_per_sample(b) :.0f} bytes per sample")
    console.print(t)


def _per_sample(r: dict) -> float:
    return (r["buffers_mb"] + r["index_mb"] + r["labels_mb"] + r["plan_mb"]) * 2**20 / r["n"]


def register(bench_app) -> None:
    """Add `scale` to `ccl bench` (train/cli.py calls this)."""
    import typer

    @bench_app.command("scale")
    def scale_cmd(
        n: list[int] = typer.Option([100_000, 2_400_000], help="Training-set sizes (repeatable). WebVision is "
                                    "2.4M; mini-WebVision 66k."),
        shard_size: int = typer.Option(5000, help="Samples per shard."),
        root: Optional[Path] = typer.Option(None, help="Where to write the synthetic sets (about 1 KB per sample); "
                                            "reused when present. Default: a temporary folder, removed after.",
                                            show_default=False),
        keep: bool = typer.Option(False, "--keep", help="Keep the temporary sets."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this file."),
    ):
        """Loader start-up, GMM fit time and per-sample memory at WebVision size, on a synthetic set."""
        from ccl.train.cli import _run
        from rich.console import Console

        _run(bench_scale, ns=tuple(n), shard_size=shard_size, root=root, keep=keep, json_path=json_out,
             console=Console())
