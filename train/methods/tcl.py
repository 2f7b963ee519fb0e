"""Twin Contrastive Learning (Huang et al., CVPR 2023), as DESIGN §8 reads it from the paper and official code.

One network with a classifier and a projection head. Each epoch past warm-up: class centres from predictions and
embeddings, the posterior of each sample's noisy label among them, and a 2-component GMM on it give w. Training:
InfoNCE between two strong views, cross-supervision with entropy regularisation, and mixup alignment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ccl.pipeline.augment import mixup
from ccl.pipeline.batch import Batch
from ccl.train import losses
from ccl.train.losses.confidence import tcl_centres, tcl_confidence
from ccl.train.methods.base import Method, TrainPass, Views


class TCL(Method):
    name = "tcl"
    num_nets = 1
    default_warmup = 20
    n_strong = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        proj_dim = self.nets[0].head[-1].out_features
        self.register_buffer("centres", torch.zeros(self.num_classes, proj_dim))  # [C, D], unit rows

    def train_step(self, batch: Batch, views: Views, phase: tuple[int, ...], epoch: int) -> dict:
        weak, (x1, x2) = views
        n, temp = weak.shape[0], self.cfg.tcl_temp
        onehot = F.one_hot(batch.label, self.num_classes).float()
        x_mix, _, lam, perm = mixup(weak, onehot, self.cfg.mixup_alpha, generator=self.generator)
        logits, z = self.nets[0](torch.cat([x1, x2, x_mix]))  # one forward: [3N, C], [3N, D]
        logits = logits.float()
        l1, l2, l_mix = logits[:n], logits[n : 2 * n], logits[2 * n :]
        z1, z2, z_mix = z[:n], z[n : 2 * n], z[2 * n :]
        w = self.w[0, batch.index]

        ctr = losses.infonce(z1, z2, temp)
        cross = losses.tcl_cross_supervision(l1, l2, w, batch.label)  # [N]
        reg = losses.tcl_entropy_reg(logits)  # over both strong views and the mixed batch, as the official code
        # Mixup alignment: the refurbished target of both views, mixed with the images' lambda and pairing.
        target = losses.tcl_align_target(w, batch.label, F.softmax(l1, dim=1), F.softmax(l2, dim=1))  # [N, C]
        target_mix = lam * target + (1 - lam) * target[perm]
        cluster_logits = losses.tcl_cluster_logits(z_mix, self.centres, temp)  # [N, C]
        align = losses.tcl_mixup_align(l_mix, cluster_logits, target_mix)

        self.record_loss(0, batch.index, losses.ce(l1.detach(), batch.label))
        loss = ctr + cross.mean() + reg + align
        return {"loss": loss, "ctr": ctr.detach(), "cross": cross.mean().detach(), "reg": reg.detach(),
                "align": align.detach()}

    @torch.no_grad()
    def estimate(self, train_pass: TrainPass, inline: bool) -> None:
        # TCL's estimate needs every sample's embedding, so it always makes a pass (inline does not apply).
        net = self.nets[0]
        mode = net.training
        net.eval()
        n = self.w.shape[1]
        emb = torch.zeros(n, self.centres.shape[1], device=self.w.device)
        probs = torch.zeros(n, self.num_classes, device=self.w.device)
        labels = torch.zeros(n, dtype=torch.long, device=self.w.device)
        for batch, x in train_pass("eval"):
            logits, z = net(x)
            emb[batch.index], probs[batch.index] = z.float(), F.softmax(logits.float(), dim=1)
            labels[batch.index] = batch.label
        net.train(mode)
        self.centres.copy_(tcl_centres(emb, probs))
        w = tcl_confidence(emb, probs, labels, self.cfg.tcl_temp, seed=self.cfg.seed)
        self.w[0] = torch.from_numpy(w).to(self.w)
        self.has_w.fill_(True)
