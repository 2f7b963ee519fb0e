"""`ccl analyze`: measure semantic contamination in finished runs and write analysis.json and report.html.

For each run directory: rebuild the run from its checkpoint, pass the chosen split through every network once
(logits and embeddings), compute the measures of `ccl.contamination`, draw the figures, and render one
self-contained page with the runs side by side (images embedded as data URIs: the page needs no network).
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ccl import files
from ccl.errors import UserError
from ccl.progress import bar as progress_bar
from ccl import contamination as M
from ccl.analysis.contamination import plots
from ccl.analysis.inference import resolve_checkpoint
from ccl.train.metrics import DamagedLog, MetricsLog
from ccl.train.track import SPACES, forward_arrays
from ccl.analysis.contamination.taxonomy import Taxonomy, resolve_taxonomies

TEMPLATE = Path(__file__).parent / "report.html.j2"
CHECKPOINTS = ("last", "best")


@dataclass(frozen=True)
class Settings:
    split: str = "test"
    checkpoint: str = "last"  # checkpoints/last.pt or best.pt
    embedding: str = "backbone"  # see ccl.train.track
    pairs: int = 10000  # random pairs for M_embed
    anchors: int = 5  # anchors per class for the similarity probe
    tsne_points: int = 2000  # t-SNE is O(N^2) in memory: a seeded subsample past this
    seed: int = 0
    device: str = "auto"
    batch_size: int = 256
    taxonomy: str | None = None  # a taxonomy file instead of the built-in trees
    data: str | None = None  # a shard directory instead of the one each run trained on

    def validate(self) -> "Settings":
        checks = [
            (self.checkpoint in CHECKPOINTS, f"--checkpoint must be {' or '.join(CHECKPOINTS)}, got {self.checkpoint!r}"),
            (self.embedding in SPACES, f"--embedding must be {' or '.join(SPACES)}, got {self.embedding!r}"),
            (self.pairs >= 2, "--pairs must be at least 2"),
            (self.anchors >= 1, "--anchors must be at least 1"),
            (self.tsne_points >= 10, "--tsne-points must be at least 10"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        return self


def read_history(run_dir: Path) -> list[dict]:
    """The run's per-epoch records for the curves (a torn last line left out); none when metrics.jsonl is missing
    or damaged, since then its history cannot be trusted."""
    try:
        return MetricsLog(run_dir / "metrics.jsonl").read()
    except DamagedLog:
        return []


# --------------------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------------------


def analyze_run(run_dir: Path, s: Settings, bar=None) -> tuple[dict, dict]:
    """(record for analysis.json, figures as data URIs) of one run directory."""
    import torch

    from ccl.pipeline.loader import make_loader
    from ccl.train.restore import restore

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    ck = resolve_checkpoint(run_dir, s.checkpoint, file_ok=False)
    run, state = restore(ck, data=s.data, device=s.device)
    shards = run.shards
    if s.split not in shards.splits:
        raise UserError(f"{run_dir}: no split {s.split!r} in its data ({shards.root} has {', '.join(shards.splits)})")
    names = [str(c) for c in shards.classes]
    num_classes = len(names)
    taxonomies, lca_note = resolve_taxonomies(names, s.taxonomy)  # before the long pass: a bad file fails fast
    nets = run.method.nets
    method = getattr(run.cfg, "method", run_dir.name)

    # One pass over the split: logits and embeddings of every net.
    loader = make_loader(shards, s.split, batch_size=s.batch_size, train=False, device=run.device, num_workers=0)
    eval_view = run.aug.eval_view
    noisy_parts, clean_parts = [], []

    def images():
        for b in loader:
            noisy_parts.append(b.label.cpu().numpy())
            clean_parts.append(b.clean.cpu().numpy())
            yield eval_view(b.images)

    task = bar.add_task(f"{run_dir.name}: {s.split} pass", total=len(loader)) if bar else None
    with torch.inference_mode():
        logits, emb = forward_arrays(nets, images(), s.embedding,
                                     on_batch=(lambda: bar.advance(task)) if bar else None)
    noisy, clean = np.concatenate(noisy_parts), np.concatenate(clean_parts)
    labels_clean = bool((clean >= 0).all())
    y = np.where(clean >= 0, clean, noisy)  # the true label where known
    heads = {f"net{k}": lg for k, lg in enumerate(logits)}
    if len(logits) > 1:
        heads["ens"] = np.sum(logits, axis=0)  # summed logits, as the loop's ensemble
    timings = {"restore_and_pass": time.perf_counter() - t0}
    clock = [time.perf_counter(), "restore_and_pass"]

    def step(what: str) -> None:
        """Close the previous stage's timer and name the next one in the progress bar."""
        now = time.perf_counter()
        if clock[1] != "restore_and_pass":
            timings[clock[1]] = now - clock[0]
        clock[:] = [now, what]
        if bar:
            bar.update(task, description=f"{run_dir.name}: {what}")

    record: dict = {
        "run": str(run_dir), "name": run_dir.name, "method": method, "dataset": shards.manifest.get("dataset"),
        "arch": getattr(run.cfg, "arch", None), "noise": _noise_spec(shards.manifest),
        "checkpoint": str(ck), "epochs_trained": int(state.get("epoch", -1)) + 1, "split": s.split,
        "num_samples": int(len(y)), "labels_are_clean": labels_clean, "num_nets": len(nets), "classes": names,
        "embedding": s.embedding, "embedding_dim": int(emb[0].shape[1]),
        "heads": list(heads), "accuracy": {h: float(100 * (lg.argmax(1) == y).mean()) for h, lg in heads.items()},
    }
    figures: dict = {}

    # 1. Cross-model consistency (Eq. 4, Fig. 3)
    step("cross-model consistency")
    if len(nets) == 2:
        record["consistency"] = {
            "applicable": True, "pairs": s.pairs, "seed": s.seed,
            "m_embed": M.m_embed(emb[0], emb[1], num_pairs=s.pairs, seed=s.seed, align=True),
            "m_embed_raw": M.m_embed(emb[0], emb[1], num_pairs=s.pairs, seed=s.seed, align=False),
            "m_logit": M.m_logit(logits[0], logits[1]),
            "softmax_tv": M.softmax_tv(logits[0], logits[1]),
        }
    else:
        record["consistency"] = {"applicable": False,
                                 "reason": f"{method} trains {len(nets)} network; the measures compare two"}

    # 2. Semantic imbalance among classes (Fig. 2b)
    step("class variances")
    imb = {}
    for k, e in enumerate(emb):
        var = M.class_variances(e, y, num_classes)
        h, hmax = M.variance_entropy(var)
        imb[f"net{k}"] = {"variances": var.tolist(), "entropy": h, "max_entropy": hmax}
    imb["entropy_mean"] = float(np.mean([imb[f"net{k}"]["entropy"] for k in range(len(emb))]))
    record["imbalance"] = imb
    figures["variances"] = plots.variances([np.asarray(imb[f"net{k}"]["variances"]) for k in range(len(emb))], names,
                                           [imb[f"net{k}"]["entropy"] for k in range(len(emb))],
                                           imb["net0"]["max_entropy"])

    # 3. Similarity probe (Table 6)
    step("similarity probe")
    sim: dict = {"anchors_per_class": s.anchors}
    figures["similarity"] = []
    for k, e in enumerate(emb):
        anchors = M.pick_anchors(y, num_classes, s.anchors, s.seed, eligible=logits[k].argmax(1) == y)
        mat = M.class_similarity(e, y, anchors)
        sim[f"net{k}"] = {
            "matrix": mat.tolist(), "anchors": [a.tolist() for a in anchors],
            "most_similar": [[{"class": d, "similarity": v} for d, v in row] for row in M.most_similar(mat, 3)],
            "probe": M.anchor_probe(e, logits[k], y, anchors),
        }
        figures["similarity"].append(plots.heatmap(mat, names, f"net{k}: anchors vs classes (cosine)",
                                                   "samples of class", "anchor class"))
    record["similarity"] = sim

    # 4. LCA distance (Table 8)
    step("LCA distance")
    record["lca"] = _lca(taxonomies, lca_note, heads, y)

    # 5. Noise detection at the checkpoint's epoch
    step("noise detection")
    record["detection"], det_figs = _detection(run, shards, names, method)
    figures |= det_figs

    # 6. Plots: t-SNE, curves, confusion matrices
    step("t-SNE")
    coords = []
    tsne: dict = {"points": min(len(y), s.tsne_points), "seed": s.seed}
    for k, e in enumerate(emb):
        idx, xy = M.tsne_2d(e, s.tsne_points, s.seed)
        coords.append(xy)
        tsne[f"net{k}"] = {"index": idx.tolist(), "xy": np.round(xy, 3).tolist()}
    record["tsne"] = tsne
    figures["tsne"] = plots.tsne(coords, y[idx], names)
    step("figures")
    main = "ens" if "ens" in heads else "net0"
    cm = M.confusion(y, heads[main].argmax(1), num_classes)
    record["confusion"] = {"pred_vs_true": cm.tolist(), "head": main}
    figures["confusion_pred"] = plots.confusion(cm, names, f"{s.split}: prediction ({main}) vs true", "predicted class")
    history = read_history(run_dir)
    record["curves"] = {"epochs": len(history),
                        "keys": sorted({k for r in history for k in r if k != "epoch"})}
    figures["curves"] = plots.curves(history)
    step("done")
    record["seconds"] = time.perf_counter() - t0
    record["timings"] = timings
    if bar:
        bar.remove_task(task)
    return record, figures


