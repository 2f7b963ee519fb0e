"""Epoch planning: which samples each rank reads in an epoch and in which batches, and `Loader`, the contract both
loader backends implement on it (`ccl.pipeline.loader` explains why: exact epochs, equal steps on every rank, no
one-sample batch)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from ccl.errors import UserError
from ccl.pipeline.batch import Batch
from ccl.pipeline.decode import resolve_load_size
from ccl.pipeline.scan import Damaged
from ccl.pipeline.shards import ShardSet


def rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice [lo, hi) of an n-long epoch order owned by `rank` (DALI's shard_id/num_shards rule)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def steps_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """Steps every rank takes: enough for the largest rank slice."""
    largest = max(hi - lo for lo, hi in (rank_range(n, r, world_size) for r in range(world_size)))
    return math.ceil(largest / batch_size)


def batch_sizes(n: int, steps: int, batch_size: int) -> list[int]:
    """Sizes of the `steps` batches that hold exactly `n` samples: as many full batches as possible, then the
    rest spread evenly over the remaining steps.

    Usually that is the full batches plus the last partial one. A rank one sample short of the others may
    need one more batch than its samples fill; the rest is then balanced over the last two batches (e.g.
    718 samples in 3 steps of 359: 359, 180, 179). No batch holds a single sample when every batch can
    hold two, because BatchNorm in train mode cannot normalise one sample.
    """
    floor = 2 if n >= 2 * steps else 1
    for full in range(min(n // batch_size, steps), -1, -1):
        rest, tail = n - full * batch_size, steps - full
        if tail == 0:
            if rest == 0:
                return [batch_size] * full
            continue
        if floor * tail <= rest <= batch_size * tail:
            q, r = divmod(rest, tail)
            return [batch_size] * full + [q + 1] * r + [q] * (tail - r)
    raise UserError(
        f"cannot split {n} samples into {steps} non-empty batches of at most {batch_size}: "
        "use a larger batch size or fewer ranks"
    )


def epoch_order(n: int, *, train: bool, seed: int, epoch: int) -> np.ndarray:
    """Global sample order of an epoch: a permutation drawn from (seed, epoch) for training, else 0..n-1."""
    if not train:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def plan_epoch(
    n: int, *, batch_size: int, train: bool, seed: int, epoch: int, rank: int, world_size: int,
    keep: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The index batches rank `rank` reads in `epoch` (the same number of batches on every rank).

    `keep`: the sample indices to read (n of them), when damaged samples are left out; default 0..n-1.
    """
    lo, hi = rank_range(n, rank, world_size)
    mine = epoch_order(n, train=train, seed=seed, epoch=epoch)[lo:hi]
    if keep is not None:
        mine = keep[mine]
    sizes = batch_sizes(hi - lo, steps_per_epoch(n, batch_size, world_size), batch_size)
    return np.split(mine, np.cumsum(sizes)[:-1])


def rechunk(batches: Iterable[Batch], sizes: Sequence[int]) -> Iterator[Batch]:
    """Re-slice a stream of batches into batches of the given sizes (views unless two batches must be joined)."""
    pending: list[Batch] = []
    have = 0
    wanted = iter(sizes)
    want = next(wanted, None)
    for b in batches:
        pending.append(b)
        have += len(b)
        while want is not None and have >= want:
            joined = pending[0] if len(pending) == 1 else cat_batches(pending)
            yield slice_batch(joined, 0, want)
            rest = slice_batch(joined, want, len(joined))
            pending = [rest] if len(rest) else []
            have -= want
            want = next(wanted, None)
    if want is not None or have:
        raise RuntimeError(f"loader produced a different sample count than planned ({have} left over)")


def slice_batch(b: Batch, lo: int, hi: int) -> Batch:
    return Batch(images=b.images[lo:hi], index=b.index[lo:hi], label=b.label[lo:hi], clean=b.clean[lo:hi])


def cat_batches(bs: Sequence[Batch]) -> Batch:
    return Batch(
        images=torch.cat([b.images for b in bs]),
        index=torch.cat([b.index for b in bs]),
        label=torch.cat([b.label for b in bs]),
        clean=torch.cat([b.clean for b in bs]),
    )


class Loader:
    """Iterable over `Batch`es already on `device`; one pass is one epoch of this rank's share of a split.

    Attributes: `num_samples` (samples this rank reads per epoch), `steps` (== len(loader), the same on every
    rank), `epoch` (set by `set_epoch`), and, for the latest pass (reset when a pass starts):
    `skipped_samples`, a list of `ccl.pipeline.scan.Damaged` (split, index, key, shard, reason) records: the
    split's damaged samples found before the first pass (every rank lists them) plus the images this rank
    could not decode; `skipped`, their number.
    """

    num_samples: int
    steps: int
    skipped: int = 0
    epoch: int = 0

    def __init__(
        self,
        shardset: ShardSet,
        split: str,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        seed: int,
        rank: int,
        world_size: int,
        load_size,
        strict: bool,
        damaged: list[Damaged],
        left_out: int = 0,
    ):
        """What both backends share: the options, the decode size, and this rank's share of the epoch.
        `left_out`: readable samples that this loader does not read (outside its `subset`)."""
        self.split, self.train, self.batch_size, self.device = split, train, batch_size, device
        self.seed, self.rank, self.world_size, self.strict = seed, rank, world_size, strict
        self.hw, self.variable = resolve_load_size(shardset.image_size, load_size)
        if strict and damaged:
            d = damaged[0]
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            raise UserError(f"damaged sample: split '{split}' index {d.index} in {d.shard}: {d.reason}{more} "
                            "(run without --strict to skip damaged samples)")
        self.damaged = list(damaged)  # found before the first pass: left out of every epoch
        self.skipped_samples: list[Damaged] = list(self.damaged)
        self.skipped = len(self.skipped_samples)
        n = shardset.count(split) - len(self.damaged) - left_out
        if n < world_size:
            raise UserError(f"split '{split}' has {n} readable samples, fewer than {world_size} ranks")
        lo, hi = rank_range(n, rank, world_size)
        self.num_samples = hi - lo
        self.steps = steps_per_epoch(n, batch_size, world_size)
        # Fail now, not mid-training, if this rank's share cannot be split into `steps` batches.
        self.sizes = batch_sizes(self.num_samples, self.steps, batch_size)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle: the order of a training epoch is a function of (seed, epoch) only."""
        self.epoch = int(epoch)

    def _begin_pass(self) -> None:
        self.skipped_samples = list(self.damaged)
        self.skipped = len(self.skipped_samples)

    def _skip(self, record: Damaged) -> None:
        if self.strict:
            raise UserError(f"corrupt image: split '{record.split}' index {record.index} in {record.shard}: "
                            f"{record.reason} (run without --strict to skip corrupt images)")
        self.skipped_samples.append(record)
        self.skipped += 1

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError
