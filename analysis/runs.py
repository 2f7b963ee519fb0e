"""`ccl runs`: runs that already exist, side by side, grouped (by method and noise, say), mean ± std over seeds.

The one summariser of finished runs: `ccl runs` prints it, and a grid's table can be made from the same rows.
A run directory is one with a config.json and a metrics.jsonl (runs/NAME as `ccl train` writes it). Its record
(`read_run`) takes the figures from summary.json; a run still going (or stopped) has none yet, and its test
figures are computed from metrics.jsonl the same way (`ccl.train.metrics.summarize`), marked unfinished.

`summarise(sources, group_by, metric, figures)` turns run directories (or records read before) into rows, one per
group, and `markdown(rows, metric)` into a table (`figures=`: other columns, as `ccl table` prints its own). Grouping
keys are the record's own columns (method, data, noise, arch, epochs, seed) or any config option by name (`lr`,
`batch_size`, `ccl.tau`); a column that is not a key shows the distinct values of its group.

metrics.jsonl is read through `ccl.train.metrics.MetricsLog`, as training writes and resumes it: a torn last line is
left out; any other line that is not an epoch record makes the run unreadable (`DamagedLog`), and `read_runs` sets
such a run aside with its reason instead of stopping the listing.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import typer

from ccl import files
from ccl.errors import UserError
from ccl.train.metrics import DamagedLog, MetricsLog, summarize

DEFAULT_GROUP = "method,data,noise,arch,epochs"
DEFAULT_METRIC = "test_last10_mean"
RECORD_KEYS = ("method", "data", "noise", "arch", "epochs", "seed")


# ----------------------------------------------------------------------------------------------------------------
# One run


def is_run(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metrics.jsonl").is_file()


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """The run directories at or under each path, each once, in the order of their start."""
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"no such directory: {p}")
        if is_run(p):
            found[p.resolve()] = None
            continue
        for cfg in sorted(p.rglob("config.json")):
            if is_run(cfg.parent):
                found[cfg.parent.resolve()] = None
    return sorted(found, key=_start_key)


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _start_key(run_dir: Path) -> tuple[str, float]:
    start = _read_json(run_dir / "config.json").get("environment", {}).get("start_time", "")
    return start, (run_dir / "config.json").stat().st_mtime


def _noise(record: dict) -> str:
    """TYPE:RATE of the training labels: the manifest's noise record, or the built-in digits options."""
    manifest = _read_json(Path(record["data"]) / "manifest.json") if record.get("data") else {}
    noise = manifest.get("noise") or {}
    if noise.get("type"):
        rate = noise.get("rate")
        return noise["type"] + (f":{rate:g}" if isinstance(rate, (int, float)) else "")
    cfg = record.get("config", {})
    if cfg.get("data") is None and cfg.get("noise"):
        return f"{cfg['noise']}:{cfg.get('noise_rate', 0):g}"
    return "-"


