"""runs/NAME belongs to one run.

- Its name is one path component under --out: a run never writes outside it.
- One writer at a time: the run holds an advisory lock (`fcntl.flock`) on NAME/.lock for as long as it trains;
  the file names the holder (process, host, command), so a second run of that name is refused with a line that
  says who has it. The kernel drops the lock when the process ends, however it ends.
- A fresh run starts only in a directory that holds nothing of another run: `--resume` continues that run,
  `--overwrite` removes everything it wrote first. What a run leaves when it never wrote a checkpoint (its
  config, the metrics of an epoch whose checkpoint failed) cannot be continued, and a rerun clears it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import sys
from pathlib import Path

from ccl import files
from ccl.errors import UserError

LOCK = ".lock"
# What a run writes at the top of its directory; anything else there is not ours to clear without --overwrite.
RUN_FILES = {"config.json", "metrics.jsonl", "summary.json", "skipped.json", "checkpoints", "tensorboard", "wandb",
             "wandb-id", LOCK}
_held: dict[Path, int] = {}  # run directory -> the fd holding its lock, in this process


def check_name(name: str | None) -> None:
    """--name is one path component: no separator, not '.' or '..'."""
    if name is None:
        return
    if not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name) \
            or "\0" in name:
        raise UserError(f"--name {name!r} must be one folder name (no '/', not '.' or '..'); the run goes in --out")


def default_base(cfg, dataset: str) -> str:
    # The dataset name comes from a manifest, i.e. from data: it must never turn into a path outside --out.
    return cfg.name or f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', dataset).strip('.') or 'data'}-{cfg.method}-s{cfg.seed}"


def find(cfg, dataset: str) -> Path | None:
    """The run a --resume continues: the newest run of the name that has a checkpoints/last.pt, or None."""
    root, base = Path(cfg.out), default_base(cfg, dataset)
    candidates = [root / base]
    if not cfg.name:
        candidates += sorted((p for p in root.glob(f"{base}-*") if p.name[len(base) + 1 :].isdigit()),
                             key=lambda p: int(p.name[len(base) + 1 :]))
    existing = [p for p in candidates if (p / "checkpoints" / "last.pt").is_file()]
    return existing[-1] if existing else None


def claim(cfg, dataset: str, resume: bool, overwrite: bool) -> Path:
    """The run directory, locked by this process and ready for the run (see the module docstring)."""
    check_name(cfg.name)
    root = Path(cfg.out)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file; expected a folder for the runs")
    if resume:
        run_dir = find(cfg, dataset)
        if run_dir is None:
            raise UserError(f"nothing to resume: no checkpoint under {root / default_base(cfg, dataset)}")
        lock(run_dir)
        return run_dir
    base = default_base(cfg, dataset)
    files.make_dir(root)
    if cfg.name:
        run_dir = root / base
    else:  # a fresh numbered name: made here, so two runs started at once never take the same one
        run_dir, i = root / base, 1
        while True:
            try:
                os.mkdir(run_dir)
                break
            except FileExistsError:
                i += 1
                run_dir = root / f"{base}-{i}"
            except OSError as e:
                raise UserError(f"cannot create the run directory {run_dir}: {e.strerror}") from None
    files.make_dir(run_dir)
    lock(run_dir)
    try:
        _make_room(run_dir, overwrite)
    except BaseException:
        release(run_dir)
        raise
    return run_dir


def _make_room(run_dir: Path, overwrite: bool) -> None:
    """Clear what another run left in run_dir: all of it with overwrite; else only a run that never wrote a
    checkpoint (nothing there can be continued); anything else is refused."""
    entries = sorted(p for p in run_dir.iterdir() if p.name != LOCK)
    if not entries:
        return
    names = {p.name for p in entries}
    ck = run_dir / "checkpoints"
    checkpoints = sorted(p.name for p in ck.iterdir() if not p.name.startswith(".")) if ck.is_dir() else []
    if overwrite:
        if not names & RUN_FILES:
            raise UserError(f"--overwrite: {run_dir} is not a run directory (it holds {', '.join(sorted(names)[:5])});"
                            " choose another --name")
    elif checkpoints or "summary.json" in names or not names <= RUN_FILES:
        what = (f"checkpoints {', '.join(checkpoints)}" if checkpoints else "a finished run (summary.json)"
                if "summary.json" in names else f"files that are not a run's: {', '.join(sorted(names - RUN_FILES)[:5])}")
        hint = ("pass --resume to continue it or --overwrite to start over" if "last.pt" in checkpoints
                else "pass --overwrite to start over, or choose another --name")
        raise UserError(f"run {run_dir} exists and holds {what}; {hint}")
    for p in entries:  # with overwrite: everything the old run wrote; else: a run that never wrote a checkpoint
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as e:
            raise UserError(f"cannot clear {p} for the new run: {e.strerror}") from None


def lock(run_dir: Path) -> None:
    """Hold run_dir's lock in this process, or one line naming the process that holds it."""
    key = run_dir.resolve()
    if key in _held:  # this process ran it before (a table, a test): its lock is still ours
        return
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create the run's lock file {path}: {e.strerror} "
                        f"({files.free_space(path)} there)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"run directory {run_dir} is in use by {holder}; wait for it to end, or choose "
                            "another --name") from None
        raise UserError(f"cannot lock {path}: {e.strerror}") from None
    me = f"process {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:200]})"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode() + b"\n", 0)
    except OSError:
        pass  # the lock holds without the note; only the message naming us is lost
    _held[key] = fd


def _forget_in_child() -> None:
    # A forked child (a loader's decoder process) inherits the lock's descriptor, and with it the lock, which
    # would then outlive the run in that child: it lets go of its copy (the parent's lock stays).
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def release(run_dir: Path | None = None) -> None:
    """Let go of run_dir's lock (every lock this process holds, without an argument)."""
    keys = list(_held) if run_dir is None else [run_dir.resolve()]
    for key in keys:
        fd = _held.pop(key, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock
