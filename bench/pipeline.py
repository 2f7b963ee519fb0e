"""`ccl bench pipeline`: images per second to model-ready (weak, strong, mixup) batches, per backend, side by
side on the same shards, batch size and number of workers.

Backends:
- ``reference``: the way the DivideMix and RoLR code does it. A per-sample Dataset in DataLoader workers reads
  an image (here from the same shards: one read + PIL decode), and applies torchvision transforms to the PIL
  image: weak = RandomCrop(size, padding=4) + RandomHorizontalFlip + ToTensor + Normalize; strong = the same
  + RandAugment(num_ops=3, magnitude=5) before ToTensor, + a per-sample Cutout after Normalize. The default
  collate stacks the float views; mixup of the weak views runs in the main process with torch ops.
  (The reference codes keep CIFAR decoded in memory; reading from shards adds a PIL decode, 10-15% of its
  per-image cost.)
  Its workers are persistent, which only flatters it.
- ``torch``: `make_loader(backend="torch")` (uint8 batches), then `Augment.views` and `mixup` on the device.
- ``dali``: `make_loader(backend="dali")`, then the same `Augment.views` and `mixup`.

Every (data set, backend) pair runs in a fresh spawned process (`isolate=True`), so the memory figures are
that backend's alone: `peak_rss_main_mb` is the process's resident-set high-water mark
(getrusage(RUSAGE_SELF).ru_maxrss; DALI's threads live here too), `peak_rss_worker_mb` the largest
high-water mark of any one of its DataLoader workers (RUSAGE_CHILDREN reports the largest child, not a sum).
`peak_rss_total_mb` = main + workers x largest worker is an upper bound: pages shared with the parent after
the fork are counted once per worker. `pss_total_mb` is the better total: the proportional set size of the
process and its workers together (shared pages split between them), sampled after each round; most of
it is the libraries (torch, torchvision, kornia, DALI), not the pipeline's buffers. With `isolate=False`
(tests) everything runs in the caller's process and the memory figures are the caller's.

On a CPU device the main process runs max(1, cores - num_workers) torch threads, the rest of the cores
being the workers'.

Throughput is measured over `rounds` rounds of `steps` batches; the figure is the mean over rounds, with its
standard deviation. The backends of a set are all built before timing starts and take their rounds in turn,
so a drift in the machine's load (other jobs on a shared machine) hits them alike instead of biasing the
ratios. Each round first consumes `warmup` untimed batches (worker start-up, the first shuffle-buffer fill,
and the batches prefetched while the backend waited for its turn, which would otherwise come for free) and
ends by waiting until the backend's workers stop working ahead, so no backend's leftover work runs during
another's timed round.
"""

from __future__ import annotations

import gc
import io
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ccl import files
from ccl.errors import UserError
from ccl.pipeline.loader import BACKENDS as LOADER_BACKENDS

BACKENDS = ("reference", *LOADER_BACKENDS)  # reference: a per-sample PIL/torchvision pipeline, as peers load
MIXUP_ALPHA = 4.0  # DivideMix's CIFAR alpha


# ---------------------------------------------------------------------------------------------------------------
# The reference: per-sample torchvision transforms in DataLoader workers


