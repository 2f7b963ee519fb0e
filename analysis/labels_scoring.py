"""The scoring behind `ccl labels`: pure functions of per-sample arrays (label confidence from a GMM, the ranking,
the suspect flags, the suggested labels, and how well they find the wrong labels)."""

from __future__ import annotations

import numpy as np

from ccl.errors import UserError

GMM_DECISION = 0.5  # w below this: the GMM's clean component is the less likely one


def monotone_confidence(w: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """w made non-increasing in the loss: the running minimum of w along increasing loss.

    A GMM posterior need not be monotone: where the clean component is the wider one, the posterior of "clean"
    rises again at the far end of the loss axis, and the most implausible labels would be trusted. A larger
    loss never makes a label more believable, so each sample gets at most the w of every sample with a smaller
    loss. [N] -> [N]."""
    order = np.argsort(loss, kind="stable")
    out = np.empty_like(w)
    out[order] = np.minimum.accumulate(w[order])
    return out


def estimate_w(ce_per_net: list[np.ndarray], ce_ens: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label confidence from the final nets, on the eval view: (w [K, N], w_ens [N]).

    w[m] is Eq. 16's criterion for net m, a GMM on its peer's per-sample CE of the given label (a single net is its
    own peer); w_ens the same GMM on the ensemble's CE. Unlike the training loop, which stops EM after RoLR's 10
    loose iterations each epoch, the GMM here is fitted to convergence (scikit-learn's defaults): it is fitted
    once, and the flag sits on its decision point. Each w is then made monotone in its loss."""
    from ccl.train.losses.confidence import TCL_GMM, gmm_confidence

    def fit(ce: np.ndarray) -> np.ndarray:
        return monotone_confidence(gmm_confidence(ce, seed=seed, **TCL_GMM), ce)

    k = len(ce_per_net)
    w = np.stack([fit(ce_per_net[(m + 1) % k]) for m in range(k)]).astype(np.float32)
    return w, fit(ce_ens).astype(np.float32)


def refurbished_labels(w: np.ndarray, given: np.ndarray, p_given: np.ndarray, alt: np.ndarray,
                       p_alt: np.ndarray) -> np.ndarray:
    """argmax_c of w * onehot(given) + (1 - w) * p (Eq. 10), from summaries of p alone: the given class scores
    w + (1 - w) p_given and any other class c at most (1 - w) p_alt, the most probable other one. Ties keep the
    given label. All inputs [N]."""
    keep = w + (1 - w) * p_given >= (1 - w) * p_alt
    return np.where(keep, given, alt)


def suspicion_order(w: np.ndarray, p_given: np.ndarray) -> np.ndarray:
    """Sample indices, most suspect first: w ascending, then the ensemble's probability of the given label
    ascending (w saturates at 0 and 1 for many samples), then the index (a deterministic order)."""
    n = len(w)
    return np.lexsort((np.arange(n), p_given, w))


def check_rate(rate: float | None) -> None:
    """`--rate`, when given, is a fraction in (0, 1]."""
    if rate is not None and not 0 < rate <= 1:
        raise UserError(f"--rate must lie in (0, 1], got {rate:g}")


def suspect_flags(order: np.ndarray, w: np.ndarray, rate: float | None = None) -> np.ndarray:
    """bool [N] by sample index: w below the GMM decision point, or with `rate` the round(rate * N) first
    samples of `order`."""
    if rate is None:
        return w < GMM_DECISION
    check_rate(rate)
    flags = np.zeros(len(order), dtype=bool)
    flags[order[: round(rate * len(order))]] = True
    return flags


def suggested_labels(suspect: np.ndarray, given: np.ndarray, alt: np.ndarray) -> np.ndarray:
    """For a suspect sample, the ensemble's most probable class other than the given one (the refurbished
    label whenever Eq. 10 moves off the given label); for any other sample, the given label."""
    return np.where(suspect, alt, given)


def issue_metrics(flag: np.ndarray, score: np.ndarray, given: np.ndarray, clean: np.ndarray,
                  suggested: np.ndarray | None = None) -> dict:
    """Detection of wrong labels (given != clean) where the clean label is known (clean >= 0).

    precision: of the flagged samples, the fraction whose label is wrong; recall: of the wrong labels, the
    fraction flagged; f1; auroc: `roc_auc_score` of `score` (higher = more suspect). With `suggested` (a label
    per sample): `correction`, of the flagged samples whose label is wrong, the fraction whose suggested label
    is the true one (`corrected` of `flagged_wrong`). Undefined values are NaN.
    """
    from sklearn.metrics import roc_auc_score

    known = clean >= 0
    flag, score, wrong = flag[known], score[known], (given != clean)[known]
    nan = float("nan")
    tp = int((flag & wrong).sum())
    n_flag, n_wrong = int(flag.sum()), int(wrong.sum())
    precision = tp / n_flag if n_flag else nan
    recall = tp / n_wrong if n_wrong else nan
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else nan
    auroc = float(roc_auc_score(wrong, score)) if 0 < n_wrong < wrong.size else nan
    out = {"precision": precision, "recall": recall, "f1": f1, "auroc": auroc, "flagged": n_flag,
           "wrong": n_wrong, "known": int(known.sum())}
    if suggested is not None:
        out |= correction(flag & wrong, suggested[known], clean[known])
    return out


def correction(mask: np.ndarray, suggested: np.ndarray, clean: np.ndarray) -> dict:
    """Of the samples in `mask` (flagged, label wrong), how many get their true label as the suggestion."""
    n = int(mask.sum())
    right = int((suggested[mask] == clean[mask]).sum())
    return {"flagged_wrong": n, "corrected": right, "correction": right / n if n else float("nan")}


def rank_score(order: np.ndarray) -> np.ndarray:
    """A score per sample index whose descending order is `order` (N for the first, 1 for the last): the AUROC
    of the ranking itself, tie-breaks included."""
    score = np.empty(len(order), dtype=np.float64)
    score[order] = np.arange(len(order), 0, -1)
    return score
