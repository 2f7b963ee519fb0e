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
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ccl.pipeline.batch import Batch
from ccl.train import losses
from ccl.train.losses.confidence import ROLR_GMM, gmm_confidence
from ccl.train.methods.base import Parts, Step, TwinMethod


class RoLR(TwinMethod):
    name = "rolr"
    default_warmup = 15  # RoLR.py l.19 (--warm_up 15; the README's command keeps it)

    def __init__(self, cfg, num_classes: int, num_train: int, arch: str, small_input: bool):
        super().__init__(cfg, num_classes, num_train, arch, small_input)
        # The GMM's loss history (RoLR.py l.200-205): each refresh's min-max normalised losses per net, in a ring of
        # `loss_history` slots, and how many refreshes have written to it. Buffers, so a resumed run keeps them.
        self.register_buffer("loss_history", torch.zeros(self.num_nets, cfg.rolr.loss_history, num_train))
        self.register_buffer("history_count", torch.zeros((), dtype=torch.long))

    # -- schedule: each net reads the data `passes_per_net` times per epoch -------------------------------------
    def passes(self, epoch: int) -> int:
        if self.warming_up(epoch):
            return 1
        k = self.cfg.rolr.passes_per_net
        return 2 * k if self.cfg.schedule == "alternate" else k

    def training_nets(self, epoch: int, pass_index: int) -> tuple[int, ...]:
        if self.warming_up(epoch) or self.cfg.schedule == "joint":
            return (0, 1)
        return (pass_index // self.cfg.rolr.passes_per_net,)  # net 0's passes, then net 1's

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

    # -- confidence: the GMM on the (averaged) normalised losses ------------------------------------------------
    @torch.no_grad()
    def confidence_from_losses(self, sample_loss: torch.Tensor) -> torch.Tensor:
        """RoLR.py l.200-212: each net's losses min-max normalised and appended to its history; the GMM (RoLR's
        settings) fits the mean of the last `loss_history` entries (the code averages 5 at 90% noise, else uses
        the current losses alone); each net's w comes from its peer's fit. Normalisation and GMM see the trained
        samples only; a sample held out for validation keeps w = 1."""
        active = self.active
        x = sample_loss[:, active]  # [nets, n_active]
        lo = x.amin(dim=1, keepdim=True)
        span = x.amax(dim=1, keepdim=True) - lo
        normalised = torch.where(span > 0, (sample_loss - lo) / span.clamp_min(1e-30), torch.zeros_like(sample_loss))
        k = self.loss_history.shape[1]
        self.loss_history[:, int(self.history_count) % k] = normalised  # [nets, N] into the oldest slot
        self.history_count += 1
        used = self.loss_history[:, : min(int(self.history_count), k)].mean(dim=1)[:, active]  # [nets, n_active]
        w = torch.ones_like(sample_loss)
        for m in range(self.num_nets):
            peer = (m + 1) % self.num_nets
            w[m, active] = torch.from_numpy(rolr_gmm(used[peer].cpu().numpy(), seed=self.cfg.seed)).to(w)
        return w


def rolr_gmm(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The clean posterior of RoLR's GMM (RoLR.py l.279, l.210-212) fitted to x as given, float32 [N].

    `gmm_confidence` min-max normalises its input first. For the current epoch's losses (already in [0, 1]) that
    changes nothing; a mean over several epochs spans less than [0, 1], and the code fits it unstretched. A GMM fit
    to x' = (x - lo) / s with its covariance floor divided by s^2 has the posteriors of one fit to x (k-means++ and
    EM are affine-equivariant), so the floor is rescaled to keep the code's fit.
    """
    span = float(x.max() - x.min()) if x.size else 0.0
    if span <= 0:
        return np.ones(x.size, dtype=np.float32)
    return gmm_confidence(x, seed=seed, **{**ROLR_GMM, "reg_covar": ROLR_GMM["reg_covar"] / span**2})
