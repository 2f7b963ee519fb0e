"""RoLR (Chen et al., AAAI 2023) as its official code runs it (chenmc1996/Robust-LR `RoLR.py`, README command).

Two nets. After warm-up, each epoch: every net's per-sample CE of the noisy label on the weak (train-transform)
view in eval mode, min-max normalised and (optionally) averaged over the last epochs, feeds a 2-component GMM;
its clean posterior becomes the PEER's w (RoLR.py l.293-304: net 1's losses weigh net 2's targets). Then each net
in turn learns, with its peer fixed, from

    L = CE(p^s_m, w y^ + (1 - w) target) + lambda_p KL(uniform || batch-mean p^s_m)        (RoLR.py l.122-138)
    target = (p^w_m + p^w_peer)/2 raised to T and normalised (variant "code"; the README's T = 1: no sharpening)
           or to 1/T as the CCL paper's Eq. 1 writes it (variant "paper", T = 0.5)

over two passes of the data per net per epoch (RoLR.py l.86-100). The learning net's weak view goes through it
under no_grad in train mode, and its strong view through a second forward (l.114-120), so each view is normalised
with its own batch statistics; the fixed peer runs in eval mode (l.80).

Warm-up (RoLR.py l.263-273 and l.146-160): CE on the weak view, net 1 over a whole pass, then net 2 over a pass of
its own (its own shuffle), at the warm-up loader's batch of 64 (dataloader_cifar.py l.176, `run('warmup')`), not the
training batch of 64 x 7 = 448: `rolr.warmup_batch_size` (the recipes' 64; none = the run's batch size). Either
schedule warms up this way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ccl.pipeline.batch import Batch
from ccl.train import losses
from ccl.train.methods.base import LossHistory, Parts, Step, Stream, TwinMethod


class RoLR(LossHistory, TwinMethod):
    name = "rolr"
    default_warmup = 15  # RoLR.py l.19 (--warm_up 15; the README's command keeps it)

    def history_length(self) -> int:
        return self.cfg.rolr.loss_history  # the GMM's loss history (RoLR.py l.200-205), `LossHistory`

    # -- schedule: in warm-up each net its own pass; then each net reads the data `passes_per_net` times ---------
    def passes(self, epoch: int) -> int:
        if self.warming_up(epoch):
            return 2
        k = self.cfg.rolr.passes_per_net
        return 2 * k if self.cfg.schedule == "alternate" else k

    def training_nets(self, epoch: int, pass_index: int) -> tuple[int, ...]:
        if self.warming_up(epoch):
            return (pass_index,)
        if self.cfg.schedule == "joint":
            return (0, 1)
        return (pass_index // self.cfg.rolr.passes_per_net,)  # net 0's passes, then net 1's

    def streams(self, epoch: int, pass_index: int) -> tuple[Stream, ...]:
        if self.warming_up(epoch):
            return (Stream(batch_size=self.cfg.rolr.warmup_batch_size),)
        return (Stream(),)

    # -- the step -----------------------------------------------------------------------------------------------
    def forward_views(self, k: int, weak: torch.Tensor, strong: torch.Tensor) -> dict[str, torch.Tensor]:
        """Two forwards of net k, as RoLR.py l.114-120: the weak view under no_grad (train mode, so its BatchNorm
        statistics move as in the code), then the strong view with gradient."""
        with torch.no_grad():
            logits_w = self.nets[k](weak)[0]  # [N, C]
        logits_s = self.nets[k](strong)[0]  # [N, C]
        return {"logits_w": logits_w.float(), "logits_s": logits_s.float()}

    def twin_loss(self, batch: Batch, own: dict[int, dict], peer: dict[int, dict]) -> Step:
        cfg = self.cfg.rolr
        target = losses.rolr_code_pseudo_label if cfg.variant == "code" else losses.rolr_pseudo_label
        parts, loss = Parts(), torch.zeros((), device=batch.label.device)
        for m in own:
            pseudo = target(F.softmax(own[m]["logits_w"], dim=1), F.softmax(peer[m]["logits_w"], dim=1),
                            cfg.temperature())  # [N, C], detached
            out = losses.rolr_total(own[m]["logits_s"], batch.label, self.w[m, batch.index], pseudo,
                                    div_weight=cfg.lambda_p)
            self.record_loss(m, batch.index, out["per_sample_ce"])
            loss = loss + out["loss"]
            parts.add(str(m), div=out["div"], soft_ce_mean=out["soft_ce_mean"], ce_mean=out["ce_mean"])
        return parts.step(loss)
