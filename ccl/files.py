"""Every file ccl writes goes through here: written whole or not at all, and a write the machine refuses (a full
disk, a read-only folder, a path that is a directory) is one line naming the path and the free space.

- `write_atomic`: a hidden temporary sibling, fsync, rename; on failure the temporary file is removed and the old
  file stays as it was. `also` puts the same bytes under more names (hard links, no second write), renamed first.
- `write_text`: the same for text streamed into an open file (CSV tables).
- `append_line`: one line at the end of a file; a failed append is cut back, so no torn line is left behind.
- `make_dir`: a folder, or one line saying why not.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence, TextIO

from ccl.errors import UserError


def free_space(path) -> str:
    """The free space of the disk that holds `path` (or would), for messages: '1.2 GB free'."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return ""


def write_error(path, e: OSError) -> UserError:
    """A write the system refused, as the user's one line (the cause is outside the code: disk, permissions)."""
    why = e.strerror or str(e) or type(e).__name__
    return UserError(f"cannot write {path}: {why} ({free_space(path)} there)")


class _Tracked:
    """A binary file that remembers the OSError of a failed write: torch.save reports one as a RuntimeError
    ('unexpected pos ...') that no longer says the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def write_atomic(path, data: bytes | str | Callable, also: Sequence = ()) -> None:
    """Write `data` (bytes, text, or a function of the open binary file) to `path`, whole or not at all.

    `also`: further paths that get the same content (hard links of the one temporary file; a copy where the file
    system has no links), each renamed into place before `path`."""
    path = Path(path)
    tmps = [_partial(path)] + [_partial(Path(p)) for p in also]
    try:
        with open(tmps[0], "wb") as raw:
            f = _Tracked(raw)
            try:
                if callable(data):
                    data(f)
                else:
                    f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(raw.fileno())
            except Exception as e:
                if f.error is not None:
                    raise f.error from None
                raise e
        for extra in tmps[1:]:
            extra.unlink(missing_ok=True)
            try:
                os.link(tmps[0], extra)
            except OSError:
                shutil.copyfile(tmps[0], extra)
        for tmp, final in zip(tmps[1:] + tmps[:1], [Path(p) for p in also] + [path]):
            os.replace(tmp, final)
    except OSError as e:
        _remove(tmps)
        raise write_error(path, e) from None
    except BaseException:
        _remove(tmps)
        raise


def _remove(paths) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def read_json(path, what: str):
    """A JSON file the user named (`what` says which: "config file", "taxonomy file"), or one line saying why it
    cannot be read: missing, not a file, not UTF-8, not JSON."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too long an integer, too deep
        raise UserError(f"{what} {p} is not valid JSON: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {p}: {e.strerror or e}") from None


def write_text(path, write: Callable[[TextIO], None]) -> None:
    """`write_atomic` for text that `write(f)` streams into an open text file (UTF-8, newline="" as csv wants)."""

    def data(f) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        write(text)
        text.flush()
        text.detach()  # the binary file stays open for write_atomic's fsync

    write_atomic(path, data)


def write_json(path, obj, indent: int = 2) -> None:
    """JSON, indented, with lists of scalars (a mean, a transition-matrix row) kept on one line."""
    write_atomic(path, dumps_json(obj, indent) + "\n")


def dumps_json(obj, indent: int = 1, _level: int = 0) -> str:
    """Indented JSON that keeps lists of scalars (mean, a transition-matrix row) on one line."""
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    if isinstance(obj, dict) and obj:
        body = ",\n".join(f"{inner}{json.dumps(str(k))}: {dumps_json(v, indent, _level + 1)}" for k, v in obj.items())
        return "{\n" + body + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (dict, list, tuple)) for v in obj):
        body = ",\n".join(inner + dumps_json(v, indent, _level + 1) for v in obj)
        return "[\n" + body + "\n" + pad + "]"
    return json.dumps(obj)


def append_line(path, line: str) -> None:
    """Append one line (a newline is added); if the write fails the file is cut back to what it was."""
    path = Path(path)
    data = (line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise write_error(path, e) from None
    finally:
        os.close(fd)


def make_dir(path) -> Path:
    """mkdir -p, or one line saying why not (a file in the way, a read-only or full disk, no permission)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"cannot create the folder {path}: a file of that name is in the way") from None
    except NotADirectoryError:
        raise UserError(f"cannot create the folder {path}: a part of the path is a file, not a folder") from None
    except OSError as e:
        raise UserError(f"cannot create the folder {path}: {e.strerror or e} ({free_space(path)} there)") from None
    return path
