"""The items of a check run, in the driver: each starts its children or CLI runs and judges what they report (the
correctness checks, then the benchmarks)."""

from __future__ import annotations

import json
import math
import shutil
import sys
import threading
import time
from pathlib import Path

from gpucheck.settings import ALL_METHODS, BREAK, ESTIMATE_S, Fail, ITEMS, SELF, SMOKE_COMPILE_BACKEND, Skip
from gpucheck.procs import Proc, cli, run_all
from gpucheck.run import Run
from gpucheck.children import nvidia_smi


# ---------------------------------------------------------------------------------------------------------------
# Parent items
# ---------------------------------------------------------------------------------------------------------------


def _verdict(details: dict, problems: list[str], skipped: list[str], rows: list | None = None) -> dict:
    """An item's result: failed on any problem (with its details), skipped when it measured no rows at all (the
    reasons are its skipped parts), else passed."""
    if problems:
        raise Fail("; ".join(problems)[:2000], details)
    if rows is not None and not rows:
        raise Skip("; ".join(skipped))
    return {"status": "passed", "details": details, "skipped_parts": skipped}


def item_versions(run: Run) -> dict:
    res = run.child("versions", run.timeout(120))
    d = res.get("details", {})
    run.cuda = bool(d.get("cuda_available"))
    run.gpu_mem_gib = float((d.get("gpu") or {}).get("memory_gib") or 0.0)
    if run.mode != "smoke" and not run.cuda and res["status"] != "failed":
        res = {**res, "status": "failed",
               "reason": "no CUDA device: this mode needs one (use --smoke on a machine without a GPU)"}
    return res


def item_kernel(run: Run) -> dict:
    return run.child("kernel_correctness", run.timeout(300))


def item_augment(run: Run) -> dict:
    return run.child("augment_device", run.timeout(180))


def _train_args(data: Path, method: str, arch: str, epochs: int, batch: int, device: str, workers: int,
                out: Path, name: str, compile_: bool = False, resume: bool = False) -> list[str]:
    """`ccl train` flags for a method spec ("ccl-alternate" = ccl with the alternate schedule)."""
    meth, _, schedule = method.partition("-")
    args = ["train", "--data", data, "--method", meth, "--arch", arch, "--epochs", epochs, "--warmup", 1,
            "--batch-size", batch, "--device", device, "--amp", "--schedule", schedule or "joint",
            "--workers", workers, "--out", out, "--name", name, "--quiet"]
    return cli(*args, *(["--compile"] if compile_ else []), *(["--resume"] if resume else []))


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses(records: list[dict]) -> dict[str, float]:
    """Every logged training loss (the train_* means) of every epoch, by epoch."""
    return {f"{k}@{r['epoch']}": v for r in records for k, v in r.items()
            if k.startswith("train_") and isinstance(v, (int, float))}


def _inspect(run: Run, paths: list[Path]) -> dict:
    """Checkpoint contents, read on the CPU in a child (CUDA hidden: the files must load on a CPU-only machine)."""
    if not paths:
        return {}
    out = run.out / "items" / "checkpoints.json"
    out.unlink(missing_ok=True)
    run.proc([sys.executable, str(SELF), str(out), "--inspect", *map(str, paths)], "inspect.log", 300,
             cpu_only=True).wait()
    return json.loads(out.read_text()) if out.is_file() else {}


def _method_specs(run: Run, *lists) -> list[tuple[str, ...]]:
    """Each list of method specs as given, ALL_METHODS as every method ccl trains: METHODS's names, as the
    versions item's child reported them (this process imports no ccl, so a broken install is a finding, not a
    crash), and ccl-alternate."""
    if ALL_METHODS not in lists:
        return [tuple(x) for x in lists]
    names = run.results.get("versions", {}).get("details", {}).get("methods")
    if not names:
        raise Fail("the versions item reported no method names (ccl did not import there)")
    every = (*names, "ccl-alternate")
    return [every if x == ALL_METHODS else tuple(x) for x in lists]


def item_train_steps(run: Run) -> dict:
    """train_amp, and train_compile's runs with it: all start together on the GPU (it has room for all of them),
    two at a time on the CPU. train_compile's result waits in `run.compile_result` for its own item."""
    t0 = time.monotonic()
    cfg, wanted = run.cfg, _wanted(run)
    train_methods, compile_methods = _method_specs(run, cfg["train_methods"], cfg["compile_methods"])
    specs = [("amp", m) for m in train_methods if "train_amp" in wanted]
    specs += [("compile", m) for m in compile_methods if "train_compile" in wanted]
    data = run.need_data("tiny32")["tiny32"]
    device = "cuda" if run.cuda else "cpu"
    n_compile = sum(kind == "compile" for kind, _ in specs)
    procs: dict[tuple[str, str], Proc] = {}

    def starter(kind: str, method: str):
        def start() -> Proc:
            # On the CPU two runs share the cores: one thread each, so neither waits at the other's barriers.
            extra = {} if run.cuda else {"OMP_NUM_THREADS": "1"}
            if kind == "compile" and run.mode == "smoke":
                extra["TORCH_COMPILE_OVERRIDE_BACKENDS"] = SMOKE_COMPILE_BACKEND
            elif kind == "compile":  # the compiling runs share the cores instead of each taking all of them
                extra["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, run.cpus // n_compile))
            cmd = _train_args(data, method, "resnet_tiny", cfg["steps_epochs"], cfg["steps_batch"], device,
                              2 if run.cuda else 1, run.out / "runs", f"{kind}-{method}", compile_=kind == "compile")
            procs[(kind, method)] = run.proc(cmd, f"{kind}-{method}.log", run.timeout(cfg["jobs_timeout_s"]),
                                             extra_env=extra)
            return procs[(kind, method)]

        return start

    run_all([starter(kind, m) for kind, m in specs], parallel=len(specs) if run.cuda else 2)
    last = {spec: run.out / "runs" / f"{spec[0]}-{spec[1]}" / "checkpoints" / "last.pt" for spec in specs}
    ckpts = _inspect(run, [p for p in last.values() if p.is_file()])
    for kind in ("amp", "compile"):
        rows, problems = [], []
        for spec in (s for s in specs if s[0] == kind):
            row, why = _judge_steps(run, spec[1], procs[spec], last[spec], ckpts.get(str(last[spec]), {}))
            rows.append(row)
            problems += [f"{spec[1]}: {w}" for w in why]
        skipped = [] if run.cuda else ["the GradScaler's live state: CPU autocast is bf16 and runs without a "
                                       "scaler (its state is saved, empty); fp16 with the scaler needs CUDA"]
        if kind == "compile":
            if run.mode == "smoke":
                skipped.append(f"Inductor code generation: smoke compiles with TORCH_COMPILE_OVERRIDE_BACKENDS="
                               f"'{SMOKE_COMPILE_BACKEND}' (Dynamo and AOT autograd without Inductor's ~90 s of "
                               f"C++ codegen for the CPU; CUDA runs Inductor and Triton)")
            others = [m for m in train_methods if m not in compile_methods]
            if others:
                skipped.append(f"--compile for {', '.join(others)}: {run.mode} mode compiles "
                               f"{', '.join(compile_methods)} only (the compiled modules are the networks, "
                               f"which every method shares)")
        result = {"status": "failed" if problems else "passed", "skipped_parts": skipped,
                  "details": {"device": device, "data": str(data), "epochs": cfg["steps_epochs"], "warmup": 1,
                              "batch": cfg["steps_batch"], "runs": rows},
                  "seconds": max((r["seconds"] for r in rows), default=0.0)}
        if problems:
            result["reason"] = "; ".join(problems)[:2000]
        if kind == "compile":
            run.compile_result = result if "train_compile" in wanted else None
        elif "train_amp" in wanted:
            amp = result | {"seconds": time.monotonic() - t0}  # the whole batch, compiling runs included
    if "train_amp" not in wanted:
        raise Skip("not selected (--only)")
    return amp


def _judge_steps(run: Run, method: str, proc: Proc, ckpt: Path, info: dict) -> tuple[dict, list[str]]:
    """One short training run's evidence, and what is wrong with it: it exited 0, logged every epoch, every loss
    is finite, and its checkpoint holds the GradScaler's state (a live fp16 scale on CUDA) and no compile keys."""
    records = _metrics(ckpt.parent.parent)
    losses = _losses(records)
    if "train_amp" in BREAK and losses:
        losses[next(iter(losses))] = math.nan
    row = {"method": method, "seconds": round(proc.seconds, 1), "exit": proc.rc, "epochs": len(records),
           "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses.values()),
           "train_loss": [r.get("train_loss") for r in records], "scaler": info.get("scaler"),
           "compile_prefixed_keys": info.get("compile_prefixed_keys"), "command": " ".join(proc.cmd)}
    if proc.failure():
        return row, [proc.failure()]
    why = []
    if len(records) != run.cfg["steps_epochs"]:
        why.append(f"{len(records)} epochs logged, expected {run.cfg['steps_epochs']}")
    if not row["losses_finite"]:
        why.append(f"non-finite or missing losses {losses}")
    if not info.get("has_scaler"):
        why.append(f"the checkpoint has no scaler state ({info.get('error', info.get('keys'))})")
    elif run.cuda and not (0 < info["scaler"].get("scale", 0) < math.inf):
        why.append(f"the GradScaler state is not a live fp16 scaler: {info['scaler']}")
    if info.get("compile_prefixed_keys"):
        why.append("the checkpoint holds compiled-module keys (_orig_mod)")
    return row, why


def item_train_compile(run: Run) -> dict:
    if run.compile_result is None:
        raise Skip("not run: its runs start with train_amp's")
    return run.compile_result


def _wanted(run: Run) -> set[str]:
    return set(ITEMS) if run.only is None else run.only


def item_resume_cpu(run: Run) -> dict:
    cfg = run.cfg
    src = run.out / "runs" / "amp-ccl"
    if not (src / "checkpoints" / "last.pt").is_file():
        raise Skip("no checkpoint to resume: train_amp's ccl run wrote none")
    data = run.need_data("tiny32")["tiny32"]
    dst = run.out / "runs" / "resume-cpu"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    epochs = cfg["steps_epochs"] + 1
    cmd = _train_args(data, "ccl", "resnet_tiny", epochs, cfg["steps_batch"], "cpu", 1, run.out / "runs",
                      "resume-cpu", resume=True)
    p = run.proc(cmd, "resume-cpu.log", run.timeout(240), cpu_only=True).wait()
    eval_json = run.out / "runs" / "resume-cpu-eval.json"
    e = run.proc(cli("eval", "--checkpoint", src / "checkpoints" / "last.pt", "--device", "cpu", "--json", eval_json),
                 "eval-cpu.log", run.timeout(180), cpu_only=True).wait()
    records = _metrics(dst)
    losses = _losses(records)
    details = {"written_on": "cuda" if run.cuda else "cpu", "resumed_on": "cpu", "epochs_logged": len(records),
               "last_epoch": records[-1] if records else None, "resume_command": " ".join(p.cmd),
               "eval_command": " ".join(e.cmd),
               "eval": json.loads(eval_json.read_text()) if eval_json.is_file() else None}
    problems = []
    if p.failure():
        problems.append(f"resume: {p.failure()}")
    elif len(records) != epochs or not losses or not all(math.isfinite(v) for v in losses.values()):
        problems.append(f"resume: {len(records)} epochs logged (expected {epochs}), losses {losses}")
    if e.failure():
        problems.append(f"eval: {e.failure()}")
    elif not details["eval"] or "ens_top1" not in details["eval"]:
        problems.append(f"eval: no ensemble accuracy in {details['eval']}")
    skipped = [] if run.cuda else ["across devices: the checkpoint was written on the CPU (no CUDA)"]
    return _verdict(details, problems, skipped)


def item_bench_kernel(run: Run) -> dict:
    cfg = run.cfg
    why = run.fits(ESTIMATE_S["bench_kernel"]) if run.mode != "smoke" else None
    if why:
        raise Skip(why)
    ns, d = cfg["bench_kernel_ns"], cfg["bench_kernel_d"]
    # The reference materialises [4, N, N] fp32 matrices, about 7.5 of them at its peak (measured on the CPU at
    # N = 8192: 7.7 GB for 1 GiB matrices). Where that exceeds 70% of the GPU, only the fused versions run.
    def ref_fits(n):
        return not run.cuda or 7.5 * 4 * n * n * 4 < 0.7 * run.gpu_mem_gib * 2**30

    with_ref = [n for n in ns if ref_fits(n)]
    fused_only = [n for n in ns if not ref_fits(n)]
    rows, problems, commands = [], [], []
    skipped = [] if run.cuda else ["Triton: needs CUDA (`ccl bench kernel` times reference and torch on the CPU)"]
    if with_ref:
        out = run.out / "bench_kernel.json"
        cmd = cli("bench", "kernel", *[a for n in with_ref for a in ("--n", n)], "--d", d, "--json", out)
        p = run.proc(cmd, "bench-kernel.log", run.timeout(300)).wait()
        commands.append(" ".join(cmd))
        if p.failure():
            problems.append(p.failure())
        elif out.is_file():
            rows += json.loads(out.read_text())["rows"]
    if fused_only:
        out = run.out / "bench_kernel_fused.json"
        code = ("from ccl.bench.kernel import bench_kernel; "
                f"bench_kernel(ns={tuple(fused_only)!r}, d={d}, impls=('torch', 'triton'), json_path={str(out)!r})")
        cmd = [sys.executable, "-c", code]
        p = run.proc(cmd, "bench-kernel-fused.log", run.timeout(300)).wait()
        commands.append(" ".join(cmd))
        skipped.append(f"reference at N={', '.join(map(str, fused_only))}: its [4, N, N] matrices would need about "
                       f"{7.5 * 16 * max(fused_only) ** 2 / 2**30:.0f} GiB")
        if p.failure():
            problems.append(p.failure())
        elif out.is_file():
            rows += json.loads(out.read_text())["rows"]
    details = {"d": d, "rows": rows, "commands": commands}
    return _verdict(details, problems, skipped)


class GpuMemorySampler:
    """Device-wide memory in use (nvidia-smi, every 0.2 s) above what was in use at the start: the peak of a child
    run that has the GPU to itself, CUDA context and allocator cache included, so an upper bound of its tensors."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.base = self.peak = None
        self._stop = threading.Event()

    def _read(self) -> float | None:
        v = nvidia_smi("memory.used")
        try:
            return float(v.splitlines()[0]) if v else None
        except ValueError:
            return None

    def __enter__(self):
        if self.enabled:
            self.base = self._read()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.2):
            v = self._read()
            if v is not None:
                self.peak = v if self.peak is None else max(self.peak, v)

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()

    def used_mb(self) -> float | None:
        if self.base is None or self.peak is None:
            return None
        return round(self.peak - self.base, 0)


def item_bench_train(run: Run) -> dict:
    cfg = run.cfg
    sets = run.need_data(*{data for _, data, _ in cfg["bench_train"]})
    device = "cuda" if run.cuda else "cpu"
    workers = max(1, min(8, run.cpus - 2)) if run.cuda else 1
    rows, problems, skipped = [], [], []
    for arch, data, schedule in cfg["bench_train"]:
        if run.mode != "smoke":
            why = run.fits(ESTIMATE_S.get((arch, schedule), 60))
            if why:
                skipped.append(f"{arch} {data} {schedule}: {why}")
                continue
        name = f"bench-{arch}-{data}-{schedule}"
        px = cfg["sets"][data][0]
        cmd = _train_args(sets[data], f"ccl-{schedule}", arch, cfg["train_epochs"], cfg["train_batch"], device,
                          workers, run.out / "runs", name)
        with GpuMemorySampler(run.cuda) as mem:
            p = run.proc(cmd, f"{name}.log", run.timeout(300)).wait()
        records = _metrics(run.out / "runs" / name)
        row = {"arch": arch, "data": data, "image_px": px, "train_px": px if px <= 64 else 224,
               "batch": cfg["train_batch"], "schedule": schedule, "method": "ccl", "amp": True, "device": device,
               "train_images": cfg["sets"][data][2], "workers": workers, "seconds": round(p.seconds, 1),
               "command": " ".join(p.cmd)}
        if p.failure() or not records:
            problems.append(f"{name}: {p.failure() or 'no metrics'}")
            rows.append(row)
            continue
        last = records[-1]  # past the warm-up epoch and CCL's first (Triton compiles then) where epochs allow
        row |= {"timed_epoch": last["epoch"], "images_per_s": round(last["images_per_s"], 1),
                # the loop counts an image once per pass, and alternate makes two passes: per epoch is comparable
                "epoch_images_per_s": round(cfg["sets"][data][2] / max(last["epoch_time"], 1e-9), 1),
                "data_wait": round(last["data_wait"], 4), "epoch_time_s": round(last["epoch_time"], 2),
                "estimate_time_s": round(last.get("estimate_time", 0.0), 2),
                "gpu_mem_peak_mb": last.get("gpu_mem_peak_mb"),
                "gpu_mem_used_peak_mb_nvidia_smi": mem.used_mb(),
                "images_per_s_by_epoch": [round(r["images_per_s"], 1) for r in records],
                "losses_finite": all(math.isfinite(v) for v in _losses(records).values())}
        rows.append(row)
        if not row["losses_finite"]:
            problems.append(f"{name}: non-finite losses")
    if not run.cuda:
        skipped.append("ResNet-50/18 and peak GPU memory: smoke trains resnet_tiny on the CPU at tiny sizes")
    details = {"rows": rows,
               "note": "images/s, data-wait (fraction of the step time spent waiting for data) and epoch time of "
                       "the last epoch; gpu_mem_peak_mb comes from the loop's metrics where it reports it"}
    return _verdict(details, problems, skipped, rows)


def _bench_pipeline(run: Run, backend: str, names: list[str], log: str) -> tuple[list[dict], list[str], list[str]]:
    cfg = run.cfg
    rows, problems, skipped = [], [], []
    device = "cuda" if run.cuda else "cpu"
    workers = max(1, min(8, run.cpus - 2)) if run.cuda else 1
    batch = 128 if run.cuda else 16
    chosen = []
    budget = ESTIMATE_S["dali_set" if backend == "dali" else "pipeline_set"]
    for name in names:
        why = run.fits(budget * (len(chosen) + 1)) if run.mode != "smoke" else None
        if why:
            skipped.append(f"{name}: {why}")
        else:
            chosen.append(name)
    if not chosen:
        return rows, problems, skipped
    sets = run.need_data(*chosen)
    out = run.out / f"bench_pipeline_{backend}.json"
    code = ("from ccl.bench.pipeline import bench_pipeline; "
            f"bench_pipeline(data={[str(sets[n]) for n in chosen]!r}, backends=({backend!r},), batch_size={batch}, "
            f"num_workers={workers}, steps={cfg['pipeline_steps']}, warmup={min(5, cfg['pipeline_steps'])}, "
            f"rounds={cfg['pipeline_rounds']}, device={device!r}, json_path={str(out)!r})")
    cmd = [sys.executable, "-c", code]
    p = run.proc(cmd, log, run.timeout(120 + 60 * len(chosen))).wait()
    if p.failure():
        problems.append(p.failure())
    elif out.is_file():
        for r in json.loads(out.read_text())["results"]:
            if "error" in r:
                problems.append(f"{Path(r['path']).name}: {r['error']}")
            rows.append({k: r.get(k) for k in ("dataset", "path", "image_size", "backend", "batch_size",
                                                "num_workers", "device", "images_per_s", "images_per_s_std",
                                                "rounds", "pss_total_mb", "error")})
    for r in rows:
        r["command"] = " ".join(cmd)
    return rows, problems, skipped


def item_bench_pipeline(run: Run) -> dict:
    rows, problems, skipped = _bench_pipeline(run, "torch", list(run.cfg["pipeline_sets"]), "bench-pipeline.log")
    if not run.cuda:
        skipped.append("augmenting on the GPU: needs CUDA (smoke augments on the CPU)")
    details = {"rows": rows, "note": "images/s from shards to model-ready (weak, strong, mixup) batches: decoding "
                                     "in CPU workers, augmentation on the training device"}
    return _verdict(details, problems, skipped, rows)


def item_bench_dali(run: Run) -> dict:
    if not run.cuda:
        raise Skip("DALI's mixed decoder (nvJPEG) needs CUDA")
    if not run.results.get("versions", {}).get("details", {}).get("dali"):
        raise Skip("DALI is not installed (put an nvidia-dali wheel in .whl/ to include it)")
    rows, problems, skipped = _bench_pipeline(run, "dali", list(run.cfg["dali_sets"]), "bench-dali.log")
    details = {"rows": rows, "note": "DALI's webdataset reader with fn.decoders.image(device='mixed'); PNGs decode "
                                     "on DALI's CPU threads, JPEGs with nvJPEG"}
    return _verdict(details, problems, skipped, rows)


PARENT = {
    "versions": item_versions, "kernel_correctness": item_kernel, "augment_device": item_augment,
    "train_amp": item_train_steps, "train_compile": item_train_compile, "resume_cpu": item_resume_cpu,
    "bench_kernel": item_bench_kernel, "bench_train": item_bench_train, "bench_pipeline": item_bench_pipeline,
    "bench_dali": item_bench_dali,
}
