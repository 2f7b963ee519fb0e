"""Loaders: shards in, uint8 `Batch`es on the training device out, with exact epochs.

Two backends share one contract (see `make_loader`):

- ``torch``: an *indexed* reader. The DALI index files written next to every tar give each sample's byte
  offset, so a DataLoader worker reads an image with one `os.pread` and decodes it to uint8 CHW with
  torchvision. The order of an epoch is a permutation of all sample indices drawn from (seed, epoch); every
  rank computes the same permutation and takes its own contiguous slice of it.
- ``dali``: `fn.readers.webdataset` + `fn.decoders.image` (``ccl.pipeline.dali``).

Why an indexed reader rather than a streaming WebDataset (shard shuffle + shuffle buffer)? Exact epochs.
A streaming reader splits *shards* over rank x worker, so it needs at least that many shards, gives ranks
unequal sample counts whenever shards differ in size (the last one always does), and makes `with_epoch`
count per worker; padding or truncating to equalise the ranks then breaks "every sample exactly once",
which the per-sample GMM buffers rely on. Random access by index makes the split per *sample*:

- one process: every sample exactly once per epoch, the last partial batch kept;
- R ranks: rank r reads slice [N*r/R, N*(r+1)/R) of the epoch's permutation, so each sample is on exactly
  one rank and the rank sizes differ by at most one. All ranks take the same number of steps: in the rare
  case where a short rank would need one step fewer, its tail is spread over one more batch. No sample is
  repeated or dropped, so no padding mask is needed; the cost is that the last step's batch sizes differ
  slightly between ranks.
- No batch is a single sample when avoidable (the tail is balanced instead), because BatchNorm in train
  mode cannot normalise one sample.
- The shuffle is a true global permutation (better than a shuffle buffer); reads are random within the tar
  files, which is cheap on local disks and page cache, the place the shards are meant to live.

Worker processes do no random draws (augmentation happens on the device), so the batches are a pure
function of (shards, seed, epoch, rank, world size), whatever the number of workers.

Damaged data (docs: `ccl.pipeline.shards`). Before the first batch, `make_loader` has the split scanned once
per ShardSet: the sha256 of every tar and index file, index against tar, both copies of every sample's labels,
and every image's structure. A damaged shard is a UserError then; a damaged sample is left out of the epoch
plans (so batches stay full and ranks stay equal) and reported every pass in `Loader.skipped_samples` (split,
index, key, shard, reason) and `Loader.skipped`, or is a UserError under ``strict=True``.

Decoding is isolated (torch backend): each DataLoader worker (or the main process, without workers) hands its
batches to a child process that decodes into shared memory. If a decoder crashes or hangs on an image, only
that child dies: the image is skipped and reported, a new child takes the rest of the batch, the epoch goes on.
The structure check already keeps every image libpng or libjpeg refuses from the decoders, so this is the
second line, for what it cannot foresee. A batch whose every image failed is dropped (under DDP its rank takes
one step fewer, acceptable only because such shards are broken anyway).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ccl.errors import UserError
from ccl.pipeline.batch import Batch
from ccl.pipeline.decode import IsolatedDecoder, decode_items
from ccl.pipeline.plan import Loader, batch_sizes, plan_epoch, rank_range, steps_per_epoch
from ccl.pipeline.scan import Damaged, SplitScan
from ccl.pipeline.shards import ShardSet
from ccl.pipeline.tarshard import sample_key

BACKENDS = ("torch", "dali")

# ---------------------------------------------------------------------------------------------------------------
# Shard index: where each sample's image bytes live


class ShardIndex:
    """Per-sample location (shard, byte offset, byte size) and labels of one split, in index order, from the
    split's scan (`ShardSet.scan`, which checks the data first: see the module docstring)."""

    def __init__(self, shardset: ShardSet, split: str, verify: bool = True):
        scan: SplitScan = shardset.scan(split, verify=verify)
        self.paths = [str(t) for t in shardset.shards(split)]
        self.shard, self.offset, self.size = scan.shard, scan.offset, scan.size
        self.label, self.clean = scan.label, scan.clean
        self.damaged: list[Damaged] = scan.damaged
        self.verified = scan.verified  # images already structure-checked: the readers need not do it again
        bad = np.fromiter((d.index for d in scan.damaged), dtype=np.int64, count=len(scan.damaged))
        self.keep = np.setdiff1d(np.arange(len(self.shard), dtype=np.int64), bad)  # the samples an epoch reads

    def __len__(self) -> int:
        return len(self.shard)

