"""`Isolated`: work on a list of items (images) in a child process, so that a crash or a hang on one item costs
that item, never the caller. The one supervisor of crash-isolated decoding: the torch loaders decode their
batches through it (`ccl.pipeline.decode.IsolatedDecoder`), and `ccl check` tries every image with each
backend's decoder through it (`ccl.pipeline.check`).

The contract. `make(*args)` runs once in the child and returns a handler; the supervisor sends it jobs, and
`handler(job, start, single_until, word)` works on items[start:] of the job, writing the position of the item
it is about to touch to `word` (8 bytes both processes map: a write costs nothing per item, unlike a message),
and returns the (position, reason) of the items that failed. When the child dies, the word names the item it
died on: that item is reported, a new child takes items[pos + 1:]. A child whose word stops moving for
`stall_s` is killed the same way (a hang). A handler that works on several items at once (DALI batches) says
so with `batch`: a crash inside such a group is first retried item by item from the group's first item
(handlers decode one by one below `single_until`), so that the item that crashes is the one named.

Two ways to start the child, one protocol:
- ``fork=True``: `os.fork`, milliseconds per child. The DataLoader workers decode this way: they are daemonic,
  and multiprocessing refuses children of daemons. Whatever the caller imported before is already there.
- ``fork=False``: a fresh interpreter (`python -c`); `make` and `args` then travel pickled. For a threaded
  caller (`ccl check` drives its children from threads), where a fork could deadlock.
Either child ends when its parent dies, even by SIGKILL (`die_with_parent`).
"""

from __future__ import annotations

import mmap
import os
import signal
import tempfile
import time
from typing import Callable

STALL_S = 60.0  # a child whose word does not move for this long is killed: the item it was on is reported hung
START_TIMEOUT_S = 300.0  # a child not ready by then is a broken setup (an error, not an item's fault)
POLL_S = 0.5  # how often the supervisor looks at the word while it waits


class Word:
    """8 bytes in a file with no name, mapped by both processes: the position the child is working on."""

    def __init__(self, fd: int | None = None):
        self._file = None
        if fd is None:
            self._file = tempfile.TemporaryFile()
            self._file.truncate(8)
            fd = self._file.fileno()
        self.fd = fd
        self._map = mmap.mmap(fd, 8)

    def set(self, pos: int) -> None:
        self._map[:8] = int(pos).to_bytes(8, "little", signed=True)

    def get(self) -> int:
        return int.from_bytes(self._map[:8], "little", signed=True)

    def close(self) -> None:
        self._map.close()
        if self._file is not None:
            self._file.close()


def _serve(conn, word: Word, parent: int, make: Callable, args: tuple) -> None:
    """The child: build the handler, say ready, serve (job, start, single_until) until told to stop."""
    from ccl.pipeline.procs import die_with_parent

    die_with_parent(parent)
    # A DataLoader worker's fatal-signal handlers print "Unexpected segmentation fault encountered in worker":
    # here a crash is expected and handled by the parent, so the child just dies.
    for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL):
        signal.signal(sig, signal.SIG_DFL)
    handler = make(*args)
    conn.send(("ready", None))
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return
        if req is None:
            return
        job, start, single_until = req
        conn.send(("done", handler(job, start, single_until, word)))


def _child(conn, word: Word, parent: int, make: Callable | None, args: tuple) -> None:
    """Run `_serve`, and never return into the caller's code: a bug of ours (not an item's crash) goes to the
    parent as a traceback, which it raises."""
    code = 0
    try:
        if make is None:  # a fresh interpreter: what to build comes over the pipe
            _, make, args = conn.recv()
        _serve(conn, word, parent, make, args)
    except BaseException:
        import traceback

        code = 1
        try:
            conn.send(("error", traceback.format_exc()))
        except BaseException:
            pass
    finally:
        os._exit(code)


def _exec_main() -> None:
    """`python -c` entry of a fresh child: the fds of its pipe and word, and the parent's pid, in argv."""
    import sys
    from multiprocessing.connection import Connection

    fd, word_fd, parent = (int(v) for v in sys.argv[1:4])
    _child(Connection(fd), Word(word_fd), parent, None, ())


