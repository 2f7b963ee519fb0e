"""The losses of DivideMix (Li, Socher and Hoi, ICLR 2020) as pure functions of tensors.

The facts come from the official code, LiJunnan1992/DivideMix `Train_CIFAR.py` (cited as TC:line):
- label co-refinement, TC:75-84: the trained net's own softmax averaged over the two augmentations, mixed with the
  noisy one-hot label by the clean probability w, then sharpened with T;
- label co-guessing, TC:63-73: both nets' softmax over the two augmentations of an unlabelled sample, averaged and
  sharpened;
- MixMatch, TC:86-105 and `SemiLoss` TC:196-203: Lx a soft cross-entropy over the mixed labelled rows, Lu the mean
  squared error between softmax and mixed target over the mixed unlabelled rows, averaged over the classes too
  (`torch.mean` over [N, C]), and lambda_u ramped up linearly over 16 epochs after warm-up (`linear_rampup`,
  TC:192-194);
- the uniform-prior penalty, TC:107-111: KL(uniform || mean prediction over the whole mixed batch), which is
  `ccl.train.losses.div`;
- the warm-up's confidence penalty on asymmetric noise, TC:132-136 and `NegEntropy` TC:205-208.

Conventions as in `ccl.train.losses`: logits [N, C], labels int64 [N], w [N] never differentiated, targets
detached here, half precision upcast before any log-softmax.

DivideMix splits every batch into a labelled and an unlabelled part. Here the split is a boolean mask over one
batch (`labelled` [N]), and each loss is a masked mean whose denominator is clamped to 1: an empty part gives an
exact 0 with a zero gradient, and no function here reads a tensor's value on the host (no sync in a step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ccl.train.losses import _f, _logits, refurbish, sharpen, soft_ce


def co_refine(w, labels: torch.Tensor, probs: torch.Tensor, T: float = 0.5) -> torch.Tensor:
    """Label co-refinement (TC:75-84), [N, C], detached:

        y_bar = w y^ + (1 - w) mean_v p_v,     y_hat = Sharpen(y_bar, T) = y_bar^(1/T) / sum_c y_bar_c^(1/T)

    probs: [V, N, C], the trained net's own softmax over V augmentations (V = 2 in DivideMix); w [N] the clean
    probability from the peer's GMM. The mixing is `refurbish`, the sharpening `sharpen` (the code raises to 1/T).
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be [V, N, C], got shape {tuple(probs.shape)}")
    return sharpen(refurbish(w, labels, _f(probs.detach()).mean(0)), T).detach()


def co_guess(probs: torch.Tensor, T: float = 0.5) -> torch.Tensor:
    """Label co-guessing (TC:63-73), [N, C], detached: Sharpen(mean over the stack, T).

    probs: [K, N, C], the softmax of both nets over both augmentations (K = 4 in DivideMix), all weighted alike.
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be [K, N, C], got shape {tuple(probs.shape)}")
    return sharpen(_f(probs.detach()).mean(0), T).detach()


def masked_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean of v [N] over mask [N] (bool): sum(v * mask) / max(count, 1). An empty mask gives 0 with a zero
    gradient; `where`, not a product, so a non-finite value outside the mask cannot leak in as NaN."""
    m = mask.to(v.dtype)
    return torch.where(mask, v, torch.zeros_like(v)).sum() / m.sum().clamp_min(1.0)


def mixmatch_losses(logits_mix: torch.Tensor, target_mix: torch.Tensor,
                    labelled: torch.Tensor) -> dict[str, torch.Tensor]:
    """DivideMix's MixMatch losses on a mixed batch (TC:86-105 and `SemiLoss` TC:196-203).

        Lx = mean over labelled rows of  -sum_c t_c log p_c                      (soft cross-entropy)
        Lu = mean over unlabelled rows of  (1/C) sum_c (p_c - t_c)^2             (the code's torch.mean over [N, C])

    logits_mix [N, C] are the net's outputs on the mixed inputs, target_mix [N, C] the targets mixed with the same
    lambda and permutation (detached here), labelled [N] bool says which part each mixed row belongs to: the part
    of its own (first, lambda >= 0.5) sample, as the code slices logits[:2B] and logits[2B:]. Returns `lx`, `lu`
    (scalars; 0 when their part is empty) and `n_labelled`, `n_unlabelled` (float counts, for logging).
    """
    logits = _logits("logits_mix", logits_mix)
    if target_mix.shape != logits.shape or labelled.shape != logits.shape[:1]:
        raise ValueError(f"target_mix {tuple(target_mix.shape)} and labelled {tuple(labelled.shape)} must match "
                         f"logits_mix {tuple(logits.shape)}")
    t = _f(target_mix.detach()).to(logits.dtype)
    lx_i = soft_ce(logits, t)  # [N]
    lu_i = (F.softmax(logits, dim=-1) - t).pow(2).mean(-1)  # [N]
    unlabelled = ~labelled
    return {"lx": masked_mean(lx_i, labelled), "lu": masked_mean(lu_i, unlabelled),
            "n_labelled": labelled.float().sum(), "n_unlabelled": unlabelled.float().sum()}


def linear_rampup(epoch, warmup: int, lambda_u: float, length: int = 16):
    """lambda_u * clip((epoch - warmup) / length, 0, 1) (`linear_rampup`, TC:192-194): the weight of Lu, a pure
    function of the fractional epoch (the code passes epoch + batch_idx / num_iter, TC:105). epoch is a float, or a
    0-d tensor (a step's fraction kept on the device); the result is of the same kind."""
    if length <= 0:
        return float(lambda_u) if not torch.is_tensor(epoch) else torch.full_like(epoch, float(lambda_u))
    x = (epoch - warmup) / length
    if torch.is_tensor(x):
        return float(lambda_u) * x.clamp(0.0, 1.0)
    return float(lambda_u) * min(max(x, 0.0), 1.0)


def neg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The warm-up's confidence penalty on asymmetric noise, mean_i sum_c p_ic log p_ic (`NegEntropy`,
    TC:205-208): the negative entropy, so adding it to the loss pushes predictions away from over-confidence.
    Scalar."""
    logp = F.log_softmax(_logits("logits", logits), dim=-1)  # [N, C]
    return (logp.exp() * logp).sum(-1).mean()


def plus_loss(cvl: torch.Tensor, cml: torch.Tensor, w, mask: torch.Tensor, *, cvl_weight: float = 1.0,
              cml_weight: float = 1.0) -> torch.Tensor:
    """CCL's cross-view and cross-model terms added to DivideMix (the CCL paper's Table 5), scalar:

        mean over mask of  (1 - w_i)/2 (cvl_weight L_CVL,i + cml_weight L_CML,i)

    with the per-sample weight of CCL's Eq. 15. cvl, cml are the [N] vectors `ccl.train.losses.ccl_total` returns
    (Eq. 8: PG + ACL + VM; Eq. 13: CE to the peer + CCLRL + MM; zeros for a part left out), w [N] the clean
    probability, mask [N] the samples the terms apply to (DivideMix's labelled part, or all).
    """
    n = cvl.shape[0]
    if cml.shape != (n,) or mask.shape != (n,):
        raise ValueError(f"cvl, cml and mask must all be [{n}], got {tuple(cml.shape)} and {tuple(mask.shape)}")
    w = torch.as_tensor(w, device=cvl.device).detach().to(cvl.dtype).expand(n)
    return masked_mean((1 - w) / 2 * (cvl_weight * cvl + cml_weight * cml), mask)
