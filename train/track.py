"""Networks -> arrays: each net's logits and embedding over a split, and the light tracking hook for training.

Embedding spaces: ``backbone`` is the penultimate feature f(x) of the paper's notation (theta = g(f(x)); every
method trains it, CE and RoLR included), ``head`` the L2-normalised projection z that CCL's and TCL's contrastive
terms act on (untrained in CE and RoLR, which never use it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ccl.model import eval_mode
from ccl import contamination as M

SPACES = ("backbone", "head")


@torch.no_grad()
def forward_arrays(nets: nn.ModuleList, images: Iterable[torch.Tensor], space: str = "backbone",
                   on_batch: Callable[[], None] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per net: logits [N, C] and embeddings [N, D] (float32) of the eval-view batches, nets in eval mode.

    The backbone feature is caught with a forward hook during the one ``net(x)`` call, so the backbone runs once
    and the network's own forward stays the only definition of how logits and z are made.
    """
    if space not in SPACES:
        raise ValueError(f"unknown embedding space {space!r}")
    caught: list[torch.Tensor] = []
    hooks = [net.backbone.register_forward_hook(lambda m, i, o: caught.append(o)) for net in nets] \
        if space == "backbone" else []
    logits: list[list[np.ndarray]] = [[] for _ in nets]
    embeds: list[list[np.ndarray]] = [[] for _ in nets]
    with eval_mode(nets), _removing(hooks):
        for x in images:
            for k, net in enumerate(nets):
                caught.clear()
                lg, z = net(x)  # [B, C], [B, D]
                e = torch.flatten(caught[-1], 1) if space == "backbone" else z  # [B, d] or [B, D]
                logits[k].append(lg.float().cpu().numpy())
                embeds[k].append(e.float().cpu().numpy())
            if on_batch:
                on_batch()
    return [np.concatenate(v) for v in logits], [np.concatenate(v) for v in embeds]


def track(nets: nn.ModuleList, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, num_pairs: int = 2000,
          seed: int = 0, space: str = "backbone") -> dict[str, float]:
    """The contamination measures cheap enough to log during training, on a fixed subset of a split.

    ``batches`` yields (eval-view images [B, 3, H, W], true labels [B]); `TrackSet.batches` makes them. Returns
    ``track_var_entropy`` (mean over nets, Fig. 2b) and ``track_var_entropy_net{k}``, and for two nets
    ``track_m_embed`` (cross-fitted, Eq. 4) and ``track_m_logit`` (Fig. 3). Nets are left in the mode they had.
    """
    labels: list[np.ndarray] = []

    def images() -> Iterator[torch.Tensor]:
        for x, y in batches:
            labels.append(y.cpu().numpy())
            yield x

    logits, emb = forward_arrays(nets, images(), space)
    y = np.concatenate(labels)
    num_classes = logits[0].shape[1]
    out: dict[str, float] = {}
    for k, e in enumerate(emb):
        out[f"track_var_entropy_net{k}"] = M.variance_entropy(M.class_variances(e, y, num_classes))[0]
    out["track_var_entropy"] = float(np.mean([out[f"track_var_entropy_net{k}"] for k in range(len(emb))]))
    if len(nets) == 2:
        out["track_m_embed"] = M.m_embed(emb[0], emb[1], num_pairs=num_pairs, seed=seed)
        out["track_m_logit"] = M.m_logit(logits[0], logits[1])
    return out


class TrackSet:
    """A fixed, seeded subset of one split, kept as uint8 images on the device, for `track` every few epochs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images  # [N, 3, H, W] uint8
        self.labels = labels  # [N] int64, the true label where known

    @classmethod
    def from_shards(cls, shards, split: str = "test", size: int = 512, seed: int = 0, device="cpu") -> "TrackSet":
        from ccl.pipeline.loader import make_loader

        n = shards.count(split)
        keep = np.zeros(n, dtype=bool)
        keep[np.random.default_rng(seed).choice(n, size=min(size, n), replace=False)] = True
        images, labels = [], []
        for b in make_loader(shards, split, batch_size=256, train=False, device=device, num_workers=0):
            sel = torch.from_numpy(keep[b.index.cpu().numpy()]).to(b.images.device)
            images.append(b.images[sel])
            labels.append(torch.where(b.clean >= 0, b.clean, b.label)[sel])
        return cls(torch.cat(images), torch.cat(labels))

    def batches(self, eval_view: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256):
        for i in range(0, len(self.labels), batch_size):
            yield eval_view(self.images[i : i + batch_size]), self.labels[i : i + batch_size]


@contextlib.contextmanager
def _removing(hooks):
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
