"""Out-of-sample predicted probabilities by k-fold cross-validation with the project's own trainer.

Confident learning (cleanlab) needs, for every sample, class probabilities from a model that never trained on
that sample: in-sample probabilities of a network that has memorised its noisy labels would call every label
right. This module obtains them without any change to the trainer:

1. the samples of a split are dealt into k folds, stratified by their given (noisy) label and seeded;
2. for each fold, the other k-1 folds are written as the `train` split of a small shard set of their own and the
   fold itself as its `test` split (the image bytes copied as they are, through `ShardWriter` and a manifest
   derived from the source's). The clean labels are withheld from these sets: nothing the cross-validation
   sees knows the truth;
3. CE is trained on it with `ccl.train.loop.train` (the run's architecture, epochs, batch size, learning rate
   and seed), and its last checkpoint predicts the held-out fold on the eval view.

Each fold's shard set and run live in a temporary folder that is removed as soon as the fold is predicted.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ccl import files
from ccl.errors import UserError
from ccl.pipeline.manifest import MANIFEST
from ccl.pipeline.shards import SampleLocations, ShardSet, sample_locations
from ccl.pipeline.tarshard import ShardWriter


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold id in [0, k) per sample: each class's samples (by given label) shuffled with `seed` and dealt round
    robin, so every fold holds each class in proportion and the fold sizes differ by at most one per class.
    The class deals are chained (each class starts where the previous one stopped), so fold sizes differ by at
    most one overall too."""
    if k < 2:
        raise UserError(f"cross-validation needs at least 2 folds, got {k}")
    labels = np.asarray(labels)
    if k > labels.size:
        raise UserError(f"{k} folds for {labels.size} samples: every fold needs a sample")
    rng = np.random.default_rng(seed)
    fold = np.empty(labels.size, dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(members.size)]
        fold[members] = (start + np.arange(members.size)) % k
        start = (start + members.size) % k
    return fold


def write_subset(src: ShardSet, split: str, parts: dict[str, np.ndarray], out_dir: Path,
                 shard_size: int = 5000, locations: SampleLocations | None = None) -> ShardSet:
    """A shard set in `out_dir` whose splits are the given index subsets of `src`'s `split` (new indices 0..n-1 in
    the order given), with the given labels and no clean labels. Returns it opened. `locations`: the split's
    `sample_locations`, when the caller already has them (one walk of the index files for every fold)."""
    loc = locations if locations is not None else sample_locations(src, split)
    label, _ = src.labels(split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    fds: dict[int, int] = {}
    try:
        for name, idx in parts.items():
            writer = ShardWriter(out_dir, name, shard_size)
            try:
                for new, i in enumerate(np.asarray(idx, dtype=np.int64)):
                    s = int(loc.shard[i])
                    if s not in fds:
                        fds[s] = os.open(loc.tars[s], os.O_RDONLY)
                    data = os.pread(fds[s], int(loc.size[i]), int(loc.offset[i]))
                    writer.write(new, data, loc.ext[i], int(label[i]), -1)
                shards = writer.close()
            except BaseException:
                writer.abort()
                raise
            if not shards:
                raise UserError(f"cross-validation: the {name!r} part of a fold is empty")
            splits[name] = {"count": len(idx), "has_clean": False, "shards": shards}
    finally:
        for fd in fds.values():
            os.close(fd)
    # The source's classes, image size and normalisation; everything about its noise and truth left out.
    manifest = {k: v for k, v in src.manifest.items() if k not in ("noise", "skipped", "num_skipped", "created")}
    manifest |= {"splits": splits, "noise": {"type": "withheld"}, "skipped": [], "num_skipped": 0,
                 "notes": [f"a cross-validation subset of split {split!r} of {src.root.name}"]}
    files.write_json(out_dir / MANIFEST, manifest, indent=1)
    return ShardSet.open(out_dir)


def _cv_config(run, data: Path, out: Path, name: str, epochs: int | None, batch_size: int, workers: int):
    """CE with the run's architecture and optimisation, on one fold's shard set."""
    from ccl.train.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = run.cfg
    values = {"data": str(data), "method": "ce", "arch": cfg.arch, "epochs": int(epochs or cfg.epochs),
              "warmup": 0, "batch_size": batch_size, "workers": workers, "out": str(out), "name": name,
              "seed": cfg.seed}
    # Options that may not exist in every config layout: taken from the run when both sides have them.
    for key in ("optimizer", "lr", "momentum", "weight_decay", "cosine", "lr_ramp", "lr_floor", "lr_decay_epoch",
                "lr_decay", "amp", "device", "backend"):
        if key in fields and hasattr(cfg, key):
            values[key] = getattr(cfg, key)
    if "device" in fields:
        values["device"] = str(run.device)
    return TrainConfig(**values)


@torch.no_grad()
def predict_probs(run, split: str, *, batch_size: int = 256, workers: int = 0) -> np.ndarray:
    """Softmax of the summed logits of the run's nets, float32 [N, C], over a split in index order."""
    from ccl.analysis.inference import iter_logits

    n = run.shards.count(split)
    out = np.zeros((n, run.shards.num_classes), dtype=np.float32)
    for index, _, logits in iter_logits(run, split, batch_size=batch_size, workers=workers):
        out[index.cpu().numpy()] = F.softmax(logits.sum(0), dim=1).cpu().numpy()
    return out


def out_of_sample_probs(run, split: str, *, folds: int = 5, epochs: int | None = None, batch_size: int | None = None,
                        workers: int = 0, work_dir: Path | None = None,
                        log: Callable[[str], None] = lambda s: None) -> tuple[np.ndarray, dict]:
    """Probabilities [N, C] for every sample of the run's `split`, each from a CE model trained without it.

    Returns (probs, info) where info records the folds, epochs, architecture and seconds per fold."""
    from ccl.train.loop import train
    from ccl.train.restore import restore

    given, _ = run.shards.labels(split)
    fold = stratified_folds(given, folds, seed=int(run.cfg.seed))
    probs = np.zeros((given.size, run.shards.num_classes), dtype=np.float32)
    batch_size = int(batch_size or run.cfg.batch_size)
    locations = sample_locations(run.shards, split)
    seconds = []
    with tempfile.TemporaryDirectory(prefix="ccl-cv-", dir=work_dir) as tmp:
        for f in range(folds):
            t0 = time.perf_counter()
            held = np.flatnonzero(fold == f)
            rest = np.flatnonzero(fold != f)
            fold_dir = Path(tmp) / f"fold{f}"
            write_subset(run.shards, split, {"train": rest, "test": held}, fold_dir / "shards", locations=locations)
            cfg = _cv_config(run, fold_dir / "shards", fold_dir / "runs", f"fold{f}", epochs, batch_size, workers)
            summary = train(cfg, progress=False)
            fold_run, _ = restore(Path(summary["run_dir"]) / "checkpoints" / "last.pt", device=str(run.device))
            probs[held] = predict_probs(fold_run, "test", workers=workers)
            del fold_run
            shutil.rmtree(fold_dir, ignore_errors=True)  # a fold's copy of the images is not needed any more
            seconds.append(time.perf_counter() - t0)
            log(f"cross-validation fold {f + 1}/{folds}: trained CE on {rest.size}, predicted {held.size} "
                f"in {seconds[-1]:.0f} s")
    info = {"folds": folds, "epochs": int(epochs or run.cfg.epochs), "arch": run.cfg.arch, "method": "ce",
            "batch_size": batch_size, "seconds_per_fold": seconds}
    return probs, info
