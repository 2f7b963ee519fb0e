"""The interface between a method and the loop, and what the methods share.

A method is an ``nn.Module`` that owns its networks, its per-sample state and its whole training step, as DINO's
and MoCo v3's modules do. The loop (ccl.train.loop) drives any method through these calls alone:

    views(epoch)                  the views one step needs, in order: ("weak",), ("weak", "strong"), ...
    passes(epoch)                 passes over the training data this epoch (2 for the alternate twin schedule)
    training_nets(epoch, pass)    the nets that learn in a pass (the loop counts each one's steps and images)
    warming_up(epoch)             whether the epoch is a warm-up epoch (logged with it)
    streams(epoch, pass)          the samplers of a pass (`Stream`): by default one, every trained sample once at
                                  the run's batch size; DivideMix draws a labelled and an unlabelled batch per step
    forward(batch, views, epoch, pass_index, rng) -> Step
                                  the loss (with its graph) and a vector of logged parts, kept on the device
    refresh_view(epoch)           after this epoch: None (nothing to refresh), "inline" (from what the steps
                                  recorded), or the view of a pass over the training set in index order
    refresh_between(epoch, pass)  after a pass that is not the epoch's last: None, or the view of a refresh then
    initial_refresh_view()        before the first epoch: None, or the view of a refresh from the initial nets
    refresh(batches)              refresh the label confidence (GMM) or TCL's centres from (batch, view) pairs
    hold_out(mask)                once, before training: the samples held out for validation (never trained on)
    begin_epoch()                 before an epoch's steps, and end_epoch(epoch) after them: the method's
                                  per-sample state and BatchNorm statistics across ranks (under torchrun)
    eval_logits(x)                logits of each net and of the ensemble
    detection(noisy, clean)       how well the label confidence finds the clean labels, when they are known

The loop owns data, views, precision, the one optimiser, evaluation, checkpoints and logging; it knows nothing of
what a method's nets compute or what its confidence is. Besides the calls above it reads a few attributes: `active`
(which samples its samplers draw from), `w` (checked equal on every rank after a refresh), `num_nets` and `nets`
(each net's step and image counts; the nets it compiles and tracks), `warmup` and `default_warmup` (patience counts
from the warm-up's end; a warning when it covers the whole run) and `name` (in a message). A new method is one file
and one registry line.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ccl.model import build_nets, eval_mode
from ccl.pipeline.batch import Batch
from ccl.train import dist, losses
from ccl.train.config import TrainConfig
from ccl.train.losses.confidence import detection_metrics, gmm_confidence, gmm_confidence_as_given


@dataclass
class Rng:
    """The run's randomness inside a step; both checkpoint with the run."""

    device: torch.Generator  # per-sample augmentation draws and permutations, on the training device
    host: random.Random  # scalar draws (mixup's lambda) that need no device round trip


@dataclass(frozen=True)
class Stream:
    """One sampler of a training pass (`Method.streams`).

    The first stream of a pass is an exact epoch over its samples: each once, on exactly one rank (the loader's
    guarantee), and its batches set the pass's steps. Every further stream gives one batch per step: a fresh
    permutation of its samples, split by rank the same way, restarted with a new permutation when it runs out
    (so within a pass a sample repeats only after all the others have been drawn, and samples the pass has no
    step for are left out). The loop joins a step's batches into one `Batch`, the streams' rows in order."""

    subset: np.ndarray | None = None  # the sample indices it draws from (trained samples only); None: all of them
    batch_size: int | None = None  # None: the run's --batch-size


class Step(NamedTuple):
    """What a method's forward returns: the loss, and its logged parts as one detached vector on the device."""

    loss: torch.Tensor  # scalar, with its graph
    logged: torch.Tensor  # float32 [K]: the loss, then the method's parts
    names: tuple[str, ...]  # K names


class Parts:
    """Collects a step's scalar parts for logging (detached, on the device) and makes the `Step`."""

    def __init__(self):
        self.names: list[str] = []
        self.values: list[torch.Tensor] = []

    def add(self, suffix: str = "", **parts: torch.Tensor) -> "Parts":
        for key, v in parts.items():
            self.names.append(f"{key}{suffix}")
            self.values.append(v.detach().float().reshape(()))
        return self

    def step(self, loss: torch.Tensor) -> Step:
        return Step(loss, torch.stack([loss.detach().float(), *self.values]), ("loss", *self.names))


