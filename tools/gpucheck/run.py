"""The state of one check run (mode, output folder, budget, results so far), written after every item."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gpucheck.settings import CHECKS, Fail, ITEMS, MODES, ROOT, SELF
from gpucheck.procs import Proc, child_env
from gpucheck.data import set_path
from gpucheck.report import markdown


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
            "cpu_s": round(cpu_seconds(), 1),
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
        atomic_write(self.out / "gpu_check.json", json.dumps(rep, indent=1) + "\n")
        atomic_write(self.out / "gpu_check.md", markdown(rep))
        return rep


def atomic_write(path: Path, text: str) -> None:
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


def cpu_seconds() -> float:
    """CPU seconds of this process and of every child it has reaped (with their reaped children): the delta over an
    item is that item's CPU time, which is what a smaller or busier machine pays for it."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