def _noise_spec(manifest: dict) -> dict | None:
    noise = manifest.get("noise")
    if not isinstance(noise, dict):
        return None
    return {k: noise.get(k) for k in ("type", "rate", "seed", "actual_rate", "source") if k in noise}


def _lca(taxonomies: list[Taxonomy], note: str | None, heads: dict[str, np.ndarray], y: np.ndarray) -> dict:
    if not taxonomies:
        return {"applicable": False, "reason": note}
    out = []
    for tax in taxonomies:
        d_depth, d_ic = tax.distance_matrix("depth"), tax.distance_matrix("ic")
        entry = tax.describe()
        for h, lg in heads.items():
            entry[h] = {"top2_depth": M.lca_top2(d_depth, lg), "top2_ic": M.lca_top2(d_ic, lg),
                        "errors_depth": M.lca_errors(d_depth, lg, y), "errors_ic": M.lca_errors(d_ic, lg, y)}
        out.append(entry)
    return {"applicable": True, "taxonomies": out}


def _detection(run, shards, names: list[str], method: str) -> tuple[dict, dict]:
    noisy, clean = shards.labels("train")
    figures = {}
    out: dict = {}
    if (clean >= 0).all():
        cm = M.confusion(clean, noisy, len(names))
        out["noisy_vs_true_train"] = cm.tolist()
        out["actual_noise_rate"] = float((noisy != clean).mean())
        figures["confusion_noisy"] = plots.confusion(cm, names, "train: noisy label vs true", "noisy label")
    else:
        return out | {"applicable": False, "reason": "the training split's true labels are unknown"}, figures
    w = getattr(run.method, "w", None)
    has_w = getattr(run.method, "has_w", None)
    if w is None or method == "ce":
        return out | {"applicable": False, "reason": f"{method} keeps no label confidence"}, figures
    if has_w is not None and not bool(has_w):
        return out | {"applicable": False,
                      "reason": "the checkpoint predates the first confidence estimate (still in warm-up)"}, figures
    w = w.detach().float().cpu().numpy()  # [K, N_train]
    is_clean = noisy == clean
    per_net = [M.confidence_view(w[k], is_clean) for k in range(w.shape[0])]
    out |= {"applicable": True, "positive": "clean", **{f"net{k}": d for k, d in enumerate(per_net)}}
    figures["w_hist"] = plots.w_histograms(per_net)
    if not (is_clean.all() or not is_clean.any()):
        figures["pr"] = plots.pr_curves(per_net, float(is_clean.mean()))
    return out, figures