class _BatchReader(Dataset):
    """Reads and decodes a whole batch per call (the sampler yields index arrays), in a DataLoader worker.

    Returns (batch, failures) with failures a list of (index, reason), so the main process can report skips
    and raise a clean UserError under strict, instead of a worker traceback.
    """

    def __init__(self, index: ShardIndex, hw: tuple[int, int], variable: bool, split: str, max_batch: int,
                 isolate: bool = True):
        self.index, self.hw, self.variable, self.split = index, hw, variable, split
        self.max_batch, self.isolate = max_batch, isolate
        self.validate = not index.verified  # unverified bytes are checked image by image, as they are read
        self._pid = -1
        self._fds: dict[int, int] = {}
        self._decoder: IsolatedDecoder | None = None  # made in the process that reads (after the fork)

    def _ready(self) -> None:
        if self._pid != os.getpid():
            self._fds, self._decoder, self._pid = {}, None, os.getpid()
            if self.isolate:
                self._decoder = IsolatedDecoder(self.index.paths, self.hw, self.variable, self.validate,
                                                self.max_batch)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, ids: np.ndarray) -> tuple[Batch, list[tuple[int, str]]]:
        ix = self.index
        self._ready()
        ids = np.asarray(ids, dtype=np.int64)  # [N]
        items = [(int(ix.shard[i]), int(ix.offset[i]), int(ix.size[i])) for i in ids]
        if self._decoder is not None:
            images, failed = self._decoder.decode(items)  # [N, 3, H, W]
        else:
            images = torch.empty((len(ids), 3, *self.hw), dtype=torch.uint8)
            failed = decode_items(items, ix.paths, self.hw, self.variable, self.validate, images, 0, fds=self._fds)
        failures = [(int(ids[j]), why) for j, why in failed]
        if failed:
            keep = np.setdiff1d(np.arange(len(ids)), [j for j, _ in failed])
            # numpy, not torch indexing: no OpenMP region in a process that may be a fork of a threaded one
            images, ids = torch.from_numpy(images.numpy()[keep]), ids[keep]
        batch = Batch(
            images=images,
            index=torch.from_numpy(ids),
            label=torch.from_numpy(ix.label[ids]),
            clean=torch.from_numpy(ix.clean[ids]),
        )
        return batch, failures

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


class _EpochBatches(Sampler):
    """Yields the index batches of epoch `self.epoch`. It runs in the main process, so `set_epoch` takes
    effect with persistent workers too. (It holds the plan's parameters, not the loader: a reference cycle
    through the DataLoader makes its persistent workers shut down by timeout, 5 s each.)"""

    def __init__(self, keep: np.ndarray, *, batch_size: int, train: bool, seed: int, rank: int, world_size: int):
        self.keep, self.n = keep, len(keep)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def plan(self) -> list[np.ndarray]:
        return plan_epoch(
            self.n,
            batch_size=self.batch_size,
            train=self.train,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            keep=self.keep,
        )

    def __iter__(self):
        return iter(self.plan() if self.n >= self.world_size else [])  # too few samples for the ranks: none

    def __len__(self) -> int:
        return steps_per_epoch(self.n, self.batch_size, self.world_size) if self.n >= self.world_size else 0


def _identity(x):
    return x


# ---------------------------------------------------------------------------------------------------------------
# Loaders


