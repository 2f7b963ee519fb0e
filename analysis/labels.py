"""`ccl labels`: which labels of a finished run look wrong, ranked, with a suggested fix.

A run already computes what a person cleaning their data wants: each net's label confidence w (a GMM posterior
that the given label is clean, Eq. 16), each net's prediction, and the refurbished label (Eq. 10). This module
turns them into one row per sample, sorted from most to least suspect, and writes the rows as Parquet (when
pyarrow is installed) or CSV.

Label confidence (`--w`):
- eval (the default): fitted here on the final nets. Each net's w is Eq. 16's criterion, a 2-component GMM on
  its peer's per-sample CE of the given label (a single net is its own peer); `w_ens` is the same GMM on the
  ensemble's CE. All on the deterministic eval view, with EM run to convergence, and made monotone in the loss.
- run: the run's own w, as its last epoch left it (the training split of ccl, rolr and tcl; ce never estimates
  one), with `w_ens` their mean. That w was fitted on the strong view (RandAugment draws add their own spread to
  each sample's loss) with the training loop's 10 loose EM steps (and under `--confidence inline` from losses
  recorded during the epoch's steps): on the data measured it ranked the wrong labels clearly worse than the
  eval estimate (see the README).

The ranking: `w_ens` ascending; ties (w saturates at 0 and 1 for many samples) broken by the ensemble's
probability of the given label, ascending; then by index, so the order is a pure function of the run. The flag
`suspect`: `w_ens` below the GMM's decision point 0.5 (the posterior of the clean component below one half), or,
with `rate`, the `rate` most suspect fraction of the rows.

Predictions use the eval view (no augmentation), so the table is reproducible. The ensemble is the softmax of the
nets' summed logits, as `ccl eval` scores it. Metrics treat a wrong label as the positive class: precision is
the fraction of flagged labels that are wrong, recall the fraction of wrong labels that are flagged, and AUROC
scores the ranking.

`--compare-cleanlab` runs cleanlab (confident learning) on out-of-sample probabilities from k-fold
cross-validation with the project's own trainer (`ccl.analysis.crossval`), and reports both methods side by side.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import typer

from ccl import files
from ccl.errors import Interrupted, UserError
from ccl.analysis.inference import iter_logits, resolve_checkpoint
from ccl.analysis.labels_scoring import (
    GMM_DECISION, check_rate, correction, estimate_w, issue_metrics, rank_score,
)  # fmt: skip
from ccl.analysis.labels_table import (
    HeadSummary, LabelTable, build_table, check_out, contact_sheet, default_out, write_table,
)  # fmt: skip
from ccl.pipeline.shards import SampleLocations, sample_locations
from ccl.train.metrics import DamagedLog, MetricsLog

GRID_DEFAULT = 64  # suspects on the contact sheet when --top is not given

# ----------------------------------------------------------------------------------------------------------------
# Predictions: one pass over a split, kept as per-sample summaries (never the [N, C] matrix, which for WebVision
# would be gigabytes)


def summarize_probs(logp: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample summaries of log-probabilities [N, C] against the given labels [N]."""
    p = logp.exp()  # [N, C]
    prob, pred = p.max(1)
    lp_given = logp.gather(1, labels[:, None]).squeeze(1)  # [N]
    others = p.scatter(1, labels[:, None], -1.0)  # the given class can never be the alternative
    p_alt, alt = others.max(1)
    return {"pred": pred, "prob": prob, "p_given": lp_given.exp(), "ce": -lp_given, "alt": alt, "p_alt": p_alt}