def _auroc(last: dict) -> float | None:
    vals = [v for k, v in last.items() if k.startswith("net") and k.endswith("_auroc")
            and isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def _wall_time(run_dir: Path, record: dict, summary: dict) -> float | None:
    """Seconds from the run's start to its summary: summary.json's own `wall_time_s` where it has one, else its
    file's time minus the environment record's start time (not for a resumed run: the pause would count)."""
    if isinstance(summary.get("wall_time_s"), (int, float)):
        return float(summary["wall_time_s"])
    start = record.get("environment", {}).get("start_time")
    done = run_dir / "summary.json"
    if not start or record.get("resumes") or not done.is_file():
        return None
    try:
        t0 = time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except ValueError:
        return None
    return max(done.stat().st_mtime - t0, 0.0)


def read_run(run_dir: Path) -> dict:
    """One run's record: what it is (method, data, noise, arch, epochs, seed, its config) and what it gave (every
    summary.json figure; for an unfinished run those computed from metrics.jsonl), its training time (the sum of
    its epochs' training and confidence-estimation time), wall time, and its per-epoch records (`history`).
    Raises `DamagedLog` when a line of metrics.jsonl is not an epoch record (a torn last line is left out)."""
    run_dir = Path(run_dir)
    record = _read_json(run_dir / "config.json")
    cfg = record.get("config", {})
    history = MetricsLog(run_dir / "metrics.jsonl").read()
    summary = _read_json(run_dir / "summary.json")
    finished = bool(summary)
    if not finished:  # the figures summary.json will hold, from the epochs so far
        summary = {f"test_{k}": v for k, v in summarize(history).items()}
        if history:
            summary["auroc"] = _auroc(history[-1])
            summary["epochs_run"] = len(history)
        val = [r["val_ens_top1"] for r in history if isinstance(r.get("val_ens_top1"), (int, float))]
        if val:
            summary["val_best"], summary["val_last10_mean"] = max(val), statistics.fmean(val[-10:])
    if "steps_per_net" not in summary and any("steps_per_net" in r for r in history):
        summary["steps_per_net"] = float(sum(r.get("steps_per_net", 0) for r in history))
    identity = record.get("identity", {})
    return {
        "run": run_dir.name, "path": str(run_dir), "finished": finished,
        "method": cfg.get("method", identity.get("method")), "data": identity.get("dataset"),
        "noise": _noise(record), "arch": identity.get("arch", cfg.get("arch")),
        "epochs": cfg.get("epochs"), "epochs_done": len(history), "seed": cfg.get("seed"),
        "steps_per_net": summary.get("steps_per_net"),
        "train_time_s": sum(float(r.get("epoch_time", 0)) + float(r.get("estimate_time", 0)) for r in history),
        "wall_time_s": _wall_time(run_dir, record, summary),
        "start_time": record.get("environment", {}).get("start_time"),
        "world_size": record.get("environment", {}).get("world_size"),
        "summary": summary, "config": cfg, "last": history[-1] if history else {}, "history": history,
    }


def read_runs(run_dirs: Iterable[Path]) -> tuple[list[dict], list[tuple[Path, str]]]:
    """(records of the runs that read, [(run directory, why not)] for those that do not): one damaged run does not
    stop a listing of many."""
    records, unreadable = [], []
    for d in run_dirs:
        try:
            records.append(read_run(d))
        except (DamagedLog, OSError) as e:
            unreadable.append((Path(d), str(e)))
    return records, unreadable


def value(record: dict, key: str):
    """A record's value by name: its own column, a summary figure, the last epoch's metric, or a config option
    (`ccl.tau` reads the section)."""
    if key in record and key not in ("summary", "config", "last", "history"):
        return record[key]
    for source in (record["summary"], record["last"]):
        if key in source:
            return source[key]
    node = record["config"]
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ----------------------------------------------------------------------------------------------------------------
# Groups


def mean_std(vals: list) -> tuple[float, float, int] | None:
    """(mean, sample std, n) of the finite numbers among vals; None when there are none."""
    xs = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not xs:
        return None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def _distinct(vals: list) -> str:
    seen = []
    for v in vals:
        s = "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
        if s not in seen:
            seen.append(s)
    return ",".join(seen)


def parse_group_by(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise UserError(f"--group-by takes comma-separated names such as method,noise; got {text!r}")
    return keys


def summarise(sources: Iterable, group_by: list[str] | str = DEFAULT_GROUP, metric: str = DEFAULT_METRIC,
              figures: Iterable[str] = ()) -> list[dict]:
    """Rows, one per group of runs (in the order each group's first run started): the group's keys, the distinct
    values of the descriptive columns, the seeds, and mean ± std over its runs of `metric`, the detection AUROC,
    the training and wall time, and the optimiser steps per net; and, under its own name, of each of `figures`
    (any name `value` reads). `sources`: run directories or `read_run` records. An empty `group_by`: one row."""
    keys = parse_group_by(group_by) if isinstance(group_by, str) else list(group_by)
    records = [s if isinstance(s, dict) else read_run(s) for s in sources]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(json.dumps(value(r, k), sort_keys=True) for k in keys), []).append(r)
    rows = []
    for members in groups.values():
        row = {k: value(members[0], k) for k in keys}
        for col in ("method", "data", "noise", "arch", "epochs"):
            row.setdefault(col, _distinct([value(r, col) for r in members]))
        row |= {
            "runs": [r["run"] for r in members],
            "seeds": sorted({r["seed"] for r in members if r["seed"] is not None}),
            "unfinished": sum(not r["finished"] for r in members),
            "metric": metric,
            "value": mean_std([value(r, metric) for r in members]),
            "auroc": mean_std([r["summary"].get("auroc") for r in members]),
            "steps_per_net": mean_std([r["steps_per_net"] for r in members]),
            "train_time_s": mean_std([r["train_time_s"] for r in members]),
            "wall_time_s": mean_std([r["wall_time_s"] for r in members]),
        }
        for f in figures:
            row.setdefault(f, mean_std([value(r, f) for r in members]))
        rows.append(row)
    return rows


def _ms(v, digits: int) -> str:
    if v is None:
        return "-"
    m, s, n = v
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def _text(v) -> str:
    return "-" if v is None else str(v)


def cells(rows: list[dict], metric: str = DEFAULT_METRIC, keys: list[str] | None = None,
          figures: Iterable[tuple[str, str, int]] | None = None) -> tuple[list, list]:
    """(header, rows of text cells): mean ± std over each group's runs; a lone run shows its value. `figures`,
    [(row key, heading, digits)], replaces the standard columns: then a row is its `keys` and those figures."""
    if figures is not None:
        figures = list(figures)
        header = list(keys or []) + [h for _, h, _ in figures]
        body = [[_text(r.get(k)) for k in keys or []] + [_ms(r.get(f), d) for f, _, d in figures] for r in rows]
        return header, body
    head = list(dict.fromkeys((keys or []) + ["method", "data", "noise", "arch", "epochs"]))
    header = head + ["steps/net", "seeds", metric, "AUROC", "train s", "wall s", "runs"]
    body = []
    for r in rows:
        runs = str(len(r["runs"])) + (f" ({r['unfinished']} unfinished)" if r["unfinished"] else "")
        steps = r["steps_per_net"]
        body.append([str(r.get(k, "-")) for k in head] + [
            "-" if steps is None else f"{steps[0]:.0f}", ",".join(map(str, r["seeds"])) or "-",
            _ms(r["value"], 2), _ms(r["auroc"], 3), _ms(r["train_time_s"], 0), _ms(r["wall_time_s"], 0), runs])
    return header, body


def markdown(rows: list[dict], metric: str = DEFAULT_METRIC, keys: list[str] | None = None,
             figures: Iterable[tuple[str, str, int]] | None = None) -> str:
    """The rows as a Markdown table (`cells`' columns)."""
    header, body = cells(rows, metric, keys, figures)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in body]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], md_path: Path, metric: str, keys: list[str] | None = None) -> tuple[Path, Path]:
    """RUNS.md and RUNS.json beside it."""
    md_path = Path(md_path)
    files.make_dir(md_path.parent)
    files.write_atomic(md_path, markdown(rows, metric, keys))
    json_path = md_path.with_suffix(".json")
    files.write_json(json_path, rows, indent=2)
    return md_path, json_path


