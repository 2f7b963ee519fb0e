"""Raw data sets -> WebDataset shards + manifest: the engine behind tools/shard.py.

One reader per source format lists the samples of each split in a deterministic order (`Item`s carrying a file
path or a pixel array, and the source's label). The engine then
  1. sets the training labels (the source's, a label file's, or synthetic noise; the true label is kept),
  2. reads, verifies (a full decode, and the structure check the loaders apply before any decoder sees a byte:
     what fails it but decodes in PIL is re-encoded as PNG) and encodes the images over a process pool, in
     bounded ordered chunks,
  3. writes them in index order through `ShardWriter` (temporary name, rename, DALI index per tar),
  4. writes manifest.json last, atomically.
Nothing in the output depends on the wall clock or on the number of workers.
"""

from __future__ import annotations

import dataclasses
import io
import math
import multiprocessing
import os
import re
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

import ccl
from ccl import files
from ccl.errors import UserError
from ccl.pipeline import manifest as schema
from ccl.pipeline.convert import noise as noise_mod
from ccl.pipeline.convert.animal10n import read_animal10n
from ccl.pipeline.convert.cifar import read_cifar
from ccl.pipeline.convert.digits import read_digits
from ccl.pipeline.convert.folder import read_folder
from ccl.pipeline.convert.source import (
    MAX_IMAGE_BYTES, SPLIT_SEED, ConvertOptions, Item, NotAnImage, Source, read_image_file,
)  # fmt: skip
from ccl.pipeline.convert.webvision import read_webvision
from ccl.progress import Bars
from ccl.pipeline.imagecheck import image_problem
from ccl.pipeline.manifest import FORMAT_VERSION, MANIFEST
from ccl.pipeline.procs import die_with_parent
from ccl.pipeline.tarshard import ShardWriter

FEATURE_SIZE = 32  # instance noise: images are compared as 32x32 RGB (CIFAR's own size)
CHUNK = 64  # items per worker task
STATS_IMAGES = 50_000  # mean/std use at most about this many train images
MIN_STD = 1 / 255  # the smallest std written: one grey level
_OUTPUT_FILE = re.compile(r"^([A-Za-z0-9_]+-\d{6}\.(tar|idx)|check\.json)$")  # check.json: `ccl check`'s report


def _read_digits(src, opts: ConvertOptions) -> Source:
    if src not in (None, "", "-"):
        raise UserError(f"digits is built in and takes no SRC (got {src}); pass '-' or leave it out")
    return read_digits()


# The one list of source formats: FORMAT -> reader(src, opts). tools/shard.py and the CLI take their names from it.
READERS: dict[str, Callable[..., Source]] = {
    "digits": _read_digits,
    "cifar10": lambda src, opts: read_cifar(src, "cifar10"),
    "cifar100": lambda src, opts: read_cifar(src, "cifar100"),
    "animal10n": lambda src, opts: read_animal10n(src),
    "webvision": read_webvision,
    "folder": lambda src, opts: read_folder(src, opts.test_fraction, opts.allow_empty_classes),
}
FORMATS = tuple(READERS)


def read_source(fmt: str, src, opts: ConvertOptions) -> Source:
    if fmt not in READERS:
        raise UserError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return READERS[fmt](src, opts)


# ----------------------------------------------------------------------------------------------------------------
# Workers: read, verify by a full decode, encode. Module-level functions so the pool can pickle them.


def _encode_chunk(task: tuple[list[Item], list[bool], int]) -> list[tuple]:
    items, want_stats, max_bytes = task
    return [_encode_one(it, w, max_bytes) for it, w in zip(items, want_stats)]


def _encode_one(item: Item, want_stats: bool, max_bytes: int = MAX_IMAGE_BYTES) -> tuple:
    """("ok", bytes, ext, h, w, stats | None, reencoded) or ("bad", reason). JPEG and PNG bytes are kept as they
    are when they pass the shard reader's structure check (`image_problem`, what every training decoder can be
    handed); otherwise the image is stored as PNG re-encoded from PIL's decode, and `reencoded` says why.

    stats = (per-channel pixel sums, sums of squares, pixel count) as exact integers, so mean/std do not
    depend on summation order.
    """
    from PIL import Image

    stats = None
    reencoded = None
    try:
        if item.array is not None:
            im = Image.fromarray(np.ascontiguousarray(item.array))  # [H, W, 3] uint8 -> RGB
            data, ext = _png_bytes(im), "png"
            w, h = im.size
            if want_stats:
                stats = _rgb_stats(im)
        else:
            data = read_image_file(item.path, max_bytes)
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # a full decode: truncated or corrupt files fail here, not in training
                w, h = im.size
                ext = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}.get(im.format)
                if ext is None:  # BMP, GIF, WebP, TIFF...: not every loader decodes them, so store PNG
                    reencoded = f"{im.format or 'unknown'} format"
                else:
                    # PIL decodes some files the training decoders refuse or crash on (a PNG with a broken
                    # ancillary chunk, a JPEG with an odd marker, arithmetic coding): store PIL's pixels.
                    reencoded = image_problem(data)
                if want_stats or reencoded:
                    rgb = rgb8(im)
                    if want_stats:
                        stats = _rgb_stats(rgb)
                    if reencoded:
                        data, ext = _png_bytes(rgb), "png"
        why = image_problem(data)
        if why is not None:  # PIL's own PNG failing the check would be a bug of ours, not bad input
            raise AssertionError(f"re-encoded PNG fails the structure check: {why}")
    except FileNotFoundError:
        return ("bad", "missing file")
    except NotAnImage as e:
        return ("bad", str(e))
    except AssertionError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError...; all mean "undecodable"
        return ("bad", _reason(e))
    return ("ok", data, ext, int(h), int(w), stats, reencoded)


def _reason(e: Exception) -> str:
    """An exception as a reason for the manifest, without object addresses ("<_io.BytesIO object at 0x7f..>"),
    so that identical conversions write identical manifests."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e))
    return f"{type(e).__name__}: {text}".rstrip(": ")


_LEVELS = np.arange(256, dtype=np.int64)


def _rgb_stats(im) -> tuple[list[int], list[int], int]:
    # PIL's histogram of an RGB image is 3 x 256 counts and costs almost nothing next to the decode.
    hist = np.asarray(im.histogram(), dtype=np.int64).reshape(3, 256)  # [3, 256]
    return (hist @ _LEVELS).tolist(), (hist @ (_LEVELS * _LEVELS)).tolist(), int(hist[0].sum())


def _png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def rgb8(im):
    """8-bit RGB pixels of a decoded PIL image. 16-bit grey (PIL's I;16 modes, or I from a PNG) keeps its top
    byte, the rule PIL itself applies to 16-bit colour PNGs; PIL's convert("RGB") would clip it at 255 instead."""
    from PIL import Image

    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        grey = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)  # [H, W]
        return Image.fromarray(grey, "L").convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _feature_chunk(task: tuple[list[Item], int]) -> np.ndarray:
    """uint8 [n, 3*32*32]: images resized to 32x32 RGB, flattened in CHW order, the layout of CIFAR's pickles that
    Xia et al.'s instance-noise generator reads (zeros where a file does not decode)."""
    from PIL import Image

    items, max_bytes = task
    out = np.zeros((len(items), FEATURE_SIZE * FEATURE_SIZE * 3), dtype=np.uint8)
    for i, it in enumerate(items):
        try:
            if it.array is not None:
                im = Image.fromarray(np.ascontiguousarray(it.array))
            else:
                im = Image.open(io.BytesIO(read_image_file(it.path, max_bytes)))
                im.load()
            im = rgb8(im)
            if im.size != (FEATURE_SIZE, FEATURE_SIZE):
                im = im.resize((FEATURE_SIZE, FEATURE_SIZE), Image.BILINEAR)
            out[i] = np.asarray(im).transpose(2, 0, 1).reshape(-1)  # HWC -> CHW
        except Exception:  # undecodable: skipped later by the encode pass, which records why
            pass
    return out


class _Runner:
    """Ordered, bounded parallel map over chunks: at most `depth` chunks in flight, results in input order.

    (Executor.map submits everything at once and would hold every encoded image in memory when the writer
    falls behind.)"""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.pool = None
        if self.workers > 1:
            methods = multiprocessing.get_all_start_methods()
            # fork starts workers in milliseconds; the workers only use numpy and PIL.
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            # die_with_parent: a kill -9 of the converter must not leave its workers blocked on a dead queue.
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=die_with_parent,
                                            initargs=(os.getpid(),))
            # Start the workers now, before the progress bar's thread exists: forking a threaded parent is unsafe.
            self.pool.submit(int).result()

    def map(self, fn: Callable, tasks: Iterator) -> Iterator:
        if self.pool is None:
            yield from map(fn, tasks)
            return
        pending: deque = deque()
        depth = 4 * self.workers
        for task in tasks:
            pending.append(self.pool.submit(fn, task))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)