class Isolated:
    """A handler in a child process, supervised (see the module docstring). `name` words the reports ("the
    decoder crashed (SIGSEGV) on this image")."""

    def __init__(self, make: Callable, args: tuple = (), *, fork: bool = True, batch: int = 1,
                 name: str = "decoder", stall_s: float = STALL_S):
        self.make, self.args, self.fork, self.batch = make, args, fork, batch
        self.name, self.stall_s = name, stall_s
        self.word = Word()
        self.pid: int | None = None
        self.proc = None  # the Popen of a fresh-interpreter child
        self.conn = None
        self.restarts = 0  # children replaced after a crash or a hang
        self.startup_s = 0.0  # seconds children took to become ready, in all

    def _start(self) -> None:
        import multiprocessing.connection as mpc

        t0 = time.perf_counter()
        parent = os.getpid()
        if self.fork:
            ours, theirs = mpc.Pipe()
            pid = os.fork()
            if pid == 0:
                ours.close()
                _child(theirs, self.word, parent, self.make, self.args)
            theirs.close()
            self.pid, self.conn = pid, ours
        else:
            import socket
            import subprocess
            import sys

            a, b = socket.socketpair()
            fds = (b.fileno(), self.word.fd)
            argv = [sys.executable, "-c", "from ccl.pipeline.isolate import _exec_main; _exec_main()",
                    *map(str, fds), str(parent)]
            # Its stderr is dropped: decoders print a line per bad image (libpng, libjpeg, nvImageCodec); a bug
            # of ours still arrives, as the traceback the child sends.
            self.proc = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            b.close()
            self.pid, self.conn = self.proc.pid, mpc.Connection(a.detach())
            try:
                self.conn.send(("setup", self.make, self.args))
            except Exception:  # cannot be pickled (a lambda, an open file): not a child's fault
                self._stop(kill=True)
                raise
        try:
            msg = self.conn.recv() if self.conn.poll(START_TIMEOUT_S) else ("timeout", None)
        except (EOFError, OSError):
            msg = ("died", None)
        if msg[0] != "ready":
            how = self._stop(kill=True)
            if msg[0] == "error":
                detail = f":\n{msg[1]}"
            else:
                detail = f" (not ready in {START_TIMEOUT_S:.0f} s)" if msg[0] == "timeout" else f" ({how})"
            raise RuntimeError(f"the {self.name} process did not start{detail}")
        self.startup_s += time.perf_counter() - t0

    def _stop(self, kill: bool) -> str:
        """End the child; returns how it ended ("SIGSEGV", "exit 1", ...)."""
        how = "killed"
        if self.pid is not None:
            if kill:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                if self.proc is not None:
                    code = self.proc.wait()
                else:
                    code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
                how = signal.Signals(-code).name if code < 0 else f"exit {code}"
            except (ChildProcessError, ValueError):
                pass
            self.conn.close()
        self.pid, self.proc, self.conn = None, None, None
        return how

    def run(self, job, n: int, advance: Callable[[int], None] | None = None) -> list[tuple[int, str]]:
        """Have the child work on the n items of `job`; returns the sorted (position, reason) of the items that
        failed, crashed or hung. `advance(k)` is told of progress, k items at a time."""
        failed: list[tuple[int, str]] = []
        start, single_until, done, idle_deaths = 0, 0, 0, 0
        while start < n:
            if self.pid is None:
                self._start()
            self.word.set(-1)
            try:
                self.conn.send((job, start, single_until))
                last, since = -1, 0.0
                while not self.conn.poll(POLL_S):
                    pos = self.word.get()
                    if advance is not None and pos > done:
                        advance(pos - done)
                        done = pos
                    since = 0.0 if pos != last else since + POLL_S
                    last = pos
                    if pos >= start and since >= self.stall_s:
                        raise TimeoutError
                kind, payload = self.conn.recv()
                if kind == "error":
                    self._stop(kill=True)
                    raise RuntimeError(f"the {self.name} process failed:\n{payload}")
                failed += payload
                break
            except TimeoutError:
                pos = self.word.get()
                self._stop(kill=True)
                self.restarts += 1
                failed.append((pos, f"the {self.name} hung (no progress in {self.stall_s:.0f} s)"))
                start = pos + 1
            except (EOFError, OSError):  # the child died: on the item its word names, or before any
                pos = self.word.get()
                how = self._stop(kill=True)
                self.restarts += 1
                if pos < start:
                    idle_deaths += 1
                    if idle_deaths > 2:
                        raise RuntimeError(f"the {self.name} process keeps dying before it starts ({how})") from None
                    continue
                if self.batch > 1 and pos >= single_until:  # died in a group: redo it item by item
                    start, single_until = pos, pos + self.batch
                    continue
                failed.append((pos, f"the {self.name} crashed ({how}) on this image"))
                start = pos + 1
        if advance is not None and n > done:
            advance(n - done)
        return sorted(failed)

    def close(self) -> None:
        """Kill the child (it holds nothing to save; tearing down an interpreter that imported torch takes
        seconds)."""
        if self.pid is not None:
            self._stop(kill=True)
        self.word.close()

    def __del__(self):
        try:
            if self.pid is not None:
                self._stop(kill=True)
        except Exception:
            pass