def predict(run, split: str, *, batch_size: int = 256, workers: int = 0) -> tuple[list[HeadSummary], HeadSummary]:
    """Each net's and the ensemble's summaries over a split (the ensemble: softmax of the summed logits)."""
    n = run.shards.count(split)
    k_nets = len(run.method.nets)
    fields = ("pred", "prob", "p_given", "ce", "alt", "p_alt")
    buf = [{f: torch.zeros(n, dtype=torch.int64 if f in ("pred", "alt") else torch.float32) for f in fields}
           for _ in range(k_nets + 1)]
    for index, label, logits in iter_logits(run, split, batch_size=batch_size, workers=workers):
        index = index.cpu()
        heads = list(logits) + [logits.sum(0)]  # K nets, then the ensemble
        for b, head in zip(buf, heads):
            for f, v in summarize_probs(F.log_softmax(head, dim=1), label).items():
                b[f][index] = v.cpu().to(b[f].dtype)
    out = [HeadSummary(**{f: b[f].numpy() for f in fields}) for b in buf]
    return out[:-1], out[-1]


# ----------------------------------------------------------------------------------------------------------------
# The engine


def run_train_seconds(run_dir: Path) -> float | None:
    """Training time the run logged (the sum of its epochs' training and confidence-estimation time); None when
    it has no metrics.jsonl, or a damaged one (a torn last line is left out, as training leaves it out)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    try:
        history = MetricsLog(path).read()
    except DamagedLog:
        return None
    return sum(float(r.get("epoch_time", 0.0)) + float(r.get("estimate_time", 0.0)) for r in history)


W_SOURCES = ("eval", "run")


def check_w_source(w_from: str) -> None:
    if w_from not in W_SOURCES:
        raise UserError(f"--w must be {' or '.join(W_SOURCES)}, got {w_from!r}")


def label_table(run, split: str, *, w_from: str = "eval", rate: float | None = None, batch_size: int = 256,
                workers: int = 0) -> tuple[LabelTable, SampleLocations, np.ndarray, np.ndarray]:
    """The sorted table of a restored run's split, with the split's locations, given labels and clean labels.

    w_from="eval": w fitted here on the final nets' eval-view losses (`estimate_w`); "run": the run's own w, as
    its last epoch left it (the training split of a method that estimates w), ranked by the nets' mean."""
    check_w_source(w_from)
    if split not in run.shards.splits:
        raise UserError(f"no split {split!r} in {run.shards.root}; it has {', '.join(run.shards.splits)}")
    method = run.method
    has_w = bool(getattr(method, "has_w", torch.zeros(())))
    if w_from == "run" and not (has_w and split == "train"):
        why = (f"w belongs to the training split, not {split!r}" if has_w else
               f"a {run.cfg.method} run holds none (ce never estimates w; a run stopped in warm-up has none yet)")
        raise UserError(f"--w run: no w from the run for this split: {why}; use --w eval")
    given, clean = run.shards.labels(split)
    locations = sample_locations(run.shards, split)
    nets, ens = predict(run, split, batch_size=batch_size, workers=workers)
    if w_from == "run":
        w = method.w.detach().float().cpu().numpy()
        w_ens = w.mean(0)
    else:
        w, w_ens = estimate_w([h.ce for h in nets], ens.ce, seed=int(getattr(run.cfg, "seed", 0)))
    if w.shape != (len(nets), len(given)):
        raise ValueError(f"w is {w.shape}, expected ({len(nets)}, {len(given)})")
    table = build_table(nets, ens, w, w_ens, given, locations.key, run.shards.classes, w_from, rate)
    if (clean >= 0).any():  # the true label beside the given one (-1 where a sample's is unknown)
        cols = table.columns
        at = list(cols).index("given_name") + 1
        items = list(cols.items())
        table.columns = dict(items[:at] + [("true", clean[cols["index"]])] + items[at:])
    return table, locations, given, clean


def flag_metrics(table: LabelTable, given: np.ndarray, clean: np.ndarray) -> dict | None:
    """Precision/recall/AUROC of the table's flag and ranking against the clean labels, or None when unknown."""
    if not (clean >= 0).any():
        return None
    c = table.columns
    idx = c["index"]
    flag = np.zeros(len(idx), dtype=bool)
    flag[idx] = c["suspect"]
    suggested = np.empty(len(idx), dtype=np.int64)
    suggested[idx] = c["suggested"]
    return issue_metrics(flag, rank_score(idx), given, clean, suggested)


