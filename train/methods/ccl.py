"""Collaborative Cross Learning (Fan and Li, AAAI 2025), Eqs. 5-16 and Algorithm 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ccl.pipeline.batch import Batch
from ccl.train import losses
from ccl.train.losses.contrastive import ccl_contrastive, ccl_contrastive_one
from ccl.train.methods.base import TwinMethod


class CCL(TwinMethod):
    name = "ccl"
    default_warmup = 10  # the paper's CIFAR-10 setting (30 for CIFAR-100)

    def _classes(self, m: int, batch: Batch, peer: dict) -> torch.Tensor:
        """CCLRL positives of net m: argmax of its refurbished labels (Eq. 10), built from the PEER's prediction."""
        w = self.w[m, batch.index]
        p_peer = F.softmax(peer["logits_w"], dim=1)
        return losses.cclrl_classes(w, batch.label, p_peer, self.num_classes, self.cfg.ablations)

    def model_loss(self, m: int, batch: Batch, own: dict, peer: dict, cont: dict | None = None) -> dict:
        if cont is None:
            y = self._classes(m, batch, peer)
            cont = ccl_contrastive_one(
                own["z_s"], own["z_w"], peer["z_w"], y, tau=self.cfg.tau, impl=self.cfg.kernel
            )
        parts = losses.ccl_total(
            own["logits_s"],
            batch.label,
            self.w[m, batch.index],
            F.softmax(own["logits_w"], dim=1).detach(),
            F.softmax(peer["logits_w"], dim=1),
            cont["acl"],
            cont["vm"],
            cont["cclrl"],
            cont["mm"],
            c=self.cfg.threshold,
            ablation=self.cfg.ablations,
        )
        return self.logged(m, batch, parts)

    def joint_shared(self, batch: Batch, outs: list[dict], peers: list[dict]) -> list[dict]:
        # Both nets' four similarity matrices in one batched kernel call (S_00, S_11, S_01, S_10).
        y0, y1 = (self._classes(m, batch, peers[m]) for m in (0, 1))
        c = ccl_contrastive(
            outs[0]["z_s"], outs[0]["z_w"], outs[1]["z_s"], outs[1]["z_w"], y0, y1,
            tau=self.cfg.tau, impl=self.cfg.kernel, detach_peer=True,
        )
        return [{"cont": {key: c[f"{key}{m}"] for key in ("acl", "vm", "cclrl", "mm")}} for m in (0, 1)]