def _chunks(seq: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(seq), size):
        yield list(seq[start : start + size])


# ----------------------------------------------------------------------------------------------------------------
# Output directory


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out} is a file; expected a directory for the shards")
    if (out / MANIFEST).exists() and not overwrite:
        raise UserError(f"{out} already holds a complete shard set ({MANIFEST}); pass --overwrite to replace it")


def _clean_out(out: Path) -> None:
    """Remove a previous (partial or overwritten) conversion's files; leave anything else alone."""
    files.make_dir(out)
    # The manifest goes first, so an interrupted overwrite never looks complete.
    (out / MANIFEST).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.is_file() and (_OUTPUT_FILE.match(p.name) or (p.name.startswith(".") and p.name.endswith(".partial"))):
            p.unlink()


# ----------------------------------------------------------------------------------------------------------------
# The engine


def convert(fmt: str, src, out, opts: ConvertOptions = ConvertOptions(), log: Callable[[str], None] = print) -> dict:
    """Convert one raw data set into OUT. Returns {"manifest", "images", "seconds", "images_per_s"}."""
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if opts.noise not in noise_mod.NOISE_TYPES:
        raise UserError(f"--noise must be one of {', '.join(noise_mod.NOISE_TYPES)}, got {opts.noise!r}")
    noise_mod.check_rate(opts.noise_rate)
    if opts.labels and opts.noise != "none":
        raise UserError("--labels and --noise both set the train labels; give one of them")
    if opts.noise != "none" and opts.noise_rate == 0.0:
        raise UserError(f"--noise {opts.noise} needs --noise-rate R with 0 < R < 1")
    if opts.noise == "none" and opts.noise_rate:
        raise UserError(f"--noise-rate needs --noise {'|'.join(t for t in noise_mod.NOISE_TYPES if t != 'none')}")
    if opts.shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {opts.shard_size}")
    if opts.num_classes is not None and opts.num_classes < 1:
        raise UserError(f"--num-classes must be positive, got {opts.num_classes}")
    if opts.max_image_bytes < 1:
        raise UserError(f"--max-image-bytes must be at least 1, got {opts.max_image_bytes}")
    out = Path(out)
    _check_out(out, opts.overwrite)

    source = read_source(fmt, src, opts)
    num_classes = len(source.classes)
    if num_classes < 2:
        raise UserError(f"{fmt}: {num_classes} class{'es' if num_classes != 1 else ''} "
                        f"({', '.join(source.classes) or 'none'}); a data set needs at least 2 classes")
    if opts.num_classes is not None and opts.num_classes != num_classes:
        raise UserError(f"--num-classes {opts.num_classes}: {fmt} has {num_classes} classes")
    labels_of = {s: np.array([it.label for it in items], dtype=np.int64) for s, items in source.splits.items()}
    for split, lab in labels_of.items():
        noise_mod.check_labels(lab, num_classes, f"{fmt} {split} labels")

    workers = opts.workers or os.cpu_count() or 1
    runner = _Runner(workers)
    progress = Bars(opts.progress)
    writer = None
    started = False
    try:
        # --- training labels: the source's, a label file's, or synthetic noise; the true label is kept
        given = labels_of["train"]
        if opts.labels:
            train_clean = given if source.train_clean else np.full_like(given, -1)
            train_label, noise_info = noise_mod.load_label_file(
                opts.labels, num_classes=num_classes, count=given.size, key=opts.label_key, truth=train_clean
            )
        elif opts.noise != "none":
            features = None
            if opts.noise == "instance":
                features = _features(source.splits["train"], runner, progress, opts.max_image_bytes)
            train_label, noise_info = noise_mod.make_noisy_labels(
                opts.noise, given, num_classes, opts.noise_rate, opts.seed, dataset=source.dataset, features=features
            )
            train_clean = given  # relative to synthetic noise, the source's labels are the truth
        else:
            train_label, noise_info = given, {"type": "none", "rate": 0.0, "seed": None, "source": None}
            train_clean = given if source.train_clean else np.full_like(given, -1)

        _clean_out(out)
        started = True
        splits_meta: dict[str, dict] = {}
        skipped = list(source.skipped)
        reencoded: list[dict] = []
        sums, sqs, npx = [0, 0, 0], [0, 0, 0], 0  # exact integer pixel sums over the train split
        sizes: set[tuple[int, int]] = set()
        written_train = ([], [])
        n_images = 0
        for split, items in source.splits.items():
            is_train = split == "train"
            label = train_label if is_train else labels_of[split]
            clean = train_clean if is_train else labels_of[split]  # test labels are human-checked
            order = np.arange(len(items))
            if source.shuffle:
                order = np.random.default_rng(SPLIT_SEED).permutation(len(items))
            writer = ShardWriter(out, split, opts.shard_size)
            task = progress.add(split, len(items))
            ordered = [items[i] for i in order]
            # mean/std: every train image up to STATS_IMAGES, else an evenly strided (deterministic) subset.
            stride = max(1, math.ceil(len(items) / STATS_IMAGES))
            want = [is_train and pos % stride == 0 for pos in range(len(items))]
            tasks = ((i, w, opts.max_image_bytes) for i, w in zip(_chunks(ordered, CHUNK), _chunks(want, CHUNK)))
            results = runner.map(_encode_chunk, tasks)
            pos = 0
            for chunk_results in results:
                for res in chunk_results:
                    src_i = int(order[pos])
                    it = items[src_i]
                    pos += 1
                    if res[0] != "ok":
                        if opts.strict:
                            raise UserError(
                                f"{it.name}: cannot decode the image ({res[1]}); without --strict it is skipped "
                                "and listed in the manifest"
                            )
                        skipped.append({"split": split, "path": it.name, "reason": res[1]})
                        continue
                    _, data, ext, h, w, stats, why = res
                    if why:
                        reencoded.append({"split": split, "path": it.name, "reason": why})
                    writer.write(writer.count, data, ext, int(label[src_i]), int(clean[src_i]))
                    sizes.add((h, w))
                    if is_train:
                        written_train[0].append(int(label[src_i]))
                        written_train[1].append(int(clean[src_i]))
                        if stats is not None:
                            sums = [a + b for a, b in zip(sums, stats[0])]
                            sqs = [a + b for a, b in zip(sqs, stats[1])]
                            npx += stats[2]
                progress.advance(task, len(chunk_results))
            n_images += len(items)
            shards = writer.close()
            writer = None
            if not shards:
                raise UserError(f"{split}: no decodable images were left to write")
            splits_meta[split] = {
                "count": sum(s["count"] for s in shards),
                "has_clean": bool(not is_train or (train_clean >= 0).all()),
                "shards": shards,
            }
    except BaseException:
        if writer is not None:
            writer.abort()
        runner.close(cancel=True)
        progress.stop()
        if started:  # shards without a manifest are of no use: leave OUT as a rerun would find it, and the disk
            _clean_out(out)
        raise
    runner.close()
    progress.stop()

    if npx == 0:
        raise UserError("no train image decoded for the mean/std; is the source readable?")
    mean = [float(s) / (255.0 * npx) for s in sums]
    std = [math.sqrt(max(float(q) / (255.0**2 * npx) - m * m, 0.0)) for q, m in zip(sqs, mean)]
    flat = [c for c, v in zip("RGB", std) if v < MIN_STD]
    if flat:  # normalising divides by std: a channel that never varies is scaled by one grey level instead
        std = [max(v, MIN_STD) for v in std]
        source.notes.append(f"channel(s) {''.join(flat)} never vary in the train split: std set to 1/255")
    train_written_label, train_written_clean = (np.array(v, dtype=np.int64) for v in written_train)
    noise_entry = noise_mod.noise_summary(noise_info, train_written_clean, train_written_label, num_classes)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": source.dataset,
        "num_classes": num_classes,
        "classes": source.classes,
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "mean": [round(v, 6) for v in mean],
        "std": [round(v, 6) for v in std],
        "splits": splits_meta,
        "order": "shuffled (seed 0)" if source.shuffle else "source order",
        "noise": noise_entry,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_reencoded": len(reencoded),
        "reencoded": reencoded,
        "notes": source.notes + [noise_entry[k] for k in ("note", "warning") if k in noise_entry],
        "tool_version": f"ccl {ccl.__version__}",
        "created": {"tool": "tools/shard.py", "format": fmt, "options": _options_record(opts)},
    }
    wrong = schema.problems(manifest)
    if wrong:  # what we write must be what every reader accepts
        raise ValueError(f"the converter built a manifest its own schema refuses: {'; '.join(wrong)}")
    try:
        files.write_json(out / MANIFEST, manifest, indent=1)
    except UserError:
        _clean_out(out)
        raise
    for note in manifest["notes"]:
        log(f"{'warning' if note == noise_entry.get('warning') else 'note'}: {note}")
    if skipped:
        log(f"skipped {len(skipped)} image(s) (undecodable or missing); listed under 'skipped' in {MANIFEST}")
    if reencoded:
        log(f"re-encoded {len(reencoded)} image(s) as PNG (a format or structure the training decoders may not "
            f"read); listed under 'reencoded' in {MANIFEST}")
    seconds = time.perf_counter() - t0
    return {"manifest": manifest, "images": n_images, "seconds": seconds, "images_per_s": n_images / max(seconds, 1e-9)}


