"""What every method shares: its networks, per-sample state, warm-up, and the interface the loop drives.

A method owns its networks and its per-sample buffers (registered, so they checkpoint with it), and turns one
batch into a loss dict. The loop owns everything else: data, views, precision, optimisers, evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ccl.model import build_nets
from ccl.pipeline.batch import Batch
from ccl.train import losses
from ccl.train.config import TrainConfig
from ccl.train.losses.confidence import gmm_confidence

# (batch, weak view, strong views) -> loss dict; the loop passes the views it made on the device.
Views = tuple[torch.Tensor, list[torch.Tensor]]
# A pass over the training split in index order: yields (batch, view) with the requested view kind.
TrainPass = Callable[[str], Iterable[tuple[Batch, torch.Tensor]]]


class Method(nn.Module):
    name = "base"
    num_nets = 1
    default_warmup = 10
    n_strong = 1  # strong views a training step needs after warm-up

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
        self.generator: torch.Generator | None = None  # the run's RNG for draws inside a step (set by the loop)

    # -- schedule ---------------------------------------------------------------------------------------------
    def warming_up(self, epoch: int) -> bool:
        return epoch < self.warmup

    def phases(self, epoch: int) -> list[tuple[int, ...]]:
        """The passes over the training data this epoch, each naming the nets it updates."""
        return [tuple(range(self.num_nets))]

    def views_needed(self, epoch: int) -> int:
        """How many strong views a step needs (0: the weak view alone)."""
        return 0 if self.warming_up(epoch) else self.n_strong

    # -- training ---------------------------------------------------------------------------------------------
    def step(self, batch: Batch, views: Views, phase: tuple[int, ...], epoch: int) -> dict:
        if self.warming_up(epoch):
            return self.warmup_step(batch, views, phase)
        return self.train_step(batch, views, phase, epoch)

    def warmup_step(self, batch: Batch, views: Views, phase: tuple[int, ...]) -> dict:
        """Plain CE on the weak view for the nets of this phase (the papers' warm-up)."""
        weak, _ = views
        out: dict = {"loss": 0.0}
        for k in phase:
            logits, _ = self.nets[k](weak)
            per_sample = losses.ce(logits.float(), batch.label)  # [N]
            self.record_loss(k, batch.index, per_sample)
            out["loss"] = out["loss"] + per_sample.mean()
            out[f"ce{k}"] = per_sample.mean().detach()
        return out

    def train_step(self, batch: Batch, views: Views, phase: tuple[int, ...], epoch: int) -> dict:
        raise NotImplementedError

    def record_loss(self, k: int, index: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Keep each sample's CE for the inline confidence estimate (no extra pass over the data)."""
        self.sample_loss[k, index] = per_sample.detach().float()

    # -- confidence ---------------------------------------------------------------------------------------------
    def needs_estimate(self, epoch: int) -> bool:
        """Estimate after an epoch whose successor trains with the method's loss."""
        return not self.warming_up(epoch + 1)

    @torch.no_grad()
    def estimate(self, train_pass: TrainPass, inline: bool) -> None:
        """Refresh ``w``: from the losses recorded during the epoch's steps (inline), or from a full pass."""
        if not inline:
            self.full_pass_losses(train_pass)
        self.w.copy_(self.confidence_from_losses(self.sample_loss))
        self.has_w.fill_(True)

    @torch.no_grad()
    def full_pass_losses(self, train_pass: TrainPass) -> None:
        """Per-sample CE of the noisy label under each net, on the configured view, in eval mode."""
        modes = [net.training for net in self.nets]
        self.nets.eval()
        for batch, x in train_pass(self.cfg.confidence_view):
            for k, net in enumerate(self.nets):
                logits, _ = net(x)
                self.record_loss(k, batch.index, losses.ce(logits.float(), batch.label))
        for net, mode in zip(self.nets, modes):
            net.train(mode)

    def confidence_from_losses(self, sample_loss: torch.Tensor) -> torch.Tensor:
        """Eq. 16: each net's confidence comes from its PEER's losses (its own would confirm its own errors)."""
        peer = [(k + 1) % self.num_nets for k in range(self.num_nets)]
        w = [torch.from_numpy(gmm_confidence(sample_loss[p].cpu().numpy(), seed=self.cfg.seed)) for p in peer]
        return torch.stack(w).to(sample_loss)

    # -- evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per net, and of the ensemble (summed logits) when there are several."""
        out = {f"net{k}": net(x)[0].float() for k, net in enumerate(self.nets)}
        if self.num_nets > 1:
            out["ens"] = torch.stack(list(out.values())).sum(0)
        else:
            out["ens"] = out["net0"]
        return out


class TwinMethod(Method):
    """Two nets trained against each other (CCL, RoLR), with the paper's alternate or a joint schedule.

    ``alternate``: each epoch trains net 0 with net 1 fixed (eval mode, no gradient), then the reverse, as in
    Algorithm 1 and RoLR's code: two passes over the data. ``joint``: one pass; both nets forward with gradient
    and each takes its own loss with the peer's outputs detached.
    """

    num_nets = 2

    def phases(self, epoch: int) -> list[tuple[int, ...]]:
        if self.warming_up(epoch) or self.cfg.schedule == "joint":
            return [(0, 1)]
        return [(0,), (1,)]

    def forward_views(self, k: int, weak: torch.Tensor, strong: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward of net k over cat([weak, strong])."""
        n = weak.shape[0]
        logits, z = self.nets[k](torch.cat([weak, strong]))  # [2N, C], [2N, D]
        return {"logits_w": logits[:n].float(), "logits_s": logits[n:].float(), "z_w": z[:n], "z_s": z[n:]}

    @torch.no_grad()
    def peer_views(self, k: int, weak: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fixed peer's weak-view outputs (alternate schedule): eval mode, no gradient."""
        net = self.nets[k]
        mode = net.training
        net.eval()
        logits, z = net(weak)
        net.train(mode)
        return {"logits_w": logits.float(), "z_w": z}

    def train_step(self, batch: Batch, views: Views, phase: tuple[int, ...], epoch: int) -> dict:
        weak, (strong, *_) = views
        if len(phase) == 2:
            outs = [self.forward_views(k, weak, strong) for k in (0, 1)]
            peers = [{key: v.detach() for key, v in o.items()} for o in outs[::-1]]
            shared = self.joint_shared(batch, outs, peers)
            return per_net([self.model_loss(m, batch, outs[m], peers[m], **shared[m]) for m in (0, 1)], (0, 1))
        (m,) = phase
        return per_net([self.model_loss(m, batch, self.forward_views(m, weak, strong), self.peer_views(1 - m, weak))],
                       phase)

    def joint_shared(self, batch: Batch, outs: list[dict], peers: list[dict]) -> list[dict]:
        """Keyword arguments of ``model_loss`` for each net, computed once for both (joint schedule; none here)."""
        return [{}, {}]

    def model_loss(self, m: int, batch: Batch, own: dict, peer: dict) -> dict:
        """Net m's loss dict (``loss`` plus detached parts); records the per-sample CE for the inline estimate."""
        raise NotImplementedError

    def logged(self, m: int, batch: Batch, parts: dict) -> dict:
        """Record the inline per-sample CE and keep the scalar parts for logging."""
        self.record_loss(m, batch.index, parts["per_sample_ce"])
        return {k: (v if k == "loss" else v.detach()) for k, v in parts.items() if v.dim() == 0}


def per_net(results: list[dict], nets: tuple[int, ...]) -> dict:
    """One step's loss dict from the nets' own: the losses summed, every other part suffixed with its net."""
    out: dict = {"loss": sum(r["loss"] for r in results)}
    for m, r in zip(nets, results):
        out |= {f"{key}{m}": v for key, v in r.items() if key != "loss"}
    return out