def require_cleanlab() -> None:
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        raise UserError("--compare-cleanlab needs cleanlab: pip install -e '.[labels]' in the checkout, "
                        "or pip install cleanlab") from None


def compare_cleanlab(run, split: str, table: LabelTable, given: np.ndarray, clean: np.ndarray, *, folds: int,
                     epochs: int | None, batch_size: int, workers: int, log: Callable[[str], None]) -> dict:
    """cleanlab's `find_label_issues` and label-quality scores on k-fold out-of-sample probabilities; adds their
    columns to the table and returns both methods' metrics and wall times."""
    require_cleanlab()
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from ccl.analysis.crossval import out_of_sample_probs

    t0 = time.perf_counter()
    probs, cv = out_of_sample_probs(run, split, folds=folds, epochs=epochs, batch_size=batch_size, workers=workers,
                                    log=log)
    t1 = time.perf_counter()
    issues = find_label_issues(given, probs)  # bool [N]: confident learning, prune_by_noise_rate
    quality = get_label_quality_scores(given, probs)  # [N] self-confidence, low = likely wrong
    t2 = time.perf_counter()
    idx = table.columns["index"]
    table.columns["cleanlab_quality"] = quality[idx].astype(np.float32)
    table.columns["cleanlab_issue"] = issues[idx]
    table.columns["oos_pred"] = probs.argmax(1)[idx]
    flag = np.zeros(len(idx), dtype=bool)
    flag[idx] = table.columns["suspect"]
    result = {
        "cleanlab_version": __import__("cleanlab").__version__,
        "cv": cv,
        "cleanlab": {"flagged": int(issues.sum()), "seconds_cv": t1 - t0, "seconds_cleanlab": t2 - t1},
        "agreement": {"both": int((flag & issues).sum()), "ccl_only": int((flag & ~issues).sum()),
                      "cleanlab_only": int((~flag & issues).sum())},
    }
    if (clean >= 0).any():
        # cleanlab's suggested fix: the argmax of the out-of-sample probabilities (Datalab's `predicted_label`)
        oos = probs.argmax(1)
        result["cleanlab"] |= issue_metrics(issues, -quality, given, clean, oos)
        # Both suggestions on the same samples: those both flag whose label is wrong.
        ours = np.empty(len(idx), dtype=np.int64)
        ours[idx] = table.columns["suggested"]
        common = flag & issues & (clean >= 0) & (given != clean)
        result["agreement"]["correction_both"] = {"ccl": correction(common, ours, clean),
                                                  "cleanlab": correction(common, oos, clean)}
    return result


def labels_report(run_path: Path, split: str = "train", *, out: Path | None = None, w_from: str = "eval",
                  rate: float | None = None, grid: int | None = None, cleanlab: bool = False, folds: int = 5,
                  cv_epochs: int | None = None,
                  data: Path | None = None, device: str = "auto", batch_size: int = 256, workers: int = 0,
                  log: Callable[[str], None] = lambda s: None) -> dict:
    """The `ccl labels` engine: restore the run, write the table (and the contact sheet), measure, compare.

    Returns {"out", "format", "rows", "w_source", "metrics" (or None), "grid", "seconds", "table", and with
    cleanlab "compare"}."""
    from ccl.train.restore import restore

    check_rate(rate)  # the arguments are checked before the run is restored
    check_w_source(w_from)
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    if cleanlab:
        require_cleanlab()  # before the minutes of work it would otherwise follow
    ck = resolve_checkpoint(run_path)
    run_dir = ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent
    out = Path(out) if out else default_out(run_dir, split)
    check_out(out)
    t0 = time.perf_counter()
    run, _ = restore(ck, data=data, device=device)
    table, locations, given, clean = label_table(run, split, w_from=w_from, rate=rate, batch_size=batch_size,
                                                 workers=workers)
    seconds = time.perf_counter() - t0
    result = {"out": str(out), "rows": len(table), "w_source": table.w_source, "method": run.cfg.method,
              "nets": len(run.method.nets), "metrics": flag_metrics(table, given, clean), "seconds": seconds,
              "run_train_seconds": run_train_seconds(run_dir), "grid": None}
    if cleanlab:
        result["compare"] = compare_cleanlab(run, split, table, given, clean, folds=folds, epochs=cv_epochs,
                                             batch_size=int(run.cfg.batch_size), workers=workers, log=log)
    result["format"] = write_table(table, out)
    if grid:
        png = out.with_suffix(".png")
        try:
            contact_sheet(table, locations, png, grid)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; the table was written to {out}, the contact sheet was not") from None
        result["grid"] = str(png)
    result["table"] = table
    return result