class Cutout:
    """Per-sample Cutout on a normalised [3, H, W] tensor: a square of side U(0, frac) x W, clipped at the
    border, set to 0 (the dataset mean after normalisation), as in the RoLR/DivideMix-style strong view."""

    def __init__(self, frac: float = 0.5):
        self.frac = frac

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        side = int(np.random.uniform(0, self.frac) * w)
        if side == 0:
            return x
        cy, cx = np.random.randint(h), np.random.randint(w)
        y0, y1 = max(0, cy - side // 2), min(h, cy + side - side // 2)
        x0, x1 = max(0, cx - side // 2), min(w, cx + side - side // 2)
        x = x.clone()
        x[:, y0:y1, x0:x1] = 0
        return x


class ReferenceDataset(torch.utils.data.Dataset):
    """(weak, strong, label, index) per sample, the per-image way."""

    def __init__(self, shardset, split: str, size: int, variable: bool):
        from torchvision import transforms as T

        from ccl.pipeline.loader import ShardIndex

        self.index = ShardIndex(shardset, split)
        norm = [T.ToTensor(), T.Normalize(shardset.mean, shardset.std)]
        if variable:  # ImageNet-style sets: resized crops instead of padded crops
            geo = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        else:
            geo = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
        self.weak = T.Compose(geo + norm)
        self.strong = T.Compose(geo + [T.RandAugment(num_ops=3, magnitude=5)] + norm + [Cutout(0.5)])
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        from PIL import Image

        ix = self.index
        s = int(ix.shard[i])
        if s not in self._fds:
            self._fds[s] = os.open(ix.paths[s], os.O_RDONLY)
        data = os.pread(self._fds[s], int(ix.size[i]), int(ix.offset[i]))
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return self.weak(img), self.strong(img), int(ix.label[i]), i


def _worker_seed(worker_id: int) -> None:
    # numpy's global RNG (Cutout) is not reseeded per worker by torch; without this all workers cut alike.
    np.random.seed(torch.initial_seed() % 2**32)


# ---------------------------------------------------------------------------------------------------------------
# One (data set, backend) measurement


def _child_pids() -> list[int]:
    """This process's children (the DataLoader workers), from Linux /proc; [] where unavailable."""
    try:
        return [int(c) for task in Path("/proc/self/task").iterdir() for c in (task / "children").read_text().split()]
    except (OSError, ValueError):
        return []


def _pss_kb() -> int | None:
    """Proportional set size of this process plus its children (DataLoader workers), in KB: memory actually
    used, with pages shared between processes split among them (Linux /proc; None elsewhere)."""
    try:
        total = 0
        for pid in [os.getpid(), *_child_pids()]:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        return total
    except (OSError, ValueError):
        return None


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process (all its threads, so DALI's too) and its live children."""
    t = os.times()
    total = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK")
    for pid in _child_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return total


def _settle(timeout: float = 10.0, window: float = 0.1) -> None:
    """Wait until this pipeline stops working ahead (its prefetch queues are full), so that it does not
    steal CPU from the next backend's timed round."""
    deadline = time.monotonic() + timeout
    last = _tree_cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(window)
        now = _tree_cpu_seconds()
        if now - last < 0.2 * window:  # under a fifth of a core: idle but for bookkeeping
            return
        last = now


def _batches_forever(loader) -> Iterator:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class _Bench:
    """One backend's pipeline on one set: built and warmed up at construction, then timed round by round."""

    def __init__(
        self, path: str, backend: str, batch_size: int, num_workers: int, warmup: int, device: str, seed: int
    ):
        from ccl.pipeline.augment import Augment, mixup
        from ccl.pipeline.decode import resolve_load_size
        from ccl.pipeline.loader import make_loader
        from ccl.pipeline.shards import ShardSet

        torch.manual_seed(seed)
        np.random.seed(seed)
        self.dev = dev = torch.device(device)
        if dev.type == "cpu":
            # The main process's augmentation must not oversubscribe the cores the decode workers (or DALI's
            # threads) use: with OpenMP spinning, 2 threads on a busy 2-core machine ran 6x slower than 1.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))
        ss = ShardSet.open(path)
        (size, _), variable = resolve_load_size(ss.image_size, None)
        num_classes = ss.num_classes
        self.row = {
            "dataset": Path(path).name, "path": str(path), "image_size": size, "backend": backend,
            "batch_size": batch_size, "num_workers": num_workers, "device": str(dev),
            "torch_threads": torch.get_num_threads(),
        }  # fmt: skip
        self.workers = num_workers if backend != "dali" else 0  # DALI decodes on threads of this process
        self.loader = self.dl = None

        if backend == "reference":
            self.dl = dl = torch.utils.data.DataLoader(
                ReferenceDataset(ss, "train", size, variable),
                batch_size=batch_size,
                shuffle=True,
                num_workers=num_workers,
                pin_memory=dev.type == "cuda",
                persistent_workers=num_workers > 0,
                worker_init_fn=_worker_seed,
            )

            def produce() -> Iterator[int]:
                while True:
                    for weak, strong, label, _ in dl:
                        weak = weak.to(dev, non_blocking=True)
                        strong = strong.to(dev, non_blocking=True)
                        y = torch.nn.functional.one_hot(label.to(dev), num_classes).float()  # [N, C]
                        lam = float(np.random.beta(MIXUP_ALPHA, MIXUP_ALPHA))
                        lam = max(lam, 1 - lam)
                        perm = torch.randperm(weak.shape[0], device=dev)
                        x_mix = lam * weak + (1 - lam) * weak[perm]  # [N, 3, S, S]
                        y_mix = lam * y + (1 - lam) * y[perm]
                        del x_mix, y_mix
                        yield weak.shape[0]

        else:
            self.loader = loader = make_loader(
                ss, "train", backend=backend, batch_size=batch_size, train=True, device=dev,
                num_workers=num_workers, seed=seed,
            )  # fmt: skip
            aug = Augment(ss.mean, ss.std, size, style="imagenet" if variable else "cifar").to(dev)

            def produce() -> Iterator[int]:
                for b in _batches_forever(loader):
                    weak, strong = aug.views(b.images, n_strong=1)
                    y = torch.nn.functional.one_hot(b.label, num_classes).float()  # [N, C]
                    x_mix, y_mix, lam, perm = mixup(weak, y, MIXUP_ALPHA)
                    del x_mix, y_mix, strong
                    yield len(b)

        self.gen = produce()
        self.warmup = warmup
        self.rates: list[float] = []
        self.pss: list[int | None] = []
        self.images, self.seconds = 0, 0.0

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def round(self, steps: int) -> None:
        """`warmup` untimed batches (they use up the batches prefetched while the pipeline sat idle, so the
        timed ones come from a pipeline in steady state), `steps` timed ones, then wait until idle again."""
        for _ in range(self.warmup):
            next(self.gen)
        self._sync()
        n, t0 = 0, time.perf_counter()
        for _ in range(steps):
            n += next(self.gen)
        self._sync()
        dt = time.perf_counter() - t0
        self.rates.append(n / dt)
        self.images, self.seconds = self.images + n, self.seconds + dt
        self.pss.append(_pss_kb())  # outside the timed region, while the workers are alive
        _settle()

    def finish(self) -> dict:
        self.gen.close()
        skipped = getattr(self.loader, "skipped", 0)
        self.gen = self.loader = self.dl = None
        gc.collect()  # shuts the persistent workers down, so RUSAGE_CHILDREN covers them
        self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return self.row | {
            "images": self.images,
            "seconds": round(self.seconds, 4),
            "images_per_s": round(statistics.mean(self.rates), 1),
            "images_per_s_std": round(statistics.stdev(self.rates), 1) if len(self.rates) > 1 else 0.0,
            "rounds": len(self.rates),
            "round_images_per_s": [round(r, 1) for r in self.rates],
            "skipped": skipped,
            "peak_rss_main_mb": round(self_kb / 1024, 1),
            "peak_rss_worker_mb": round(child_kb / 1024, 1) if self.workers else 0.0,
            "peak_rss_total_mb": round((self_kb + self.workers * child_kb) / 1024, 1),
            "pss_total_mb": round(max(self.pss) / 1024, 1) if self.pss and None not in self.pss else None,
        }


def _serve(conn, kwargs: dict) -> None:
    """Child process: build a `_Bench`, then run its rounds when told to."""
    try:
        bench = _Bench(**kwargs)
        conn.send(("ready", None))
        while (cmd := conn.recv())[0] == "round":
            bench.round(cmd[1])
            conn.send(("done", None))
        conn.send(("ok", bench.finish()))
    except UserError as e:
        conn.send(("error", str(e)))
    except Exception as e:  # reported in the table; the other backends still run
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


class _Remote:
    """A `_Bench` in a fresh spawned process (clean memory figures; a crash costs one row, not the run)."""

    def __init__(self, **kwargs):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, kwargs))
        self.proc.start()
        child.close()  # so that a dead child shows up as EOF here
        self._expect("ready")

    def _expect(self, status: str):
        try:
            got, payload = self.conn.recv()
        except EOFError:
            self.proc.join()
            raise RuntimeError(f"the benchmark process died (exit code {self.proc.exitcode})") from None
        if got != status:
            self.proc.join()
            raise RuntimeError(payload)
        return payload

    def round(self, steps: int) -> None:
        self.conn.send(("round", steps))
        self._expect("done")

    def finish(self) -> dict:
        self.conn.send(("finish", None))
        row = self._expect("ok")
        self.proc.join()
        return row


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def bench_pipeline(
    data: Sequence | None = None,
    backends: Sequence[str] = BACKENDS,
    *,
    batch_size: int = 128,
    num_workers: int = 2,
    steps: int = 20,
    warmup: int = 10,
    rounds: int = 3,
    device: str | None = None,
    seed: int = 0,
    isolate: bool = True,
    json_path=None,
    cache_dir=None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Measure each backend on each shard set (paths or ShardSets); print a table; return one dict per row.

    Without `data`, the two synthetic sets of `default_sets` (CIFAR-like 32 px PNG, Animal-10N-like 64 px
    JPEG) are built once under `cache_dir` (default $CCL_CACHE/bench, else ~/.cache/ccl/bench) and used.

    Rows that fail (e.g. DALI not installed) carry an "error" string instead of figures. `ratio_to_reference`
    is the backend's images/s over the reference's on the same set (None without a reference row).
    With `json_path`, writes {"command", "environment", "results"} there.
    """
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UserError(f"unknown benchmark backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if batch_size < 1 or steps < 1 or rounds < 1 or warmup < 0:
        raise UserError("batch_size, steps and rounds must be positive and warmup non-negative")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if data is None:
        if cache_dir is None:
            from ccl.pipeline.convert import default_cache

            cache_dir = default_cache() / "bench"
        log(f"benchmark sets: {cache_dir} (built on first use)")
        data = default_sets(cache_dir)
    paths = [str(d) if isinstance(d, (str, os.PathLike)) else str(d.root) for d in data]  # paths or ShardSets
    if not paths:
        raise UserError("no shard sets to benchmark")
    threads = torch.get_num_threads()  # _Bench changes it; isolate=False must not leave the caller's changed
    try:
        rows = _bench_sets(
            paths, backends, log, isolate, rounds, steps,
            dict(batch_size=batch_size, num_workers=num_workers, warmup=warmup, device=device, seed=seed),
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    if json_path is not None:
        record = {"command": " ".join(sys.argv), "environment": _environment(), "results": rows}
        files.write_json(Path(json_path), record, indent=1)
    return rows


def _bench_sets(paths, backends, log, isolate: bool, rounds: int, steps: int, settings: dict) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        # All backends of a set are built first and their timed rounds interleave (reference, torch, dali,
        # reference, ...), so a change in the machine's load mid-run hits every backend alike. Idle
        # pipelines between their rounds only hold their prefetched batches.
        benches, out = {}, {}
        for backend in backends:
            kwargs = dict(path=path, backend=backend, **settings)
            try:
                benches[backend] = _Remote(**kwargs) if isolate else _Bench(**kwargs)
            except (RuntimeError, UserError) as e:
                out[backend] = {"path": path, "backend": backend, "error": str(e)}
        for _ in range(rounds):
            for backend, bench in list(benches.items()):
                try:
                    bench.round(steps)
                except (RuntimeError, UserError) as e:
                    out[backend] = {"path": path, "backend": backend, "error": str(e)}
                    del benches[backend]
        for backend, bench in benches.items():
            try:
                out[backend] = bench.finish() | {"steps": steps}
            except (RuntimeError, UserError) as e:
                out[backend] = {"path": path, "backend": backend, "error": str(e)}
        ref = out.get("reference", {}).get("images_per_s")
        for backend in backends:
            row = out[backend]
            rate = row.get("images_per_s")
            row["ratio_to_reference"] = round(rate / ref, 2) if ref and rate is not None else None
            rows.append(row)
            log(_format_row(row))
    return rows


def _format_row(r: dict) -> str:
    if "error" in r:
        return f"{Path(r['path']).name:<28} {r['backend']:<10} failed: {r['error']}"
    ratio = f"{r['ratio_to_reference']:.2f}x" if r["ratio_to_reference"] is not None else "-"
    return (
        f"{r['dataset']:<20} {r['image_size']:>4}px {r['backend']:<10} "
        f"{r['images_per_s']:>9.0f} +- {r['images_per_s_std']:<6.0f} img/s  {ratio:>6} ref  "
        f"peak RSS main {r['peak_rss_main_mb']:.0f} MB, largest worker {r['peak_rss_worker_mb']:.0f} MB; "
        f"PSS all {r['pss_total_mb'] if r['pss_total_mb'] is not None else '?'} MB"
    )


def _environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except ImportError:
        env["dali"] = None
    return env


# ---------------------------------------------------------------------------------------------------------------
# Synthetic benchmark sets (when no data set is given)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A natural-looking-enough uint8 [size, size, 3] image: smooth colour blobs plus sensor-like noise, so
    that PNG/JPEG sizes and decode costs resemble real photos rather than flat or white-noise images."""
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
    t = torch.from_numpy(coarse).permute(2, 0, 1)[None]  # [1, 3, 4, 4]
    smooth = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)[0]
    img = smooth.permute(1, 2, 0).numpy() + rng.normal(0, 10, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_set(cache_dir, kind: str = "cifar", train: int = 10000, test: int = 1000, seed: int = 0) -> Path:
    """Build (once) a synthetic shard set through the converter and return its path.

    kind "cifar": 32x32 PNGs in class folders (`folder` format, 10 classes).
    kind "animal": 64x64 JPEGs named <label>_<id>.jpg (`animal10n` format), like Animal-10N.
    """
    from PIL import Image

    from ccl.pipeline.convert import ConvertOptions, convert
    from ccl.pipeline.manifest import MANIFEST

    if kind not in ("cifar", "animal"):
        raise UserError(f"unknown synthetic set kind {kind!r}: cifar or animal")
    cache_dir = Path(cache_dir)
    size = 32 if kind == "cifar" else 64
    out = cache_dir / f"synthetic-{kind}{size}-n{train}-s{seed}"
    if (out / MANIFEST).is_file():
        return out
    raw = cache_dir / f".{out.name}.raw-{os.getpid()}"
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for i in range(count):
            label = int(rng.integers(10))
            img = Image.fromarray(_texture(rng, size))
            if kind == "cifar":
                folder = raw / split / f"c{label}"
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"{i:06d}.png")
            else:
                folder = raw / ("training" if split == "train" else "testing")
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"{label}_{i:06d}.jpg", quality=90)
    opts = ConvertOptions(shard_size=5000, workers=min(2, os.cpu_count() or 1), progress=False, overwrite=True)
    convert("folder" if kind == "cifar" else "animal10n", raw, out, opts, log=lambda s: None)
    import shutil

    shutil.rmtree(raw, ignore_errors=True)
    return out


def default_sets(cache_dir) -> list[Path]:
    """The two sets of the issue: CIFAR-like 32 px PNGs and Animal-10N-like 64 px JPEGs."""
    return [synthetic_set(cache_dir, "cifar", train=10000), synthetic_set(cache_dir, "animal", train=5000)]


if __name__ == "__main__":  # python -m ccl.bench.pipeline [SHARDS...]: a quick look without the CLI
    bench_pipeline(sys.argv[1:] or None)
