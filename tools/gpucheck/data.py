"""The synthetic shard sets the checks train and measure on, and the import shim that makes a checkout importable."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from gpucheck.settings import MODES, ROOT


# ---------------------------------------------------------------------------------------------------------------
# Synthetic shards
# ---------------------------------------------------------------------------------------------------------------


def set_path(out: Path, name: str, spec) -> Path:
    px, fmt, train, test = spec
    return out / "data" / f"{name}-{px}px-{fmt}-n{train}-t{test}"


def _texture(rng, px: int):
    """A photo-like uint8 [px, px, 3] image: smooth colour blobs plus sensor-like noise, so that the JPEG/PNG sizes
    and decode costs resemble real images rather than flat or white-noise ones."""
    import numpy as np
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((px, px), Image.BICUBIC), dtype=np.float32)  # [px, px, 3]
    return np.clip(smooth + rng.normal(0.0, 8.0, smooth.shape), 0, 255).astype(np.uint8)


def _write_images(job) -> None:
    """Write images [lo, hi) of one split into class folders (a pool task; its own seed, so any split is the same)."""
    import numpy as np
    from PIL import Image

    folder, px, fmt, lo, hi, seed = job
    rng = np.random.default_rng(seed)
    for i in range(lo, hi):
        img = Image.fromarray(_texture(rng, px))
        path = folder / f"c{int(rng.integers(10))}" / f"{i:06d}.{fmt}"
        img.save(path, quality=90) if fmt == "jpg" else img.save(path)


def make_data(out: Path, mode: str, names: list[str]) -> None:
    """Build each named set (once: a set whose manifest exists is reused) through the converter, as real data is."""
    from concurrent.futures import ProcessPoolExecutor

    from ccl.pipeline.convert import ConvertOptions, convert

    cpus = os.cpu_count() or 1
    for partial in (out / "data").glob(".raw-*"):  # left by a build that was cut short
        shutil.rmtree(partial, ignore_errors=True)
    for name in names:
        spec = MODES[mode]["sets"][name]
        final = set_path(out, name, spec)
        if (final / "manifest.json").is_file():
            continue
        px, fmt, train, test = spec
        t0 = time.monotonic()
        raw = out / "data" / f".raw-{os.getpid()}" / f"synthetic{px}"  # its name becomes the data set's name
        jobs = []
        for s, (split, count) in enumerate((("train", train), ("test", test))):
            for c in range(10):
                (raw / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            step = max(64, -(-count // cpus))
            jobs += [(raw / split, px, fmt, lo, min(lo + step, count), [px, count, s, lo])
                     for lo in range(0, count, step)]
        with ProcessPoolExecutor(min(cpus, len(jobs))) as pool:
            list(pool.map(_write_images, jobs))
        # the smoke sets are a few images over 10 random classes: some classes may hold none, kept as classes
        opts = ConvertOptions(noise="sym", noise_rate=0.4, seed=0, shard_size=2048, workers=cpus, progress=False,
                              overwrite=True, allow_empty_classes=True)
        convert("folder", raw, final, opts, log=lambda s: None)
        shutil.rmtree(raw.parent, ignore_errors=True)
        print(f"{final.name}: {time.monotonic() - t0:.1f} s", flush=True)


def make_shim(dest: Path) -> None:
    """A folder of symbolic links that lays this checkout out as the installed package is laid out (pyproject's
    package-dir: ccl.pipeline -> pipeline/, ...), for PYTHONPATH, so the check runs this checkout's code on a
    machine where it is not installed. Every child process sees it through the environment; nothing is installed."""
    import tomllib

    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(dest, ignore_errors=True)
    top = dest / "ccl"
    top.mkdir(parents=True)
    # The top package's own files first, then each mapped folder unless a link above it already covers it.
    for entry in (ROOT / package_dir.get("ccl", "ccl")).iterdir():
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for pkg, folder in sorted(package_dir.items(), key=lambda kv: kv[0].count(".")):
        parts = pkg.split(".")
        if parts[0] != "ccl" or len(parts) == 1:
            continue
        link = dest.joinpath(*parts)
        if link.exists():  # reached through a parent link: must be the same folder
            if link.resolve() != (ROOT / folder).resolve():
                raise SystemExit(f"shim: {pkg} -> {folder} is not below its parent's folder")
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT / folder, target_is_directory=True)
