"""Collaborative Cross Learning (Fan and Li, AAAI 2025), Eqs. 5-16 and Algorithm 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ccl.pipeline.batch import Batch
from ccl.train import dist, losses
from ccl.train.losses.contrastive import ccl_contrastive, ccl_contrastive_one
from ccl.train.methods.base import Parts, Step, TwinMethod

# The parts of each net's Eq. 15 that are logged (batch means, and PG's active fraction).
LOGGED = ("div", "pg_active", "ce_mean", "pg_mean", "acl_mean", "vm_mean", "cclrl_mean", "mm_mean", "cml_ce_mean",
          "cvl_mean", "cml_mean", "per_sample_mean")
CONTRASTIVE = ("acl", "vm", "cclrl", "mm")


class CCL(TwinMethod):
    name = "ccl"
    default_warmup = 10  # the paper's CIFAR-10 setting (30 for CIFAR-100)

    def refresh_between(self, epoch: int, pass_index: int) -> str | None:
        """Algorithm 1 l.7 (ccl.confidence_every=net): w is estimated before each net trains, so under the alternate
        schedule a second estimate follows net 0's pass, from net 0 as it now is, before net 1 learns."""
        if self.cfg.ccl.confidence_every != "net" or self.warming_up(epoch) or pass_index + 1 >= self.passes(epoch):
            return None
        return self.confidence_view

    def twin_loss(self, batch: Batch, own: dict[int, dict], peer: dict[int, dict]) -> Step:
        cfg = self.cfg.ccl
        # CCLRL positives of net m: argmax of its refurbished labels (Eq. 10), built from the PEER's prediction.
        classes = {m: losses.cclrl_classes(self.w[m, batch.index], batch.label, F.softmax(peer[m]["logits_w"], dim=1),
                                           self.num_classes, cfg.ablations) for m in own}
        if len(own) == 2:  # joint: both nets' four similarity matrices (S_00, S_11, S_01, S_10) in one kernel call
            zs = (own[0]["z_s"], own[0]["z_w"], own[1]["z_s"], own[1]["z_w"], classes[0], classes[1])
        else:  # alternate: net m against its fixed peer
            (m,) = own
            zs = (own[m]["z_s"], own[m]["z_w"], peer[m]["z_w"], classes[m])
        rows = slice(None)
        if self.cfg.gather_negatives:  # under torchrun: the global batch, with a gradient to this rank's rows
            *zs, rows = dist.global_batch(*zs)
        if len(own) == 2:
            c = ccl_contrastive(*zs, tau=cfg.tau, impl=self.cfg.kernel, detach_peer=True)
            cont = {m: {key: c[f"{key}{m}"][rows] for key in CONTRASTIVE} for m in own}
        else:
            c = ccl_contrastive_one(*zs, tau=cfg.tau, impl=self.cfg.kernel)
            cont = {m: {key: c[key][rows] for key in CONTRASTIVE}}
        parts, loss = Parts(), torch.zeros((), device=batch.label.device)
        for m in own:
            probs_w = F.softmax(own[m]["logits_w"], dim=1)
            probs_peer = F.softmax(peer[m]["logits_w"], dim=1)
            probs_pg = {"own_weak": probs_w, "peer_weak": probs_peer,
                        "own_strong": F.softmax(own[m]["logits_s"].detach(), dim=1)}[cfg.pg_prediction]
            out = losses.ccl_total(
                own[m]["logits_s"], batch.label, self.w[m, batch.index], probs_w, probs_peer,
                *(cont[m][key] for key in CONTRASTIVE),
                c=cfg.threshold, ablation=cfg.ablations, sharpen_T=cfg.sharpen_t,
                cvl_weight=cfg.cvl_weight, cml_weight=cfg.cml_weight, div_weight=cfg.div_weight,
                contrastive_weight=cfg.contrastive_weight, cml_target=cfg.cml_target, probs_pg=probs_pg,
            )
            self.record_loss(m, batch.index, out["per_sample_ce"])
            loss = loss + out["loss"]
            parts.add(str(m), **{key: out[key] for key in LOGGED})
        return parts.step(loss)
