"""A finished run's networks put to work: the checkpoint a run path names, and their logits over a split.

Shared by `ccl labels`, the cross-validation behind its cleanlab comparison, and `ccl predict`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ccl.errors import UserError


def resolve_checkpoint(run: Path) -> Path:
    """RUN (a run directory: its checkpoints/last.pt) or a checkpoint file."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise UserError(f"run not found: {run} (expected a run directory such as runs/NAME, or a checkpoint file)")
    ck = run / "checkpoints" / "last.pt"
    if not ck.is_file():
        raise UserError(f"{run} has no checkpoints/last.pt: not a run directory, or its first epoch never finished")
    return ck


def iter_logits(run, split: str, *, batch_size: int = 256, workers: int = 0) -> Iterator[tuple]:
    """(index [B], label [B], logits [K, B, C]) per batch of a split, in index order, on the eval view."""
    from ccl.pipeline.loader import make_loader

    loader = make_loader(run.shards, split, batch_size=batch_size, train=False, device=run.device,
                         num_workers=workers)
    view = getattr(run.aug, "eval_view", None) or run.aug.eval
    nets = run.method.nets
    nets.eval()
    cuda = run.device.type == "cuda"
    with torch.no_grad():
        for batch in loader:
            x = view(batch.images)
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                logits = torch.stack([net(x)[0].float() for net in nets])  # [K, B, C]
            yield batch.index, batch.label, logits.float()
