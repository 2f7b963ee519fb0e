"""The job runner of tools/gpu_check.py: child processes with a timeout and a log, ended with the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


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


def interrupt(signum, frame):
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
