"""Worker processes that end with their parent, even when the parent is killed with SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time



# ----------------------------------------------------------------------------------------------------------------
# Processes


def die_with_parent(parent: int) -> None:
    """Make this (child) process end when `parent` does, even by kill -9 (which runs no cleanup in the parent).

    Linux: the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG). Elsewhere: a daemon thread
    polls the parent pid. Used as the initializer of every worker pool here, so that killing the converter or
    the trainer leaves no worker blocked on a queue nobody reads.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0:  # 1 = PR_SET_PDEATHSIG
                if os.getppid() != parent:  # the parent died before the call: the signal will never come
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="die-with-parent").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which taskset and cgroups narrow), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
