"""DivideMix (Li, Socher and Hoi, ICLR 2020) as LiJunnan1992/DivideMix's Train_CIFAR.py runs it, and DivideMix with
CCL's cross-view and cross-model terms (the CCL paper's Table 5).

The official code, cited as TC:line (Train_CIFAR.py) and DC (dataloader_cifar.py), read for the facts:
- warm-up (TC:124-139, TC:253-258): CE on the weak view, net 1 for a whole epoch, then net 2 over its own shuffle,
  in batches of twice the training batch (DC l.169-173, `run('warmup')`: batch_size * 2). On asymmetric noise
  the negative-entropy penalty is added (TC:132-136). The method cannot see the noise type (the manifest's noise
  record does not reach a method through the interface), so it is the switch `dividemix.warmup_penalty`, off by
  default as for symmetric noise; a recipe or the user sets it.
- co-divide (TC:165-190, TC:261-273): before each epoch past warm-up, each net's per-sample CE on the un-augmented
  training set (eval mode), min-max normalised, is fitted by a 2-component GMM (max_iter=10, tol=1e-2,
  reg_covar=5e-4); a net trains on the division of its PEER's GMM. This is the base class's `refresh` with the
  "eval" view and `LossHistory`'s fit (the same settings). Samples with clean probability w > p_threshold are
  labelled, the rest unlabelled. At 90% noise the code's GMM fits the mean of the last 5 epochs' normalised losses
  (TC:178-181): `dividemix.loss_history` (5 in that setting; 1, this epoch's alone, otherwise), `LossHistory`.
- training (TC:41-113): net m learns with its peer fixed (eval mode), then the reverse: the "alternate" schedule,
  always (DivideMix is defined by it; `--schedule` does not apply). Label co-refinement of the labelled samples,
  co-guessing of the unlabelled ones, MixMatch over both, Lx + ramp(lambda_u) Lu + the uniform-prior penalty:
  the pure functions of `ccl.train.losses.dividemix`.
- evaluation (TC:145-162): the summed logits of both nets, the base class's `eval_logits`.

The batches, as the code draws them (DC l.178-189, TC:45-52): each step takes a labelled batch of `batch_size` from
net m's division and an unlabelled batch of `batch_size` from the rest, and a pass is one exact epoch over the
labelled set (ceil(|L| / B) steps; the last labelled batch may be short), the unlabelled sampler restarting with a
new shuffle when it runs out. Here these are the pass's two `Stream`s: the labelled one keeps the loader's exact-
epoch guarantee (every labelled sample once per pass, on exactly one rank); the unlabelled one draws without
replacement in reshuffled cycles, so an unlabelled sample repeats within a pass only after every other one has been
drawn, and when |U| > |L| some are not drawn at all in that pass (as in the code). Under torchrun both are split by
rank, each rank taking its slice of each permutation. The loop joins the two batches into one, labelled rows first;
the step tells them apart by net m's division (labelled = w[m, index] > p_threshold, the same test that made the
streams), as masks, never as tensors of data-dependent size (no host sync). Lx and Lu are masked means over their
own rows; an empty part (no unlabelled sample) gives exactly 0. With no labelled sample a pass has no step; the
code would fail on an empty unlabelled set, here the steps then hold labelled rows alone. The ramp of lambda_u
advances per step over the code's num_iter = |L| // B + 1 (TC:46, TC:105).

Views: two independent weak views (DivideMix's two augmentations, DC: RandomCrop(32, 4) + flip), and a strong
view when CCL's terms are on: ("weak", "weak") or ("weak", "weak", "strong").

`dividemix.plus` (cvl, cml or both) adds CCL's L_CVL (Eq. 8: PG + ACL + VM) and L_CML (Eq. 13: CE to the peer's
weak prediction + CCLRL + MM). The CCL paper (Table 5 paragraph) says only that it "integrates (L_CVL and L_CML)
into the existing loss function"; where it leaves room we chose:
- the terms are computed exactly as CCL computes them, by the same functions and fused kernel
  (`ccl_contrastive_one`, `cclrl_classes`, `ccl_total`), for net m against its fixed peer, with CCL's settings
  (the `ccl` section: tau, threshold c, sharpen_t, cvl_weight, cml_weight, ablations);
- they are weighted per sample by (1 - w)/2 as in CCL's Eq. 15, with w DivideMix's clean probability (the same
  quantity as CCL's confidence: the peer's GMM posterior), and averaged over the labelled part
  (`dividemix.plus_on=labelled`, default) or over the whole batch (`plus_on=all`, CCL's own reach);
- they are added to DivideMix's loss unchanged: L = Lx + ramp(lambda_u) Lu + L_prior + plus;
- L_CVL contrasts the strong view with the first weak view of net m; L_CML's peer is the fixed peer's first weak
  view; the CCLRL classes are the argmax of w y + (1 - w) p^w_peer (Eq. 10).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ccl.model import eval_mode
from ccl.pipeline.augment import apply_mixup, draw_mixup
from ccl.pipeline.batch import Batch
from ccl.train import dist, losses
from ccl.train.losses import dividemix as dm
from ccl.train.losses.contrastive import ccl_contrastive_one
from ccl.train.methods.base import LossHistory, Method, Parts, Rng, Step, Stream


class DivideMix(LossHistory, Method):
    name = "dividemix"
    num_nets = 2
    default_warmup = 10  # the code's CIFAR-10 warm-up (TC:218-219; 30 for CIFAR-100)
    confidence_view = "eval"  # eval_train reads the training set with the test transform (TC:165-173)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plus = self.cfg.dividemix.plus_terms()
        self._ramp_at = (-1, -1)  # (epoch, pass) the step counter below belongs to
        self._ramp_step = 0  # steps taken in this pass: the code ramps lambda_u per step (TC:105)
        self._num_iter = 1  # the code's num_iter of the current pass, |L| // B + 1 (TC:46), set by `streams`

    def history_length(self) -> int:
        return self.cfg.dividemix.loss_history

    # -- schedule: the alternate one, warm-up included (TC:253-273) -------------------------------------------------
    def passes(self, epoch: int) -> int:
        return 2

    def training_nets(self, epoch: int, pass_index: int) -> tuple[int, ...]:
        return (pass_index,)

    def views(self, epoch: int) -> tuple[str, ...]:
        if self.warming_up(epoch):
            return ("weak",)
        return ("weak", "weak", "strong") if self.plus else ("weak", "weak")

    def streams(self, epoch: int, pass_index: int) -> tuple[Stream, ...]:
        """Warm-up: every trained sample at twice the batch (DC l.169-173). Then net m's division (co-divide by its
        peer's GMM): the labelled samples, an exact epoch at the batch size, and the unlabelled ones, one batch of
        the batch size per step (DC l.178-189). One host read of w per pass."""
        batch = self.cfg.batch_size
        if self.warming_up(epoch):
            return (Stream(batch_size=2 * batch),)
        (m,) = self.training_nets(epoch, pass_index)
        active = self.active.cpu().numpy()
        labelled = (self.w[m] > self.cfg.dividemix.p_threshold).cpu().numpy()
        lab, unlab = np.flatnonzero(active & labelled), np.flatnonzero(active & ~labelled)
        # the code's num_iter for the ramp, over this rank's share of the labelled set (all of it in one process)
        self._num_iter = -(-len(lab) // dist.world()) // batch + 1
        return Stream(lab, batch), Stream(unlab, batch)

    # -- warm-up ------------------------------------------------------------------------------------------------------
    def warmup_step(self, batch: Batch, weak: torch.Tensor, nets: tuple[int, ...]) -> Step:
        """CE on the weak view, plus the negative-entropy penalty when `warmup_penalty` is set (TC:130-136)."""
        parts, loss = Parts(), torch.zeros((), device=batch.label.device)
        for k in nets:
            logits = self.nets[k](weak)[0].float()  # [N, C]
            per_sample = losses.ce(logits, batch.label)  # [N]
            self.record_loss(k, batch.index, per_sample)
            loss = loss + per_sample.mean()
            parts.add(str(k), ce=per_sample.mean())
            if self.cfg.dividemix.warmup_penalty:
                penalty = dm.neg_entropy(logits)
                loss = loss + penalty
                parts.add(str(k), neg_entropy=penalty)
        return parts.step(loss)

    # -- training -----------------------------------------------------------------------------------------------------
    def train_step(self, batch: Batch, views: tuple[torch.Tensor, ...], epoch: int, pass_index: int,
                   rng: Rng | None) -> Step:
        cfg = self.cfg.dividemix
        expected = self.views(epoch)
        if len(views) != len(expected):
            raise ValueError(f"dividemix asked for the views {expected} but got {len(views)} tensors")
        (m,) = self.training_nets(epoch, pass_index)
        x1, x2 = views[0], views[1]  # two weak augmentations, [N, 3, H, W] each
        n, label = x1.shape[0], batch.label
        w = self.w[m, batch.index]  # [N] clean probability of net m's samples, from its peer's GMM (co-divide)
        labelled = w > cfg.p_threshold  # [N] bool; the rest is the unlabelled part

        # The targets (TC:62-84), all under no_grad. Net m in train mode, as the code calls it (net.train()).
        net = self.nets[m]
        own: dict[str, torch.Tensor] = {}
        if self.plus:  # CCL's terms need net m's weak and strong views with their graph
            logits, z = net(torch.cat([x1, views[2]]))  # [2N, C], [2N, D]
            own = {"logits_w": logits[:n].float(), "logits_s": logits[n:].float(), "z_w": z[:n], "z_s": z[n:]}
            with torch.no_grad():
                logits_x2 = net(x2)[0].float()  # [N, C]
            own_logits = torch.stack([own["logits_w"].detach(), logits_x2])  # [2, N, C]
        else:
            with torch.no_grad():
                own_logits = net(torch.cat([x1, x2]))[0].float().view(2, n, -1)  # [2, N, C]
        peer = self.fixed_peer(1 - m, torch.cat([x1, x2]))  # eval mode, no gradient (net2.eval(), TC:43)
        p_own = F.softmax(own_logits, dim=-1)  # [2, N, C]
        p_peer = F.softmax(peer["logits"].view(2, n, -1), dim=-1)  # [2, N, C]
        refined = dm.co_refine(w, label, p_own, cfg.sharpen_t)  # [N, C]
        guessed = dm.co_guess(torch.cat([p_own, p_peer]), cfg.sharpen_t)  # [N, C]
        target = torch.where(labelled[:, None], refined, guessed)  # [N, C]
        self.record_loss(m, batch.index, losses.ce(own_logits[0], label))  # for the inline estimate

        # MixMatch over both parts and both views together (TC:86-111). A mixed row keeps the part of its own
        # sample, the one with weight lam >= 0.5, as the code slices logits[:2B] (labelled) and logits[2B:].
        lam, perm = draw_mixup(2 * n, cfg.alpha, rng.device if rng else None, rng.host if rng else None,
                               device=x1.device)
        mixed = apply_mixup(torch.cat([x1, x2]), lam, perm)  # [2N, 3, H, W]
        target_mix = apply_mixup(torch.cat([target, target]), lam, perm)  # [2N, C]
        logits_mix = net(mixed)[0].float()  # [2N, C]
        mm = dm.mixmatch_losses(logits_mix, target_mix, torch.cat([labelled, labelled]))
        lambda_u = torch.full((), dm.linear_rampup(epoch + self._pass_fraction(epoch, pass_index), self.warmup,
                                                   cfg.lambda_u, cfg.rampup), device=x1.device)  # host value, no read
        prior = losses.div(logits_mix)  # KL(uniform || mean prediction) over the whole mixed batch
        loss = mm["lx"] + lambda_u * mm["lu"] + cfg.prior_weight * prior

        parts = Parts().add(str(m), lx=mm["lx"], lu=mm["lu"], lambda_u=lambda_u, prior=prior,
                            labelled=mm["n_labelled"] / (2 * n))
        if self.plus:
            plus = self.ccl_terms(own, peer, w, label, labelled)
            loss = loss + plus
            parts.add(str(m), plus=plus)
        return parts.step(loss)

    def ccl_terms(self, own: dict, peer: dict, w: torch.Tensor, label: torch.Tensor,
                  labelled: torch.Tensor) -> torch.Tensor:
        """CCL's L_CVL and/or L_CML for net m against its fixed peer, by CCL's own functions, weighted (1 - w)/2
        per sample (Eq. 15) and averaged over the samples `plus_on` names."""
        ccl = self.cfg.ccl
        n = label.shape[0]
        p_own = F.softmax(own["logits_w"].detach(), dim=1)  # [N, C]
        p_peer = F.softmax(peer["logits"][:n], dim=1)  # [N, C] the peer's first weak view
        ablation = dataclasses.replace(ccl.ablations, no_cvl=ccl.ablations.no_cvl or "cvl" not in self.plus,
                                       no_cml=ccl.ablations.no_cml or "cml" not in self.plus)
        classes = losses.cclrl_classes(w, label, p_peer, self.num_classes, ablation)  # [N] (Eq. 10)
        cont = ccl_contrastive_one(own["z_s"], own["z_w"], peer["z"][:n], classes, tau=ccl.tau, impl=self.cfg.kernel)
        out = losses.ccl_total(own["logits_s"], label, w, p_own, p_peer, cont["acl"], cont["vm"], cont["cclrl"],
                               cont["mm"], c=ccl.threshold, ablation=ablation, sharpen_T=ccl.sharpen_t)
        mask = labelled if self.cfg.dividemix.plus_on == "labelled" else torch.ones_like(labelled)
        return dm.plus_loss(out["cvl"], out["cml"], w, mask, cvl_weight=ccl.cvl_weight, cml_weight=ccl.cml_weight)

    @torch.no_grad()
    def fixed_peer(self, k: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fixed peer's outputs on x: eval mode, no gradient."""
        with eval_mode(self.nets[k]):
            logits, z = self.nets[k](x)
        return {"logits": logits.float(), "z": z}

    def _pass_fraction(self, epoch: int, pass_index: int) -> float:
        """batch_idx / num_iter of the code's per-step ramp (TC:105): the steps this pass has taken, counted on the
        host, over the code's num_iter of the pass (`streams`)."""
        if self._ramp_at != (epoch, pass_index):
            self._ramp_at, self._ramp_step = (epoch, pass_index), 0
        fraction = self._ramp_step / self._num_iter
        self._ramp_step += 1
        return fraction
