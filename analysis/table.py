"""`ccl table`: a methods x grid x noise x seeds table of runs and its results.

A column is a noise setting of the built-in digits, or, with `data`, the one given shard set (its own labels:
every noise setting would train the same runs under different names). A row is a method and one cell of the
product of the `--grid` options (`KEY=V1,V2,...`); a grid key of a method's section (`ccl.sharpen_t`) applies to
that method alone. A run's name holds only the settings that differ from the base config, so the default cell of
two sweeps is one run, trained once.

Rows are ranked by held-out accuracy on the noisy labels (`val_fraction`), never by the test split; the test
accuracy is reported beside it, at equal epochs (the runs' own figures) and at equal optimiser steps per net.

A cell's figures come from `ccl runs`' summariser (`ccl.analysis.runs`): each run is read with `read_run`, the
cell's runs are one group of `summarise`, and the table is its `markdown`; the reading at equal steps is taken
from the same record's per-epoch history.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional  # the command's annotations are evaluated in this module

import typer

from rich.console import Console

from ccl import files
from ccl.analysis import runs
from ccl.errors import UserError
from ccl.progress import bar as progress_bar
from ccl.train.config import SECTIONS, TrainConfig, apply_overrides, load_config_file
from ccl.train.loop import train
from ccl.train.resume import FREE_ON_RESUME, config_changes


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


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=V1,V2` strings -> [(KEY, [V1, V2])]; a key given twice is the user's error."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise UserError(f"--grid takes KEY=V1,V2,..., e.g. ccl.sharpen_t=none,0.5; got {spec!r}")
        if key in out:
            raise UserError(f"--grid names {key} twice")
        out[key] = vals
    return list(out.items())


def _section(key: str) -> str | None:
    section, dot, _ = key.partition(".")
    return section if dot and section in SECTIONS else None


@dataclass(frozen=True)
class Cell:
    """One row of the table: a method and the grid's settings that differ from the base config."""

    method: str
    settings: tuple[tuple[str, str], ...]  # (key, value as given), the non-default ones only

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings) or "default"

    @property
    def token(self) -> str:
        return "".join(f"-{re.sub(r'[^A-Za-z0-9_.=]+', '_', k.split('.')[-1])}={re.sub(r'[^A-Za-z0-9_.]+', '_', v)}"
                       for k, v in self.settings)


def grid_cells(methods: list[str], grid: list[tuple[str, list[str]]], base: dict) -> list[Cell]:
    """The rows: per method, the product of the grids that apply to it, each setting kept only where it changes
    the resolved config (so `--grid ccl.sharpen_t=none,0.5` keeps one default row). Every value is checked."""
    cells: list[Cell] = []
    for m in methods:
        keys = [(k, vals) for k, vals in grid if _section(k) in (None, m)]
        plain = _resolve({**base, "method": m}, [])
        for combo in itertools.product(*(vals for _, vals in keys)):
            pairs = [(k, v) for (k, _), v in zip(keys, combo)]
            resolved = _resolve({**base, "method": m}, pairs)
            changed = tuple((k, v) for k, v in pairs if _get(resolved, k) != _get(plain, k))
            cell = Cell(m, changed)
            if cell not in cells:
                cells.append(cell)
    return cells


def _resolve(values: dict, pairs: list[tuple[str, str]]) -> dict:
    return TrainConfig.from_dict(apply_overrides(values, [f"{k}={v}" for k, v in pairs])).validate().to_dict()


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return d


# The figures each row reports, mean ± std over seeds: (summary key, heading, digits).
FIGURES = (("val_best", "val best", 1), ("val_last10_mean", "val last-10", 1), ("test_at_best_val", "test at best val", 1),
           ("test_last10_mean", "test last-10", 1), ("test_final", "test final", 1),
           ("test_equal_steps", "test at equal steps", 1), ("auroc", "AUROC of w", 3),
           ("epochs_run", "epochs", 0), ("steps_per_net", "steps/net", 0), ("wall_time_s", "wall s", 0))


