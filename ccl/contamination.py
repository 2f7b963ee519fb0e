"""The paper's diagnostics of semantic contamination, as pure functions of numpy arrays.

Every function takes embeddings, logits, labels or confidences and returns numbers; nothing here touches a network,
a file or a global RNG (randomness comes from an explicit seed). The CCL paper (Sec. "Semantic Contamination in
LwNL", Eqs. 3-4, Fig. 2b, Fig. 3, Table 6, Table 8) names these measures without code; each docstring says how the
text was read where it leaves room.
"""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# Cross-model consistency (Eq. 4 and Fig. 3)
# --------------------------------------------------------------------------------------------------------------


def sample_pairs(n: int, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``num_pairs`` seeded random pairs (i, j) of distinct indices in [0, n), drawn with replacement."""
    if n < 2:
        raise ValueError(f"pairs need at least 2 samples, got {n}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, num_pairs)
    j = (i + rng.integers(1, n, num_pairs)) % n  # never i: an offset in [1, n) around the ring
    return i, j


def procrustes(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The orthogonal map R [D_src, D_dst] minimising ||src R - dst||_F (Schonemann 1966), on centred rows.

    src [N, D_src], dst [N, D_dst]. With D_src != D_dst, R has orthonormal rows or columns (the closest such map).
    """
    a = src - src.mean(0)  # [N, Ds]
    b = dst - dst.mean(0)  # [N, Dd]
    u, _, vt = np.linalg.svd(a.T @ b, full_matrices=False)  # [Ds, k], [k, Dd]
    return u @ vt  # [Ds, Dd]


def _pair_cosines(e0: np.ndarray, e1: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    d0 = e0[i] - e0[j]  # [P, D]
    d1 = e1[i] - e1[j]  # [P, D]
    n0 = np.linalg.norm(d0, axis=1)
    n1 = np.linalg.norm(d1, axis=1)
    ok = (n0 > 0) & (n1 > 0)  # two samples with the same embedding give no direction to compare
    cos = np.full(len(i), np.nan)
    cos[ok] = (d0[ok] * d1[ok]).sum(1) / (n0[ok] * n1[ok])
    return cos


def m_embed(e0: np.ndarray, e1: np.ndarray, num_pairs: int = 10000, seed: int = 0, align: bool = True) -> float:
    """M_embed (Eq. 4): E over pairs (x0, x1) of cos(f0(x0) - f0(x1), f1(x0) - f1(x1)); larger is more consistent.

    e0 [N, D0], e1 [N, D1]: the two networks' embeddings of the same N samples, row for row.

    ``align=False`` is Eq. 4 to the letter: it compares coordinates of two independently initialised networks,
    whose embedding bases are arbitrary, so it is near 0 for two networks that agree on every relation but in
    rotated coordinates. The paper's stated aim is to "align the semantic relationships across models" rather than
    the embeddings themselves, so by default (``align=True``) net 1's embedding is first mapped onto net 0's by the
    orthogonal Procrustes rotation, cross-fitted so that the fit cannot inflate the score: the samples are split in
    two seeded halves, the rotation is fitted on one half and the pairs are drawn inside the other, then the halves
    swap; ``num_pairs`` pairs in all. A rotation of the embedding (or a reflection) leaves this score unchanged.
    When a half has fewer samples than dimensions, the comparison runs in the span of its principal axes.
    """
    e0 = np.asarray(e0, dtype=np.float64)
    e1 = np.asarray(e1, dtype=np.float64)
    if e0.shape[0] != e1.shape[0]:
        raise ValueError(f"embeddings of different sample counts: {e0.shape[0]} and {e1.shape[0]}")
    n = e0.shape[0]
    if not align:
        i, j = sample_pairs(n, num_pairs, seed)
        return float(np.nanmean(_pair_cosines(e0, e1, i, j)))
    if n < 4:
        raise ValueError(f"the cross-fitted M_embed needs at least 4 samples, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    halves = (perm[: n // 2], perm[n // 2 :])
    cosines = []
    for k, (fit, held) in enumerate((halves, halves[::-1])):
        # A rotation is only determined on the span of the fit half: with fewer fit samples than dimensions
        # (ResNet-18's 512 on a small subset) the rest of it would be arbitrary. So both nets are read in the
        # principal axes of their own fit half, as many as both have (all of them when samples outnumber
        # dimensions, which changes nothing: a change of orthonormal basis).
        p0, p1 = _principal_axes(e0[fit]), _principal_axes(e1[fit])
        dim = min(p0.shape[1], p1.shape[1])
        a0, a1 = e0 @ p0[:, :dim], e1 @ p1[:, :dim]  # [N, dim]
        r = procrustes(a1[fit], a0[fit])  # [dim, dim]: net 1's axes onto net 0's
        i, j = sample_pairs(len(held), num_pairs // 2 + (num_pairs % 2) * (k == 0), seed + 1 + k)
        cosines.append(_pair_cosines(a0[held], a1[held] @ r, i, j))
    return float(np.nanmean(np.concatenate(cosines)))


def _principal_axes(x: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """The principal axes [D, k] of the centred rows of x, for its k singular values above rtol * the largest."""
    _, sv, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    k = int((sv > rtol * max(sv[0], 1e-300)).sum()) if len(sv) else 0
    return vt[: max(k, 1)].T


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """W1 between two equally weighted 1-D samples of the same size: the mean gap of their sorted values.

    The same number as scipy.stats.wasserstein_distance(a, b) for samples of equal size.
    """
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.sort(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"samples of different sizes: {a.shape} and {b.shape}")
    return float(np.abs(a - b).mean())


def m_logit(l0: np.ndarray, l1: np.ndarray) -> float:
    """M_logit (Fig. 3): the Wasserstein distance between the two networks' logits; smaller is more consistent.

    l0, l1 [N, C] raw logits of the same N samples. Read as: for each class c, the 1-D Wasserstein-1 distance
    between the distribution of net 0's logit c over the samples and that of net 1's, averaged over the C classes.
    The paper gives no ground metric between classes, which a distance between softmax vectors would need; per
    class, the support (logit values) has one, and class c of one net is compared with class c of the other.
    It is in logit units, so it also grows with the logits' scale (a method with more confident logits scores
    higher at equal agreement); `softmax_tv` is the paired, scale-free companion.
    """
    l0 = np.asarray(l0, dtype=np.float64)
    l1 = np.asarray(l1, dtype=np.float64)
    if l0.shape != l1.shape:
        raise ValueError(f"logits of different shapes: {l0.shape} and {l1.shape}")
    return float(np.mean([wasserstein_1d(l0[:, c], l1[:, c]) for c in range(l0.shape[1])]))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def softmax_tv(l0: np.ndarray, l1: np.ndarray) -> float:
    """Mean over samples of the total variation between the two nets' softmax vectors, in [0, 1].

    This is the Wasserstein-1 distance between the two predictive distributions under the 0/1 ground metric on
    classes, sample by sample: the paired reading of "the Wasserstein distance of logits".
    """
    return float(0.5 * np.abs(softmax(l0) - softmax(l1)).sum(1).mean())


# --------------------------------------------------------------------------------------------------------------
# Semantic imbalance among classes (Fig. 2b)
# --------------------------------------------------------------------------------------------------------------


def class_variances(emb: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class, the variance of its embeddings: the mean squared distance to the class mean (the trace of the
    class covariance). emb [N, D], labels [N] -> [C]; NaN for a class with fewer than 2 samples."""
    emb = np.asarray(emb, dtype=np.float64)
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        e = emb[labels == c]  # [n_c, D]
        if len(e) >= 2:
            out[c] = float(((e - e.mean(0)) ** 2).sum(1).mean())
    return out


def variance_entropy(variances: np.ndarray) -> tuple[float, float]:
    """Fig. 2b: the entropy (nats) of the per-class variances normalised to sum to 1, and its maximum log(K) over
    the K classes with a variance. Equal variances give the maximum; a few dominant classes give less."""
    v = np.asarray(variances, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0 or v.sum() <= 0:
        return float("nan"), float("nan")
    p = v / v.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()), float(np.log(len(v)))


# --------------------------------------------------------------------------------------------------------------
# Similarity probe (Table 6)
# --------------------------------------------------------------------------------------------------------------


def _unit(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float64)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def pick_anchors(labels: np.ndarray, num_classes: int, per_class: int, seed: int,
                 eligible: np.ndarray | None = None) -> list[np.ndarray]:
    """Per class, up to ``per_class`` seeded anchor indices, taken among ``eligible`` samples (Table 6 picks
    correctly predicted ones) when the class has any, else among all of its samples."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if eligible is not None and eligible[pool].any():
            pool = pool[eligible[pool]]
        out.append(np.sort(rng.choice(pool, size=min(per_class, len(pool)), replace=False)) if len(pool) else pool)
    return out


def class_similarity(emb: np.ndarray, labels: np.ndarray, anchors: list[np.ndarray]) -> np.ndarray:
    """S [C, C]: S[c, d] is the mean cosine similarity between the anchors of class c and every sample of class d
    (an anchor is never compared with itself). NaN where a class has no anchor or no sample."""
    u = _unit(emb)
    c_count = len(anchors)
    s = np.full((c_count, c_count), np.nan)
    for c, idx in enumerate(anchors):
        if len(idx) == 0:
            continue
        sims = u[idx] @ u.T  # [A, N]
        sims[np.arange(len(idx)), idx] = np.nan  # not itself
        for d in range(c_count):
            cols = sims[:, labels == d]
            if cols.size and np.isfinite(cols).any():
                s[c, d] = float(np.nanmean(cols))
    return s


def most_similar(sim: np.ndarray, k: int = 3) -> list[list[tuple[int, float]]]:
    """Per class, the k other classes its anchors are most similar to, as (class, similarity), best first."""
    out = []
    for c in range(sim.shape[0]):
        row = sim[c].copy()
        row[c] = np.nan
        order = [d for d in np.argsort(-np.nan_to_num(row, nan=-np.inf)) if np.isfinite(row[d])]
        out.append([(int(d), float(row[d])) for d in order[:k]])
    return out


def anchor_probe(emb: np.ndarray, logits: np.ndarray, labels: np.ndarray, anchors: list[np.ndarray]) -> list[dict]:
    """Table 6, one row per class: its first anchor's true class, the class of its second-largest logit, and the
    anchor's mean cosine similarity to the samples of that second class and to the samples of its own class."""
    u = _unit(emb)
    rows = []
    for c, idx in enumerate(anchors):
        if len(idx) == 0:
            continue
        a = int(idx[0])
        second = int(np.argsort(-np.asarray(logits[a]))[1])
        sims = u @ u[a]  # [N]
        own = (labels == c) & (np.arange(len(labels)) != a)
        other = labels == second
        rows.append({"index": a, "label": c, "top1": int(np.argmax(logits[a])), "top2": second,
                     "sim_top2": float(sims[other].mean()) if other.any() else float("nan"),
                     "sim_own": float(sims[own].mean()) if own.any() else float("nan")})
    return rows


# --------------------------------------------------------------------------------------------------------------
# LCA distance (Table 8, after Shi et al. 2024)
# --------------------------------------------------------------------------------------------------------------


def top2(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classes of the largest and second-largest logit of each row: [N], [N]."""
    order = np.argsort(-np.asarray(logits), axis=1, kind="stable")
    return order[:, 0], order[:, 1]


def lca_top2(dist: np.ndarray, logits: np.ndarray) -> float:
    """Table 8: the mean LCA distance between each sample's top-1 and top-2 predicted classes (lower: the model's
    runner-up is semantically closer to its choice). dist [C, C] from `Taxonomy.distance_matrix`."""
    t1, t2 = top2(logits)
    return float(dist[t1, t2].mean())


def lca_errors(dist: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> float:
    """Shi et al.'s own use: the mean LCA distance between the true class and the top-1 prediction, over the
    misclassified samples only (NaN when there are none)."""
    pred = np.argmax(logits, axis=1)
    wrong = pred != labels
    return float(dist[labels[wrong], pred[wrong]].mean()) if wrong.any() else float("nan")


# --------------------------------------------------------------------------------------------------------------
# Noise detection, confusion, embeddings for display
# --------------------------------------------------------------------------------------------------------------


def confidence_view(w: np.ndarray, is_clean: np.ndarray, bins: int = 20, max_points: int = 200) -> dict:
    """How well the label confidence w separates truly clean (positive) from truly noisy samples.

    w [N] in [0, 1], is_clean [N] bool. Returns the histogram of w per group (shared bin edges on [0, 1]), the
    precision-recall curve of "clean" ranked by w (thinned to at most ``max_points`` points), its average
    precision and the AUROC.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    w = np.asarray(w, dtype=np.float64)
    is_clean = np.asarray(is_clean, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = {"bin_edges": edges.tolist(),
           "hist_clean": np.histogram(np.clip(w[is_clean], 0, 1), edges)[0].tolist(),
           "hist_noisy": np.histogram(np.clip(w[~is_clean], 0, 1), edges)[0].tolist(),
           "num_clean": int(is_clean.sum()), "num_noisy": int((~is_clean).sum())}
    if is_clean.all() or not is_clean.any():
        return out | {"precision": [], "recall": [], "average_precision": float("nan"), "auroc": float("nan")}
    precision, recall, _ = precision_recall_curve(is_clean, w)
    keep = np.unique(np.linspace(0, len(recall) - 1, min(max_points, len(recall))).round().astype(int))
    return out | {"precision": precision[keep].tolist(), "recall": recall[keep].tolist(),
                  "average_precision": float(average_precision_score(is_clean, w)),
                  "auroc": float(roc_auc_score(is_clean, w))}


def confusion(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [C, C]: row = true class, column = predicted (or noisy) class."""
    true = np.asarray(true, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    return np.bincount(true * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def tsne_2d(emb: np.ndarray, max_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """t-SNE (scikit-learn) of at most ``max_points`` seeded samples: (indices [M], coordinates [M, 2])."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(emb)
    idx = np.arange(n) if n <= max_points else np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    perplexity = float(min(30.0, max(2.0, (len(idx) - 1) / 3)))
    # One OpenMP thread: on a busy shared machine, t-SNE's spinning worker threads made 360 points take 185 s
    # instead of 11 s; at the sizes plotted (a few thousand points) one thread needs seconds to a minute.
    with threadpool_limits(limits=1):
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            np.asarray(emb, dtype=np.float32)[idx])
    return idx, xy
