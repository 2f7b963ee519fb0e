"""Label confidence: which training labels look clean.

- `gmm_confidence`: the small-loss criterion with a two-component 1-D GMM (CCL Eq. 16, after RoLR and DivideMix):
  w_i = posterior of the low-loss component.
- `tcl_centres`, `tcl_clean_scores`, `tcl_confidence`: TCL's out-of-distribution view of label noise, a GMM over
  the embedding space whose class centres come from the predictions (DESIGN section 8).
- `detection_metrics`: how well w separates clean from noisy labels, where the clean labels are known.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture

# RoLR's GMM settings, used by CCL and RoLR (DESIGN section 6): few, loose EM steps, a slightly larger covariance
# floor. max_iter=10 rarely "converges" by sklearn's tol, hence the silenced ConvergenceWarning below.
ROLR_GMM = {"max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4}
# scikit-learn's defaults, which the TCL code uses (DESIGN section 8).
TCL_GMM = {"max_iter": 100, "tol": 1e-3, "reg_covar": 1e-6}


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x).reshape(-1)


def gmm_confidence(losses, *, lower_is_clean: bool = True, max_iter: int = 10, tol: float = 1e-2,
                   reg_covar: float = 5e-4, seed: int = 0) -> np.ndarray:
    """Label confidence from per-sample losses (CCL Eq. 16): w_i = p(clean component | loss_i), float32 [N].

    The losses (numpy or torch, any shape, flattened) are min-max normalised to [0, 1] and a 2-component
    `sklearn.mixture.GaussianMixture` is fitted to them (seeded: the same input gives the same w). The clean
    component is the one with the smaller mean, or the larger one when lower_is_clean=False (for scores where
    high means clean). Defaults are RoLR's settings (`ROLR_GMM`).

    Fallback: with fewer than 2 samples or constant losses there is nothing to separate, and every sample gets
    w = 1 (its label is trusted, the same as during warm-up). NaN or inf losses raise ValueError: they mean the
    model has diverged, and a GMM over them would silently assign garbage.
    """
    x = _numpy(losses).astype(np.float64)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise ValueError(f"gmm_confidence: {bad} of {x.size} losses are NaN or inf")
    lo, hi = (x.min(), x.max()) if x.size else (0.0, 0.0)
    if x.size < 2 or hi - lo <= 0:
        return np.ones(x.size, dtype=np.float32)
    x = ((x - lo) / (hi - lo))[:, None]  # [N, 1]
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
    posterior = gmm.predict_proba(x)  # [N, 2]
    means = gmm.means_.reshape(-1)
    clean = int(means.argmin() if lower_is_clean else means.argmax())
    return posterior[:, clean].astype(np.float32)


def gmm_confidence_as_given(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The clean posterior of RoLR's and DivideMix's GMM (`ROLR_GMM`) fitted to x as given, float32 [N]: what
    their code fits to a loss history, the mean of several epochs' min-max normalised losses (chenmc1996/Robust-LR
    RoLR.py l.279 and l.210-212; LiJunnan1992/DivideMix Train_CIFAR.py l.178-189).

    `gmm_confidence` min-max normalises its input first. For one epoch's losses (already in [0, 1]) that changes
    nothing; a mean over several epochs spans less than [0, 1], and the code fits it unstretched. A GMM fit to
    x' = (x - lo) / s with its covariance floor divided by s^2 has the posteriors of one fit to x (k-means++ and EM
    are affine-equivariant), so the floor is rescaled to keep the code's fit.
    """
    span = float(x.max() - x.min()) if x.size else 0.0
    if span <= 0:
        return np.ones(x.size, dtype=np.float32)
    return gmm_confidence(x, seed=seed, **{**ROLR_GMM, "reg_covar": ROLR_GMM["reg_covar"] / span**2})


# ----------------------------------------------------------------------------------------------------------------
# TCL


