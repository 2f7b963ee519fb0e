"""TCL (Huang et al., CVPR 2023) as its official code computes it (Hzzone/TCL), on the building blocks of
`ccl.train.losses`: the whole objective with the code's grouping and weights, and its label confidence with the
per-class GMM option.

Sources (Hzzone/TCL): `models/tcl/tcl_wrapper.py` (the losses, the heads, mixup), `models/tcl/tcl.py` (the loss
weights, the noise detection, the clean fraction), `models/basic_template.py` (the training schedule).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ccl.train.losses import (_logits, infonce, soft_ce, tcl_align_target, tcl_cluster_logits,
                              tcl_cross_supervision)
from ccl.train.losses.confidence import TCL_GMM, gmm_confidence, tcl_clean_scores, tcl_confidence

# ----------------------------------------------------------------------------------------------------------------
# the objective


def tcl_entropy_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TCL's two regularisers, kept apart because the code weighs them apart (tcl_wrapper.py l.79-84,
    tcl.py l.80-84): ent = mean_i H(p_i) (each prediction confident) and ne = sum_c pbar_c log pbar_c = -H(pbar)
    (the batch-mean prediction spread over the classes). Scalars; the batch mean is taken in log space."""
    logp = F.log_softmax(_logits("logits", logits), dim=-1)  # [N, C]
    ent = -(logp.exp() * logp).sum(-1).mean()
    log_pbar = torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])  # [C]
    ne = (log_pbar.exp() * log_pbar).sum()
    return ent, ne


def tcl_mix_target(w, labels: torch.Tensor, probs1: torch.Tensor, probs2: torch.Tensor, lam: float,
                   perm: torch.Tensor, *, scale=1.0, repeats: int = 3) -> torch.Tensor:
    """The target of TCL's mixed batch ([repeats * N, C], detached), as tcl_wrapper.py l.110-112 builds it:
    t = w' y^ + (1 - w') (p1 + p2) / 2 with w' = scale * w (`tcl_align_target`), stacked `repeats` times in the order
    the images were concatenated (weak, view 1, view 2), then mixed with the images' lam and permutation:
    lam t + (1 - lam) t[perm]."""
    t = tcl_align_target(w, labels, probs1, probs2, scale=scale).repeat(repeats, 1)  # [R N, C]
    if perm.shape != (t.shape[0],):
        raise ValueError(f"perm must be [{t.shape[0]}] (the mixed batch), got {tuple(perm.shape)}")
    return lam * t + (1.0 - lam) * t[perm]


