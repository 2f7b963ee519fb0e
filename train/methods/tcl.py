"""Twin Contrastive Learning (Huang et al., CVPR 2023) as its official code runs it (Hzzone/TCL, `models/tcl/`).

One network (`ccl.model.heads.TCLNet`: the backbone with TCL's classifier and 256-d projector heads). Each step
sees three views of the batch: weak, and two SimCLR-style contrastive views (`Augment.contrastive`; tcl.py
l.262-263 orders them weak, view 1, view 2). The weak and both contrastive views are mixed (one lam, one
permutation over the 3N images), and one forward takes cat(weak, mixed, view 1, view 2), 6N images, as
tcl_wrapper.py l.166-168 does; the loss is `ccl.train.losses.tcl.tcl_total`.

Warm-up (tcl.py l.67, tcl_wrapper.py l.122-126) trains the same loss with every label trusted (w = 1, no scaling);
`tcl.warmup_loss=ce` is plain CE on the weak view instead. After every epoch, warm-up included (basic_template.py
l.379 and l.399, `reassign` 1), the network in eval mode embeds the training set on the eval view (its memory
loader uses the test transform, basic_template.py l.343-344), which gives the class centres, the label confidence
w (GMM; per noisy class with `sep_gmm`) and the clean fraction mean(w > 0.5), by which an unset scale1/scale2
multiplies w (tcl.py l.176-180). The same estimate runs once before the first epoch, from the initial network:
the code calls `psedo_labeling` before its training loop (basic_template.py l.379), which copies the centres
computed from that network's embeddings into the model (tcl.py l.194), so the warm-up's cluster terms start from
them, not from the random buffer the wrapper creates (tcl_wrapper.py l.68-69). A resumed run takes its centres
from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ccl.model import eval_mode
from ccl.model.heads import build_tcl_nets
from ccl.pipeline.augment import apply_mixup, draw_mixup
from ccl.pipeline.batch import Batch
from ccl.train import dist, losses
from ccl.train.losses.confidence import tcl_centres
from ccl.train.losses.tcl import clean_fraction, tcl_code_confidence, tcl_total
from ccl.train.methods.base import Method, Parts, Rng, Step


class TCL(Method):
    name = "tcl"
    num_nets = 1
    # The configs' warmup_epochs is 20, and tcl.py l.67 warms up while cur_epoch < 20 with cur_epoch counted from 1:
    # 19 epochs of warm-up loss. (Its lr also ramps up over the first 20 epochs, basic_template.py l.449-451.)
    default_warmup = 19
    train_views = ("weak", "contrastive", "contrastive")

    def __init__(self, cfg, num_classes: int, num_train: int, arch: str, small_input: bool):
        super().__init__(cfg, num_classes, num_train, arch, small_input)
        t = cfg.tcl
        # TCL's own heads replace the ones `Method` builds (same seeds, so runs stay reproducible).
        self.nets = build_tcl_nets(arch, num_classes, self.num_nets, small_input, cfg.seed, proj_dim=t.proj_dim,
                                   dropout=t.dropout)
        g = torch.Generator().manual_seed(cfg.seed)  # a placeholder until the first refresh (`initial_refresh_view`)
        self.register_buffer("centres", F.normalize(torch.randn(num_classes, t.proj_dim, generator=g), dim=1))
        # mean(w > 0.5) of the last estimate: a device scalar, so the step multiplies by it without a host read.
        self.register_buffer("clean_fraction", torch.ones(()))

    def views(self, epoch: int) -> tuple[str, ...]:
        if self.warming_up(epoch) and self.cfg.tcl.warmup_loss == "ce":
            return ("weak",)
        return self.train_views

    def forward(self, batch: Batch, views: tuple[torch.Tensor, ...], epoch: int, pass_index: int = 0,
                rng: Rng | None = None) -> Step:
        cfg = self.cfg.tcl
        if self.warming_up(epoch):
            if cfg.warmup_loss == "ce":
                return self.warmup_step(batch, views[0], (0,))
            # The code's warm-up: the whole objective, every label trusted.
            return self.tcl_step(batch, views, rng, torch.ones_like(self.w[0, batch.index]), 1.0, 1.0)
        scale1 = self.clean_fraction if cfg.scale1 is None else cfg.scale1
        scale2 = self.clean_fraction if cfg.scale2 is None else cfg.scale2
        return self.tcl_step(batch, views, rng, self.w[0, batch.index], scale1, scale2)

    def tcl_step(self, batch: Batch, views: tuple[torch.Tensor, ...], rng: Rng | None, w: torch.Tensor,
                 scale1, scale2) -> Step:
        cfg = self.cfg.tcl
        weak, x1, x2 = views
        n = weak.shape[0]
        three = torch.cat([weak, x1, x2])  # [3N, 3, H, W]
        lam, perm = draw_mixup(3 * n, cfg.mixup_alpha, rng.device if rng else None, rng.host if rng else None,
                               device=weak.device)
        # One forward over [weak, mixed, view 1, view 2] (tcl_wrapper.py l.168): BatchNorm sees all 6N images.
        logits, z = self.nets[0](torch.cat([weak, apply_mixup(three, lam, perm), x1, x2]))  # [6N, C], [6N, D]
        _, l_mix, l1, l2 = logits.float().split([n, 3 * n, n, n])
        _, z_mix, z1, z2 = z.split([n, 3 * n, n, n])
        if self.cfg.gather_negatives:  # under torchrun: InfoNCE over the global batch, as the code's GatherLayer
            z1, z2, _ = dist.global_batch(z1, z2)  # (tcl_wrapper.py SimCLRWrapper.forward_contrastive_loss)
        out = tcl_total(l1, l2, l_mix, z1, z2, z_mix, batch.label, w, self.centres, lam, perm, temp=cfg.temp,
                        scale1=scale1, scale2=scale2, ctr_weight=cfg.ctr_weight, cls_weight=cfg.cls_weight,
                        ent_weight=cfg.ent_weight, ne_weight=cfg.ne_weight, align_weight=cfg.align_weight)
        self.record_loss(0, batch.index, losses.ce(l1.detach(), batch.label))
        return Parts().add(**{k: out[k] for k in ("ctr", "cross", "mix_ce", "ent", "ne", "align")}).step(out["loss"])

    # -- the estimate: before the first epoch and after every epoch, on the eval view ----------------------------
    def refresh_view(self, epoch: int) -> str | None:
        return "eval"  # TCL's estimate needs every sample's embedding: always a pass (inline does not apply)

    def initial_refresh_view(self) -> str | None:
        return "eval"  # basic_template.py l.379: the centres and w of the initial network

    @torch.no_grad()
    def refresh(self, batches: Iterable[tuple[Batch, torch.Tensor]]) -> None:
        net, n = self.nets[0], self.w.shape[1]
        emb = torch.zeros(n, self.centres.shape[1], device=self.w.device)
        probs = torch.zeros(n, self.num_classes, device=self.w.device)
        labels = torch.zeros(n, dtype=torch.long, device=self.w.device)
        with eval_mode(net):
            for batch, x in batches:
                logits, z = net(x)
                emb[batch.index], probs[batch.index] = z.float(), F.softmax(logits.float(), dim=1)
                labels[batch.index] = batch.label
        # Under torchrun each rank read its own samples (zeros elsewhere): summed, every rank holds every sample's
        # embedding, so the centres come from all ranks' embeddings and every rank fits the same GMM. This moves
        # N x (D + C + 1) numbers once per epoch; at WebVision size the [C, D] sums of P^T Z would do instead.
        for t in (emb, probs, labels):
            dist.merge_owned_(t)
        # The centres, the GMM and the clean fraction come from the samples TCL trains on (its memory loader reads
        # the training set); a sample held out for validation keeps w = 1.
        active = self.active
        self.centres.copy_(tcl_centres(emb[active], probs[active]))  # tcl.py l.194, l.202
        w = tcl_code_confidence(emb[active], probs[active], labels[active], self.cfg.tcl.temp,
                                per_class=self.cfg.tcl.sep_gmm, seed=self.cfg.seed)
        self.w[0] = 1.0
        self.w[0, active] = torch.from_numpy(w).to(self.w)
        self.clean_fraction.fill_(clean_fraction(w))
        self.has_w.fill_(True)
