"""`ccl bench kernel`: forward+backward time and peak extra memory of the contrastive implementations, side by side.

The workload is the one CCL runs every step: K = 4 similarity matrices of N anchors (ACL/VM for both models with
arange classes, CCLRL/MM for both models with labels of 10 classes), L2-normalised fp32 embeddings of width D,
tau = 0.5, upstream gradient ones on every ce and kl.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ccl import files
from ccl.train.losses.contrastive import pair_losses

K = 4  # matrices per step: S_00, S_11, S_01, S_10
NUM_CLASSES = 10  # classes of the refurbished labels in the two CCLRL matrices


def bench_kernel(
    ns=(128, 512, 2048, 8192),
    d: int = 128,
    impls=None,
    repeats: int = 3,
    json_path=None,
    tau: float = 0.5,
    memory: bool = True,
    console=None,
) -> list[dict]:
    """Measure every implementation at every N in one run and print a table with ratios to `reference`.

    Time: the median (and the minimum) over at least `repeats` runs of forward+backward wall time, after one
    warm-up run per case; cheap cases get up to 50 runs. The runs of the different implementations are
    interleaved, so load from other processes hits them alike.
    Memory ("peak extra"): how far the forward+backward raises memory above what the inputs already hold.
    - CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
    - CPU: torch has no CPU allocator statistics, and tracemalloc does not see its allocations, so each case runs
      once in a fresh Python process: it warms the thread pools with a tiny case, resets the kernel's resident-set
      high-water mark (writing 5 to /proc/self/clear_refs, Linux), reads its resident set, runs forward+backward
      and reports VmHWM minus that resident set. A fresh process per case matters: memory freed by an earlier case
      stays in the allocator's heap and would hide the next case's peak. Without clear_refs the lifetime peak
      (ru_maxrss) is used, an upper bound.

    Args:
        ns: batch sizes N.
        d: embedding width D.
        impls: implementations to compare; default reference and torch, plus triton on CUDA.
        repeats: minimum timed runs per case (the median is reported, time/ref is the ratio of medians).
        json_path: also write the rows (and the environment) to this JSON file.
        memory: measure peak memory (CPU: one child process per case).
        console: a rich Console to print to (default: a new one).

    Returns:
        One dict per (N, impl): n, d, k, impl, device, time_ms, time_min_ms, peak_extra_mib, time_x_ref, mem_x_ref.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if impls is None:
        impls = ["reference", "torch"] + (["triton"] if device.type == "cuda" and _has_triton() else [])
    impls = list(impls)
    rows = []
    load_start = _loadavg()
    for n in ns:
        times = _time_cases(impls, n, d, tau, repeats, device)
        for impl in impls:
            peak = _peak_extra_bytes(impl, n, d, tau, device) if memory else None
            rows.append({
                "n": n, "d": d, "k": K, "impl": impl, "device": device.type,
                "time_ms": 1e3 * statistics.median(times[impl]), "time_min_ms": 1e3 * min(times[impl]),
                "peak_extra_mib": None if peak is None else peak / 2**20,
            })  # fmt: skip
    _add_ratios(rows)

    title = f"contrastive kernel, fwd+bwd, K={K}, D={d}, {device.type}, {torch.get_num_threads()} threads"
    if device.type == "cpu" and load_start is not None:
        title += f", load average {load_start:.1f} -> {_loadavg():.1f}"
    table = Table(title=title)
    for col in ("N", "impl", "fwd+bwd ms", "min ms", "time/ref", "peak extra MiB", "mem/ref"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["n"]), r["impl"], f"{r['time_ms']:.1f}", f"{r['time_min_ms']:.1f}", _fmt_ratio(r["time_x_ref"]),
            "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}", _fmt_ratio(r["mem_x_ref"]),
        )  # fmt: skip
    console.print(table)
    if json_path is not None:
        env = {"torch": torch.__version__, "device": device.type, "threads": torch.get_num_threads(),
               "repeats": repeats, "tau": tau, "loadavg_start": load_start, "loadavg_end": _loadavg()}  # fmt: skip
        files.write_json(Path(json_path), {"env": env, "rows": rows}, indent=2)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------


