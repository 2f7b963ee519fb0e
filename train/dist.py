"""Data-parallel training under PyTorch's own launcher (`torchrun`): the process group, rank helpers, the
collectives the loop and the methods need, and the DDP wrapper. Without torchrun every function here is a no-op
(or returns its input), so a single process runs exactly as it did before.

What crosses ranks, and why (the loop calls these at fixed points, the same on every rank):

- gradients: `wrap` puts the method in one `DistributedDataParallel`; after every step each rank holds the
  same averaged gradient, so the one Adam keeps the parameters identical.
- per-sample state: each rank writes the losses (or TCL's embeddings) of the samples it read, zeros
  elsewhere; `merge_owned_` sums them, so every rank holds the whole training set's values and fits the same
  GMM. `assert_same` checks the resulting w by hash.
- BatchNorm running statistics: averaged over ranks after an epoch, for the nets that trained in it
  (`average_bn_stats`), unless SyncBatchNorm already keeps them equal. A net that did not train keeps its
  buffers bit for bit.
- evaluation counts (`reduce_accuracy`) and the logged step means (`read_meter`).
- rank 0 alone owns the output: it picks the run directory, reads and writes checkpoints and metrics
  (`rank0_call` hands its result, or its UserError, to every rank, so no rank waits on one that failed).

The contrastive negatives can span the global batch: `global_batch` all-gathers embeddings with a gradient
back to each rank's own rows (SimCLR's cross-replica concatenation); see `TrainConfig.gather_negatives`.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ccl.errors import UserError

BACKENDS = ("auto", "nccl", "gloo")
# A collective that waits longer than this fails instead of hanging: the longest gap between two collectives is
# rank 0 writing a checkpoint or the eval pass, seconds to minutes at WebVision size.
TIMEOUT = timedelta(minutes=int(os.environ.get("CCL_DIST_TIMEOUT_MIN", "15")))


# ----------------------------------------------------------------------------------------------------------------
# Process group and ranks


def launched() -> bool:
    """Started by torchrun (or any launcher that sets its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(backend: str = "auto", device: str = "auto") -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); idempotent.

    NCCL when the run trains on CUDA, gloo on CPU; `backend` overrides. On CUDA each process takes the GPU of its
    local rank (made current, so "cuda" means that GPU everywhere). Ranks > 0 print nothing on stdout: rank 0
    owns the output. Errors and warnings (stderr) still come from every rank.
    """
    if not launched() or active():
        return
    if backend not in BACKENDS:
        raise UserError(f"unknown --dist-backend {backend!r}; expected {', '.join(BACKENDS)}")
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise UserError("--dist-backend nccl needs CUDA; use gloo (the default on CPU)")
    if cuda:
        if device.startswith("cuda:") and int(device.split(":", 1)[1]) != local_rank():
            raise UserError(f"--device {device} under torchrun: each process uses the GPU of its local rank "
                            "(pass --device cuda or auto)")
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=TIMEOUT)
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def rank_seed(seed: int) -> int:
    """The seed of a rank's own random stream (augmentation, mixup): the run's seed on rank 0, so that a single
    process draws as before, and an independent stream derived from (seed, rank) on the others."""
    r = rank()
    return seed if r == 0 else int(np.random.SeedSequence([seed, r]).generate_state(1, np.uint64)[0] >> 1)


def _device() -> torch.device:
    """Where a collective's tensors live: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_object(obj=None):
    """Rank 0's `obj` on every rank (pickled: only our own ranks' objects)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def rank0_call(fn: Callable, *args, **kwargs):
    """fn(*args) on rank 0 alone, its result on every rank; a UserError there is raised on every rank, so a
    mistake that rank 0 finds (a run directory in the way, an unreadable checkpoint) stops all ranks at once."""
    if not active():
        return fn(*args, **kwargs)
    out = None
    if is_main():
        try:
            out = ("ok", fn(*args, **kwargs))
        except UserError as e:
            out = ("error", str(e))
        except BaseException as e:  # a bug of ours: stop the others too, then raise it here with its traceback
            broadcast_object(("error", f"rank 0 failed: {type(e).__name__}: {e}"))
            raise
    kind, value = broadcast_object(out)
    if kind == "error":
        raise UserError(value)
    return value


def local_first(fn: Callable, *args, **kwargs):
    """fn on each node's local rank 0 first, then on the other ranks: for caches that one process builds (the
    digits shards) and the others then find built."""
    if not active():
        return fn(*args, **kwargs)
    out = None
    if local_rank() == 0:
        try:
            out = fn(*args, **kwargs)
        finally:
            dist.barrier()
    else:
        dist.barrier()
        out = fn(*args, **kwargs)
    return out


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Models


def wrap(method: nn.Module, *, sync_bn: bool) -> nn.Module:
    """The module the loop calls for a training step: the method itself, or one DDP around it under torchrun.

    One DDP over the whole method, not one per net, because the method decides inside its forward which nets
    learn and calls them itself (a wrapper per net would have to replace the nets the method owns, and with them
    the checkpoint's keys). The parameters that get a gradient change from step to step: warm-up trains the
    classifiers but not the projection heads, the alternate schedule trains one net per pass with its peer fixed
    (eval mode, no_grad), the joint one trains both. So `find_unused_parameters=True`: DDP walks the step's
    graph, marks the rest ready, and leaves the gradient of a parameter that no rank used at None (the reducer's
    `global_unused`), so Adam skips the fixed peer exactly as in one process (tests/test_dist.py checks it). The
    price: the walk per step, and the fixed peer's gradient buckets are all-reduced as zeros (the alternate
    schedule moves twice the bytes of the joint one).

    `broadcast_buffers=False`: DDP would otherwise copy rank 0's buffers to every rank before every forward:
    the per-sample buffers (O(N), and each rank's own entries would be lost) and the fixed peer's BatchNorm
    statistics. Running statistics are averaged once per epoch instead (`average_bn_stats`). `device_ids=None`:
    the batch is already on this rank's device, and DDP then leaves the inputs alone.
    """
    if sync_bn:
        if not active():
            return method  # one process: SyncBatchNorm would fall back to BatchNorm anyway
        if dist.get_backend() != "nccl":
            raise UserError("--sync-bn needs CUDA and NCCL (PyTorch's SyncBatchNorm has no CPU implementation)")
        nn.SyncBatchNorm.convert_sync_batchnorm(method)  # in place below the top module; keeps the state_dict keys
    if not active():
        return method
    ddp = nn.parallel.DistributedDataParallel
    # Newer PyTorch renames the per-forward buffer sync (the buffers are still broadcast once at construction:
    # all ranks built or loaded the same ones).
    quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
             else {"broadcast_buffers": False})
    return ddp(method, device_ids=None, find_unused_parameters=True, **quiet)


@torch.no_grad()
def average_bn_stats(nets: nn.ModuleList, trained: set[int]) -> None:
    """Average the BatchNorm running mean and variance of the nets in `trained` over ranks (timm's
    `distribute_bn`), so that evaluation, the confidence pass and the checkpoint see one model. Nets outside
    `trained` are left as they are: their statistics did not move this epoch and are already equal on every rank
    (an average of equal values is not always bit-exact). One all-reduce for all of them."""
    if not active():
        return
    bufs = [b for k in sorted(trained) for m in nets[k].modules() if isinstance(m, nn.modules.batchnorm._NormBase)
            for b in (m.running_mean, m.running_var) if b is not None]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).float() for b in bufs])
    dist.all_reduce(flat)
    flat /= world()
    i = 0
    for b in bufs:
        b.copy_(flat[i : i + b.numel()].view_as(b))
        i += b.numel()


# ----------------------------------------------------------------------------------------------------------------
# Per-sample state


@torch.no_grad()
def merge_owned_(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks of a per-sample tensor whose entries are non-zero on at most one rank (each
    rank wrote the samples it read, zeros elsewhere), i.e. every rank's own entries, on every rank. Exact: each
    entry is one value plus zeros."""
    if active():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sum_(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks (e.g. TCL's partial class-centre sums)."""
    if active():
        dist.all_reduce(t)
    return t


def fingerprint(t: torch.Tensor) -> int:
    """A 63-bit hash of a tensor's bytes."""
    data = t.detach().contiguous().cpu().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def assert_same(name: str, t: torch.Tensor) -> None:
    """A broken invariant of ours if the ranks hold different values of `t` (the label confidence w after the
    GMM: every rank fits it on the same all-reduced losses, so any difference is a bug)."""
    if not active():
        return
    hashes = gather_objects(fingerprint(t))
    if len(set(hashes)) != 1:
        raise ValueError(f"{name} differs between ranks (hashes {hashes}): the per-sample state was not merged")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and logging


def reduce_accuracy(acc):
    """The counts of a `ccl.train.metrics.Accuracy` summed over ranks (each evaluated its own part of the split,
    every sample on exactly one rank), so `acc.result()` is the accuracy of the whole split on every rank."""
    if not active():
        return acc
    heads = list(acc.correct)  # the same heads, in the same order, on every rank
    counts = torch.tensor([acc.correct[h][k] for h in heads for k in (1, 5)] + [acc.total], dtype=torch.float64,
                          device=_device())
    dist.all_reduce(counts)
    vals = [int(v) for v in counts.tolist()]
    for i, h in enumerate(heads):
        acc.correct[h] = {1: vals[2 * i], 5: vals[2 * i + 1]}
    acc.total = vals[-1]
    return acc


def read_meter(meter) -> tuple[dict[str, float], bool]:
    """`DeviceMeter.read()` over all ranks: the mean of each logged part over every rank's steps, and whether any
    rank saw a non-finite loss (so that every rank stops together). One all-reduce of one small vector, at the
    meter's own read points; the meter itself keeps its local sums."""
    if not active():
        return meter.read()
    keys = list(meter.sums)
    flat = torch.cat([meter.sums[k].float() for k in keys] + [meter.bad.float().view(1)])
    dist.all_reduce(flat)
    saved = meter.sums, meter.bad
    try:
        i, meter.sums = 0, {}
        for k in keys:
            meter.sums[k] = flat[i : i + len(k)] / world()  # every rank took the same steps: same counts
            i += len(k)
        meter.bad = flat[-1] > 0
        return meter.read()
    finally:
        meter.sums, meter.bad = saved


def sum_numbers(*xs: float) -> list[float]:
    """Host numbers summed over ranks (images seen, decode failures)."""
    if not active():
        return list(xs)
    t = torch.tensor(xs, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Contrastive negatives across ranks


class _GatherWithGrad(torch.autograd.Function):
    """All-gather rows with a gradient to each rank's own rows (SimCLR's cross-replica concatenation).

    Every rank computes its loss from the same global tensor, so the gradient of a rank's rows has a part from
    every rank's loss: backward sums the incoming gradients over ranks and keeps this rank's slice. DDP then
    averages the parameter gradients, which gives the gradient of the mean of the ranks' losses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        r, top = rank(), max(sizes)
        ctx.lo, ctx.hi = sum(sizes[:r]), sum(sizes[: r + 1])
        padded = x.new_zeros((top, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])  # [sum(sizes), ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.lo : ctx.hi], None


def global_batch(*tensors: torch.Tensor) -> tuple:
    """The global batch of per-sample tensors ([n_rank, ...] each, the same n_rank): `(*global tensors, rows)`,
    with `rows` the slice of this rank's samples in them. Float tensors that require a gradient get it back on
    their own rows; the others (labels, classes) are gathered without one.

    The ranks' batch sizes can differ by one on an epoch's last steps, so the sizes are gathered first: one
    small all-gather and one host read per call. Without torchrun: the tensors themselves and slice(0, n).
    """
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError(f"global_batch: tensors of different lengths {[t.shape[0] for t in tensors]}")
    if not active():
        return (*tensors, slice(0, n))
    size = torch.tensor([n], dtype=torch.int64, device=tensors[0].device)
    sizes_t = [torch.empty_like(size) for _ in range(world())]
    dist.all_gather(sizes_t, size)
    sizes = [int(s) for s in torch.cat(sizes_t).tolist()]
    out = []
    for t in tensors:
        if t.requires_grad:
            out.append(_GatherWithGrad.apply(t, sizes))
        else:
            with torch.no_grad():
                out.append(_GatherWithGrad.forward(_Ctx(), t, sizes))
    lo = sum(sizes[: rank()])
    return (*out, slice(lo, lo + n))


class _Ctx:
    """A stand-in for autograd's ctx when a tensor is gathered without a gradient."""


@torch.no_grad()
def clear_owned_(t: torch.Tensor) -> torch.Tensor:
    """Zero a per-sample tensor before the ranks refill their own entries (for `merge_owned_`); a single process
    keeps its values, as before."""
    if active():
        t.zero_()
    return t


# ----------------------------------------------------------------------------------------------------------------
# Checkpointed randomness


def rng_states(state: dict) -> list | None:
    """Every rank's RNG states, for the checkpoint (None in a single process, whose `rng` entry says it all)."""
    return gather_objects(state) if active() else None


def rng_for_rank(checkpoint: dict) -> dict | None:
    """The RNG states this rank continues from: its own when the checkpoint was written by as many processes, else
    None (the world size changed: each rank starts fresh streams, `reseed`)."""
    ranks = checkpoint.get("rng_ranks")
    if ranks is None:
        return checkpoint["rng"] if world() == 1 else None
    return ranks[rank()] if len(ranks) == world() else None


def reseed(rng, seed: int, epoch: int) -> None:
    """Fresh, reproducible streams for (seed, epoch, rank) after a resume on another number of processes."""
    s = int(np.random.SeedSequence([seed, epoch, rank(), world()]).generate_state(1, np.uint64)[0] >> 1)
    import random

    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    rng.device.manual_seed(s)
    rng.host.seed(s)