def run_table(*, methods, noise, seeds, epochs, warmup, arch, out: Path, data=None, base=None, grid=(),
              console: Console | None = None) -> dict:
    """Train every (row, column, seed) run once; finished runs are read back, a killed one resumes."""
    console = console or Console()
    columns = grid_columns(noise, data)
    out = Path(out)
    common = {**(base or {}), "epochs": epochs, "warmup": warmup, "arch": arch, "out": str(out / "runs")}
    cells = grid_cells(methods, parse_grid(list(grid)), common)
    todo = [(cell, col, seed) for col in columns for seed in seeds for cell in cells]
    results: dict[str, dict] = {}
    with progress_bar(True, console=console, remaining=True) as bar:
        task = bar.add_task("grid", total=len(todo))
        for cell, col, seed in todo:
            name = run_name(cell, col, seed)
            run_dir = out / "runs" / name
            done = run_dir / "summary.json"
            values = apply_overrides({**common, "method": cell.method, "seed": seed, "name": name, **col.options},
                                     [f"{k}={v}" for k, v in cell.settings])
            cfg = TrainConfig.from_dict(values)
            if done.is_file():
                record = runs.read_run(run_dir)
                _check_same(run_dir, record["config"], cfg)
            else:
                bar.update(task, description=f"{name}")
                t0 = time.perf_counter()
                resume = (run_dir / "checkpoints" / "last.pt").is_file()
                summary = train(cfg, resume=resume, progress=False)
                summary["wall_time_s"] = time.perf_counter() - t0  # of this process only, when the run was resumed
                files.write_json(done, summary, indent=2)
                record = runs.read_run(run_dir)
            results[name] = record
            bar.advance(task)
    table = aggregate(results, cells, columns, seeds)
    files.make_dir(out)
    files.write_json(out / "table.json", table, indent=2)
    files.write_atomic(out / "table.md", markdown(table, columns))
    console.print((out / "table.md").read_text())
    return table


def _check_same(run_dir: Path, saved: dict, cfg: TrainConfig) -> None:
    """A finished run is read back only when it was trained with this config (`saved`: the config its
    config.json holds): a name holds the grid's settings alone, so another --set, --extra or --epochs in the same
    --out would otherwise report the old run."""
    free = tuple(k for k in FREE_ON_RESUME if k not in ("epochs", "patience"))  # they change what a run reports
    changes = config_changes(saved, cfg, allow=True, free=free)
    changes = {k: v for k, v in changes.items() if v[1] is not None}  # unset here: the run resolved it (num_classes)
    if changes:
        first = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(changes.items())[:3])
        raise UserError(f"{run_dir} holds a finished run with other settings: {first}; give this table its own --out")


def run_name(cell: Cell, col: Column, seed: int) -> str:
    return f"{cell.method}-{col.token}{cell.token}-s{seed}"


def at_steps(record: dict, budget: float) -> dict:
    """Test and held-out accuracy of a run (a `runs.read_run` record) at its last epoch within `budget` optimiser
    steps per net, from its per-epoch history (empty when it has no such epoch, or no curve)."""
    steps, last = 0.0, {}
    for r in record["history"]:  # MetricsLog's complete lines
        steps += r.get("steps_per_net", 0)
        if steps > budget + 1e-6:
            break
        last = {"test_equal_steps": r.get("ens_top1"), "val_equal_steps": r.get("val_ens_top1")}
    return last


def aggregate(results: dict, cells: list[Cell], columns: list[Column], seeds) -> dict:
    """Each cell's runs summarised as one group by `runs.summarise`: mean ± std over seeds of its FIGURES. Equal
    work: within a column, every run is also read at the smallest number of optimiser steps per net that any run
    of the column took (`equal_steps`), so a method that steps twice per epoch (RoLR's code) is compared at the same
    number of steps as one that steps once. `results`: run name -> `runs.read_run` record, or its directory."""
    records = {name: r if isinstance(r, dict) else runs.read_run(Path(r)) for name, r in results.items()}
    figures = [key for key, _, _ in FIGURES] + ["val_equal_steps", "actual_noise_rate"]
    table = {}
    for col in columns:
        col_runs = [records[run_name(cell, col, s)] for cell in cells for s in seeds]
        budget = min(filter(None, (runs.value(r, "steps_per_net") for r in col_runs)), default=0.0)
        for cell in cells:
            members = []
            for s in seeds:
                r = records[run_name(cell, col, s)]
                members.append({**r, "summary": {**r["summary"], **at_steps(r, budget)}})
            (row,) = runs.summarise(members, [], "test_last10_mean", figures)
            table[f"{cell.method}|{cell.label}|{col.label}"] = {
                "method": cell.method, "reading": cell.label, "settings": dict(cell.settings), "column": col.label,
                **{k: v for k, v in row.items() if k != "method"}, "seeds": list(seeds), "equal_steps": budget,
                "per_seed_test_last10": [runs.value(r, "test_last10_mean") for r in members],
            }
    return table


