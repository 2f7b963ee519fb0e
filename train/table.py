"""`ccl table`: a methods x noise x seeds grid and its results table.

A column is a noise setting of the built-in digits, or, with `data`, the one given shard set (its own labels:
every noise setting would train the same runs under different names).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from ccl.errors import UserError
from ccl.train.config import TrainConfig
from ccl.train.loop import train


def parse_noise(spec: str) -> tuple[str, float]:
    try:
        kind, rate = spec.split(":")
        return kind, float(rate)
    except ValueError:
        raise UserError(f"noise setting {spec!r} should read TYPE:RATE, e.g. sym:0.5") from None


@dataclass(frozen=True)
class Column:
    """One column of the grid: its label in the table, its part of the run names, and the options it sets."""

    label: str
    token: str
    options: dict


def grid_columns(noise: list[str], data=None) -> list[Column]:
    if data is not None:
        name = Path(data).resolve().name
        return [Column(name, name, {"data": str(data)})]
    return [Column(f"{k}:{r:g}", f"{k}{r:g}", {"noise": k, "noise_rate": r}) for k, r in map(parse_noise, noise)]


def _mean_std(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and v == v]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(ms: tuple[float, float], digits: int = 1) -> str:
    m, s = ms
    return "-" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}"


def run_table(*, methods, noise, seeds, epochs, warmup, arch, out: Path, data=None, base=None,
              console: Console | None = None) -> dict:
    """Train every (method, noise, seed) cell once; finished cells are read back, a killed one resumes."""
    console = console or Console()
    columns = grid_columns(noise, data)
    out = Path(out)
    cells = [(m, col, seed) for col in columns for m in methods for seed in seeds]
    results: dict[str, dict] = {}
    with Progress(console=console) as bar:
        task = bar.add_task("grid", total=len(cells))
        for method, col, seed in cells:
            name = f"{method}-{col.token}-s{seed}"
            run_dir = out / "runs" / name
            done = run_dir / "summary.json"
            if not done.is_file():
                cfg = TrainConfig.from_dict({**(base or {}), "method": method, "seed": seed, "epochs": epochs,
                                             "warmup": warmup, "arch": arch, "out": str(out / "runs"),
                                             "name": name, **col.options})
                bar.update(task, description=f"{name}")
                t0 = time.perf_counter()
                resume = (run_dir / "checkpoints" / "last.pt").is_file()
                summary = train(cfg, resume=resume, progress=False)
                summary["wall_time_s"] = time.perf_counter() - t0  # of this process only, when the cell was resumed
                done.write_text(json.dumps(summary, indent=2) + "\n")
            results[name] = _read(done)
            bar.advance(task)
    table = _aggregate(results, methods, columns, seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "table.md").write_text(_markdown(table, methods, columns))
    console.print((out / "table.md").read_text())
    return table


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _aggregate(results, methods, columns, seeds) -> dict:
    cells = {}
    for col in columns:
        for m in methods:
            runs = [results[f"{m}-{col.token}-s{s}"] for s in seeds]
            cells[f"{m}|{col.label}"] = {
                "method": m, "column": col.label, "seeds": list(seeds),
                "final": _mean_std([r.get("test_final") for r in runs]),
                "last10": _mean_std([r.get("test_last10_mean") for r in runs]),
                "auroc": _mean_std([r.get("auroc") for r in runs]),
                "wall_time_s": _mean_std([r.get("wall_time_s") for r in runs]),
                "actual_noise_rate": _mean_std([r.get("actual_noise_rate") for r in runs]),
            }
    return cells


def _markdown(table, methods, columns) -> str:
    head = "| method | " + " | ".join(col.label.replace(":", " ") for col in columns) + " |\n"
    head += "|---|" + "---|" * len(columns) + "\n"
    rows = []
    for m in methods:
        cells = []
        for col in columns:
            c = table[f"{m}|{col.label}"]
            cells.append(f"{_fmt(c['last10'])} (final {_fmt(c['final'])}; AUROC {_fmt(c['auroc'], 3)}; "
                         f"{c['wall_time_s'][0]:.0f} s)")
        rows.append(f"| {m} | " + " | ".join(cells) + " |\n")
    return ("Test accuracy (%), mean of the last 10 epochs, mean ± std over seeds; in brackets the final-epoch "
            "accuracy, the clean-sample detection AUROC of w and the wall time per run.\n\n" + head + "".join(rows))