# ----------------------------------------------------------------------------------------------------------------
# The command


def runs_cmd(
    dirs: Optional[list[Path]] = typer.Argument(None, help="Run directories, or folders to search for them. "
                                                "\\[default: runs]", show_default=False),
    group_by: str = typer.Option(DEFAULT_GROUP, help="Comma-separated keys the runs are grouped by: method, data, "
                                 "noise, arch, epochs, seed, or any config option (lr, batch_size, ccl.tau)."),
    metric: str = typer.Option(DEFAULT_METRIC, help="The figure to compare: a summary.json key (test_final, "
                               "test_last10_mean, test_at_best_val, val_best, ...) or a metrics.jsonl key of the "
                               "last epoch."),
    last: Optional[int] = typer.Option(None, metavar="N", help="Only the N runs that started last.",
                                       show_default=False),
    out: Optional[Path] = typer.Option(None, help="Markdown file to write (the JSON goes beside it). \\[default: "
                                       "runs.md in the first directory]", show_default=False),
):
    """Put existing runs side by side: grouped, mean ± std over seeds of a metric, the detection AUROC, steps per
    net and time; printed, and written as Markdown and JSON."""
    from rich.console import Console
    from rich.table import Table

    dirs = list(dirs or [Path("runs")])
    if last is not None and last < 1:
        raise UserError(f"--last must be at least 1, got {last}")
    keys = parse_group_by(group_by)
    found = find_runs(dirs)
    if last is not None:
        found = found[-last:]
    if not found:
        raise UserError(f"no runs under {', '.join(map(str, dirs))} (a run directory holds config.json and "
                        "metrics.jsonl)")
    records, unreadable = read_runs(found)
    console, err = Console(), Console(stderr=True)
    for d, why in unreadable:
        err.print(f"warning: skipped {d}: unreadable ({why})", highlight=False, soft_wrap=True, markup=False)
    if not records:
        raise UserError(f"none of the {len(found)} runs under {', '.join(map(str, dirs))} is readable")
    rows = summarise(records, keys, metric)
    md, js = write(rows, out or (dirs[0] / "runs.md"), metric, keys)
    header, body = cells(rows, metric, keys)
    skipped = f", {len(unreadable)} unreadable skipped" if unreadable else ""
    t = Table(title=f"{len(records)} runs, {len(rows)} groups (mean ± std over runs){skipped}")
    for c in header:
        t.add_column(c, justify="left" if c in keys + ["method", "data", "noise", "arch"] else "right")
    for c in body:
        t.add_row(*c)
    console.print(t)
    console.print(f"-> {md}, {js}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `ccl runs` to the app (`ccl.cli` calls this once)."""
    app.command("runs")(runs_cmd)
