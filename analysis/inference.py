"""A finished run's networks put to work: the checkpoint a run path names, and their logits over a split.

Shared by `ccl labels` (its table and the cross-validation behind its cleanlab comparison), `ccl export` and
`ccl analyze`. `ccl predict` reads images that are not a split, and has its own pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ccl.errors import UserError


def resolve_checkpoint(run: Path, which: str = "last", *, file_ok: bool = True) -> Path:
    """RUN (a run directory: its checkpoints/WHICH.pt, last or best) or, with `file_ok`, a checkpoint file.
    `ccl analyze` reads more of the run directory than its checkpoint, so it asks for the directory alone."""
    run = Path(run)
    if file_ok and run.is_file():
        return run
    if not run.exists():
        alt = ", or a checkpoint file" if file_ok else ""
        raise UserError(f"run not found: {run} (expected a run directory such as runs/NAME{alt})")
    if not run.is_dir():
        raise UserError(f"{run} is not a run directory (expected a directory such as runs/NAME)")
    ck = run / "checkpoints" / f"{which}.pt"
    if not ck.is_file():
        why = ("its first epoch never finished" if which == "last" else
               "it chose no best epoch (best.pt needs a held-out part: --val-fraction)")
        raise UserError(f"{run} has no checkpoints/{which}.pt: not a run directory, or {why}")
    return ck


def iter_logits(run, split: str, *, batch_size: int = 256, workers: int = 0) -> Iterator[tuple]:
    """(index [B], label [B], logits [K, B, C]) per batch of a split, in index order, on the eval view (fp16 on
    CUDA, float32 on the CPU). A split with samples the loader could not read stops with one line once the pass is
    over."""
    from ccl.pipeline.loader import make_loader

    loader = make_loader(run.shards, split, batch_size=batch_size, train=False, device=run.device,
                         num_workers=workers)
    cuda = run.device.type == "cuda"
    nets = run.method.nets
    nets.eval()
    seen = torch.zeros(run.shards.count(split), dtype=torch.bool)
    with torch.no_grad():
        for batch in loader:
            x = run.aug.eval_view(batch.images)
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                logits = torch.stack([net(x)[0].float() for net in nets])  # [K, B, C]
            seen[batch.index.cpu()] = True
            yield batch.index, batch.label, logits.float()
    if not bool(seen.all()):
        raise UserError(f"split {split!r}: {int((~seen).sum())} samples could not be read (corrupt images?)")
