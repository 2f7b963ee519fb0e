"""`ccl bench train`: CCL's epoch time on the built-in digits set, per schedule and confidence mode."""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

import torch
from ccl import files
from ccl.train import loop
from ccl.train.config import TrainConfig
from ccl.pipeline.convert import default_cache
from ccl.train.loop import train
from ccl.train.metrics import MetricsLog
from rich.console import Console
from rich.table import Table

from ccl.errors import UserError


class HostSyncCounter:
    """Counts the host reads of tensor values (item, float, int, bool, tolist, numpy) made while it is entered.

    On a GPU each of them waits for the device to finish its queued work; on the CPU they are as cheap as any
    call, so counting them is how a CPU-only suite can check that a step keeps the GPU fed.
    """

    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy")

    def __init__(self):
        self.count = 0
        self.where: list[str] = []

    def __enter__(self) -> "HostSyncCounter":
        import traceback

        self._saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name, real in self._saved.items():
            def counted(t, *a, _real=real, _name=name, **k):
                self.count += 1
                frame = traceback.extract_stack(limit=2)[0]
                self.where.append(f"{_name} at {frame.filename}:{frame.lineno}")
                return _real(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)


def bench_train(*, epochs: int = 2, json_path: Path | None = None, console: Console | None = None,
                out: Path | None = None) -> list[dict]:
    """Time CCL's epochs on the built-in digits set: (alternate | joint) x (full | inline) confidence.

    One warm-up epoch, then ``epochs - 1`` CCL epochs; reports the mean CCL epoch's training time, the
    confidence-estimation time, and their sum, the time per training step and the host synchronisations per
    training step (`HostSyncCounter` over the timed epochs' steps; counting adds a little to their time).
    """
    if epochs < 2:
        raise UserError("bench train needs at least 2 epochs (one warm-up, one timed)")
    console = console or Console()
    out = Path(out or default_cache() / "bench-train")
    rows = []
    for schedule in ("alternate", "joint"):
        for confidence in ("full", "inline"):
            cfg = replace(TrainConfig(), epochs=epochs, warmup=1, schedule=schedule, confidence=confidence,
                          out=str(out), name=f"{schedule}-{confidence}", arch="resnet_small")
            summary, steps, syncs = _counted_train(cfg)
            hist = MetricsLog(Path(summary["run_dir"], "metrics.jsonl")).read()
            timed = [r for r in hist if not r["warmup"]]
            train_s = statistics.fmean(r["epoch_time"] for r in timed)
            est_s = statistics.fmean(r["estimate_time"] for r in hist)
            rows.append({"schedule": schedule, "confidence": confidence, "train_s": train_s, "estimate_s": est_s,
                         "epoch_s": train_s + est_s, "images_per_s": statistics.fmean(r["images_per_s"] for r in timed),
                         "step_ms": 1000 * train_s * len(timed) / max(steps, 1), "syncs_per_step": syncs / max(steps, 1),
                         "test_top1": hist[-1].get("ens_top1")})
    ref = rows[0]["epoch_s"]
    t = Table(title="CCL epoch time on digits (resnet_small), first row = paper's setting")
    for col in ("schedule", "confidence", "train s", "estimate s", "epoch s", "vs alternate+full", "step ms",
                "host syncs/step"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["schedule"], r["confidence"], f"{r['train_s']:.2f}", f"{r['estimate_s']:.2f}",
                  f"{r['epoch_s']:.2f}", f"{ref / r['epoch_s']:.2f}x", f"{r['step_ms']:.1f}",
                  f"{r['syncs_per_step']:.2f}")
    console.print(t)
    if json_path:
        files.write_json(Path(json_path), rows, indent=2)
    return rows


def _counted_train(cfg: TrainConfig) -> tuple[dict, int, int]:
    """Train, counting the steps of the epochs past warm-up and the host syncs made inside them."""
    counter, steps, real = HostSyncCounter(), 0, loop.train_epoch

    def counted_epoch(run, opt, scaler, ctx, rng, loader, epoch, bar):
        nonlocal steps
        if run.method.warming_up(epoch):
            return real(run, opt, scaler, ctx, rng, loader, epoch, bar)
        with counter:
            out = real(run, opt, scaler, ctx, rng, loader, epoch, bar)
        steps += len(loader) * run.method.passes(epoch)
        return out

    loop.train_epoch = counted_epoch
    try:
        summary = train(cfg, overwrite=True, progress=False)
    finally:
        loop.train_epoch = real
    return summary, steps, counter.count