class TorchLoader(Loader):
    """The ``torch`` backend: indexed reads + torchvision decoding in DataLoader workers (module docstring)."""

    def __init__(
        self,
        shardset: ShardSet,
        split: str,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        num_workers: int,
        seed: int,
        rank: int,
        world_size: int,
        load_size,
        strict: bool,
        verify: bool = True,
        isolate: bool = True,
        subset: np.ndarray | None = None,
    ):
        self.index = ShardIndex(shardset, split, verify=verify)
        keep = self.index.keep if subset is None else np.intersect1d(self.index.keep, np.asarray(subset, np.int64))
        super().__init__(shardset, split, batch_size=batch_size, train=train, device=device, seed=seed, rank=rank,
                         world_size=world_size, load_size=load_size, strict=strict, damaged=self.index.damaged,
                         left_out=len(self.index.keep) - len(keep))
        self.epoch = 0
        self._shard_names = [os.path.basename(p) for p in self.index.paths]
        workers = max(0, int(num_workers))
        self._sampler = _EpochBatches(
            keep, batch_size=batch_size, train=train, seed=seed, rank=rank, world_size=world_size
        )
        self._dl = DataLoader(
            _BatchReader(self.index, self.hw, self.variable, split, max_batch=batch_size, isolate=isolate),
            batch_size=None,  # the sampler yields whole index batches; the reader builds the Batch
            sampler=self._sampler,
            collate_fn=_identity,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,  # keep open files and skip the re-fork every epoch
            prefetch_factor=4 if workers > 0 else None,
        )

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._sampler.epoch = self.epoch

    def select(self, subset: np.ndarray) -> None:
        """Read only these sample indices from the next pass on (a method's sampler over part of the split, e.g.
        DivideMix's labelled samples), with the same exact-epoch guarantee over them. Fewer samples than ranks (none
        included) give a pass of no steps on every rank. The workers stay: the sampler runs in this process."""
        keep = np.intersect1d(self.index.keep, np.asarray(subset, np.int64))
        n = len(keep)
        self._sampler.keep, self._sampler.n = keep, n
        lo, hi = rank_range(n, self.rank, self.world_size)
        self.num_samples = hi - lo if n >= self.world_size else 0
        self.steps = len(self._sampler)
        self.sizes = batch_sizes(self.num_samples, self.steps, self.batch_size) if self.steps else []

    def plan(self) -> list[np.ndarray]:
        """The index batches this rank reads in the current epoch."""
        return self._sampler.plan()

    def __iter__(self) -> Iterator[Batch]:
        self._begin_pass()
        for batch, failures in self._dl:
            for i, why in failures:
                self._skip(Damaged(self.split, i, sample_key(i), self._shard_names[int(self.index.shard[i])], why))
            if len(batch) == 0:
                continue
            yield batch.to(self.device, non_blocking=True)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised (arguments, if given, must agree), else the
    arguments, else a single process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        got = (dist.get_rank(), dist.get_world_size())
        if (rank is not None and rank != got[0]) or (world_size is not None and world_size != got[1]):
            raise UserError(f"rank/world_size {rank}/{world_size} disagree with torch.distributed's {got[0]}/{got[1]}")
        return got
    rank = 0 if rank is None else int(rank)
    world_size = 1 if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
    return rank, world_size


def make_loader(
    shardset: ShardSet,
    split: str,
    *,
    backend: str = "torch",
    batch_size: int,
    train: bool,
    device,
    num_workers: int = 2,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    load_size=None,
    strict: bool = False,
    checksum: bool | None = None,
    subset: np.ndarray | None = None,
) -> Loader:
    """A loader over `split` of a `ccl.pipeline.shards.ShardSet`.

    train=True: a new permutation every epoch (call `set_epoch`); every readable sample exactly once per epoch,
    on exactly one rank; all ranks take `len(loader)` steps. train=False: index order, no randomness; with
    several ranks an eval split is split too, in contiguous index ranges (all-gather the results, or pass
    world_size=1 to read the whole split on every rank). Rank and world size come from torch.distributed
    when it is initialised (the arguments, if given, must agree), else from the arguments.
    Images are decoded to uint8 [3, H, W] at `load_size` (default: the manifest's image size, or 224 with a
    256-short-side resize and centre crop when the set's sizes vary).

    Before anything is read the split is scanned (`ShardSet.scan`, once per ShardSet): a missing, truncated or
    changed shard or index file is a UserError here rather than a failure mid-epoch; damaged samples are left
    out and reported in `loader.skipped_samples` (`strict`: a UserError instead). The scan reads every byte
    (seconds for CIFAR, about a minute for WebVision on fast disks). `checksum=False` (default True) skips it
    for the torch backend, which then checks each image's structure as it reads it; the dali backend always
    scans, since its decoder cannot skip an image and some damage crashes it.

    `subset`: read only these sample indices of the split (a held-out validation part, or the rest of it);
    the torch backend only.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown loader backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if int(batch_size) < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    splits = shardset.manifest.get("splits", {})
    if split not in splits:
        raise UserError(f"{shardset.root}: no split '{split}' (the shards have: {', '.join(splits)})")
    verify = True if checksum is None else bool(checksum)
    if backend == "dali" and not verify:
        raise UserError("the dali backend needs the checksum scan (its decoder cannot skip a damaged image); "
                        "use the torch backend to train without it")
    rank, world_size = resolve_rank(rank, world_size)
    if shardset.count(split) < world_size:
        raise UserError(f"split '{split}' has {shardset.count(split)} samples, fewer than {world_size} ranks")
    kwargs = dict(
        batch_size=int(batch_size),
        train=bool(train),
        device=torch.device(device),
        num_workers=num_workers,
        seed=int(seed),
        rank=rank,
        world_size=world_size,
        load_size=load_size,
        strict=bool(strict),
    )
    if backend == "dali":
        if subset is not None:
            raise UserError("a validation split (--val-fraction) needs the torch backend; the dali backend reads "
                            "whole shards")
        from ccl.pipeline.dali import DaliLoader  # imported lazily: DALI is optional and slow to import

        return DaliLoader(shardset, split, **kwargs)
    return TorchLoader(shardset, split, verify=verify, subset=subset, **kwargs)