def _rank(cell: dict) -> float:
    val = cell.get("val_best")
    return -val[0] if val else 0.0


def markdown(table: dict, columns: list[Column]) -> str:
    """One table per column (`runs.markdown` of its cells), rows ranked by held-out accuracy (val best) when there
    is one, else as given."""
    parts = ["Accuracy (%), mean ± std over seeds (a lone seed: its value). `val` is the held-out part of the noisy "
             "training set (the ranking); `test` the clean test split, reported beside it. `steps/net`: optimiser "
             "steps each net took; `test at equal steps`: at the last epoch within the fewest steps per net any run "
             "of the column took.\n"]
    for col in columns:
        rows = sorted((c for c in table.values() if c["column"] == col.label), key=_rank)
        budget = max((c.get("equal_steps", 0) for c in rows), default=0)
        parts.append(f"\n**{col.label}** (equal steps: {budget:.0f} per net)\n\n")
        parts.append(runs.markdown(rows, keys=["method", "reading"], figures=FIGURES))
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# The command


def table_cmd(
    methods: str = typer.Option("ce,rolr,tcl,ccl", help="Comma-separated methods."),
    noise: str = typer.Option("sym:0.5,pair:0.4", help="Comma-separated TYPE:RATE settings."),
    seeds: str = typer.Option("0,1", help="Comma-separated seeds (noise and init)."),
    epochs: int = typer.Option(12, help="Epochs per run."),
    warmup: int = typer.Option(4, help="Warm-up epochs, the same for every method."),
    arch: str = typer.Option("resnet_small", help="Architecture for every run."),
    batch_size: int = typer.Option(64, help="Batch size for every run."),
    out: Path = typer.Option(Path("runs/table"), help="Directory for the runs, table.md and table.json."),
    data: Optional[Path] = typer.Option(None, help="A shard directory with its own labels: one column, named "
                                        "after the directory, instead of the built-in digits under --noise (then "
                                        "--noise is ignored)."),
    extra: Optional[Path] = typer.Option(None, help="JSON file of further TrainConfig options for every run."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE or SECTION.KEY=VALUE for every run "
                                             "(repeatable).", show_default=False),
    grid: Optional[list[str]] = typer.Option(None, "--grid", help="KEY=V1,V2,... (repeatable): train the product of "
                                             "the grids; a method section's key applies to that method alone, e.g. "
                                             "--grid ccl.sharpen_t=none,0.5 --grid schedule=joint,alternate.",
                                             show_default=False),
    val_fraction: float = typer.Option(0.0, help="Held-out fraction of the noisy training set (ranks the grid's "
                                       "cells; never the test split)."),
    patience: int = typer.Option(0, help="Stop a run when its held-out accuracy has not improved for this many "
                                 "epochs (needs --val-fraction); 0: every run takes --epochs."),
):
    """Run a methods x grid x noise x seeds table and write table.md and table.json (resumes a partly finished
    one: finished runs are read back, a killed one continues)."""
    base = load_config_file(extra) if extra else {}
    base = apply_overrides(base, list(set_ or []))
    seed_list = [s.strip() for s in seeds.split(",") if s.strip()]
    if not seed_list or not all(s.lstrip("-").isdigit() for s in seed_list):
        raise UserError(f"--seeds takes comma-separated whole numbers, e.g. 0,1,2; got {seeds!r}")
    base = {"batch_size": batch_size, "val_fraction": val_fraction, "patience": patience, **base}
    run_table(methods=methods.split(","), noise=noise.split(","), seeds=[int(s) for s in seed_list],
         epochs=epochs, warmup=warmup, arch=arch, out=out, data=data, base=base, grid=list(grid or []),
         console=Console())


def register(app: typer.Typer) -> None:
    """Add `ccl table` to the app (`ccl.cli` calls this once)."""
    app.command("table")(table_cmd)