# --------------------------------------------------------------------------------------------------------------
# All runs, the files
# --------------------------------------------------------------------------------------------------------------


def analyze(runs: list[str | Path], out: str | Path, settings: Settings = Settings(), progress: bool = True,
            console=None) -> dict:
    """Analyse each run and write OUT/analysis.json and OUT/report.html; returns the analysis."""
    s = settings.validate()
    if not runs:
        raise UserError("name at least one run directory")
    run_dirs = [Path(r) for r in runs]
    for r in run_dirs:
        resolve_checkpoint(r, s.checkpoint, file_ok=False)  # every run is checked before the first long pass
    if s.taxonomy is not None and not Path(s.taxonomy).is_file():
        raise UserError(f"taxonomy file not found: {s.taxonomy}")
    out = Path(out)
    records, figures = [], []
    with progress_bar(progress, console=console) as bar:
        for r in run_dirs:
            rec, fig = analyze_run(r, s, bar if progress else None)
            records.append(rec)
            figures.append(fig)
            if console is not None and progress:
                console.print(f"analysed {r} in {rec['seconds']:.1f} s")
    analysis = {"version": 1, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                "settings": asdict(s), "summary": summary_rows(records), "runs": records}
    files.make_dir(out)
    files.write_json(out / "analysis.json", _json_safe(analysis), indent=1)
    files.write_atomic(out / "report.html", render(analysis, figures))
    return analysis


