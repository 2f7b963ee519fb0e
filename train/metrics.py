"""Accuracy, per-epoch records (one JSON line each) and the run summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ccl import files
from ccl.errors import UserError

NL = b"\n"
LAST_K = 10  # the papers report the mean test accuracy of the last 10 epochs


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax]
    hit = top.eq(target[:, None])
    return {k: int(hit[:, : min(k, kmax)].any(1).sum()) for k in ks}


class Accuracy:
    """Accumulates top-1/top-5 per output head over an evaluation pass."""

    def __init__(self):
        self.correct: dict[str, dict[int, int]] = {}
        self.total = 0

    def update(self, logits: dict[str, torch.Tensor], target: torch.Tensor) -> None:
        for name, lg in logits.items():
            c = self.correct.setdefault(name, {1: 0, 5: 0})
            for k, v in topk_correct(lg, target).items():
                c[k] += v
        self.total += int(target.numel())

    def result(self) -> dict[str, float]:
        out = {}
        for name, c in self.correct.items():
            out[f"{name}_top1"] = 100.0 * c[1] / max(self.total, 1)
            out[f"{name}_top5"] = 100.0 * c[5] / max(self.total, 1)
        return out


class DeviceMeter:
    """The logged parts of an epoch's steps, summed on the device; reading them is one device-to-host copy.

    Each step adds its `Step` (loss first, then the method's parts, all detached) and folds ``not isfinite(loss)``
    into a device flag, so neither logging nor the non-finite check costs a host synchronisation per step.
    """

    def __init__(self, device: torch.device | str):
        self.sums: dict[tuple[str, ...], torch.Tensor] = {}
        self.counts: dict[tuple[str, ...], int] = {}
        self.bad = torch.zeros((), dtype=torch.bool, device=device)

    def add(self, step) -> None:
        key = step.names
        if key in self.sums:
            self.sums[key].add_(step.logged)
        else:
            self.sums[key] = step.logged.clone()
        self.counts[key] = self.counts.get(key, 0) + 1
        self.bad |= ~torch.isfinite(step.loss.detach())

    def read(self) -> tuple[dict[str, float], bool]:
        """(mean of each part over the steps that logged it, whether any step's loss was non-finite): one sync."""
        keys = list(self.sums)
        flat = torch.cat([self.sums[k] for k in keys] + [self.bad.float().view(1)]).tolist()
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        i = 0
        for key in keys:
            for name in key:
                totals[name] = totals.get(name, 0.0) + flat[i]
                counts[name] = counts.get(name, 0) + self.counts[key]
                i += 1
        return {name: totals[name] / counts[name] for name in totals}, bool(flat[-1])


class DamagedLog(UserError):
    """metrics.jsonl has a line that is not an epoch record, other than a torn last line (changed by hand, or
    damaged): the run's history cannot be trusted. A `UserError`, so training stops with one line; `ccl runs` sets
    such a run aside."""


class MetricsLog:
    """metrics.jsonl in the run directory; one record appended per epoch.

    Only complete lines are trusted: a torn last line (a short write on a full disk, a kill mid-write) is left out
    when read and cut on resume. A record is appended whole or not at all (`ccl.files.append_line`)."""

    def __init__(self, path: Path):
        self.path = path

    def _records(self) -> list[tuple[dict, int]]:
        """(record, byte offset of the end of its line) for every complete line."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        out, pos = [], 0
        while True:
            end = data.find(NL, pos)
            if end < 0:
                break  # no newline: a torn tail, not a record
            line = data[pos:end].strip()
            if line:
                try:
                    record = json.loads(line)
                except ValueError:
                    if data[end + 1 :].strip():
                        raise DamagedLog(f"{self.path}: line {data.count(NL, 0, pos) + 1} is not a JSON record; "
                                         "the file was changed by hand or is damaged") from None
                    break  # the last line, torn (bytes lost mid-line): not a record
                if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                    raise DamagedLog(f"{self.path}: line {data.count(NL, 0, pos) + 1} is not an epoch record")
                out.append((record, end + 1))
            pos = end + 1
        return out

    def read(self) -> list[dict]:
        return [r for r, _ in self._records()]

    def truncate_after(self, epoch: int) -> None:
        """On resume: keep the records up to `epoch` (the checkpoint's) and cut the rest: later epochs (written
        before the kill, not kept in the checkpoint) and a torn last line. Cut in place, so it needs no space."""
        keep = 0
        for record, end in self._records():
            if record["epoch"] > epoch:
                break
            keep = end
        if self.path.is_file() and self.path.stat().st_size != keep:
            try:
                os.truncate(self.path, keep)
            except OSError as e:
                raise files.write_error(self.path, e) from None

    def append(self, record: dict) -> None:
        files.append_line(self.path, json.dumps(record, default=_jsonable))


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


def summarize(history: list[dict], key: str = "ens_top1") -> dict:
    """The papers' figures of ``key`` (final value and the mean of the last 10 epochs), its value at the epoch
    whose validation accuracy was best (when the run held out a validation part), and its best value over all
    epochs, `best_oracle`: picked by looking at the test split itself, so only for comparison with papers that
    report it."""
    vals = [(r[key], r) for r in history if r.get(key) is not None]
    if not vals:
        return {}
    last = [v for v, _ in vals[-LAST_K:]]
    out = {"final": vals[-1][0], f"last{LAST_K}_mean": sum(last) / len(last), "best_oracle": max(v for v, _ in vals),
           "epochs": len(vals)}
    judged = [(r[f"val_{key}"], v) for v, r in vals if r.get(f"val_{key}") is not None]
    if judged:
        out["at_best_val"] = max(judged, key=lambda t: t[0])[1]  # the first epoch of the best validation accuracy
    return out
