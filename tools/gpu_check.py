"""GPU readiness: one run that checks every GPU path of ccl and measures it (run it through tools/gpu_check.sh).

    tools/gpu_check.sh OUT [--quick | --smoke] [--only NAME,...] [--budget SECONDS]

Writes OUT/gpu_check.json (every item below with its status, passed, failed or skipped, the reason for a skip or a
failure, its seconds and its figures) and OUT/gpu_check.md (a short summary), and rewrites both after every item,
so a run cut short keeps what it measured. Exit status: 0 when no item failed, even where a benchmark was skipped
(DALI absent, the time budget spent); 1 when an item failed; 2 on a usage error.

Items, in the order they run:
  versions            torch, CUDA, cuDNN, Triton, Kornia, webdataset, DALI; the GPU's name and memory
  kernel_correctness  the fused contrastive kernel, torch and compiled Triton, against the reference in fp64:
                      values and gradients, fp32/bf16/fp16, N = 128 and 4096
  augment_device      device augmentation (weak, strong and contrastive views): the same seed draws the same ops
                      and parameters on CUDA as on the CPU, and the views agree within AUG_FRAC_TOL / AUG_MEAN_TOL
  train_amp           a few fp16 steps with the GradScaler for every method of ccl.train.methods.METHODS (ccl in
                      both schedules) on tiny shards: finite losses, the scaler's state in the checkpoint
  train_compile       the same with --compile
  resume_cpu          the ccl checkpoint written on the GPU resumes training, and evaluates, on the CPU
  bench_train         images/s, data-wait fraction and peak GPU memory of twin ResNet-50s at 224 px (batch 128,
                      AMP, CCL joint and alternate) and twin ResNet-18s at 32 px, on synthetic shards made here
  bench_kernel        `ccl bench kernel` on CUDA up to N = 32768: time and peak memory per implementation
  bench_pipeline      `ccl bench pipeline`: the torch backend decoding on CPU workers, augmenting on the GPU
  bench_dali          the same with DALI's `mixed` (nvJPEG) decoder, where DALI is installed

Modes (sizes and budgets in MODES):
  full   a CUDA machine; the driver keeps to a 450 s budget, so with the wrapper's installs the run fits 8 minutes
  quick  a CUDA machine, under 3 minutes: fewer sizes, one compiled method, the joint schedule only
  smoke  the CPU at tiny sizes: the same code paths, skipping only what needs CUDA (each skip named in the JSON);
         tests/test_gpu_check.py runs it, so the script cannot rot between GPU runs

How it runs:
- every item runs in child processes with a timeout, so a CUDA error or a crash costs that item, not the run; this
  process never initialises CUDA, so the device-memory figures are the children's alone;
- the training path is used only through the CLI (`python -m ccl.cli`), as a user runs it;
- correctness checks always run; a benchmark that would not finish within the budget is skipped and says so;
- CCL_GPU_CHECK_BREAK=NAME[,NAME] perturbs what the named checks compare, so the test can show that they fail.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()

# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------

# Synthetic shard sets: name -> (side px, image format, train images, test images). Noise: 40% symmetric, so the
# label-confidence path (GMM, detection metrics) runs as on real noisy data.
_SETS_FULL = {
    "tiny32": (32, "png", 128, 64),  # the correctness runs: a few steps per epoch at batch 32
    "cifar32": (32, "png", 10240, 512),  # ResNet-18 throughput: 80 steps of 128 per epoch
    "animal64": (64, "jpg", 4096, 256),  # pipeline benchmark, Animal-10N-like
    "img224": (224, "jpg", 3072, 128),  # ResNet-50 throughput: 24 steps of 128 per epoch
}

# The training items' method specs: ALL_METHODS is every method of ccl.train.methods.METHODS (the one list of
# method names, read in a child by `_method_specs`), then "ccl-alternate" (ccl under the alternate schedule).
ALL_METHODS = "all"

MODES = {
    "full": dict(
        budget_s=450,  # the driver's budget; the wrapper's installs (seconds) come on top, 8 minutes in all
        sets=_SETS_FULL,
        kernel_ns=(128, 4096), kernel_dtypes=("float32", "bfloat16", "float16"),
        aug_cases=(("cifar", 64, (32, 32), 32), ("imagenet", 16, (180, 240), 224)),  # style, N, input HxW, size
        train_methods=ALL_METHODS,
        compile_methods=ALL_METHODS,
        steps_batch=32, steps_epochs=2, jobs_timeout_s=300,
        bench_kernel_ns=(128, 1024, 4096, 16384, 32768), bench_kernel_d=128,
        bench_train=(("resnet50", "img224", "joint"), ("resnet50", "img224", "alternate"),
                     ("resnet18", "cifar32", "joint")),
        # epoch 0 is the CE warm-up, epoch 1 CCL's first (it compiles the Triton kernels), epoch 2 is the one timed
        train_batch=128, train_epochs=3,
        pipeline_sets=("cifar32", "animal64", "img224"), pipeline_steps=30, pipeline_rounds=3,
        dali_sets=("animal64", "img224"),  # JPEGs: nvJPEG's formats (DALI decodes PNGs on its CPU threads)
    ),
    "quick": dict(
        budget_s=170,
        sets={"tiny32": _SETS_FULL["tiny32"], "cifar32": (32, "png", 5120, 256), "img224": (224, "jpg", 1536, 128)},
        kernel_ns=(128, 4096), kernel_dtypes=("float32", "float16"),  # fp16: the dtype of AMP on CUDA
        aug_cases=(("cifar", 64, (32, 32), 32), ("imagenet", 16, (180, 240), 224)),
        train_methods=ALL_METHODS,
        compile_methods=("ccl",),
        steps_batch=32, steps_epochs=2, jobs_timeout_s=150,
        bench_kernel_ns=(4096, 32768), bench_kernel_d=128,
        bench_train=(("resnet50", "img224", "joint"), ("resnet18", "cifar32", "joint")),
        train_batch=128, train_epochs=3,
        pipeline_sets=("cifar32", "img224"), pipeline_steps=20, pipeline_rounds=2,
        dali_sets=("img224",),
    ),
    "smoke": dict(
        budget_s=900,  # not a target: smoke skips nothing for time; a bound on a stuck run
        # img224 stands for the 224 px sets: any set over 64 px trains on 224 px crops, which costs the CPU most
        sets={"tiny32": (32, "png", 96, 32), "cifar32": (32, "png", 48, 16), "img224": (80, "jpg", 8, 8)},
        kernel_ns=(32, 128), kernel_dtypes=("float32", "bfloat16", "float16"),
        aug_cases=(("cifar", 16, (32, 32), 32), ("imagenet", 8, (60, 80), 64)),
        train_methods=ALL_METHODS,
        # torch.compile's graph capture and AOT autograd run for ccl; see SMOKE_COMPILE_BACKEND for the codegen.
        compile_methods=("ccl",),
        steps_batch=32, steps_epochs=2, jobs_timeout_s=240,
        bench_kernel_ns=(48,), bench_kernel_d=32,
        # resnet_tiny stands in for ResNet-50/18: the same loop and 224/32 px data paths, both schedules
        bench_train=(("resnet_tiny", "img224", "joint"), ("resnet_tiny", "cifar32", "alternate")),
        train_batch=16, train_epochs=2,  # a few steps per pass: small batches cost the CPU per step, not per image
        pipeline_sets=("cifar32", "img224"), pipeline_steps=2, pipeline_rounds=1,
        dali_sets=(),
    ),
}

# Rough seconds of each benchmark on one H100/H200-class GPU, for the budget: a benchmark starts only when the
# budget still holds this much. Guesses until a GPU run replaces them with measured figures.
ESTIMATE_S = {"bench_kernel": 45, "pipeline_set": 20, "dali_set": 20,
              ("resnet50", "joint"): 45, ("resnet50", "alternate"): 60,
              ("resnet18", "joint"): 30}

TAU = 0.5  # contrastive temperature of the kernel check (the training default)
# Kernel check tolerances against the fp64 reference on the same (rounded) inputs: (max absolute error of the ce
# and kl values, relative Frobenius error of each gradient). fp32 runs at IEEE precision (no TF32). bf16/fp16
# gradients come back in the input dtype and the Triton backward casts dS to it before its second product, so
# their error is of the order of that dtype's rounding (2^-8 for bf16, 2^-11 for fp16).
KERNEL_TOL = {"float32": (1e-3, 1e-4), "bfloat16": (1e-3, 2e-2), "float16": (1e-3, 4e-3)}
INTERPRETER_MAX_N = 32  # interpreted Triton (smoke) costs about a second per call at N = 32, and grows as N^2
# Pixel agreement of a CUDA view with the CPU view of the same draws, in units of the pixel range [0, 1]: at most
# AUG_FRAC_TOL of the values may differ by more than 1/255 (a nearest-neighbour warp picks a neighbouring source
# pixel where a coordinate rounds the other way; a quantising op, posterize or solarize's threshold, moves a value
# by a whole step where the two devices round it the other way: on the first H200 run 0.125% of the strong view's
# values differed, by at most 4/255, a 6-bit posterize step), and the mean absolute difference stays under
# AUG_MEAN_TOL. A wrong op or wrong draw differs on a large part of the image, far above either bound.
AUG_FRAC_TOL = 5e-3
AUG_MEAN_TOL = 5e-4
# Float parameters (crop boxes in px, op values in their units) are computed on the device from the same uniform
# draws, partly through exp/sqrt: equal up to float rounding.
AUG_PARAM_TOL = 1e-3
# Smoke: Inductor's C++ code generation for the CPU takes about 90 s for one tiny twin run on 2 cores, and it is not
# the GPU's code generator (Triton) anyway, so smoke compiles with AOT autograd and eager kernels: the same Dynamo
# graph capture and AOT autograd tracing that fail on unsupported code, without the codegen.
SMOKE_COMPILE_BACKEND = ">=0:aot_eager"

# The order they run in. The benchmarks go by value, so that a short budget costs the training figures last.
ITEMS = ("versions", "kernel_correctness", "augment_device", "train_amp", "train_compile", "resume_cpu",
         "bench_train", "bench_kernel", "bench_pipeline", "bench_dali")
CHECKS = ("versions", "kernel_correctness", "augment_device", "train_amp", "train_compile", "resume_cpu")
REQUIRED = ("kornia", "webdataset")  # declared dependencies that a bare GPU image may lack (the wrapper installs)
BREAK = set(filter(None, os.environ.get("CCL_GPU_CHECK_BREAK", "").split(",")))  # deliberately broken checks


class Skip(Exception):
    """The item (or a part of it) cannot run here; the message says why."""


class Fail(Exception):
    """The item ran and found something wrong."""

    def __init__(self, reason: str, details: dict | None = None):
        super().__init__(reason)
        self.details = details or {}


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------


def child_env(mode: str, cpu_only: bool = False) -> dict:
    """The environment of every child: smoke and CPU-only children see no GPU; GPU children run compiled Triton."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if mode == "smoke" or cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if mode == "smoke":
        env["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: must be set before the first import
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:].strip()


_LIVE: list[Proc] = []  # children still running: ended with this process when it is interrupted


def end_children() -> None:
    for p in _LIVE:
        try:
            os.killpg(p.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class Proc:
    """One child process with its output in a log file; killed with its process group at its deadline."""

    def __init__(self, cmd: list[str], log: Path, env: dict, timeout: float, cwd: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.cmd, self.log, self.timeout = cmd, log, max(1.0, timeout)
        self._f = open(log, "w")
        self._f.write("$ " + " ".join(cmd) + "\n")
        self._f.flush()
        self.t0 = time.monotonic()
        # A session of its own, so a timeout kills the DataLoader workers and compile workers it started too.
        self.p = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True)
        _LIVE.append(self)
        self.rc: int | None = None
        self.timed_out = False
        self.seconds = 0.0

    def poll(self) -> bool:
        """True once finished (or killed at its deadline)."""
        if self.rc is not None:
            return True
        rc = self.p.poll()
        if rc is None and time.monotonic() - self.t0 > self.timeout:
            self.timed_out = True
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = self.p.wait()
        if rc is None:
            return False
        self.rc, self.seconds = rc, time.monotonic() - self.t0
        self._f.close()
        _LIVE.remove(self)
        return True

    def wait(self) -> Proc:
        while not self.poll():
            time.sleep(0.1)
        return self

    def failure(self) -> str | None:
        """None when it exited 0; else one line of why, with the end of its output."""
        if self.rc == 0 and not self.timed_out:
            return None
        why = f"timed out after {self.timeout:.0f} s" if self.timed_out else f"exit status {self.rc}"
        return f"{why}: {_tail(self.log, 600)}"


def run_all(procs: list, parallel: int) -> None:
    """Start the (lazily built) processes `parallel` at a time and wait for all of them."""
    pending, running = list(procs), []
    while pending or running:
        while pending and len(running) < parallel:
            running.append(pending.pop(0)())
        running = [p for p in running if not p.poll()]
        time.sleep(0.1)


def cli(*args) -> list[str]:
    """The ccl command line, run as a module so it needs no console script on the PATH."""
    return [sys.executable, "-m", "ccl.cli", *map(str, args)]


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


class Run:
    """The state of one check run: mode, output folder, budget, results so far."""

    def __init__(self, out: Path, mode: str, only: set[str] | None, budget: float | None):
        self.out, self.mode, self.only = out, mode, only
        self.cfg = MODES[mode]
        self.budget = float(budget if budget is not None else self.cfg["budget_s"])
        self.t0 = time.monotonic()
        self.started = dt.datetime.now(dt.timezone.utc)
        self.results: dict[str, dict] = {}
        self.cuda = False  # set from the versions item
        self.gpu_mem_gib = 0.0
        self.cpus = os.cpu_count() or 1
        self.data_proc: Proc | None = None
        self.data: dict[str, Path] = {}
        self.compile_result: dict | None = None  # train_compile's runs start together with train_amp's
        self.interrupted = False

    # -- time --------------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def timeout(self, cap: float) -> float:
        """A child's timeout: its cap, but never far past the budget (checks still get a minute when it is spent)."""
        return min(cap, max(60.0, self.left()))

    def fits(self, estimate: float) -> str | None:
        """None when a benchmark of `estimate` seconds fits the budget; else the reason to skip it."""
        if self.left() >= estimate:
            return None
        left = max(0.0, self.left())
        return f"time budget: {left:.0f} s of {self.budget:.0f} s left, it needs about {estimate:.0f} s"

    # -- processes ---------------------------------------------------------------------------------------------

    def proc(self, cmd, log: str, timeout: float, cpu_only: bool = False, extra_env: dict | None = None) -> Proc:
        env = child_env(self.mode, cpu_only) | (extra_env or {})
        return Proc(cmd, self.out / "logs" / log, env, timeout, cwd=self.out)

    def child(self, name: str, timeout: float) -> dict:
        """Run one in-process item (CHILD) in a fresh process and return its result."""
        path = self.out / "items" / f"{name}.json"
        path.unlink(missing_ok=True)
        p = self.proc([sys.executable, str(SELF), str(self.out), "--child", name, "--mode", self.mode],
                      f"{name}.log", timeout).wait()
        if path.is_file():
            return json.loads(path.read_text())
        return {"status": "failed", "reason": p.failure() or "the child wrote no result"}

    # -- data --------------------------------------------------------------------------------------------------

    def start_data(self, names: list[str]) -> None:
        """Build the synthetic shard sets in the background while the first checks run."""
        names = [n for n in names if n in self.cfg["sets"]]
        for n in names:
            self.data[n] = set_path(self.out, n, self.cfg["sets"][n])
        if names:
            self.data_proc = self.proc([sys.executable, str(SELF), "--make-data", str(self.out), "--mode", self.mode,
                                        "--sets", ",".join(names)], "data.log", 900, cpu_only=True)

    def need_data(self, *names: str) -> dict[str, Path]:
        """The shard sets, once built (an item without its data fails: the data are this script's to make)."""
        if self.data_proc is not None:
            self.data_proc.wait()
            if self.data_proc.failure():
                raise Fail(f"the synthetic shards could not be built: {self.data_proc.failure()}")
        missing = [n for n in names if not (self.data.get(n, Path("/nonexistent")) / "manifest.json").is_file()]
        if missing:
            raise Fail(f"synthetic shard sets missing: {', '.join(missing)}")
        return {n: self.data[n] for n in names}

    # -- results -----------------------------------------------------------------------------------------------

    def record(self, name: str, result: dict, seconds: float) -> None:
        seconds = result.pop("seconds", seconds)  # an item whose runs started with another's reports its own
        result = {"name": name, "kind": "check" if name in CHECKS else "benchmark", **result,
                  "seconds": round(seconds, 1)}
        result.setdefault("details", {})
        result.setdefault("skipped_parts", [])
        self.results[name] = result
        line = f"[{self.elapsed():6.1f} s] {name:<20} {result['status']}"
        if result.get("reason"):
            line += f": {result['reason'][:300]}"
        print(line, flush=True)
        self.write(finished=False)

    def report(self, finished: bool) -> dict:
        items = [self.results.get(n) or {"name": n, "kind": "check" if n in CHECKS else "benchmark",
                                         "status": "skipped", "reason": "not reached", "seconds": 0.0,
                                         "details": {}, "skipped_parts": []} for n in ITEMS]
        failed = [r["name"] for r in items if r["status"] == "failed"]
        versions = self.results.get("versions", {}).get("details", {})
        return {
            "schema": 1,
            "mode": self.mode,
            "device": "cuda" if self.cuda else "cpu",
            "gpu": versions.get("gpu"),
            "started": self.started.isoformat(timespec="seconds"),
            "finished": finished,
            "seconds": round(self.elapsed(), 1),
            "cpu_s": round(_cpu_seconds(), 1),
            "load_average": [round(x, 1) for x in os.getloadavg()],  # other jobs' share of the machine
            "budget_s": self.budget,
            "interrupted": self.interrupted,
            "passed": finished and not failed,  # a run still going, or cut short, has not passed
            "failed": failed,
            "exit_code": 130 if self.interrupted else 1 if failed else 0,
            "command": " ".join(sys.argv),
            "git_sha": _git_sha(),
            "versions": versions,
            "items": items,
        }

    def write(self, finished: bool) -> dict:
        rep = self.report(finished)
        _atomic_write(self.out / "gpu_check.json", json.dumps(rep, indent=1) + "\n")
        _atomic_write(self.out / "gpu_check.md", markdown(rep))
        return rep


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=ROOT,
                             check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main_run(out: Path, mode: str, only: set[str] | None, budget: float | None) -> int:
    run = Run(out, mode, only, budget)
    for sub in ("runs", "items", "logs"):  # this script's own folders: a rerun into OUT starts clean
        shutil.rmtree(out / sub, ignore_errors=True)
    print(f"gpu check, mode {mode}, budget {run.budget:.0f} s, output {out}", flush=True)

    wanted = [n for n in ITEMS if only is None or n in only or n == "versions"]
    sets = {"tiny32"} if {"train_amp", "train_compile", "resume_cpu"} & set(wanted) else set()
    if "bench_train" in wanted:
        sets |= {data for _, data, _ in run.cfg["bench_train"]}
    if "bench_pipeline" in wanted:
        sets |= set(run.cfg["pipeline_sets"])
    if "bench_dali" in wanted:
        sets |= set(run.cfg["dali_sets"])
    run.start_data(sorted(sets))

    try:
        _run_items(run, wanted)
    except KeyboardInterrupt:  # Ctrl-C, or the slot's end (SIGTERM): leave nothing running, keep what was measured
        end_children()
        run.interrupted = True
        rep = run.write(finished=False)
        print(f"gpu check interrupted after {rep['seconds']:.0f} s: {out / 'gpu_check.json'}", flush=True)
        return rep["exit_code"]
    end_children()  # a data build still going is one that no item asked for (no CUDA, say)
    rep = run.write(finished=True)
    verdict = "PASSED" if rep["passed"] else f"FAILED ({', '.join(rep['failed'])})"
    print(f"gpu check {verdict} in {rep['seconds']:.0f} s: {out / 'gpu_check.json'}", flush=True)
    return rep["exit_code"]


def _cpu_seconds() -> float:
    """CPU seconds of this process and of every child it has reaped (with their reaped children): the delta over an
    item is that item's CPU time, which is what a smaller or busier machine pays for it."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _run_items(run: Run, wanted: list[str]) -> None:
    for name in ITEMS:
        t0, cpu0 = time.monotonic(), _cpu_seconds()
        if name not in wanted and not (name == "train_amp" and "train_compile" in wanted):
            result = {"status": "skipped", "reason": "not selected (--only)"}
        elif name != "versions" and run.mode != "smoke" and not run.cuda:
            result = {"status": "skipped", "reason": "no CUDA device (see versions)"}
        else:
            try:
                result = PARENT[name](run)
            except Skip as e:
                result = {"status": "skipped", "reason": str(e)}
            except Fail as e:
                result = {"status": "failed", "reason": str(e), "details": e.details}
            except Exception as e:  # a bug of this script: that item fails, the others still run
                result = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
                          "details": {"traceback": traceback.format_exc()[-3000:]}}
        result["cpu_s"] = round(_cpu_seconds() - cpu0, 1)
        run.record(name, result, time.monotonic() - t0)


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


# ---------------------------------------------------------------------------------------------------------------
# Child items (run inside a fresh process by `--child NAME`)
# ---------------------------------------------------------------------------------------------------------------


def child_versions(cfg: dict, cuda: bool) -> tuple[dict, list[str]]:
    import importlib
    import importlib.metadata as md
    import platform

    import torch

    def version(module: str, dist: str):
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # a broken install is a finding, not a crash
            return None if isinstance(e, ImportError) else f"import failed: {type(e).__name__}: {e}"
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return getattr(mod, "__version__", "?")

    d = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torchvision": version("torchvision", "torchvision"),
        "triton": version("triton", "triton"),
        "kornia": version("kornia", "kornia"),
        "webdataset": version("webdataset", "webdataset"),
        "dali": version("nvidia.dali", "nvidia-dali-cuda130"),
        "cpus": os.cpu_count(),
        "cuda_available": cuda,
        "gpu": None,
    }
    import ccl.train

    d["ccl_source"] = str(Path(ccl.train.__file__).parent)
    d["ccl_code"] = str(Path(ccl.train.__file__).resolve().parent)
    d["install"] = os.environ.get("CCL_GPU_CHECK_INSTALL_REPORT", "")
    skipped = []
    if cuda:
        p = torch.cuda.get_device_properties(0)
        d["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count(),
                    "driver": _nvidia_smi("driver_version")}
    else:
        skipped.append("GPU name and memory: no CUDA device")
    problems = [f"{m} is {d[m] or 'not installed'}" for m in REQUIRED if not d[m] or str(d[m]).startswith("import")]
    if problems:
        problems[-1] += " (fill .whl/ as the README's GPU section says)"
    if d["ccl_code"] != str(ROOT / "train"):
        problems.append(f"ccl imports from {d['ccl_code']}, not from this checkout ({ROOT})")
    if problems:
        raise Fail("; ".join(problems), d)
    return d, skipped


def _nvidia_smi(field: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def child_kernel(cfg: dict, cuda: bool) -> tuple[dict, list[str]]:
    import torch
    import torch.nn.functional as F
    from ccl.train.losses import contrastive_triton as ct
    from ccl.train.losses.contrastive import pair_losses, reference_pair_losses

    dev = torch.device("cuda" if cuda else "cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    skipped, impls = [], ["torch"]
    if cuda:
        if ct.triton is None:
            raise Fail("triton is not importable, so the GPU kernel cannot run")
        if ct.interpreted():
            raise Fail("the Triton kernels were defined for the interpreter (TRITON_INTERPRET=1): unset it")
        impls.append("triton")
    else:
        skipped.append("compiled Triton kernels: need CUDA (the interpreter runs them on the CPU instead)")
        if ct.triton is not None and ct.interpreted():
            impls.append("triton")
        else:
            skipped.append("interpreted Triton: triton is not installed")
    d = 128 if cuda else 32  # the embedding width the training uses; smaller under the CPU interpreter

    def inputs(n, dtype):
        g = torch.Generator().manual_seed(n)
        a = F.normalize(torch.randn(4, n, d, generator=g), dim=-1)  # [K, N, D]
        c = F.normalize(torch.randn(4, n, d, generator=g), dim=-1)  # [K, N, D]
        labels = torch.randint(0, 10, (2, n), generator=g)  # [2, N] refurbished-label classes
        classes = torch.cat([torch.arange(n).expand(2, n), labels])  # [K, N]: ACL/VM, then CCLRL/MM, as CCL uses it
        w = torch.randn(2, 4, n, generator=g)  # [2, K, N] upstream gradient weights of ce and kl
        to = lambda t: t.to(dev, dtype).requires_grad_()
        return to(a), to(c), classes.to(dev), w.to(dev)

    def values_and_grads(fn, a, c, w):
        ce, kl = fn(a, c)  # [K, N] each
        da, dc = torch.autograd.grad((ce * w[0]).sum() + (kl * w[1]).sum(), [a, c])
        return ce.detach().double(), kl.detach().double(), da.double(), dc.double()

    if "bfloat16" not in cfg["kernel_dtypes"]:
        skipped.append("bf16: the full run checks it (training on CUDA autocasts to fp16)")
    cases = []
    ns = cfg["kernel_ns"]
    for n in ns:
        for dname in cfg["kernel_dtypes"]:
            # detach_target=False is the other compiled variant of the backward: once, at the smallest N, fp32.
            for detach in (True, False) if (n == min(ns) and dname == "float32") else (True,):
                a, c, classes, w = inputs(n, dtypes[dname])
                a64, c64 = a.detach().double().requires_grad_(), c.detach().double().requires_grad_()
                ref = functools.partial(reference_pair_losses, classes=classes, tau=TAU, detach_target=detach)
                want = values_and_grads(ref, a64, c64, w)
                for impl in impls:
                    if impl == "triton" and not cuda:
                        if n > INTERPRETER_MAX_N:
                            skipped.append(f"interpreted Triton at N={n}: the interpreter is for N <= "
                                           f"{INTERPRETER_MAX_N}")
                            continue
                        if dname == "bfloat16":
                            skipped.append("interpreted Triton in bf16: Triton's CPU interpreter computes tl.dot of "
                                           "bf16 operands wrongly (a 16x16 product is off by ~1e10), so bf16 Triton "
                                           "is checked compiled, on CUDA")
                            continue
                    t0 = time.perf_counter()
                    fn = functools.partial(pair_losses, classes=classes, tau=TAU, impl=impl, detach_target=detach)
                    got = values_and_grads(fn, a, c, w)
                    seconds = time.perf_counter() - t0
                    if "kernel_correctness" in BREAK:
                        got = (got[0] + 0.01,) + got[1:]
                    errs = _kernel_errors(got, want)
                    val_tol, grad_tol = KERNEL_TOL[dname]
                    ok = errs["value_err"] <= val_tol and max(errs["grad_rel_a"], errs["grad_rel_c"]) <= grad_tol
                    cases.append({"n": n, "d": d, "dtype": dname, "impl": impl, "detach_target": detach,
                                  "compiled": impl != "triton" or cuda, **errs, "value_tol": val_tol,
                                  "grad_tol": grad_tol, "seconds": round(seconds, 3), "ok": ok})
    details = {"device": dev.type, "tau": TAU, "cases": cases}
    bad = [c for c in cases if not c["ok"]]
    if bad:
        first = bad[0]
        raise Fail(f"{len(bad)} of {len(cases)} cases out of tolerance, e.g. {first['impl']} {first['dtype']} "
                   f"N={first['n']}: value error {first['value_err']:.2e}, gradient errors "
                   f"{first['grad_rel_a']:.2e}/{first['grad_rel_c']:.2e}", details)
    return details, sorted(set(skipped))


def _kernel_errors(got, want) -> dict:
    import torch

    ce, kl, da, dc = got
    ce0, kl0, da0, dc0 = want
    finite = all(bool(torch.isfinite(t).all()) for t in got)
    rel = lambda x, y: float((x - y).norm() / y.norm().clamp_min(1e-30))
    value = max(float((ce - ce0).abs().max()), float((kl - kl0).abs().max()))
    return {"value_err": value if finite else math.inf, "grad_rel_a": rel(da, da0) if finite else math.inf,
            "grad_rel_c": rel(dc, dc0) if finite else math.inf, "finite": finite}


def child_augment(cfg: dict, cuda: bool) -> tuple[dict, list[str]]:
    import torch
    from ccl.pipeline.augment import Augment

    dev = torch.device("cuda" if cuda else "cpu")
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    std_cpu = torch.tensor(std).view(1, 3, 1, 1)
    skipped = [] if cuda else ["the CUDA side: needs CUDA (the CPU draws and views were compared with themselves)"]
    cases, problems = [], []
    for style, n, in_hw, size in cfg["aug_cases"]:
        seed = 1234 + n
        x = _smooth_batch(n, in_hw, seed)  # uint8 [N, 3, H, W]
        x_cpu, x_dev = Augment.to_float(x), Augment.to_float(x.to(dev))
        aug_cpu = Augment(mean, std, size, style=style)
        aug_dev = Augment(mean, std, size, style=style).to(dev)
        draws, dev_repeat, dev_vs_cpu, pixels = {}, {}, {}, {}
        for view in ("weak", "strong", "contrastive"):

            def sample(aug, g, d, view=view, n=n, in_hw=in_hw):
                return getattr(aug, f"sample_{view}")(n, in_hw, generator=g, device=d)

            # The same seed in a CPU generator: the parameters are drawn on the CPU and moved to the device.
            p_cpu = sample(aug_cpu, torch.Generator().manual_seed(seed), "cpu")
            p_dev = sample(aug_dev, torch.Generator().manual_seed(seed), dev)
            draws[view] = _param_diffs(p_cpu, p_dev)
            # The loop seeds a generator on the run's device: it must repeat itself. Whether its stream is the CPU's
            # is recorded (CUDA's Philox and the CPU's Mersenne Twister differ, so it is not expected to be).
            g_dev = [sample(aug_dev, torch.Generator(device=dev).manual_seed(seed), dev) for _ in range(2)]
            dev_repeat[view] = _param_diffs(g_dev[0], g_dev[1])
            dev_vs_cpu[view] = all(v is True for v in _param_diffs(p_cpu, g_dev[0]).values())
            # The views from the same draws, in pixel-range units (the normalised ones times std).
            want = getattr(aug_cpu, f"apply_{view}")(x_cpu, p_cpu)
            got = getattr(aug_dev, f"apply_{view}")(x_dev, p_dev).float().cpu()
            if view != "weak":  # apply_weak stops before normalising
                want, got = want * std_cpu, got * std_cpu
            if "augment_device" in BREAK:
                got = got + 0.01
            diff = (got - want).abs()
            pixels[view] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                            "frac_over_1_255": float((diff > 1.0 / 255).float().mean()),
                            "finite": bool(torch.isfinite(got).all())}
        # The public path the loop calls, with autocast on around it as in a training step: float32, finite.
        with torch.autocast(dev.type, enabled=True):
            weak, strongs = aug_dev.views(x.to(dev), n_strong=2, generator=torch.Generator(device=dev).manual_seed(0))
        views_ok = all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) and t.shape == (n, 3, size, size)
                       for t in (weak, *strongs))
        cases.append({"style": style, "n": n, "input_hw": list(in_hw), "size": size, "device": dev.type,
                      "cpu_generator_draws": draws, "device_generator_repeats": dev_repeat,
                      "device_generator_matches_cpu_stream": dev_vs_cpu, "pixels": pixels,
                      "views_float32_finite": views_ok})
        tag = f"{style} (N={n}, {in_hw[0]}x{in_hw[1]} -> {size})"
        for view in draws:
            if not all(v is True for v in draws[view].values()):
                problems.append(f"{tag}: {view} draws from a CPU generator differ on {dev.type}: {draws[view]}")
            if not all(v is True for v in dev_repeat[view].values()):
                problems.append(f"{tag}: {view} draws from a {dev.type} generator do not repeat")
            s = pixels[view]
            if not s["finite"] or s["frac_over_1_255"] > AUG_FRAC_TOL or s["mean_abs"] > AUG_MEAN_TOL:
                problems.append(f"{tag}: the {view} view differs: {s}")
        if not views_ok:
            problems.append(f"{tag}: Augment.views under autocast is not float32, finite and of the expected shape")
    details = {"tolerance": {"frac_over_1_255": AUG_FRAC_TOL, "mean_abs": AUG_MEAN_TOL, "float_params": AUG_PARAM_TOL},
               "cases": cases,
               "note": "the loop draws from torch.Generator(device=the run's device): the same --seed draws other "
                       "augmentations on CUDA than on the CPU unless device_generator_matches_cpu_stream is true"}
    if problems:
        raise Fail("; ".join(problems)[:1500], details)
    return details, skipped


def _smooth_batch(n: int, hw, seed: int):
    """uint8 [N, 3, H, W] photo-like images (bilinear colour blobs + noise) from a seed."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 255  # [N, 3, 4, 4]
    img = F.interpolate(coarse, size=tuple(hw), mode="bilinear", align_corners=False)  # [N, 3, H, W]
    img = img + 8 * torch.randn(img.shape, generator=g)
    return img.round().clamp(0, 255).to(torch.uint8)


def _param_diffs(p, q, prefix: str = "") -> dict:
    """Every field of two parameter dataclasses (nested ones too): True when equal (integers and booleans exactly,
    floats within AUG_PARAM_TOL in their own units), else how they differ."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(p):
        a, b, key = getattr(p, f.name), getattr(q, f.name), prefix + f.name
        if dataclasses.is_dataclass(a):
            out |= _param_diffs(a, b, key + ".")
        elif a is None or b is None:
            out[key] = a is None and b is None
        elif a.shape != b.shape:
            out[key] = f"shapes {list(a.shape)} vs {list(b.shape)}"
        else:
            a, b = a.cpu(), b.cpu()
            tol = AUG_PARAM_TOL if a.is_floating_point() else 0.0
            err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
            out[key] = True if err <= tol else err
    return out


def child_checkpoints(paths: list[str]) -> dict:
    """On the CPU: what each checkpoint holds (method, scaler state, state-dict keys free of compile prefixes)."""
    import torch

    info = {}
    for p in paths:
        try:
            state = torch.load(p, map_location="cpu", weights_only=False)  # our own files, written by this run
        except Exception as e:  # reported as that run's finding
            info[p] = {"error": f"{type(e).__name__}: {e}"}
            continue
        scaler = state.get("scaler")
        keys = list(state.get("method", {}).keys()) if isinstance(state.get("method"), dict) else []
        info[p] = {
            "keys": sorted(state),
            "has_scaler": "scaler" in state,
            "scaler": {k: (float(v) if isinstance(v, (int, float)) else str(v)) for k, v in (scaler or {}).items()},
            "compile_prefixed_keys": sum("_orig_mod" in k for k in keys),
            "method_keys": len(keys),
            "epoch": state.get("epoch"),
        }
    return info


CHILD = {"versions": child_versions, "kernel_correctness": child_kernel, "augment_device": child_augment}


def child_main(name: str, out: Path, mode: str) -> int:
    import torch

    cuda = mode != "smoke" and torch.cuda.is_available()
    path = out / "items" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        details, skipped = CHILD[name](MODES[mode], cuda)
        result = {"status": "passed", "details": details, "skipped_parts": skipped}
    except Skip as e:
        result = {"status": "skipped", "reason": str(e)}
    except Fail as e:
        result = {"status": "failed", "reason": str(e), "details": e.details}
    except Exception as e:
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
                  "details": {"traceback": traceback.format_exc()[-3000:]}}
    _atomic_write(path, json.dumps(result, indent=1, default=str) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parent items
# ---------------------------------------------------------------------------------------------------------------


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
    """Each list of method specs as given, ALL_METHODS as every method ccl trains: METHODS's names, read in a
    CPU-only child (this process imports no ccl, so a broken install is a finding, not a crash), and ccl-alternate."""
    if ALL_METHODS not in lists:
        return [tuple(x) for x in lists]
    code = "from ccl.train.methods import METHODS; print(*METHODS)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=run.timeout(300),
                       env=child_env(run.mode, cpu_only=True))
    if p.returncode != 0 or not p.stdout.split():
        raise RuntimeError(f"cannot read ccl's method names: {p.stderr.strip()[-1000:]}")
    every = (*p.stdout.split(), "ccl-alternate")
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
    if problems:
        raise Fail("; ".join(problems)[:2000], details)
    return {"status": "passed", "details": details, "skipped_parts": skipped}


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
    if problems:
        raise Fail("; ".join(problems)[:2000], details)
    return {"status": "passed", "details": details, "skipped_parts": skipped}


class GpuMemorySampler:
    """Device-wide memory in use (nvidia-smi, every 0.2 s) above what was in use at the start: the peak of a child
    run that has the GPU to itself, CUDA context and allocator cache included, so an upper bound of its tensors."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.base = self.peak = None
        self._stop = threading.Event()

    def _read(self) -> float | None:
        v = _nvidia_smi("memory.used")
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
    if problems:
        raise Fail("; ".join(problems)[:2000], details)
    if not rows:
        raise Skip("; ".join(skipped))
    return {"status": "passed", "details": details, "skipped_parts": skipped}


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
    if problems:
        raise Fail("; ".join(problems)[:2000], details)
    if not rows:
        raise Skip("; ".join(skipped))
    return {"status": "passed", "details": details, "skipped_parts": skipped}


def item_bench_dali(run: Run) -> dict:
    if not run.cuda:
        raise Skip("DALI's mixed decoder (nvJPEG) needs CUDA")
    if not run.results.get("versions", {}).get("details", {}).get("dali"):
        raise Skip("DALI is not installed (put an nvidia-dali wheel in .whl/ to include it)")
    rows, problems, skipped = _bench_pipeline(run, "dali", list(run.cfg["dali_sets"]), "bench-dali.log")
    details = {"rows": rows, "note": "DALI's webdataset reader with fn.decoders.image(device='mixed'); PNGs decode "
                                     "on DALI's CPU threads, JPEGs with nvJPEG"}
    if problems:
        raise Fail("; ".join(problems)[:2000], details)
    if not rows:
        raise Skip("; ".join(skipped))
    return {"status": "passed", "details": details, "skipped_parts": skipped}


PARENT = {
    "versions": item_versions, "kernel_correctness": item_kernel, "augment_device": item_augment,
    "train_amp": item_train_steps, "train_compile": item_train_compile, "resume_cpu": item_resume_cpu,
    "bench_kernel": item_bench_kernel, "bench_train": item_bench_train, "bench_pipeline": item_bench_pipeline,
    "bench_dali": item_bench_dali,
}


# ---------------------------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------------------------


def _summary(r: dict) -> str:
    """One line for an item in the Markdown table."""
    d = r.get("details") or {}
    if r["status"] != "passed":
        return (r.get("reason") or "")[:160].replace("|", "/").replace("\n", " ")
    name = r["name"]
    if name == "versions":
        return f"torch {d['torch']}, CUDA {d['cuda_runtime']}, Triton {d['triton']}, Kornia {d['kornia']}"
    if name == "kernel_correctness":
        cases = d["cases"]
        values = max(c["value_err"] for c in cases)
        grads = max(max(c["grad_rel_a"], c["grad_rel_c"]) for c in cases)
        return f"{len(cases)} cases; largest value error {values:.1e}, largest relative gradient error {grads:.1e}"
    if name == "augment_device":
        frac = max(s["frac_over_1_255"] for c in d["cases"] for s in c["pixels"].values())
        return f"draws equal; largest fraction of values off by more than 1/255: {frac:.1e}"
    if name in ("train_amp", "train_compile"):
        return ", ".join(f"{x['method']} {x['seconds']:.0f} s" for x in d["runs"])
    if name == "resume_cpu":
        return f"{d['epochs_logged']} epochs after resuming on the CPU; eval top-1 {d['eval']['ens_top1']:.1f}"
    return f"{len(d.get('rows', []))} measurements"


def markdown(rep: dict) -> str:
    """A short summary: the items, then the figures in the form of the README's GPU section."""
    gpu = rep.get("gpu") or {}
    where = f"{gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else "CPU (no GPU)"
    verdict = "passed" if rep["passed"] else "FAILED: " + ", ".join(rep["failed"])
    state = "" if rep["finished"] else " (unfinished)"
    lines = [f"# GPU check: {verdict}", "",
             f"{rep['started']}, {where}, mode `{rep['mode']}`, {rep['seconds']:.0f} s{state} "
             f"({rep['cpu_s']:.0f} CPU s, load average {rep['load_average'][0]}), "
             f"commit {str(rep.get('git_sha'))[:10]}",
             "", "| item | status | s | CPU s | summary |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r.get('cpu_s', 0):.0f} | {_summary(r)} |"
              for r in rep["items"]]
    rows = {r["name"]: (r.get("details") or {}).get("rows") or [] for r in rep["items"]}

    train = [x for x in rows["bench_train"] if "images_per_s" in x]
    if train:
        lines += ["", "Training, CCL under AMP, last epoch (images/s per pass; per epoch counts each image once):", "",
                  "| networks | px | batch | schedule | images/s | per epoch | data-wait | peak GPU MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in train:
            mem = x.get("gpu_mem_peak_mb") or x.get("gpu_mem_used_peak_mb_nvidia_smi")
            lines.append(f"| twin {x['arch']} | {x['train_px']} | {x['batch']} | {x['schedule']} | "
                         f"{x['images_per_s']:,.0f} | {x['epoch_images_per_s']:,.0f} | {100 * x['data_wait']:.1f}% | "
                         f"{'-' if mem is None else f'{mem:,.0f}'} |")
    if rows["bench_kernel"]:
        lines += ["", "Contrastive kernel, forward + backward, K = 4:", "",
                  "| N | impl | ms | peak extra MiB |", "|---|---|---|---|"]
        for x in rows["bench_kernel"]:
            mem = x.get("peak_extra_mib")
            lines.append(f"| {x['n']} | {x['impl']} | {x['time_ms']:.2f} | {'-' if mem is None else f'{mem:,.0f}'} |")
    pipe = [x for x in rows["bench_pipeline"] + rows["bench_dali"] if x.get("images_per_s")]
    if pipe:
        lines += ["", "Pipeline, shards to augmented batches:", "",
                  "| set | px | backend | device | images/s |", "|---|---|---|---|---|"]
        lines += [f"| {x['dataset']} | {x['image_size']} | {x['backend']} | {x['device']} | "
                  f"{x['images_per_s']:,.0f} |" for x in pipe]
    skips = [f"- {r['name']}: {s}" for r in rep["items"] for s in r.get("skipped_parts", [])]
    if skips:
        lines += ["", "Not run here:", "", *skips]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (created)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the short run: under 3 minutes on an H100/H200")
    mode.add_argument("--smoke", action="store_true", help="the CPU at tiny sizes (what the test runs)")
    ap.add_argument("--only", help=f"comma-separated items to run (versions always runs): {', '.join(ITEMS)}")
    ap.add_argument("--budget", type=float, help="seconds for the benchmarks to fit (default: the mode's)")
    # internal entry points of the child processes
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--make-data", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sets", help=argparse.SUPPRESS)
    ap.add_argument("--make-shim", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inspect", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.make_shim:
        make_shim(args.out)
        return 0
    if args.inspect:
        _atomic_write(args.out, json.dumps(child_checkpoints(args.inspect), indent=1) + "\n")
        return 0
    if args.child:
        return child_main(args.child, args.out.resolve(), args.mode)
    if args.make_data:
        make_data(args.out.resolve(), args.mode, args.sets.split(","))
        return 0

    only = None
    if args.only:
        only = set(args.only.split(","))
        unknown = sorted(only - set(ITEMS))
        if unknown:
            ap.error(f"unknown item(s) {', '.join(unknown)}; choose from {', '.join(ITEMS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    signal.signal(signal.SIGTERM, _interrupt)
    return main_run(args.out.resolve(), mode, only, args.budget)


if __name__ == "__main__":
    sys.exit(main())
