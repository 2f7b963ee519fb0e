"""`ccl check DATA`: validate a shard set without training, and say everything that is wrong with it.

1. The manifest against its schema (`ccl.pipeline.manifest`), strictly: one message per problem.
2. Every shard (`ShardSet`'s scan, with the index always compared to a walk over the tar's headers): the tar's
   and the index's sha256, index against tar, both copies of every sample's labels, labels in range, and the
   structure of every image (what the loaders check before a decoder sees a byte).
3. Every image that passed, decoded by each backend's own decoder (torchvision's `decode_image`; DALI's
   `fn.decoders.image` on the device training would use), in child processes (`ccl.pipeline.isolate`, the
   supervisor the training loaders decode through): a decoder that crashes on or hangs over an image kills only
   its child, which is replaced, and the image is reported. Decoded sizes must match the
   manifest's image size, when it has one.
4. Counts per split and per class (training and clean labels) and the measured noise rate.

It prints a summary, writes a JSON report (default DATA/check.json), shows progress, and exits 0 when nothing
is wrong, 1 when something is, 2 on a usage error. It streams: memory grows with the number of samples only by
a few arrays (about 40 bytes per sample), so WebVision's 2.4M images are fine.

Damaged samples are what the loaders skip (and name) in training; decode failures are images a loader would
fail on at run time: the torch backend skips and names them too, the dali backend stops (DALI cannot skip).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ccl import files
from ccl.errors import UserError
from ccl.pipeline import manifest as schema
from ccl.pipeline.loader import BACKENDS  # the decoders checked: those the loader backends use
from ccl.pipeline.manifest import MANIFEST
from ccl.pipeline.isolate import Isolated
from ccl.pipeline.procs import die_with_parent, usable_cores
from ccl.pipeline.scan import ShardScan, scan_task
from ccl.pipeline.shards import load_manifest
from ccl.pipeline.tarshard import sample_key
from ccl.progress import Bars

REPORT = "check.json"
DALI_BATCH = 32  # images per DALI run; a batch that fails is redone image by image to name the culprit
STALL_S = 120.0  # a decoder child with no progress for this long is killed and the image reported as a hang


# ----------------------------------------------------------------------------------------------------------------
# Decoding in child processes


class _DaliDecoder:
    """fn.decoders.image over external_source batches, synchronous (so an error belongs to the batch run)."""

    def __init__(self, device: str):
        from nvidia.dali import fn, pipeline_def, types

        self.fn, self.pipeline_def, self.types = fn, pipeline_def, types
        self.device = device
        self.pipes: dict[int, object] = {}
        self.feed: list = []

    def _pipe(self, batch: int):
        # A pipeline is unusable after an error ("no longer valid"): rebuilt then, else kept per batch size.
        if batch not in self.pipes:
            fn, types = self.fn, self.types

            @self.pipeline_def(batch_size=batch, num_threads=1, device_id=0 if self.device == "gpu" else None,
                               exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
            def pipe():
                raw = fn.external_source(source=lambda: self.feed, batch=True, dtype=types.UINT8, no_copy=False)
                return fn.decoders.image(raw, device="mixed" if self.device == "gpu" else "cpu",
                                         output_type=types.RGB)

            p = pipe()
            p.build()
            self.pipes[batch] = p
        return self.pipes[batch]

    def run(self, datas: list[bytes]) -> list[tuple[int, int]]:
        self.feed = [np.frombuffer(d, dtype=np.uint8) for d in datas]
        try:
            (out,) = self._pipe(len(datas)).run()
        except Exception:
            self.pipes.pop(len(datas), None)
            raise
        return [tuple(int(v) for v in out[i].shape()[:2]) for i in range(len(datas))]


def _measurer(backend: str, device: str):
    """The handler of a check's decoder child (`ccl.pipeline.isolate`): a job is (tar, items, want) with items
    (index, offset, size); it decodes items[start:] with `backend`'s decoder, one image at a time (torch) or
    DALI_BATCH at a time (dali; one at a time below `single_until`), and fails an image that does not decode
    or decodes to another size than `want`."""
    if backend == "torch":
        import torch

        from ccl.pipeline.decode import image_decoder

        torch.set_num_threads(1)
        decode = image_decoder()

        def sizes(datas):
            return [tuple(decode(datas[0]).shape[1:])]
    else:
        sizes = _DaliDecoder(device).run

    def handle(job, start, single_until, word):
        tar, items, want = job
        failed = []
        fd = os.open(tar, os.O_RDONLY)
        try:
            j = start
            while j < len(items):
                word.set(j)
                step = 1 if backend == "torch" or j < single_until else min(DALI_BATCH, len(items) - j)
                datas = [os.pread(fd, size, off) for _, off, size in items[j : j + step]]
                try:
                    got = sizes(datas)
                except Exception as e:
                    if step > 1:  # which image? redo the batch one by one
                        single_until = j + step
                        continue
                    failed.append((j, _short(e)))
                    j += 1
                    continue
                for k, hw in enumerate(got):
                    if want is not None and tuple(hw) != tuple(want):
                        failed.append((j + k, f"decodes to {hw[1]}x{hw[0]}, the manifest's image size is "
                                              f"{want[1]}x{want[0]}"))
                j += step
        finally:
            os.close(fd)
        return failed

    return handle


def _short(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "failure" in ln.lower() or "error" in ln.lower() or "failed" in ln.lower()]
    text = (useful[-1] if useful else lines[-1] if lines else "") if len(lines) > 1 else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}"[:300]


# ----------------------------------------------------------------------------------------------------------------
# The check


@dataclass
class _Split:
    name: str
    count: int
    shards: int
    scans: list[ShardScan] = field(default_factory=list)


def resolve_backends(spec: str) -> list[str]:
    """'auto' (torch, and dali when installed), 'none', or a comma-separated list of torch and dali."""
    spec = spec.strip().lower()
    if spec == "none":
        return []
    if spec == "auto":
        try:
            import nvidia.dali  # noqa: F401

            return list(BACKENDS)
        except ImportError:
            return ["torch"]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise UserError(f"--backend takes auto, none, or a list of {', '.join(BACKENDS)}; got {spec!r}")
    if "dali" in names:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise UserError(f"--backend dali needs NVIDIA DALI (pip install nvidia-dali-cuda130): {e}") from None
    return names


def check(data, *, backends: list[str] | None = None, workers: int | None = None, dali_device: str = "auto",
          progress: bool = False, decode_damaged: bool = False) -> dict:
    """Check the shard set in `data`; returns the report (see the module docstring). Raises UserError only when
    there is nothing to check (no such folder, no manifest).

    decode_damaged: hand the damaged images to the decoders too (they are skipped in training either way), to
    see what each decoder would do with them (many crash torchvision's PNG decoder)."""
    root = Path(data)
    if root.name == MANIFEST and root.is_file():
        root = root.parent
    if not root.is_dir():
        raise UserError(f"no shard set at {root}: the directory does not exist")
    if not (root / MANIFEST).is_file():
        raise UserError(f"no shard set at {root}: {MANIFEST} is missing (an unfinished conversion?)")
    backends = list(BACKENDS) if backends is None else list(backends)
    if dali_device not in ("auto", "cpu", "gpu"):
        raise UserError(f"--dali-device takes auto, cpu or gpu, got {dali_device!r}")
    if dali_device == "auto":
        dali_device = "cpu"
        if "dali" in backends:  # torch is slow to import: only when its answer is needed
            import torch

            dali_device = "gpu" if torch.cuda.is_available() else "cpu"
    workers = max(1, workers or usable_cores())
    report: dict = {"data": str(root), "ok": False, "problems": [], "damaged": [], "decode_failures": [],
                    "warnings": [], "splits": {}, "timing": {}, "backends": backends, "dali_device": dali_device}

    # --- 1. the manifest
    try:
        manifest = load_manifest(root / MANIFEST)
    except UserError as e:
        report["problems"].append(str(e))
        return report
    found = schema.problems(manifest)
    report["problems"] += [f"{MANIFEST}: {p}" for p in found]
    if found:
        return report  # the fields below are what the schema vouches for
    report["dataset"] = manifest["dataset"]
    num_classes = int(manifest["num_classes"])
    splits = [_Split(name, int(m["count"]), len(m["shards"])) for name, m in manifest["splits"].items()]
    listed = {r[k] for m in manifest["splits"].values() for r in m["shards"] for k in ("file", "index")}
    stray = sorted(p.name for p in root.iterdir() if p.suffix in (".tar", ".idx") and p.name not in listed)
    if stray:
        report["warnings"].append(f"files not listed in {MANIFEST} (ignored by the loaders): {', '.join(stray[:10])}"
                                  + (f" and {len(stray) - 10} more" if len(stray) > 10 else ""))

    # --- 2. every shard: checksums, index, labels, structure (a pool made before the progress bar's thread)
    total = sum(s.count for s in splits)
    pool = None
    if workers > 1 and sum(s.shards for s in splits) > 1 and "fork" in multiprocessing.get_all_start_methods():
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))
        pool.submit(int).result()
    bar = Bars(progress, label_width=16)
    try:
        task = bar.add("checksums", total)
        t0 = time.perf_counter()
        for sp in splits:
            m = manifest["splits"][sp.name]
            size = tuple(manifest["image_size"]) if manifest.get("image_size") else None
            args = [(root, rec, sp.name, num_classes, bool(m["has_clean"]), True, True, size) for rec in m["shards"]]
            results = pool.map(scan_task, args) if pool else map(scan_task, args)
            for rec, scan in zip(m["shards"], results):
                sp.scans.append(scan)
                report["problems"] += [f"split {sp.name!r}: {p}" for p in scan.problems]
                report["damaged"] += [
                    {"split": sp.name, "index": i, "key": sample_key(i), "shard": rec["file"], "reason": why}
                    for i, why in sorted(scan.damaged.items())
                ]
                bar.advance(task, int(rec["count"]))
        seconds = time.perf_counter() - t0
        report["timing"]["scan"] = _rate(total, seconds)
        if pool:
            pool.shutdown()
            pool = None

        # --- 3. every image that passed, through each backend's decoder
        for backend in backends:
            t0 = time.perf_counter()
            n, startup = _decode_backend(backend, dali_device, root, manifest, splits, workers, bar, report,
                                         decode_damaged)
            report["timing"][backend] = _rate(n, time.perf_counter() - t0, startup)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        bar.stop()

    # --- 4. counts per split and class
    for sp in splits:
        usable = [s for s in sp.scans if not s.problems]
        label = np.concatenate([s.label for s in usable]) if usable else np.zeros(0, np.int64)
        clean = np.concatenate([s.clean for s in usable]) if usable else np.zeros(0, np.int64)
        bad = {d["index"] for d in report["damaged"] if d["split"] == sp.name}
        bad |= {d["index"] for d in report["decode_failures"] if d["split"] == sp.name}
        known = clean >= 0
        report["splits"][sp.name] = {
            "count": sp.count,
            "shards": sp.shards,
            "unusable_shards": sum(1 for s in sp.scans if s.problems),
            "readable": int(len(label) - len(bad)),
            "damaged": len(bad),
            "class_counts": np.bincount(label[label >= 0], minlength=num_classes).tolist(),
            "clean_class_counts": np.bincount(clean[known], minlength=num_classes).tolist() if known.any() else None,
            "noise_rate": round(float(np.mean(label[known] != clean[known])), 6) if known.any() else None,
        }
    report["ok"] = not (report["problems"] or report["damaged"] or report["decode_failures"])
    return report


def _rate(images: int, seconds: float, startup: float = 0.0) -> dict:
    """Wall time, and wall time per 10k images once the processes have started (what scales with the set:
    starting a decoder process, i.e. importing torch or DALI, is a fixed cost of seconds)."""
    steady = max(seconds - startup, 1e-9)
    return {"images": int(images), "seconds": round(seconds, 3), "startup_seconds": round(startup, 3),
            "seconds_per_10k": round(steady / images * 10_000, 3) if images else None}


def _decode_backend(backend, device, root, manifest, splits, workers, bar, report,
                    decode_damaged=False) -> tuple[int, float]:
    """Decode every image that passed the scan with `backend`'s decoder; failures go into the report.
    Returns the number of images and the seconds the decoder processes took to start."""
    want = tuple(manifest["image_size"]) if manifest.get("image_size") else None
    jobs = []  # one per usable shard; its item list is built when a thread takes it (2.4M tuples would not fit)
    n = 0
    for sp in splits:
        for rec, scan in zip(manifest["splits"][sp.name]["shards"], sp.scans):
            if scan.problems:
                continue
            todo_k = np.flatnonzero(scan.size > 0) if decode_damaged else np.asarray(
                [k for k in range(len(scan.label)) if int(rec["first_index"]) + k not in scan.damaged], np.int64)
            if len(todo_k):
                jobs.append((sp.name, rec, scan, todo_k))
                n += len(todo_k)
    if not jobs:
        return 0, 0.0
    label = f"{backend} decode" + (f" ({device})" if backend == "dali" else "")
    task = bar.add(label, n)
    k = min(len(jobs), workers if not (backend == "dali" and device == "gpu") else min(workers, 4))
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    lock = threading.Lock()
    errors: list[BaseException] = []
    startups: list[float] = []  # per driver thread: the wall time its first child took to start

    def drive():
        w = Isolated(_measurer, (backend, device), fork=False, batch=DALI_BATCH if backend == "dali" else 1,
                     name=f"{backend} decoder", stall_s=STALL_S)
        first_job = True
        try:
            while True:
                try:
                    split, rec, scan, ks = todo.get_nowait()
                except queue.Empty:
                    return
                base, shard = int(rec["first_index"]), rec["file"]
                items = [(base + int(k), int(scan.offset[k]), int(scan.size[k])) for k in ks]
                failed = [(items[pos][0], why) for pos, why in
                          w.run((str(root / shard), items, want), len(items), lambda d: bar.advance(task, d))]
                if first_job:
                    startups.append(w.startup_s)
                    first_job = False
                with lock:
                    report["decode_failures"] += [
                        {"split": split, "index": i, "key": sample_key(i), "shard": shard, "backend": backend,
                         "reason": why} for i, why in failed
                    ]
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
        finally:
            w.close()

    threads = [threading.Thread(target=drive, daemon=True) for _ in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    report["decode_failures"].sort(key=lambda d: (d["backend"], d["split"], d["index"]))
    # The children start side by side: the slowest start is the fixed cost in the wall time.
    return n, max(startups, default=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Summary and command


def summary(report: dict, max_list: int = 20) -> list[str]:
    """The report as console lines."""
    lines = [f"{report['data']}: dataset {report.get('dataset', '?')}"]
    for name, s in report["splits"].items():
        counts = [c for c in s["class_counts"] if c] or [0]
        noise = "" if s["noise_rate"] is None else f", measured noise rate {s['noise_rate']:.4f}"
        lines.append(f"  {name}: {s['count']} samples in {s['shards']} shards, {s['readable']} readable, "
                     f"{s['damaged']} damaged; {min(counts)}..{max(counts)} per class{noise}")
    for what, t in report["timing"].items():
        if t["images"]:
            name = {"scan": "checksums+structure"}.get(what, f"{what} decoder")
            start = f", {t['startup_seconds']:.1f} s of it starting processes" if t.get("startup_seconds") else ""
            lines.append(f"  {name}: {t['images']} images in {t['seconds']:.1f} s{start} ({t['seconds_per_10k']:.1f} s "
                         "per 10k images after that)" if start else f"  {name}: {t['images']} images in "
                         f"{t['seconds']:.1f} s ({t['seconds_per_10k']:.1f} s per 10k images)")
    for kind, items in (("problem", report["problems"]), ("warning", report["warnings"])):
        for p in items[:max_list]:
            lines.append(f"{kind}: {p}")
        if len(items) > max_list:
            lines.append(f"... and {len(items) - max_list} more {kind}s (all in the report)")
    for kind, items in (("damaged", report["damaged"]), ("decode failure", report["decode_failures"])):
        for d in items[:max_list]:
            via = f" [{d['backend']}]" if "backend" in d else ""
            lines.append(f"{kind}{via}: {d['split']} {d['key']} in {d['shard']}: {d['reason']}")
        if len(items) > max_list:
            lines.append(f"... and {len(items) - max_list} more (all in the report)")
    n = len(report["problems"]) + len(report["damaged"]) + len(report["decode_failures"])
    lines.append("OK: no problems found" if report["ok"] else f"NOT OK: {n} problem(s)")
    return lines


def check_command(
    data: Path,
    backend: str = "auto",
    report: Optional[Path] = None,
    workers: Optional[int] = None,
    dali_device: str = "auto",
    progress: bool = True,
    max_list: int = 20,
    decode_damaged: bool = False,
) -> None:
    """Check a shard set without training: manifest schema, checksums of tars and index files, index against tar,
    labels, every image's structure and decoding by each backend's decoder, counts per split and class. Writes a
    JSON report (default DATA/check.json); exits 0 when all is well, 1 when something is wrong."""
    import sys

    import typer

    rep = check(data, backends=resolve_backends(backend), workers=workers, dali_device=dali_device,
                progress=progress and sys.stderr.isatty(), decode_damaged=decode_damaged)
    for line in summary(rep, max_list):
        print(line)
    root = Path(data).parent if Path(data).name == MANIFEST else Path(data)
    out = Path(report) if report is not None else root / REPORT
    try:
        files.write_json(out, rep, indent=1)
    except OSError as e:
        raise UserError(f"cannot write the report to {out} ({e.strerror}); pass --report PATH") from None
    print(f"report: {out}")
    raise typer.Exit(0 if rep["ok"] else 1)


def register(app) -> None:
    """Add `ccl check` to the ccl Typer app (`ccl.cli` calls this once)."""
    import typer

    def check_cmd(
        data: Path = typer.Argument(..., help="Shard directory (the folder with manifest.json)."),
        backend: str = typer.Option("auto", help="Decoders to try on every image: auto (torch, and dali when "
                                    "installed), none, or a comma-separated list of torch and dali."),
        report: Optional[Path] = typer.Option(None, help="Where to write the JSON report. \\[default: DATA/check.json]",
                                              show_default=False),
        workers: Optional[int] = typer.Option(None, help="Processes to use. \\[default: all cores]", show_default=False),
        dali_device: str = typer.Option("auto", help="Where DALI decodes: cpu, gpu, or auto (gpu when CUDA is "
                                        "available, as training would)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
        max_list: int = typer.Option(20, help="Problems of each kind listed on the console (all go in the report)."),
        decode_damaged: bool = typer.Option(False, help="Also hand the damaged images to the decoders, to see what "
                                            "they would do with them (training skips them either way)."),
    ) -> None:
        check_command(data, backend, report, workers, dali_device, progress, max_list, decode_damaged)

    check_cmd.__doc__ = check_command.__doc__
    app.command(name="check")(check_cmd)