@torch.no_grad()
def tcl_centres(embeddings: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """TCL's class centres mu_k = normalise(sum_i p_ik z_i), i.e. normalise(P^T Z): [C, D] from embeddings [N, D]
    and predicted probabilities [N, C] (not the noisy labels, which is what lets noisy samples stand out)."""
    z = embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings
    return F.normalize(probs.to(z.dtype).T @ z, dim=1)


@torch.no_grad()
def tcl_clean_scores(embeddings: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, temp: float = 0.25,
                     chunk: int = 65536) -> torch.Tensor:
    """TCL's per-sample clean score gamma_i[y^_i], [N]: gamma_i = softmax_k(z_i . mu_k / temp) is the posterior of
    each class's cluster in the embedding space (centres from `tcl_centres`), read at the noisy label. Computed in
    row chunks so the [N, C] posterior never exists whole (ImageNet-sized N x C)."""
    n = embeddings.shape[0]
    if probs.shape[0] != n or labels.shape != (n,):
        raise ValueError(f"embeddings [{n}, D], probs [{n}, C] and labels [{n}] must agree, got "
                         f"{tuple(embeddings.shape)}, {tuple(probs.shape)}, {tuple(labels.shape)}")
    centres = tcl_centres(embeddings, probs)  # [C, D]
    z = embeddings.to(centres.dtype)
    out = torch.empty(n, dtype=centres.dtype, device=centres.device)
    for s in range(0, n, chunk):
        logits = z[s:s + chunk] @ centres.T / temp  # [n_chunk, C]
        at_label = logits.gather(1, labels[s:s + chunk, None]).squeeze(1)
        out[s:s + chunk] = (at_label - torch.logsumexp(logits, dim=1)).exp()
    return out


def tcl_confidence(embeddings: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, temp: float = 0.25, *,
                   seed: int = 0) -> np.ndarray:
    """TCL's label confidence, float32 [N]: a 2-component GMM (scikit-learn defaults, `TCL_GMM`) on the min-max
    normalised loss -gamma[y^] (`tcl_clean_scores`), w = posterior of the low-loss (high-gamma) component."""
    scores = tcl_clean_scores(embeddings, probs, labels, temp)
    return gmm_confidence(-scores, lower_is_clean=True, seed=seed, **TCL_GMM)


# ----------------------------------------------------------------------------------------------------------------
# metrics


def detection_metrics(w, noisy_label, clean_label, threshold: float = 0.5) -> dict[str, float]:
    """How well the confidence w detects clean labels: clean (noisy_label == clean_label) is the positive class,
    w the score, and w >= threshold the prediction "clean".

    Returns precision (of the samples predicted clean, the fraction that are), recall (of the clean samples, the
    fraction predicted clean), auroc (`sklearn.metrics.roc_auc_score` of w) and actual_noise_rate (the fraction of
    labels that are wrong). Samples whose clean label is unknown (-1) are left out. A quantity that is undefined --
    AUROC when every known label is clean or every one is noisy, precision with nothing predicted clean, recall
    with no clean sample, anything with no known sample -- is NaN.
    """
    w, noisy, clean = _numpy(w).astype(np.float64), _numpy(noisy_label), _numpy(clean_label)
    if not (w.size == noisy.size == clean.size):
        raise ValueError(f"w, noisy_label and clean_label must have one entry per sample, got "
                         f"{w.size}, {noisy.size}, {clean.size}")
    known = clean >= 0
    w, is_clean = w[known], noisy[known] == clean[known]
    nan = float("nan")
    n = int(is_clean.size)
    if n == 0:
        return {"precision": nan, "recall": nan, "auroc": nan, "actual_noise_rate": nan}
    predicted = w >= threshold
    tp = int((predicted & is_clean).sum())
    n_pred, n_clean = int(predicted.sum()), int(is_clean.sum())
    return {
        "precision": tp / n_pred if n_pred else nan,
        "recall": tp / n_clean if n_clean else nan,
        "auroc": float(roc_auc_score(is_clean, w)) if 0 < n_clean < n else nan,
        "actual_noise_rate": 1.0 - n_clean / n,
    }
