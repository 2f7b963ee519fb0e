"""Loss functions of CCL (Fan & Li, AAAI 2025), of the RoLR baseline it analyses (Chen et al., AAAI 2023) and of
TCL (Huang et al., CVPR 2023), as pure functions of tensors.

Conventions shared by every function here:
- logits are [N, C], labels int64 [N], the label confidence w is [N] (or a scalar) in [0, 1] and is never
  differentiated;
- a loss that a per-sample weight or the GMM needs is returned per sample, [N]; batch-level terms (L_div, InfoNCE,
  the entropy regulariser) are scalars;
- whatever a paper treats as a target (own or peer weak probabilities, pseudo-labels, refurbished labels) is
  detached *here*, so no caller can forget it;
- fp16/bf16 logits are upcast to float32 before any log-softmax; float32 and float64 are kept as they are.

The contrastive terms of CCL (ACL, VM, CCLRL, MM: Eqs. 5, 6, 9, 12) live in `ccl.train.losses.contrastive`; `ccl_total`
takes their per-anchor [N] vectors as inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ccl.errors import UserError

# ----------------------------------------------------------------------------------------------------------------
# helpers


def _f(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32 (log-softmax and sums of logs need the range); float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _logits(name: str, logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"{name} must be [N, C], got shape {tuple(logits.shape)}")
    return _f(logits)


def _weights(w, n: int, like: torch.Tensor) -> torch.Tensor:
    """w as a detached [N] vector in like's dtype and device (a python float or 0-d tensor is broadcast)."""
    w = torch.as_tensor(w, device=like.device).detach().to(like.dtype)
    if w.dim() == 0:
        w = w.expand(n)
    if w.shape != (n,):
        raise ValueError(f"w must be a scalar or [{n}], got shape {tuple(w.shape)}")
    return w


