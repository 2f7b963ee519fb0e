"""`ccl bench train`: CCL's epoch time on the built-in digits set, per schedule and confidence mode."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ccl.errors import UserError
from ccl.train.config import TrainConfig
from ccl.train.loop import default_cache, train
from ccl.train.metrics import MetricsLog


def bench_train(*, epochs: int = 2, json_path: Path | None = None, console: Console | None = None,
                out: Path | None = None) -> list[dict]:
    """Time CCL's epochs on the built-in digits set: (alternate | joint) x (full | inline) confidence.

    One warm-up epoch, then ``epochs - 1`` CCL epochs; reports the mean CCL epoch's training time, the
    confidence-estimation time, and their sum.
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
            summary = train(cfg, overwrite=True, progress=False)
            hist = MetricsLog(Path(summary["run_dir"], "metrics.jsonl")).read()
            timed = [r for r in hist if not r["warmup"]]
            train_s = statistics.fmean(r["epoch_time"] for r in timed)
            est_s = statistics.fmean(r["estimate_time"] for r in hist)
            rows.append({"schedule": schedule, "confidence": confidence, "train_s": train_s, "estimate_s": est_s,
                         "epoch_s": train_s + est_s, "images_per_s": statistics.fmean(r["images_per_s"] for r in timed),
                         "test_top1": hist[-1].get("ens_top1")})
    ref = rows[0]["epoch_s"]
    t = Table(title="CCL epoch time on digits (resnet_small), first row = paper's setting")
    for col in ("schedule", "confidence", "train s", "estimate s", "epoch s", "vs alternate+full"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["schedule"], r["confidence"], f"{r['train_s']:.2f}", f"{r['estimate_s']:.2f}",
                  f"{r['epoch_s']:.2f}", f"{ref / r['epoch_s']:.2f}x")
    console.print(t)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")
    return rows