def tcl_total(logits1: torch.Tensor, logits2: torch.Tensor, logits_mix: torch.Tensor, z1: torch.Tensor,
              z2: torch.Tensor, z_mix: torch.Tensor, labels: torch.Tensor, w, centres: torch.Tensor, lam: float,
              perm: torch.Tensor, *, temp: float = 0.25, scale1=1.0, scale2=1.0, ctr_weight: float = 1.0,
              cls_weight: float = 1.0, ent_weight: float = 1.0, ne_weight: float = 1.0,
              align_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """TCL's objective as Hzzone/TCL computes it (tcl.py l.80-84, tcl_wrapper.py l.89-131):

        L = ctr_weight  InfoNCE(z1, z2)                                  (utils/infonce.py, temp)
          + cls_weight  (mean_i L_cross,i + mean_j CE(g(x_mix,j), t_mix,j))
          + ent_weight  mean H(p) + ne_weight (-H(mean p))                over cat(view 1, view 2, mixed)
          + align_weight mean_j CE(z_mix,j centres^T / temp, t_mix,j)

    L_cross is `tcl_cross_supervision` with w scaled by scale1; t_mix is `tcl_mix_target` with w scaled by scale2
    (the code sets an unset scale to the estimated clean fraction each epoch, tcl.py l.176-180; 1 and 1 are the
    paper's formula). With w = 1 and both scales 1 every target is the noisy one-hot label, mixed like the images:
    the code's warm-up loss (tcl_wrapper.py l.122-126).

    Inputs: logits1, logits2 [N, C] and z1, z2 [N, D] (unit rows) of the two contrastive views (z1, z2 may be the
    global batch [N_all, D] gathered over ranks, as the code's InfoNCE is); logits_mix
    [3N, C] and z_mix [3N, D] of the mixed cat(weak, view 1, view 2); labels [N] noisy; w [N] (or a scalar) the
    label confidence; centres [C, D] the class centres of the last estimate (a fixed buffer); lam, perm [3N] the
    mixup draws of the images. scale1 and scale2 are floats or 0-d tensors (a buffer: no host read).
    Returns `loss` and the parts: ctr, cross, mix_ce, ent, ne, align (scalars).
    """
    l1, l2, lm = _logits("logits1", logits1), _logits("logits2", logits2), _logits("logits_mix", logits_mix)
    n = l1.shape[0]
    if lm.shape[0] != 3 * n or z_mix.shape[0] != 3 * n:
        raise ValueError(f"the mixed batch must hold 3 x {n} rows (weak, view 1, view 2), got {lm.shape[0]} logits "
                         f"and {z_mix.shape[0]} embeddings")
    ctr = infonce(z1, z2, temp)
    cross = tcl_cross_supervision(l1, l2, w, labels, scale=scale1).mean()
    t_mix = tcl_mix_target(w, labels, l1.softmax(-1), l2.softmax(-1), lam, perm, scale=scale2)  # [3N, C]
    mix_ce = soft_ce(lm, t_mix).mean()
    align = soft_ce(tcl_cluster_logits(z_mix, centres, temp), t_mix).mean()
    ent, ne = tcl_entropy_terms(torch.cat([l1, l2, lm]))
    loss = (ctr_weight * ctr + cls_weight * (cross + mix_ce) + ent_weight * ent + ne_weight * ne
            + align_weight * align)
    return {"loss": loss, "ctr": ctr, "cross": cross, "mix_ce": mix_ce, "ent": ent, "ne": ne, "align": align}


# ----------------------------------------------------------------------------------------------------------------
# label confidence


def tcl_confidence_per_class(embeddings: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor,
                             temp: float = 0.25, *, seed: int = 0) -> np.ndarray:
    """TCL's `sep_gmm` label confidence (tcl.py l.202-218), float32 [N]: the loss -gamma_i[y^_i]
    (`tcl_clean_scores`) is min-max normalised over the whole training set, then one 2-component GMM
    (scikit-learn's defaults) is fitted per noisy class, and w is the posterior of that class's low-loss component.

    `gmm_confidence` normalises its input again, per class here; a GMM fitted to x' = (x - lo) / s with its
    covariance floor divided by s^2 has exactly the posteriors of one fitted to x (k-means++ initialisation and
    EM are affine-equivariant), so reg_covar / s^2 keeps the code's fit on the globally normalised values.
    A class with fewer than 2 samples, or with one loss value, keeps w = 1 (the code's GMM would fail there).
    """
    loss = (-tcl_clean_scores(embeddings, probs, labels, temp)).to("cpu", torch.float64).numpy()
    lo, hi = loss.min(), loss.max()
    loss = (loss - lo) / (hi - lo) if hi > lo else np.zeros_like(loss)
    y = labels.cpu().numpy()
    w = np.ones(loss.shape[0], dtype=np.float32)
    for c in np.unique(y):
        x = loss[y == c]
        span = float(x.max() - x.min())
        if x.size >= 2 and span > 0:
            w[y == c] = gmm_confidence(x, seed=seed, **{**TCL_GMM, "reg_covar": TCL_GMM["reg_covar"] / span**2})
    return w


def tcl_code_confidence(embeddings: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, temp: float = 0.25, *,
                        per_class: bool = False, seed: int = 0) -> np.ndarray:
    """TCL's label confidence, float32 [N]: one GMM over every sample (`tcl_confidence`, tcl.py l.219-222) or one
    per noisy class (`tcl_confidence_per_class`, the `sep_gmm` option of its CIFAR-100 90% config)."""
    if per_class:
        return tcl_confidence_per_class(embeddings, probs, labels, temp, seed=seed)
    return tcl_confidence(embeddings, probs, labels, temp, seed=seed)


def clean_fraction(w: np.ndarray) -> float:
    """The fraction of samples judged clean, mean(w > 0.5): what the code scales an unset scale1/scale2 by
    (tcl.py l.176-180; it names it `estimated_noise_ratio`, but it counts the clean ones)."""
    return float((np.asarray(w) > 0.5).mean()) if np.asarray(w).size else 1.0


__all__ = ["clean_fraction", "tcl_code_confidence", "tcl_confidence_per_class", "tcl_entropy_terms",
           "tcl_mix_target", "tcl_total"]