class Method(nn.Module):
    name = "base"
    num_nets = 1
    default_warmup = 10
    train_views: tuple[str, ...] = ("weak", "strong")  # the views a step needs after warm-up

    def __init__(self, cfg: TrainConfig, num_classes: int, num_train: int, arch: str, small_input: bool):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.warmup = cfg.warmup if cfg.warmup is not None else self.default_warmup
        self.nets = build_nets(arch, num_classes, self.num_nets, small_input, cfg.seed)
        # Per-sample state, sized from the manifest and indexed by the sample index every batch carries.
        self.register_buffer("w", torch.ones(self.num_nets, num_train))  # label confidence per net
        self.register_buffer("sample_loss", torch.zeros(self.num_nets, num_train))  # CE of the noisy label
        self.register_buffer("has_w", torch.zeros((), dtype=torch.bool))
        # The samples the method trains on (False: held out for validation); confidence is fitted on these alone.
        self.register_buffer("active", torch.ones(num_train, dtype=torch.bool))

    # -- per-sample state around an epoch ------------------------------------------------------------------------
    def hold_out(self, held: torch.Tensor) -> None:
        """The samples (bool [num_train]) held out for validation: never trained on, and left out of the GMM."""
        self.active.copy_(~held)

    def begin_epoch(self) -> None:
        """Each rank records the losses of its own samples during the epoch (`record_loss`): the others' are
        cleared here, so that `end_epoch` can sum them over ranks."""
        dist.clear_owned_(self.sample_loss)

    def end_epoch(self, epoch: int) -> None:
        """Every rank gets every sample's recorded loss, and the BatchNorm running statistics of the nets that
        trained this epoch are averaged over ranks (SyncBatchNorm keeps them equal by itself)."""
        dist.merge_owned_(self.sample_loss)
        if not self.cfg.sync_bn:
            trained = {k for p in range(self.passes(epoch)) for k in self.training_nets(epoch, p)}
            dist.average_bn_stats(self.nets, trained)

    # -- schedule ---------------------------------------------------------------------------------------------
    def warming_up(self, epoch: int) -> bool:
        return epoch < self.warmup

    def passes(self, epoch: int) -> int:
        return 1

    def training_nets(self, epoch: int, pass_index: int) -> tuple[int, ...]:
        """The nets that learn in this pass; the others stay fixed."""
        return tuple(range(self.num_nets))

    def views(self, epoch: int) -> tuple[str, ...]:
        return ("weak",) if self.warming_up(epoch) else self.train_views

    def streams(self, epoch: int, pass_index: int) -> tuple[Stream, ...]:
        """The samplers of a pass, called once at its start: by default every trained sample at the run's batch."""
        return (Stream(),)

    # -- the step -----------------------------------------------------------------------------------------------
    def forward(self, batch: Batch, views: tuple[torch.Tensor, ...], epoch: int, pass_index: int = 0,
                rng: Rng | None = None) -> Step:
        if self.warming_up(epoch):
            return self.warmup_step(batch, views[0], self.training_nets(epoch, pass_index))
        return self.train_step(batch, views, epoch, pass_index, rng)

    def warmup_step(self, batch: Batch, weak: torch.Tensor, nets: tuple[int, ...]) -> Step:
        """Plain CE on the weak view for the given nets (the papers' warm-up)."""
        parts, loss = Parts(), 0.0
        for k in nets:
            per_sample = losses.ce(self.nets[k](weak)[0].float(), batch.label)  # [N]
            self.record_loss(k, batch.index, per_sample)
            loss = loss + per_sample.mean()
            parts.add(str(k), ce=per_sample.mean())
        return parts.step(loss)

    def train_step(self, batch: Batch, views: tuple[torch.Tensor, ...], epoch: int, pass_index: int,
                   rng: Rng | None) -> Step:
        raise NotImplementedError

    def record_loss(self, k: int, index: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Keep each sample's CE for the inline confidence estimate (no extra pass over the data)."""
        self.sample_loss[k, index] = per_sample.detach().float()

    # -- confidence ---------------------------------------------------------------------------------------------
    confidence_view = "strong"

    def refresh_view(self, epoch: int) -> str | None:
        """Refresh after an epoch whose successor trains with the method's loss."""
        if self.warming_up(epoch + 1):
            return None
        return "inline" if self.cfg.confidence == "inline" else self.confidence_view

    def refresh_between(self, epoch: int, pass_index: int) -> str | None:
        """A refresh between two passes of one epoch (after pass ``pass_index``): none by default."""
        return None

    def initial_refresh_view(self) -> str | None:
        """The view of a refresh before the first epoch, from the initial networks (not on resume): none by default."""
        return None

    @torch.no_grad()
    def refresh(self, batches: Iterable[tuple[Batch, torch.Tensor]] | None) -> None:
        """Refresh ``w``: each net's per-sample CE of the noisy label over ``batches`` in eval mode (None for the
        inline estimate, which uses the losses the epoch's steps recorded), then the GMM.

        Under torchrun each rank's pass reads its own part of the training set: the losses of the others' samples
        are zeroed first and summed over ranks after, so every rank fits the GMM on the whole set. (The inline
        losses were merged by `end_epoch` already.)"""
        full_pass = batches is not None
        if full_pass:
            dist.clear_owned_(self.sample_loss)
        with eval_mode(self.nets):
            for batch, x in batches or ():
                for k, net in enumerate(self.nets):
                    self.record_loss(k, batch.index, losses.ce(net(x)[0].float(), batch.label))
        if full_pass:
            dist.merge_owned_(self.sample_loss)
        self.w.copy_(self.confidence_from_losses(self.sample_loss))
        self.has_w.fill_(True)

    def confidence_from_losses(self, sample_loss: torch.Tensor) -> torch.Tensor:
        """Eq. 16: each net's confidence comes from its PEER's losses (its own would confirm its own errors).
        The GMM sees the active samples only; a held-out sample keeps w = 1."""
        peer = [(k + 1) % self.num_nets for k in range(self.num_nets)]
        active = self.active.cpu().numpy()
        w = torch.ones_like(sample_loss)
        for k, p in enumerate(peer):
            w[k, self.active] = torch.from_numpy(gmm_confidence(sample_loss[p].cpu().numpy()[active],
                                                                seed=self.cfg.seed)).to(w)
        return w

    def detection(self, noisy, clean) -> dict[str, float]:
        """Precision, recall and AUROC of each net's w as a detector of clean labels ({} before the first refresh)."""
        if not bool(self.has_w):
            return {}
        out, active = {}, self.active.cpu().numpy()
        for k in range(self.num_nets):
            det = detection_metrics(self.w[k].cpu().numpy()[active], noisy[active], clean[active])
            out |= {f"net{k}_{key}": v for key, v in det.items()}
        return out

    # -- evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per net, and of the ensemble (summed logits) when there are several."""
        out = {f"net{k}": net(x)[0].float() for k, net in enumerate(self.nets)}
        out["ens"] = torch.stack(list(out.values())).sum(0) if self.num_nets > 1 else out["net0"]
        return out


class LossHistory:
    """A mixin for `Method`s whose GMM fits a loss history, as RoLR's and DivideMix's code do (chenmc1996/Robust-LR
    RoLR.py l.200-212; LiJunnan1992/DivideMix Train_CIFAR.py l.175-189): each refresh min-max normalises each net's
    losses and appends them to its history; the GMM fits the mean of the last `history_length()` entries (the codes
    average 5 at 90% noise, else use the current losses alone), unstretched; each net's w comes from its peer's fit.
    Normalisation and GMM see the trained samples only; a sample held out for validation keeps w = 1."""

    def history_length(self) -> int:
        raise NotImplementedError

    def __init__(self, cfg, num_classes: int, num_train: int, arch: str, small_input: bool):
        super().__init__(cfg, num_classes, num_train, arch, small_input)
        # Each refresh's normalised losses per net in a ring of `history_length()` slots, and how many refreshes
        # have written to it. Buffers, so a resumed run keeps them.
        self.register_buffer("loss_history", torch.zeros(self.num_nets, self.history_length(), num_train))
        self.register_buffer("history_count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def confidence_from_losses(self, sample_loss: torch.Tensor) -> torch.Tensor:
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
            w[m, active] = torch.from_numpy(gmm_confidence_as_given(used[peer].cpu().numpy(),
                                                                    seed=self.cfg.seed)).to(w)
        return w


class TwinMethod(Method):
    """Two nets trained against each other (CCL, RoLR), with the paper's alternate or a joint schedule.

    ``alternate``: each epoch trains net 0 with net 1 fixed (eval mode, no gradient), then the reverse, as in
    Algorithm 1 and RoLR's code: two passes over the data. ``joint``: one pass; both nets forward with gradient
    and each takes its own loss with the peer's outputs detached. Warm-up trains both nets in one pass.
    A subclass writes `twin_loss`, which sees the nets that learn this pass and their peers' detached outputs.
    """

    num_nets = 2

    @property
    def confidence_view(self) -> str:
        return getattr(self.cfg, self.name).confidence_view

    def passes(self, epoch: int) -> int:
        return 2 if self.cfg.schedule == "alternate" and not self.warming_up(epoch) else 1

    def training_nets(self, epoch: int, pass_index: int) -> tuple[int, ...]:
        return (0, 1) if self.passes(epoch) == 1 else (pass_index,)

    def train_step(self, batch, views, epoch, pass_index, rng) -> Step:
        weak, strong = views
        own = {m: self.forward_views(m, weak, strong) for m in self.training_nets(epoch, pass_index)}
        peer = {m: _detached(own[1 - m]) if 1 - m in own else self.fixed_peer(1 - m, weak) for m in own}
        return self.twin_loss(batch, own, peer)

    def twin_loss(self, batch: Batch, own: dict[int, dict], peer: dict[int, dict]) -> Step:
        """The step's loss from ``own[m]`` (outputs with gradient of each net m that learns) and ``peer[m]``
        (its peer's outputs, detached)."""
        raise NotImplementedError

    def forward_views(self, k: int, weak: torch.Tensor, strong: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward of net k over cat([weak, strong])."""
        n = weak.shape[0]
        logits, z = self.nets[k](torch.cat([weak, strong]))  # [2N, C], [2N, D]
        return {"logits_w": logits[:n].float(), "logits_s": logits[n:].float(), "z_w": z[:n], "z_s": z[n:]}

    @torch.no_grad()
    def fixed_peer(self, k: int, weak: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fixed peer's weak-view outputs (alternate schedule): eval mode, no gradient."""
        with eval_mode(self.nets[k]):
            logits, z = self.nets[k](weak)
        return {"logits_w": logits.float(), "z_w": z}


def _detached(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: v.detach() for key, v in outputs.items()}
