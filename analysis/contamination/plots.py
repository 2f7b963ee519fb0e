"""Figures of the analysis page: matplotlib (Agg) figures, returned as base64 PNG data URIs to embed in the page."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # files only: never a window, works without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 90
NET_COLOURS = ("#1f77b4", "#d62728", "#2ca02c")


def data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _class_ticks(ax, names: list[str], axis: str = "both") -> None:
    # Past 20 classes, labels overlap into a black band: keep the matrix and drop the names.
    if len(names) > 20:
        return
    ticks = np.arange(len(names))
    if axis in ("x", "both"):
        ax.set_xticks(ticks, names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=7)
    if axis in ("y", "both"):
        ax.set_yticks(ticks, names, fontsize=7)


def variances(per_net: list[np.ndarray], names: list[str], entropies: list[float], max_entropy: float) -> str:
    """Per-class embedding variance, each net's normalised to sum to 1 (what the entropy is taken of)."""
    c = len(names)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.32 * c * len(per_net) / 2 + 2), 2.8))
    width = 0.8 / len(per_net)
    for k, v in enumerate(per_net):
        p = v / np.nansum(v)
        ax.bar(np.arange(c) + (k - (len(per_net) - 1) / 2) * width, p, width, color=NET_COLOURS[k % 3],
               label=f"net{k}: H = {entropies[k]:.3f}")
    ax.axhline(1 / c, color="grey", lw=0.8, ls="--", label=f"equal (H = {max_entropy:.3f})")
    ax.set_ylabel("share of variance")
    _class_ticks(ax, names, "x")
    ax.legend(fontsize=7, loc="upper right")
    return data_uri(fig)


def heatmap(mat: np.ndarray, names: list[str], title: str, xlabel: str, ylabel: str, cmap: str = "viridis",
            annotate: bool | None = None, fmt: str = "{:.2f}", vmin=None, vmax=None, skip_zero: bool = False) -> str:
    c = len(names)
    size = 3.4 if c <= 12 else 5.5
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _class_ticks(ax, names)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    if annotate if annotate is not None else c <= 12:
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                v = mat[i, j]
                if np.isfinite(v) and (skip_zero is False or abs(v) >= 0.005):
                    r, g, b, _ = im.cmap(im.norm(v))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark cells
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
    return data_uri(fig)


def confusion(counts: np.ndarray, names: list[str], title: str, xlabel: str) -> str:
    """Row-normalised, so that a row reads as where the samples of one true class went."""
    rows = counts.sum(1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    return heatmap(frac, names, title, xlabel, "true class", cmap="Blues", vmin=0, vmax=1, skip_zero=True)


def tsne(per_net: list[np.ndarray], labels: np.ndarray, names: list[str]) -> str:
    n = len(per_net)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "nipy_spectral")
    for k, (ax, xy) in enumerate(zip(axes[0], per_net)):
        colours = cmap(labels / max(len(names) - 1, 1)) if len(names) > 20 else cmap(labels % cmap.N)
        ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=4, linewidths=0)
        ax.set_title(f"net{k}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(names) <= 20:
        handles = [plt.Line2D([], [], ls="", marker="o", ms=4, color=cmap(i % cmap.N)) for i in range(len(names))]
        axes[0][-1].legend(handles, names, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return data_uri(fig)


def w_histograms(per_net: list[dict]) -> str:
    n = len(per_net)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 2.6), squeeze=False, layout="constrained")
    for k, (ax, d) in enumerate(zip(axes[0], per_net)):
        edges = np.asarray(d["bin_edges"])
        mid, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        ax.bar(mid, d["hist_clean"], width, color="#2ca02c", alpha=0.6, label=f"clean ({d['num_clean']})")
        ax.bar(mid, d["hist_noisy"], width, color="#d62728", alpha=0.6, label=f"noisy ({d['num_noisy']})")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_xlabel(f"w of net{k}", fontsize=8)
        ax.legend(fontsize=7, loc="upper center")
    axes[0][0].set_ylabel("training samples", fontsize=8)
    return data_uri(fig)


def pr_curves(per_net: list[dict], clean_share: float) -> str:
    fig, ax = plt.subplots(figsize=(3.4, 2.8))
    for k, d in enumerate(per_net):
        ax.plot(d["recall"], d["precision"], color=NET_COLOURS[k % 3], label=f"net{k}: AP {d['average_precision']:.3f}")
    ax.axhline(clean_share, color="grey", lw=0.8, ls="--", label=f"chance ({clean_share:.2f})")
    ax.set_xlabel("recall of clean samples", fontsize=8)
    ax.set_ylabel("precision", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    return data_uri(fig)


def curves(history: list[dict]) -> str | None:
    """Training curves from metrics.jsonl: accuracy, AUROC of w, the loss parts, and tracked contamination.

    A twin method logs each loss part once per net (``train_acl_mean0``, ``train_acl_mean1``); the panel shows
    their mean over the nets, so that a part is one line.
    """
    if not history:
        return None
    keys = sorted({k for r in history for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    losses: dict[str, list[str]] = {}
    for k in keys:
        if k.startswith("train_"):
            losses.setdefault(k.rstrip("0123456789"), []).append(k)
    panels = [("test top-1 (%)", {k: [k] for k in keys if k.endswith("_top1")}),
              ("AUROC of w", {k: [k] for k in keys if k.endswith("_auroc")}),
              ("training loss parts (mean over nets)", losses),
              ("tracked contamination", {k: [k] for k in keys if k.startswith("track_") and "_net" not in k})]
    panels = [(t, lines) for t, lines in panels if lines]
    if not panels:
        return None
    # Accuracy and AUROC side by side; the loss parts (a long legend) and the tracked measures each take a row.
    small = [p for p in panels if p[0] in ("test top-1 (%)", "AUROC of w")]
    wide = [p for p in panels if p not in small]
    mosaic = ([[p[0] for p in small] if len(small) == 2 else [small[0][0]] * 2] if small else []) + \
             [[p[0]] * 2 for p in wide]
    fig = plt.figure(figsize=(6.4, 2.3 * len(mosaic)), layout="constrained")
    axes = fig.subplot_mosaic(mosaic)
    for title, lines in panels:
        ax = axes[title]
        for label, members in lines.items():
            pts = [(r["epoch"] + 1, float(np.mean([r[m] for m in members])))
                   for r in history if all(isinstance(r.get(m), (int, float)) for m in members)]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="." if len(pts) < 30 else None, label=label, lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), ncol=-(-len(lines) // 9), frameon=False)
    return data_uri(fig)