def _options_record(opts: ConvertOptions) -> dict:
    # What shaped the output; no paths, worker counts or switches that leave the bytes unchanged.
    return {
        "labels": Path(opts.labels).name if opts.labels else None,
        "label_key": opts.label_key,
        "noise": opts.noise,
        "noise_rate": opts.noise_rate,
        "seed": opts.seed,
        "num_classes": opts.num_classes,
        "shard_size": opts.shard_size,
        "strict": opts.strict,
        "skip_missing": opts.skip_missing,
        "test_fraction": opts.test_fraction,
        "max_image_bytes": opts.max_image_bytes,
        "allow_empty_classes": opts.allow_empty_classes,
        "webvision_lists": list(opts.webvision_lists),
        "imagenet_val": bool(opts.imagenet_val),
    }


def _features(items: list[Item], runner: _Runner, progress: Bars, max_bytes: int) -> np.ndarray:
    task = progress.add("features", len(items))
    parts = []
    for part in runner.map(_feature_chunk, ((c, max_bytes) for c in _chunks(items, CHUNK))):
        parts.append(part)
        progress.advance(task, len(part))
    return np.concatenate(parts) if parts else np.zeros((0, FEATURE_SIZE * FEATURE_SIZE * 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# The built-in default data


def default_cache() -> Path:
    """Where built-in data and benchmark sets are built once: $CCL_CACHE, else ~/.cache/ccl."""
    return Path(os.environ.get("CCL_CACHE", Path.home() / ".cache" / "ccl"))


def ensure_digits(cache_dir, noise: str = "sym", rate: float = 0.4, seed: int = 0) -> Path:
    """Build (once) the digits shard set with the given synthetic noise under cache_dir and return its path.

    Safe when several processes call it at once: each builds in a private temporary folder and renames it
    into place; whoever loses the rename uses the winner's copy.
    """
    cache_dir = Path(cache_dir)
    if noise == "none" or rate == 0:
        noise, rate = "none", 0.0
    final = cache_dir / f"digits-{noise}{rate:g}-s{seed}"
    # Small shards so that loaders have several to split between workers and ranks.
    opts = ConvertOptions(noise=noise, noise_rate=rate, seed=seed, shard_size=256, workers=1, progress=False)
    if (final / MANIFEST).is_file():
        if _noise_is_current(final / MANIFEST):
            return final
        # Made by a noise generator older than the conventions (sym then never kept the true label): remake it.
        convert("digits", None, final, dataclasses.replace(opts, overwrite=True), log=lambda s: None)
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    if final.exists():  # a partial build from an interrupted run: finish it in place
        convert("digits", None, final, opts, log=lambda s: None)
        return final
    tmp = cache_dir / f".{final.name}.building-{os.getpid()}"
    convert("digits", None, tmp, dataclasses.replace(opts, overwrite=True), log=lambda s: None)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _noise_is_current(manifest_path: Path) -> bool:
    """Whether a cached set's synthetic labels come from today's generators: their noise record names its
    convention (noise.CONVENTIONS), which older records lack."""
    import json

    try:
        noise = json.loads(manifest_path.read_text()).get("noise") or {}
    except (OSError, ValueError):
        return False
    return noise.get("type") in ("none", "file") or "convention" in noise