def summary_rows(records: list[dict]) -> list[dict]:
    """One row per measure, one value per run: the page's first table and the headline numbers."""
    def get(rec, *path):
        v = rec
        for p in path:
            if not isinstance(v, dict) or p not in v:
                return None
            v = v[p]
        return v

    rows = [
        ("top-1 (%), ensemble / single net", "higher",
         lambda r: get(r, "accuracy", "ens") if "ens" in r["accuracy"] else get(r, "accuracy", "net0")),
        ("M_embed (Eq. 4, Procrustes-aligned)", "higher", lambda r: get(r, "consistency", "m_embed")),
        ("M_embed raw (Eq. 4 as written)", "higher", lambda r: get(r, "consistency", "m_embed_raw")),
        ("M_logit (per-class logit W1)", "lower", lambda r: get(r, "consistency", "m_logit")),
        ("softmax TV between nets", "lower", lambda r: get(r, "consistency", "softmax_tv")),
        ("variance entropy (nats, mean over nets)", "higher", lambda r: get(r, "imbalance", "entropy_mean")),
        ("variance entropy maximum log C", "", lambda r: get(r, "imbalance", "net0", "max_entropy")),
    ]
    taxes = []
    for r in records:
        for t in get(r, "lca", "taxonomies") or []:
            if t["name"] not in taxes:
                taxes.append(t["name"])
    for name in taxes:
        def lca(r, name=name, key="top2_depth"):
            for t in get(r, "lca", "taxonomies") or []:
                if t["name"] == name:
                    head = "ens" if "ens" in t else "net0"
                    return t[head][key]
            return None
        rows.append((f"LCA top-1/top-2, {name} tree (depth)", "lower", lca))
    rows.append(("noise detection AP of w (mean over nets)", "higher",
                 lambda r: (float(np.mean([r["detection"][f"net{k}"]["average_precision"] for k in range(r["num_nets"])]))
                            if get(r, "detection", "applicable") else None)))
    rows.append(("analysis time (s)", "", lambda r: r.get("seconds")))
    return [{"measure": name, "better": better, "values": [fn(r) for r in records]} for name, better, fn in rows]


def _json_safe(v):
    """Strict JSON: NaN and infinities become null (json.dumps would write the non-standard NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.generic):
        return _json_safe(v.item())
    return v


def render(analysis: dict, figures: list[dict]) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    template = env.from_string(TEMPLATE.read_text())
    runs = [dict(rec, figures=fig) for rec, fig in zip(analysis["runs"], figures)]
    taxonomies = {}  # each tree once, however many runs used it
    for rec in analysis["runs"]:
        for t in rec["lca"].get("taxonomies", []):
            taxonomies.setdefault((t["name"], t["source"]), t)
    return template.render(analysis=analysis, runs=runs, settings=analysis["settings"],
                           taxonomies=list(taxonomies.values()))


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.{digits}f}"
