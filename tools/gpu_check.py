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
import json
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its parts, tools/gpucheck/, however it is started
from gpucheck.settings import Fail, ITEMS, Skip  # noqa: E402
from gpucheck.procs import interrupt, end_children  # noqa: E402
from gpucheck.data import make_data, make_shim  # noqa: E402
from gpucheck.run import Run, atomic_write, cpu_seconds  # noqa: E402
from gpucheck.children import child_checkpoints, child_main  # noqa: E402
from gpucheck.items import PARENT  # noqa: E402


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


def _run_items(run: Run, wanted: list[str]) -> None:
    for name in ITEMS:
        t0, cpu0 = time.monotonic(), cpu_seconds()
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
        result["cpu_s"] = round(cpu_seconds() - cpu0, 1)
        run.record(name, result, time.monotonic() - t0)


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
        atomic_write(args.out, json.dumps(child_checkpoints(args.inspect), indent=1) + "\n")
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
    signal.signal(signal.SIGTERM, interrupt)
    return main_run(args.out.resolve(), mode, only, args.budget)


if __name__ == "__main__":
    sys.exit(main())
