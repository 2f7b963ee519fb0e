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

from ccl import files
from ccl.errors import UserError

NUM_CLASSES = 1000  # WebVision 1.0
BLOCK = 512  # a tar block: every member's data starts on one


# ----------------------------------------------------------------------------------------------------------------
# The synthetic set


def write_synthetic(root: Path, n: int, shard_size: int, seed: int = 0) -> Path:
    """N samples in ceil(N / shard_size) shards + index files + manifest.json under root (reused if complete)."""
    from ccl.pipeline.manifest import MANIFEST
    from ccl.pipeline.tarshard import INDEX_VERSION, LABELS_EXT, index_name, sha256_bytes, sha256_file, shard_name

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
        files.write_atomic(root / index_name(tar.name), idx)
        shards.append({"file": tar.name, "index": index_name(tar.name), "count": count, "first_index": first,
                       "sha256": sha256_file(tar), "bytes": tar.stat().st_size,
                       "index_sha256": sha256_bytes(idx.encode())})
    manifest = {"format_version": 1, "dataset": "webvision-synthetic", "num_classes": NUM_CLASSES,
                "classes": [f"c{i}" for i in range(NUM_CLASSES)], "image_size": None,
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                "splits": {"train": {"count": n, "has_clean": False, "shards": shards}},
                "notes": ["ccl bench scale: label members only, no image bytes"]}
    files.write_json(root / MANIFEST, manifest, indent=1)  # last: a set without it is unfinished
    return root


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
    ix = loader.index
    index_bytes = sum(a.nbytes for a in (ix.shard, ix.offset, ix.size, ix.label, ix.clean, ix.keep))
    return {
        "n": n, "shards": len(shards.shards("train")),
        "startup_s": t_start, "open_manifest_s": t_open, "scan_s": shards.scan("train", verify=False).seconds,
        "loader_s": t_loader, "plan_s": t_start - t_loader, "gmm_s": t_gmm,
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
            code = ("import json, sys, pathlib; from ccl.bench.scale import measure; "
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
        files.write_json(Path(json_path), {"command": sys.argv, "rows": rows}, indent=2)
    return rows


def _table(rows: list[dict], console) -> None:
    from rich.table import Table

    t = Table(title="ccl bench scale: per-sample costs (synthetic WebVision layout, no image bytes)")
    cols = [("N", "n", "{:,}"), ("shards", "shards", "{}"), ("start-up s", "startup_s", "{:.2f}"),
            ("of it: scan s", "scan_s", "{:.2f}"), ("GMM fit s", "gmm_s", "{:.2f}"),
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
    """Add `scale` to `ccl bench` (`ccl.bench.cli` calls this)."""
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
        from rich.console import Console

        bench_scale(ns=tuple(n), shard_size=shard_size, root=root, keep=keep, json_path=json_out,
             console=Console())