def _vec(name: str, v: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """A per-anchor loss vector supplied by the caller, checked to be [N] (gradients kept)."""
    if v is None:
        raise ValueError(f"{name} is required unless the ablation drops it")
    if v.shape != (n,):
        raise ValueError(f"{name} must be [{n}], got shape {tuple(v.shape)}")
    return v.to(like.dtype)


# ----------------------------------------------------------------------------------------------------------------
# building blocks


def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against hard labels, L_c(p, y^) of Eqs. 2, 15 and 16. Returns [N]."""
    return F.cross_entropy(_logits("logits", logits), labels, reduction="none")


def soft_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against a soft target, L_c(p, t) = -sum_c t_c log p_c (Eqs. 2 and 13, TCL's
    L_cross and L_align). The target is detached. Returns [N]."""
    logp = F.log_softmax(_logits("logits", logits), dim=-1)  # [N, C]
    return -(target_probs.detach().to(logp.dtype) * logp).sum(-1)


def sharpen(p: torch.Tensor, T: float = 0.5) -> torch.Tensor:
    """Sharpen(p)_i = p_i^(1/T) / sum_j p_j^(1/T), Eq. 1 of the CCL paper.

    The RoLR code raises p to T instead of 1/T (T=0.5 would then flatten); we follow the paper, so T=0.5 squares.
    Not detached (callers that use it as a target detach, e.g. `rolr_pseudo_label`).
    """
    if not T > 0:
        raise ValueError(f"sharpening temperature must be > 0, got {T}")
    q = _f(p).pow(1.0 / T)  # [N, C]; the largest entry is >= (1/C)^(1/T), so the sum never underflows to 0
    return q / q.sum(-1, keepdim=True)


def refurbish(w, labels: torch.Tensor, target: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Refurbished label y' = w * onehot(y^) + (1 - w) * target, [N, C]. Detached: it is always a target.

    One function for every method that mixes the noisy label with a prediction:
    - CCL Eq. 10: target = p^w of the peer model 1-m (its argmax gives the CCLRL classes of Eq. 9);
    - RoLR Eq. 2: target = the sharpened two-model pseudo-label of Eq. 1;
    - TCL cross-supervision and mixup targets: target = the other view's (or both views') prediction.
    num_classes defaults to target's width; when given it must agree.
    """
    if target.dim() != 2:
        raise ValueError(f"target must be [N, C], got shape {tuple(target.shape)}")
    n, c = target.shape
    if num_classes is not None and num_classes != c:
        raise ValueError(f"num_classes={num_classes} but target has {c} columns")
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}], got shape {tuple(labels.shape)}")
    t = _f(target.detach())  # [N, C]
    w = _weights(w, n, t)[:, None]  # [N, 1]
    return w * F.one_hot(labels, c).to(t.dtype) + (1 - w) * t


def rolr_pseudo_label(p_w_own: torch.Tensor, p_w_peer: torch.Tensor, T: float = 0.5) -> torch.Tensor:
    """RoLR's pseudo-label (Eq. 1): y~^m = Sharpen((p^w_m + p^w_{1-m}) / 2) with temperature T. Detached, [N, C]."""
    return sharpen((_f(p_w_own.detach()) + _f(p_w_peer.detach())) / 2, T).detach()


def pg(logits_s: torch.Tensor, probs_w: torch.Tensor, c: float | None = 0.95) -> torch.Tensor:
    """Predicted Guidance with confident learning, Eq. 7: -1[y_pred >= c] * y_pred * log p^s[k].

    k = argmax of probs_w and y_pred = probs_w[k], where probs_w is the prediction PG follows (by default the
    model's own weak view, the prediction-guidance half of the cross-view CE in Eq. 3), detached. c=None removes the threshold
    (the "w/o Threshold in L_PG" ablation of Table 7): every sample then counts, still weighted by y_pred.
    Samples below c give exactly 0 with a zero (finite) gradient. Returns [N].
    """
    logits = _logits("logits_s", logits_s)
    p = _f(probs_w.detach())
    if p.shape != logits.shape:
        raise ValueError(f"probs_w {tuple(p.shape)} and logits_s {tuple(logits.shape)} must have the same shape")
    conf, k = p.max(dim=-1)  # [N], [N]
    logp_k = F.log_softmax(logits, dim=-1).gather(1, k[:, None]).squeeze(1)  # [N]
    keep = torch.ones_like(conf, dtype=torch.bool) if c is None else conf >= c
    # where, not a 0/1 product: a masked-out -inf log-prob (saturated fp16 logits) must not turn into NaN
    return torch.where(keep, -conf.to(logp_k.dtype) * logp_k, torch.zeros_like(logp_k))


def div(logits_s: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Diversity regulariser, Eq. 14: sum_i pi_i log(pi_i / mean_j p^s_j[i]) = KL(pi || batch-mean prediction),
    with pi the uniform prior 1/C unless given (RoLR's and DivideMix's penalty is the same term). Scalar.

    The batch mean is taken in log space (logsumexp of log-probs), so a class no sample predicts gives a large but
    finite penalty rather than inf.
    """
    logits = _logits("logits_s", logits_s)
    n, c = logits.shape
    log_pbar = torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(n)  # [C]
    if prior is None:
        prior = torch.full((c,), 1.0 / c, dtype=logits.dtype, device=logits.device)
    else:
        prior = prior.detach().to(device=logits.device, dtype=logits.dtype)
        if prior.shape != (c,):
            raise ValueError(f"prior must be [{c}], got shape {tuple(prior.shape)}")
    return (torch.xlogy(prior, prior) - prior * log_pbar).sum()  # xlogy: a zero prior entry contributes 0


# ----------------------------------------------------------------------------------------------------------------
# CCL (Eq. 15) and its ablations (Table 7)


@dataclasses.dataclass(frozen=True)
class Ablation:
    """The component ablations of the CCL paper's Table 7 (all False = the full method)."""

    no_mimicry: bool = False
    """w/o Mimicry: remove both mimicry terms, View-wise Mimicry (Eq. 6) and Model-wise Mimicry (Eq. 12)."""
    no_threshold: bool = False
    """w/o Threshold in L_PG: remove the confidence threshold c of Eq. 7; every sample's predicted class is
    learned, weighted by its confidence."""
    no_refurbished: bool = False
    """w/o Refurbished labels: replace the loss on refurbished labels in Eq. 9 with vanilla contrastive learning:
    the only positive of anchor i is sample i itself from the peer's weak view (see `cclrl_classes`)."""
    no_cvl: bool = False
    """w/o L_CVL: remove Cross-view Learning (Eq. 8: PG + ACL + VM) from Eq. 15."""
    no_cml: bool = False
    """w/o L_CML: remove Cross-model Learning (Eq. 13: CE to the peer + CCLRL + MM) from Eq. 15."""

    @classmethod
    def from_names(cls, names: Iterable[str]) -> "Ablation":
        """Build from flag names, e.g. ["no_mimicry", "no_cml"]; an unknown name is the user's error."""
        valid = [f.name for f in dataclasses.fields(cls)]
        names = [n.strip().replace("-", "_") for n in names if n.strip()]
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise UserError(f"unknown ablation {', '.join(unknown)}: expected any of {', '.join(valid)}")
        return cls(**{n: True for n in names})


def cclrl_classes(w, labels: torch.Tensor, probs_w_peer: torch.Tensor, num_classes: int | None = None,
                  ablation: Ablation = Ablation()) -> torch.Tensor:
    """The class of each anchor that defines CCLRL's positives (Eq. 9), int64 [N].

    argmax of the collaborative refurbished label y'_m = w y^ + (1 - w) p^w_{1-m} (Eq. 10): anchors i and j are
    positives when their classes agree. With ablation.no_refurbished it is arange(N), so each anchor's only positive
    is its own sample (vanilla contrastive learning across models).
    """
    if ablation.no_refurbished:
        return torch.arange(labels.shape[0], device=labels.device)
    return refurbish(w, labels, probs_w_peer, num_classes).argmax(dim=-1)


def ccl_total(logits_s: torch.Tensor, labels: torch.Tensor, w, probs_w_own: torch.Tensor,
              probs_w_peer: torch.Tensor, acl: torch.Tensor | None, vm: torch.Tensor | None,
              cclrl: torch.Tensor | None, mm: torch.Tensor | None, c: float = 0.95,
              ablation: Ablation = Ablation(), *, sharpen_T: float | None = None, cvl_weight: float = 1.0,
              cml_weight: float = 1.0, div_weight: float = 1.0, contrastive_weight: float = 1.0,
              cml_target: str = "peer", probs_pg: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The CCL objective for model m, Eq. 15:

        L = mean_i [ w_i CE(p^s_i, y^_i) + (1 - w_i)/2 (L_CVL,i + L_CML,i) ] + L_div
        L_CVL = PG + ACL + VM                          (Eq. 8;  PG Eq. 7, ACL Eq. 5, VM Eq. 6)
        L_CML = CE(p^s_m, p^w_{1-m}) + CCLRL + MM      (Eq. 13; CCLRL Eq. 9, MM Eq. 12)
        L_div = KL(uniform || batch-mean p^s_m)        (Eq. 14, once per batch)

    Inputs: logits_s [N, C] of model m on the strong view; labels [N] noisy; w [N] model m's label confidence
    (from the peer's GMM, Eq. 16); probs_w_own / probs_w_peer [N, C] the weak-view probabilities of model m and of
    its peer (both detached here); acl, vm, cclrl, mm the per-anchor [N] vectors from `ccl.train.losses.contrastive` for
    model m (a term the ablation drops may be None). c is PG's threshold.

    The readings the paper leaves open (`ccl.train.config.CCLConfig` says where each comes from):
    - cml_target: the cross-model CE's target, "peer" = p^w_{1-m} (Eq. 13 as written) or "mean" =
      (p^w_m + p^w_{1-m})/2 (Eq. 1's average, which the text introducing Eq. 13 refers to);
    - sharpen_T, when set, sharpens that target (the paper lists T as a CCL input; no equation of CCL shows it);
    - probs_pg: the probabilities PG takes y_pred and its confidence from (detached; default probs_w_own, the
      model's own weak view; Eq. 3 writes the strong view's).
    cvl_weight, cml_weight and div_weight scale L_CVL, L_CML and L_div in Eq. 15, contrastive_weight the four
    contrastive terms ACL, VM, CCLRL and MM (all 1 in the paper).

    Returns a dict: `loss` (scalar), `div` (scalar), `per_sample_ce` (CE to the noisy label, detached, for the
    inline GMM), `pg_active` (fraction of samples above c), and for every part -- ce, pg, acl, vm, cclrl, mm,
    cml_ce, cvl, cml, per_sample (Eq. 15 without L_div) -- the [N] vector *as it enters the loss* (zeros when the
    ablation drops it) and `<part>_mean` (detached scalar) for logging. The mean is over the batch (divided by N,
    not by the weights' sum), as in Eq. 15.
    """
    logits = _logits("logits_s", logits_s)
    n = logits.shape[0]
    w = _weights(w, n, logits)
    zero = logits.new_zeros(n)
    ce_noisy = ce(logits, labels)  # [N]

    if cml_target not in ("peer", "mean"):
        raise ValueError(f"cml_target must be 'peer' or 'mean', got {cml_target!r}")
    source = _f((probs_w_own if probs_pg is None else probs_pg).detach())  # where PG's y_pred comes from
    pg_active = (source.max(dim=-1).values >= c).to(logits.dtype).mean() if c is not None else logits.new_ones(())
    if ablation.no_cvl:
        pg_v = acl_v = vm_v = zero
    else:
        pg_v = pg(logits, source, None if ablation.no_threshold else c)
        acl_v = contrastive_weight * _vec("acl", acl, n, logits)
        vm_v = zero if ablation.no_mimicry else contrastive_weight * _vec("vm", vm, n, logits)
    if ablation.no_cml:
        cml_ce = cclrl_v = mm_v = zero
    else:
        target = _f(probs_w_peer.detach())  # [N, C]
        if cml_target == "mean":
            target = (_f(probs_w_own.detach()) + target) / 2
        cml_ce = soft_ce(logits, target if sharpen_T is None else sharpen(target, sharpen_T))
        cclrl_v = contrastive_weight * _vec("cclrl", cclrl, n, logits)
        mm_v = zero if ablation.no_mimicry else contrastive_weight * _vec("mm", mm, n, logits)

    cvl = pg_v + acl_v + vm_v  # [N]
    cml = cml_ce + cclrl_v + mm_v  # [N]
    per_sample = w * ce_noisy + (1 - w) / 2 * (cvl_weight * cvl + cml_weight * cml)  # [N]
    d = div(logits)
    out = {"loss": per_sample.mean() + div_weight * d, "div": d, "per_sample_ce": ce_noisy.detach(),
           "pg_active": pg_active.detach()}
    parts = {"ce": ce_noisy, "pg": pg_v, "acl": acl_v, "vm": vm_v, "cclrl": cclrl_v, "mm": mm_v, "cml_ce": cml_ce,
             "cvl": cvl, "cml": cml, "per_sample": per_sample}
    for name, v in parts.items():
        out[name] = v
        out[f"{name}_mean"] = v.detach().mean()
    return out


# ----------------------------------------------------------------------------------------------------------------
# RoLR (Eqs. 1-2)


def rolr_code_pseudo_label(p_w_own: torch.Tensor, p_w_peer: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """RoLR's pseudo-label as its code computes it (chenmc1996/Robust-LR RoLR.py l.122-128): the mean of both nets'
    weak-view predictions raised to the power T (not 1/T as the CCL paper's Eq. 1 writes), normalised. Detached,
    [N, C]. The README's command runs T = 1, which leaves the mean as it is: no sharpening.

    Computed as softmax(T log p), which is p^T / sum p^T without underflow for large T (a zero entry stays 0).
    """
    if not T > 0:
        raise ValueError(f"sharpening exponent must be > 0, got {T}")
    mean = (_f(p_w_own.detach()) + _f(p_w_peer.detach())) / 2  # [N, C]
    return torch.softmax(T * torch.log(mean), dim=-1).detach()


def rolr_total(logits_s: torch.Tensor, labels: torch.Tensor, w, pseudo: torch.Tensor,
               prior: torch.Tensor | None = None, *, div_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The RoLR objective for model m, Eq. 2 plus its diversity penalty:

        L = mean_i CE(p^s_m,i, w_i y^_i + (1 - w_i) y~^m_i) + div_weight * KL(prior || batch-mean p^s_m)

    pseudo is y~^m of Eq. 1 (`rolr_pseudo_label`), w model m's confidence from the peer's GMM; the refurbished
    target is built by the same `refurbish` as CCL's Eq. 10. div_weight is RoLR's lambda_p (1 by default).
    Returns `loss`, `div`, `soft_ce` [N] and `soft_ce_mean`, `ce` [N] (to the noisy label) and `ce_mean`, and
    `per_sample_ce` (the same, detached, for the inline GMM).
    """
    logits = _logits("logits_s", logits_s)
    target = refurbish(w, labels, pseudo)  # [N, C]
    soft = soft_ce(logits, target)  # [N]
    d = div(logits, prior)
    ce_noisy = ce(logits, labels).detach()
    return {"loss": soft.mean() + div_weight * d, "div": d, "soft_ce": soft, "soft_ce_mean": soft.detach().mean(),
            "ce": ce_noisy, "ce_mean": ce_noisy.mean(), "per_sample_ce": ce_noisy}


# ----------------------------------------------------------------------------------------------------------------
# TCL (DESIGN section 8; facts checked against the official code)


def infonce(z1: torch.Tensor, z2: torch.Tensor, temp: float = 0.25) -> torch.Tensor:
    """SimCLR's NT-Xent between two views (TCL's L_ctr), scalar.

    Over the 2N embeddings cat([z1, z2]) (rows L2-normalised by the caller), each anchor's positive is the other
    view of its sample and its negatives are the other 2N - 2 embeddings; the loss is the mean over all 2N anchors,
    i.e. both directions. TCL uses temp 0.25.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [N, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = _f(torch.cat([z1, z2]))  # [2N, D]
    s = z @ z.T / temp  # [2N, 2N]
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    s = s.masked_fill(self_mask, float("-inf"))  # an anchor is never its own negative
    positive = torch.arange(2 * n, device=z.device).roll(n)  # i <-> i + N
    return F.cross_entropy(s, positive)


def tcl_cross_supervision(logits1: torch.Tensor, logits2: torch.Tensor, w, labels: torch.Tensor, *,
                          scale: float = 1.0) -> torch.Tensor:
    """TCL's cross-supervision L_cross, per sample [N]:

        CE(g(x1), t2) + CE(g(x2), t1),   t_v = w y^ + (1 - w) softmax(g(x_v)) (detached)

    so each view learns from the noisy label and the *other* view's prediction. scale multiplies w (the official
    code scales w by the fraction of samples it judges clean; 1 is the paper's formula).
    """
    l1 = _logits("logits1", logits1)
    l2 = _logits("logits2", logits2)
    wt = _weights(w, l1.shape[0], l1) * scale
    t1 = refurbish(wt, labels, l1.softmax(-1))  # [N, C], detached
    t2 = refurbish(wt, labels, l2.softmax(-1))
    return soft_ce(l1, t2) + soft_ce(l2, t1)


def tcl_align_target(w, labels: torch.Tensor, probs1: torch.Tensor, probs2: torch.Tensor, *,
                     scale: float = 1.0) -> torch.Tensor:
    """The unmixed target of TCL's mixup alignment, w y^ + (1 - w) (p1 + p2) / 2 ([N, C], detached), where p1, p2
    are the predictions on the two strong views. The caller mixes it with the images' lambda and permutation
    (`ccl.pipeline.augment.mixup`), repeated as often as the images were (the official code mixes weak + both
    strong views, 3N)."""
    avg = (_f(probs1.detach()) + _f(probs2.detach())) / 2
    return refurbish(_weights(w, avg.shape[0], avg) * scale, labels, avg)


def tcl_cluster_logits(z: torch.Tensor, centres: torch.Tensor, temp: float = 0.25) -> torch.Tensor:
    """Cluster-posterior logits of TCL, z centres^T / temp ([N, C]); centres ([C, D], from the last confidence
    estimation, `ccl.train.losses.confidence.tcl_centres`) are a fixed buffer, so detached. The official code uses the
    contrastive temperature here."""
    return _f(z) @ _f(centres.detach()).T / temp