# ----------------------------------------------------------------------------------------------------------------
# The command


def _pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _auc(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _label_text(label: int, name: str) -> str:
    return str(name) if str(name) == str(label) else f"{label} {name}"


def print_top(table: LabelTable, k: int, console) -> None:
    from rich.table import Table

    c = table.columns
    t = Table(title=f"the {min(k, len(table))} most suspect labels")
    for col in ("rank", "index", "given", "suggested", "w", "p(given)", "suspect"):
        t.add_column(col, justify="left" if col in ("given", "suggested") else "right", no_wrap=True)
    for r in range(min(k, len(table))):
        t.add_row(str(c["rank"][r]), str(c["index"][r]), _label_text(c["given"][r], c["given_name"][r]),
                  _label_text(c["suggested"][r], c["suggested_name"][r]), f"{c['w_ens'][r]:.3g}",
                  f"{c['prob_given'][r]:.3g}", "yes" if c["suspect"][r] else "")
    console.print(t)


def print_report(result: dict, rate: float | None, console) -> None:
    rule = f"the {rate:g} most suspect fraction" if rate is not None else f"w < {GMM_DECISION:g}"
    m = result["metrics"]
    flagged = int(result["table"].columns["suspect"].sum())
    source = "the run's own" if result["w_source"] == "run" else "fitted on the eval view"
    console.print(f"{result['rows']} rows -> {result['out']} ({result['format']}); w {source}; flagged {flagged} "
                  f"({rule})",
                  highlight=False, soft_wrap=True)
    if result["grid"]:
        console.print(f"contact sheet -> {result['grid']}", highlight=False, soft_wrap=True)
    if m is not None:
        console.print(f"against the clean labels ({m['wrong']} of {m['known']} wrong): precision {_pct(m['precision'])}"
                      f"  recall {_pct(m['recall'])}  AUROC {_auc(m['auroc'])}", highlight=False, soft_wrap=True)
        console.print(f"the suggested label is the true one for {m['corrected']} of the {m['flagged_wrong']} flagged "
                      f"wrong labels ({_pct(m['correction'])})", highlight=False, soft_wrap=True)
    cmp = result.get("compare")
    if cmp is None:
        return
    from rich import box
    from rich.table import Table

    cv = cmp["cv"]
    t = Table(title=f"wrong-label detection: the {result['method']} run vs cleanlab {cmp['cleanlab_version']} on "
              f"{cv['folds']}-fold out-of-sample CE ({cv['arch']}, {cv['epochs']} epoch{'s' * (cv['epochs'] != 1)})",
              box=box.SIMPLE_HEAD)
    for col in ("method", "flagged", "precision", "recall", "F1", "AUROC", "train s", "score s"):
        t.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    cl = cmp["cleanlab"]
    train_s = result["run_train_seconds"]
    rows = ((f"ccl ({result['method']})", m, flagged, train_s, result["seconds"]),
            ("cleanlab", cl if "precision" in cl else None, cl["flagged"], cl["seconds_cv"], cl["seconds_cleanlab"]))
    for name, mm, n, tr, sc in rows:
        scores = ("n/a",) * 4 if mm is None else (_pct(mm["precision"]), _pct(mm["recall"]), _pct(mm["f1"]),
                                                  _auc(mm["auroc"]))
        t.add_row(name, str(n), *scores, "n/a" if tr is None else f"{tr:.0f}", f"{sc:.1f}")
    console.print(t)
    a = cmp["agreement"]
    console.print(f"flagged by both {a['both']}, by ccl only {a['ccl_only']}, by cleanlab only {a['cleanlab_only']}",
                  highlight=False, soft_wrap=True)
    both = a.get("correction_both")
    if both:
        console.print(f"cleanlab's suggested label (the argmax of its out-of-sample probabilities) is the true one for "
                      f"{cl['corrected']} of its {cl['flagged_wrong']} flagged wrong labels ({_pct(cl['correction'])}); "
                      f"on the {both['ccl']['flagged_wrong']} wrong labels both flag: ccl's "
                      f"{_pct(both['ccl']['correction'])}, cleanlab's {_pct(both['cleanlab']['correction'])}",
                      highlight=False, soft_wrap=True)


def labels_cmd(
    run: Path = typer.Argument(..., help="A run directory (its checkpoints/last.pt is read) or a checkpoint file.",
                               show_default=False),
    split: str = typer.Option("train", help="The split whose labels to rank."),
    out: Optional[Path] = typer.Option(None, help="Output file, .csv or .parquet. \\[default: RUN/labels-SPLIT.parquet "
                                       "with pyarrow installed, else RUN/labels-SPLIT.csv]", show_default=False),
    top: Optional[int] = typer.Option(None, metavar="K", help="Print the K most suspect rows as a table.",
                                      show_default=False),
    w_from: str = typer.Option("eval", "--w", help="Where the label confidence w comes from: eval (a GMM on the "
                               "final nets' per-sample CE of the given label, on the eval view) or run (the run's "
                               "own w from its last epoch; the training split of ccl, rolr and tcl)."),
    rate: Optional[float] = typer.Option(None, metavar="R", help="Flag the R most suspect fraction instead of the "
                                         "samples whose w is below the GMM's decision point 0.5.",
                                         show_default=False),
    grid: bool = typer.Option(False, help=f"Also write a PNG contact sheet (--out with .png) of the K most suspect "
                              f"samples (--top K, else {GRID_DEFAULT}), each with its given and suggested class."),
    compare_cleanlab: bool = typer.Option(False, help="Also run cleanlab's find_label_issues and label-quality "
                                          "scores on out-of-sample probabilities from k-fold cross-validation (CE "
                                          "with the run's architecture, epochs and batch size), and compare. Needs "
                                          "cleanlab: pip install -e '.\\[labels]' in the checkout."),
    folds: int = typer.Option(5, help="Cross-validation folds for --compare-cleanlab."),
    cv_epochs: Optional[int] = typer.Option(None, help="Epochs per fold. \\[default: the run's]", show_default=False),
    data: Optional[Path] = typer.Option(None, help="Shard directory. \\[default: the one the run trained on]",
                                        show_default=False),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(256, help="Batch size of the prediction pass."),
    workers: int = typer.Option(0, help="Loader workers."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary (metrics, times) here.",
                                            show_default=False),
):
    """Rank a run's labels from most to least suspect: one row per sample with each net's w and prediction, the
    refurbished and suggested label and a suspect flag; precision/recall/AUROC when the true labels are known."""
    from rich.console import Console

    err = Console(stderr=True)
    if top is not None and top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    try:
        result = labels_report(run, split, out=out, w_from=w_from, rate=rate,
                               grid=(top or GRID_DEFAULT) if grid else None,
                               cleanlab=compare_cleanlab, folds=folds, cv_epochs=cv_epochs, data=data,
                               device=device, batch_size=batch_size, workers=workers,
                               log=lambda s: err.print(s, highlight=False, soft_wrap=True))
    except KeyboardInterrupt:  # before the table was written (`labels_report` says so once it is)
        raise Interrupted("interrupted; nothing was written") from None
    console = Console()
    print_report(result, rate, console)
    if top:
        print_top(result["table"], top, console)
    if json_out:
        record = {k: v for k, v in result.items() if k != "table"}
        files.write_json(json_out, record, indent=2)


def register(app: typer.Typer) -> None:
    """Add `ccl labels` to the app (`ccl.cli` calls this once)."""
    app.command("labels")(labels_cmd)
