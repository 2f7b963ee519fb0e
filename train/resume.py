"""What a `--resume` may change: the options free to change (each field's `free=True`), and the changes it refuses
unless asked, recorded in config.json when allowed."""

from __future__ import annotations

import json
from pathlib import Path

from ccl import files
from ccl.errors import UserError
from ccl.train.config import TrainConfig, free_on_resume

# Options a `--resume` may change freely: they do not change what the run computes (or, for epochs, only how long
# it goes on); each field says so (`opt(..., free=True)` in ccl.train.config). Any other change is refused unless
# asked for (`allow_changes`), and then recorded in config.json.
FREE_ON_RESUME = free_on_resume()


def config_changes(saved: dict, cfg: TrainConfig, allow: bool, free: tuple[str, ...] = FREE_ON_RESUME) -> dict:
    """{option: (saved, now)} for every option that changed, other than the free ones; refused unless allowed.

    An option the saved run predates (one added to ccl since) counts as its default: new options default to
    the behaviour that runs had before them."""
    now, default = cfg.to_dict(), TrainConfig().to_dict()

    def before(key: str):
        if key not in saved:
            return default[key]
        if key == "data" and saved[key]:  # stored as given before it was stored resolved
            return str(Path(saved[key]).resolve())
        if isinstance(saved[key], dict) and isinstance(default[key], dict):  # a method section: the same, per key
            return {**default[key], **saved[key]}
        return saved[key]

    changes = {k: (before(k), now[k]) for k in now if k not in free and before(k) != now[k]}
    if changes and not allow:
        first = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(changes.items())[:3])
        raise UserError(f"--resume would change the run: {first}; pass --allow-changes to continue with them "
                        "(they are recorded in config.json), or leave them out")
    return changes


def record_resume(path: Path, epoch: int, env: dict, changes: dict, cfg: TrainConfig) -> None:
    """On --resume: config.json gains a `resumes` entry, the epoch it continued from and that process's environment
    (the run may continue on other hardware, or on another number of processes); with allowed `changes`, also a
    `changes` entry and the config now in force. One write, so that a kill cannot keep the changes without the
    resume that made them."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    if changes:
        record.setdefault("changes", []).append({"from_epoch": epoch,
                                                 "changed": {k: list(v) for k, v in changes.items()}})
        record["config"] = cfg.to_dict()
    record.setdefault("resumes", []).append({"from_epoch": epoch, "environment": env})
    files.write_json(path, record)