def _inputs(n: int, d: int, device, seed: int = 0):
    """The benchmark case: a, c [K, N, D] normalised, classes [K, N] (arange, arange, labels, labels)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(K, n, d, generator=g), dim=-1)  # [K, N, D]
    c = torch.nn.functional.normalize(torch.randn(K, n, d, generator=g), dim=-1)  # [K, N, D]
    labels = torch.randint(0, NUM_CLASSES, (2, n), generator=g)  # [2, N]
    classes = torch.cat([torch.arange(n).expand(2, n), labels])  # [K, N]
    return a.to(device).requires_grad_(), c.to(device).requires_grad_(), classes.to(device)


def _step(a, c, classes, tau: float, impl: str) -> None:
    ce, kl = pair_losses(a, c, classes, tau=tau, impl=impl)
    (ce.sum() + kl.sum()).backward()
    a.grad = c.grad = None


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cases(impls, n, d, tau, repeats, device) -> dict[str, list[float]]:
    a, c, classes = _inputs(n, d, device)
    times = {impl: [] for impl in impls}
    t0 = time.perf_counter()
    for impl in impls:  # warm-up: thread pools, kernel compilation, allocator
        _step(a, c, classes, tau, impl)
    _sync(device)
    # Cheap cases get more runs (up to ~1 s in all), so a burst of load from elsewhere cannot set the median.
    runs = max(repeats, min(50, int(1.0 / max(time.perf_counter() - t0, 1e-3))))
    for _ in range(runs):
        for impl in impls:
            _sync(device)
            t0 = time.perf_counter()
            _step(a, c, classes, tau, impl)
            _sync(device)
            times[impl].append(time.perf_counter() - t0)
    return times


def _peak_extra_bytes(impl, n, d, tau, device) -> float | None:
    if device.type == "cuda":
        a, c, classes = _inputs(n, d, device)
        _step(a, c, classes, tau, impl)  # warm-up outside the measurement
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _step(a, c, classes, tau, impl)
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    spec = json.dumps({"impl": impl, "n": n, "d": d, "tau": tau})
    code = f"from ccl.bench.kernel import _memory_child; _memory_child({spec!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:  # e.g. killed for lack of memory: report no number rather than a wrong one
        print(f"memory measurement of {impl} at N={n} failed: {out.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def _memory_child(spec: str) -> None:
    """Run in a fresh process: print {"peak_extra_bytes": ...} for one CPU forward+backward."""
    cfg = json.loads(spec)
    a, c, classes = _inputs(16, cfg["d"], torch.device("cpu"))
    _step(a, c, classes, cfg["tau"], cfg["impl"])  # thread pools and one-time buffers, not counted
    a, c, classes = _inputs(cfg["n"], cfg["d"], torch.device("cpu"))
    reset = _reset_peak_rss()
    base = _status_bytes("VmRSS")
    _step(a, c, classes, cfg["tau"], cfg["impl"])
    if reset:
        peak = _status_bytes("VmHWM")
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_extra_bytes": max(0, peak - base)}))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _add_ratios(rows: list[dict]) -> None:
    ref = {r["n"]: r for r in rows if r["impl"] == "reference"}
    for r in rows:
        base = ref.get(r["n"])
        r["time_x_ref"] = None if base is None else r["time_ms"] / base["time_ms"]
        has_mem = base is not None and base["peak_extra_mib"] and r["peak_extra_mib"] is not None
        r["mem_x_ref"] = r["peak_extra_mib"] / base["peak_extra_mib"] if has_mem else None


def _fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _loadavg() -> float | None:
    """1-minute load average: other processes' load is part of a CPU timing's evidence."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
