"""Accuracy, per-epoch records (one JSON line each) and the run summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

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


class MetricsLog:
    """metrics.jsonl in the run directory; records are appended and flushed each epoch."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop records of epochs after the checkpoint (written before the kill, not kept in it)."""
        keep = [r for r in self.read() if r["epoch"] <= epoch]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


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
