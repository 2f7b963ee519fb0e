"""The one training loop, a generic driver: data -> device views -> the method's step -> one optimiser; per epoch
the method's refresh (GMM, centres), evaluation, metrics and the checkpoint.

It knows nothing of what a method's nets compute or of its label confidence: a method supplies its step, its
samplers and its per-sample state (kept across ranks by its `begin_epoch` / `end_epoch`) through the interface in
`ccl.train.methods.base`, which lists the few attributes the loop reads (`method.active` points its samplers at the
trained samples). The step's logged parts stay on the device; the host reads them once per `log_every` steps and
once at the end of each epoch.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ccl.errors import Stop, UserError
from ccl.model import ARCHS, auto_arch, eval_mode, memory_format
from ccl.pipeline.augment import Augment
from ccl.pipeline.batch import Batch
from ccl.pipeline.loader import make_loader
from ccl.pipeline.plan import cat_batches
from ccl.pipeline.scan import Damaged
from ccl.pipeline.shards import ShardSet
from ccl import files
from ccl.progress import bar as progress_bar
from ccl.train import checkpoint as ckpt
from ccl.train import resume as resume_check
from ccl.train import dist, rundir
from ccl.train.config import TrainConfig
from ccl.train.environment import environment, git_sha
from ccl.train.methods import Method, Rng, build_method
from ccl.train.metrics import Accuracy, DeviceMeter, MetricsLog, summarize
from ccl.train.tracking import NullLogger, global_step, make_logger

class NonFiniteLoss(Stop):
    """The loss became NaN or infinite: the run stops (exit 1); the last good checkpoint stays as it was."""


def resolve_data(cfg: TrainConfig) -> Path:
    """The shard directory: --data, or the built-in digits set (built once into the cache)."""
    if cfg.data is None:
        from ccl.pipeline.convert import default_cache, ensure_digits

        return ensure_digits(default_cache() / "shards", noise=cfg.noise, rate=cfg.noise_rate, seed=cfg.seed)
    path = Path(cfg.data)
    if not path.exists():
        raise UserError(f"data directory not found: {path} (expected shards written by tools/shard.py)")
    return path.resolve()  # stored so: eval, labels and --resume find it from any folder


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    return device


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype of `precision`: fp16 on CUDA, bf16 on CPU; None without AMP."""
    return (torch.float16 if device.type == "cuda" else torch.bfloat16) if enabled else None


def precision(device: torch.device, enabled: bool):
    """One precision path: bf16 autocast on CPU, fp16 autocast with a GradScaler on CUDA, or neither."""
    dtype = amp_dtype(device, True)
    ctx = torch.autocast(device.type, dtype=dtype, enabled=enabled)
    scaler = torch.amp.GradScaler(device.type, enabled=enabled and device.type == "cuda")
    return ctx, scaler


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The lr of an epoch (0-based), a pure function of it: lr x (epoch + 1) / lr_ramp over the first lr_ramp
    epochs; then lr, or with `cosine` floor + (lr - floor) (1 + cos(pi (epoch - lr_ramp) / epochs)) / 2 with
    floor = lr_floor x lr (Hzzone/TCL models/basic_template.py `cosine_annealing_LR`, there per iteration); all
    times lr_decay from lr_decay_epoch on (LiJunnan1992/DivideMix Train_cifar.py l.244-245, chenmc1996/Robust-LR
    RoLR.py l.281-284)."""
    if epoch < cfg.lr_ramp:
        lr = cfg.lr * (epoch + 1) / cfg.lr_ramp
    elif cfg.cosine:
        floor = cfg.lr_floor * cfg.lr
        lr = floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - cfg.lr_ramp) / cfg.epochs))
    else:
        lr = cfg.lr
    if cfg.lr_decay_epoch is not None and epoch >= cfg.lr_decay_epoch:
        lr *= cfg.lr_decay
    return lr


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """One optimiser over every parameter: a net that does not learn in a pass has no gradient and both Adam and
    SGD skip it, which gives the same updates (weight decay, moments and momentum included) as one optimiser per
    net (tests/test_interface.py)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything a run is built from; made once by ``setup`` and used by train(), evaluate() and restore()."""

    cfg: TrainConfig
    shards: ShardSet
    device: torch.device
    method: Method
    aug: Augment
    identity: dict
    model: torch.nn.Module | None = None  # what a training step calls: the method, or DDP around it (dist.wrap)
    logger: NullLogger = NullLogger()  # --logger: TensorBoard or wandb on rank 0 (ccl.train.tracking)
    stream_loaders: dict = field(default_factory=dict)  # (stream, batch size) -> its loader (`pass_batches`)


def setup(cfg: TrainConfig, data_dir: Path) -> Run:
    shards = ShardSet.open(data_dir)
    m = shards.manifest
    if cfg.num_classes is not None and cfg.num_classes != shards.num_classes:
        raise UserError(f"--num-classes is {cfg.num_classes} but {data_dir} holds {shards.num_classes} classes")
    arch = cfg.arch if cfg.arch != "auto" else auto_arch(m["dataset"], shards.image_size)
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; expected auto or one of {', '.join(ARCHS)}")
    cfg = replace(cfg, arch=arch, num_classes=shards.num_classes, data=None if cfg.data is None else str(data_dir))
    small = shards.image_size is not None and max(shards.image_size) <= 64
    device = resolve_device(cfg.device)
    num_train = shards.count("train")
    method = build_method(cfg, shards.num_classes, num_train, arch, small)
    method = method.to(device, memory_format=memory_format(device))
    if cfg.compile:
        for net in method.nets:
            net.compile()  # in place: the saved state_dict keeps the uncompiled module's keys
    size = shards.image_size[0] if small else 224
    aug = Augment(shards.mean, shards.std, size, style="cifar" if small else "imagenet").to(device)
    identity = {"method": cfg.method, "arch": arch, "num_classes": shards.num_classes, "dataset": m["dataset"],
                "num_train": num_train, "schedule": cfg.schedule}
    return Run(cfg, shards, device, method, aug, identity)


def split_loader(run: Run, split: str, train: bool, subset: np.ndarray | None = None, batch_size: int | None = None):
    cfg = run.cfg
    return make_loader(run.shards, split, backend=cfg.backend, batch_size=batch_size or cfg.batch_size, train=train,
                       device=run.device, num_workers=cfg.workers, seed=cfg.seed, strict=cfg.strict, subset=subset)


def held_out(num_train: int, fraction: float, seed: int) -> np.ndarray:
    """bool [N]: the validation part of the (noisy) training split, a seeded random fraction of it."""
    val = np.zeros(num_train, dtype=bool)
    val[np.random.default_rng([seed, 0x5A1]).permutation(num_train)[: int(round(fraction * num_train))]] = True
    return val


class _JoinedStreams:
    """A pass over several `Stream`s: the first one's batches in its exact epoch, each joined with the next batch of
    every other stream (restarted with a fresh permutation when it runs out)."""

    def __init__(self, loaders: list, key: int):
        self.loaders, self.key = loaders, key

    def __len__(self) -> int:
        return len(self.loaders[0])

    def _cycle(self, k: int, loader) -> Iterator:
        for cycle in itertools.count():
            # an order of its own for each stream, pass and cycle, never one of the first stream's
            loader.set_epoch(((self.key * 16 + k) << 20) + cycle)
            empty = True
            for batch in loader:
                empty = False
                yield batch
            if empty:
                return

    def __iter__(self) -> Iterator[Batch]:
        self.loaders[0].set_epoch(self.key)
        rest = [self._cycle(k, ld) for k, ld in enumerate(self.loaders[1:], 1)]
        for batch in self.loaders[0]:
            parts = [batch] + [b for b in (next(it, None) for it in rest) if b is not None]
            yield parts[0] if len(parts) == 1 else cat_batches(parts)


def pass_batches(run: Run, loader, epoch: int, p: int, passes: int):
    """The batches of one training pass as the method's `streams` ask: the run's train loader itself for the
    default stream (every trained sample once, at the run's batch size), else one loader per stream (made once per
    stream and batch size; `select` points it at the stream's samples each pass), joined per step."""
    key = epoch * passes + p  # a fresh order for every pass
    streams = run.method.streams(epoch, p)
    if len(streams) == 1 and streams[0].subset is None and streams[0].batch_size in (None, run.cfg.batch_size):
        loader.set_epoch(key)
        return loader
    if run.cfg.backend != "torch":
        raise UserError(f"{run.method.name}'s samplers (a subset of the training set, or another batch size) need "
                        "the torch backend; the dali backend reads whole shards at one batch size")
    loaders = []
    for k, stream in enumerate(streams):
        bs = stream.batch_size or run.cfg.batch_size
        if (k, bs) not in run.stream_loaders:
            run.stream_loaders[(k, bs)] = split_loader(run, "train", train=True, batch_size=bs,
                                                  subset=np.flatnonzero(run.method.active.cpu().numpy()))
        ld = run.stream_loaders[(k, bs)]
        ld.select(np.flatnonzero(run.method.active.cpu().numpy()) if stream.subset is None else stream.subset)
        loaders.append(ld)
    return _JoinedStreams(loaders, key)


def ordered_views(run: Run, loader, view: str, generator) -> Iterator[tuple[Batch, torch.Tensor]]:
    """The training split in index order as one view: what a method's refresh reads."""
    for batch in loader:
        yield batch, run.aug.make_views(batch.images, (view,), generator)[0]


@torch.no_grad()
def evaluate(run: Run, loader, ctx, noisy: bool = False) -> dict[str, float]:
    """Top-1/top-5 of every head (each net and the ensemble) on a split, against its clean labels when known, or
    against the given (noisy) labels with ``noisy``: the validation part of the training set, which model
    selection may only judge as a user would, by the labels it has."""
    acc = Accuracy()
    with eval_mode(run.method):
        for batch in loader:
            with ctx:
                logits = run.method.eval_logits(run.aug.eval_view(batch.images))
            target = batch.label if noisy else torch.where(batch.clean >= 0, batch.clean, batch.label)
            acc.update(logits, target)
    return dist.reduce_accuracy(acc).result()  # each rank read its part of the split


def train_epoch(run: Run, opt, scaler, ctx, rng: Rng, loader, epoch: int, bar, refresh=None) -> dict:
    """One epoch of training steps (one pass per `method.passes`). Returns the epoch's logged means, timings, and
    the optimiser steps and images each net learned from. Between two passes, ``refresh(view)`` runs the refresh
    the method asks for (`Method.refresh_between`) and returns its seconds."""
    cfg, method = run.cfg, run.method
    model = run.model or method
    method.train()
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, epoch)
    meter = DeviceMeter(run.device)
    names = method.views(epoch)
    passes = method.passes(epoch)
    steps = images = 0
    net_steps, net_images = [0] * method.num_nets, [0] * method.num_nets
    wait, est_time, t0 = 0.0, 0.0, time.perf_counter()
    for p in range(passes):
        pass_start = (steps, images)
        source = pass_batches(run, loader, epoch, p, passes)  # the method's samplers (`Method.streams`)
        label = f"epoch {epoch + 1}/{cfg.epochs}" + (f" pass {p + 1}/{passes}" if passes > 1 else "")
        task = bar.add_task(label, total=len(source))
        it = iter(source)
        while True:
            tw = time.perf_counter()
            batch = next(it, None)
            wait += time.perf_counter() - tw
            if batch is None:
                break
            views = run.aug.make_views(batch.images, names, rng.device)
            with ctx:
                step = model(batch, views, epoch, p, rng)
            opt.zero_grad(set_to_none=True)  # a net that did not learn this pass keeps grad None: opt skips it
            scaler.scale(step.loss).backward()
            scaler.step(opt)
            scaler.update()
            meter.add(step)
            steps += 1
            images += batch.images.shape[0]
            if steps % cfg.log_every == 0:  # the only host read inside the epoch
                means, bad = dist.read_meter(meter)  # every rank stops together on a non-finite loss
                _stop_if_bad(bad, epoch, steps)
                run.logger.log_step(global_step(method.passes, len(loader), epoch, steps),
                                    means | {"lr": opt.param_groups[0]["lr"]})
                rate = images / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, description=f"{label} loss {means['loss']:.3f} {rate:.0f} img/s")
            bar.update(task, advance=1)
        bar.remove_task(task)
        for k in method.training_nets(epoch, p):
            net_steps[k] += steps - pass_start[0]
            net_images[k] += images - pass_start[1]
        view = method.refresh_between(epoch, p) if p + 1 < passes else None
        if view is not None and refresh is not None:
            est_time += refresh(view)
    means, bad = dist.read_meter(meter) if steps else ({}, False)
    _stop_if_bad(bad, epoch, steps)
    train_time = time.perf_counter() - t0 - est_time
    return {"means": means, "images": images, "train_time": train_time, "wait": wait, "estimate_time": est_time,
            "net_steps": net_steps, "net_images": net_images}


def _stop_if_bad(bad: bool, epoch: int, steps: int) -> None:
    if bad:
        raise NonFiniteLoss(f"non-finite loss in epoch {epoch + 1}, within its first {steps} steps")


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, allow_changes: bool = False,
          progress: bool = True) -> dict:
    """Train one run (see `_train`), holding its run directory's lock until it ends, however it ends."""
    try:
        return _train(cfg, resume=resume, overwrite=overwrite, allow_changes=allow_changes, progress=progress)
    finally:
        rundir.release()


def _train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, allow_changes: bool = False,
           progress: bool = True) -> dict:
    """Train one run; returns its summary. Writes runs/NAME/{config.json, metrics.jsonl, checkpoints/, summary.json}.

    ``resume`` continues runs/NAME from checkpoints/last.pt; a change of any option outside `FREE_ON_RESUME` is
    refused unless ``allow_changes``, and then recorded in config.json.
    """
    cfg = cfg.validate()
    dist.init(cfg.dist_backend, cfg.device)  # under torchrun; rank 0 alone then writes the run directory
    data_dir = dist.local_first(resolve_data, cfg)
    seed_everything(cfg.seed)
    run = setup(cfg, data_dir)
    cfg, method, device = run.cfg, run.method, run.device
    main, progress = dist.is_main(), progress and dist.is_main()
    run_dir = _claim(run, resume, overwrite)
    ck_dir = run_dir / "checkpoints"
    log = MetricsLog(run_dir / "metrics.jsonl")
    run.logger = make_logger(cfg.logger, run_dir, cfg.to_dict(), main=main)

    ctx, scaler = precision(device, cfg.amp)
    opt = make_optimizer(cfg, method.parameters())
    seed = dist.rank_seed(cfg.seed)  # each rank augments its samples with its own stream; rank 0 with the run's
    rng = Rng(torch.Generator(device=device).manual_seed(seed), random.Random(seed))

    start, best, best_epoch = 0, -1.0, -1
    if resume:
        start, best, best_epoch = _resume(run, run_dir, opt, scaler, rng, log, allow_changes)
    elif main:
        record = {"config": cfg.to_dict(), "identity": run.identity, "data": str(data_dir), "git_sha": git_sha(),
                  "command": sys.argv, "environment": environment(cfg, device, amp_dtype(device, cfg.amp))}
        files.write_json(run_dir / "config.json", record)

    train_loader, train_in_order, val_loader, test_loader = _loaders(run)
    labels, clean = run.shards.labels("train")
    has_clean = bool((clean >= 0).all())
    run.model = dist.wrap(method, sync_bn=cfg.sync_bn)

    tracker = None
    if cfg.track_every:  # ccl analyze's measures during training, on a fixed test subset
        from ccl.train.track import TrackSet

        tracker = TrackSet.from_shards(run.shards, "test", size=cfg.track_samples, seed=cfg.seed, device=device)

    def refresh_confidence(view: str) -> float:
        """The method's refresh (GMM, centres) from a pass over the training set in `view`; its seconds."""
        te = time.perf_counter()
        batches = None if view == "inline" else ordered_views(run, train_in_order, view, rng.device)
        with ctx:
            method.refresh(batches)
        dist.assert_same("w", method.w)
        return time.perf_counter() - te

    if start == 0:  # what the method takes from its initial networks before the first epoch (TCL's centres)
        view = method.initial_refresh_view()
        if view is not None:
            refresh_confidence(view)

    bar = progress_bar(progress, remaining=True)
    with bar:
        for epoch in range(start, cfg.epochs):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            method.begin_epoch()
            try:
                ep = train_epoch(run, opt, scaler, ctx, rng, train_loader, epoch, bar, refresh_confidence)
            except NonFiniteLoss as e:
                kept = (f"the last good checkpoint is kept in {ck_dir}" if (ck_dir / "last.pt").is_file()
                        else "no checkpoint was written before it")
                raise NonFiniteLoss(f"{e}; {kept}") from None

            method.end_epoch(epoch)
            est_time = ep["estimate_time"]
            view = method.refresh_view(epoch)
            if view is not None:
                est_time += refresh_confidence(view)
            record = _epoch_record(run, ep, epoch, est_time, ctx, (train_loader, val_loader, test_loader), tracker)
            if has_clean and main:
                record |= method.detection(labels, clean)
            if device.type == "cuda":
                record["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            top1 = record.get("val_ens_top1", -1.0)  # no validation part: no best.pt (the test split never picks)
            improved = top1 > best
            best = max(best, top1)
            best_epoch = epoch if improved else best_epoch
            # --patience: no better held-out accuracy for `patience` epochs since warm-up ended (or since the best)
            stop = bool(cfg.patience) and epoch - max(best_epoch, method.warmup - 1) >= cfg.patience
            rng_ranks = dist.rng_states(ckpt.rng_state(rng))  # every rank's streams, to resume on as many processes
            skipped = report_skipped(run_dir, (train_loader, val_loader, test_loader), main)
            if stop and not main:
                break
            if not main:
                continue
            state = {"format": ckpt.FORMAT, "method": method.state_dict(), "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict(), "rng": ckpt.rng_state(rng), "epoch": epoch, "best": best,
                     "best_epoch": best_epoch, "identity": run.identity, "config": cfg.to_dict(),
                     **({"rng_ranks": rng_ranks} if rng_ranks is not None else {})}
            _log_and_save(run, record, state, log, ck_dir, improved)
            if progress:
                bar.console.print(_epoch_line(record))
                for line in skipped:
                    bar.console.print(line)
            if stop:
                if progress:
                    bar.console.print(f"stopped: no better held-out accuracy for {cfg.patience} epochs "
                                      f"(best {best:.2f} at epoch {best_epoch + 1})")
                break
    run.logger.close()
    summary = None
    if main:
        summary = _summary(run, run_dir, log.read(), labels, clean, has_clean)
        files.write_json(run_dir / "summary.json", summary)
    summary = dist.broadcast_object(summary)
    dist.shutdown()
    return summary


def _claim(run: Run, resume: bool, overwrite: bool) -> Path:
    """The run directory, claimed (locked by rank 0) with its checkpoints/ folder; the recipe's dataset checked
    first, and a warning when the warm-up would be all the run trains."""
    cfg, method = run.cfg, run.method
    if cfg.recipe is not None:
        from ccl.train import recipes

        recipes.check_dataset(cfg.recipe, recipes.load(cfg.recipe), run.identity["dataset"])
    run_dir = dist.rank0_call(rundir.claim, cfg, run.identity["dataset"], resume, overwrite)
    if dist.is_main():
        files.make_dir(run_dir / "checkpoints")
        if method.warmup >= cfg.epochs and type(method).default_warmup:
            print(f"warning: the warm-up ({method.warmup} epochs) covers all {cfg.epochs} epochs: {cfg.method} "
                  "trains only its warm-up (plain CE); lower --warmup, or raise --epochs (a warm-up-only run "
                  "continues with --resume --epochs N)", file=sys.stderr)
    return run_dir


def _loaders(run: Run):
    """(train, train in order, validation or None, test) loaders. Model selection never looks at the test split:
    best.pt is chosen on a held-out part of the training set, which the method is told to leave out of its
    confidence (the GMM is fitted on the samples it trains on)."""
    cfg = run.cfg
    val = held_out(run.identity["num_train"], cfg.val_fraction, cfg.seed)
    fit = np.flatnonzero(~val) if val.any() else None
    run.method.hold_out(torch.from_numpy(val))
    train = split_loader(run, "train", train=True, subset=fit)
    test = split_loader(run, "test", train=False)
    in_order = split_loader(run, "train", train=False, subset=fit)
    held = split_loader(run, "train", train=False, subset=np.flatnonzero(val)) if val.any() else None
    return train, in_order, held, test


def _resume(run: Run, run_dir: Path, opt, scaler, rng: Rng, log: MetricsLog, allow_changes: bool):
    """Load checkpoints/last.pt into the method, optimiser, scaler and streams (refusing a changed run unless
    allowed, and recording what changed); cut the log back to it. Returns (first epoch, best, best epoch)."""
    cfg, device, main = run.cfg, run.device, dist.is_main()
    path = run_dir / "checkpoints" / "last.pt"
    state = dist.rank0_call(ckpt.load, path)  # global per-sample state: any world size resumes it
    ckpt.check_identity(state["identity"], run.identity, path)
    changes = resume_check.config_changes(state["config"], cfg, allow_changes)
    ckpt.load_method_state(run.method, state["method"], path)
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    start, best = state["epoch"] + 1, state["best"]
    best_epoch = state.get("best_epoch", state["epoch"])  # a checkpoint that predates it: count from here
    saved_rng = dist.rng_for_rank(state)
    if saved_rng is not None:
        ckpt.set_rng_state(saved_rng, rng)
    else:  # written by another number of processes
        dist.reseed(rng, cfg.seed, start)
    if main:
        log.truncate_after(state["epoch"])
        env = environment(cfg, device, amp_dtype(device, cfg.amp))
        resume_check.record_resume(run_dir / "config.json", start, env, changes, cfg)
    return start, best, best_epoch


def _epoch_record(run: Run, ep: dict, epoch: int, est_time: float, ctx, loaders, tracker) -> dict:
    """One metrics.jsonl line: the epoch's logged losses, test (and held-out) accuracy when due, the tracked
    contamination measures when due, throughput, and the steps and images each net learned from."""
    cfg, method = run.cfg, run.method
    train_loader, val_loader, test_loader = loaders
    record = {"epoch": epoch, "lr": lr_at(cfg, epoch), "warmup": method.warming_up(epoch)}
    record |= {f"train_{k}": v for k, v in ep["means"].items()}
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
        record |= evaluate(run, test_loader, ctx)
        if val_loader is not None:
            record |= {f"val_{k}": v for k, v in evaluate(run, val_loader, ctx, noisy=True).items()}
    if tracker is not None and (epoch + 1) % cfg.track_every == 0:
        from ccl.train.track import track

        with ctx:
            record |= track(method.nets, tracker.batches(run.aug.eval_view), seed=cfg.seed)
    train_time = ep["train_time"]
    (images, *net_images) = dist.sum_numbers(ep["images"], *ep["net_images"])  # all ranks
    record |= {"images": int(images), "images_per_s": images / max(train_time, 1e-9),
               "data_wait": ep["wait"] / max(train_time, 1e-9), "epoch_time": train_time,
               "estimate_time": est_time, "skipped": train_loader.skipped,
               # optimiser steps and images each net learned from this epoch (mean over the nets)
               "steps_per_net": float(np.mean(ep["net_steps"])), "images_per_net": float(np.mean(net_images)),
               "test_skipped": test_loader.skipped}
    return record


def _log_and_save(run: Run, record: dict, state: dict, log: MetricsLog, ck_dir: Path, improved: bool) -> None:
    """The epoch's line in metrics.jsonl and the logger, then checkpoints/last.pt (and best.pt when the held-out
    accuracy improved). A refused write (a full disk) leaves the checkpoints as they were, and the log with them."""
    epoch = state["epoch"]
    log.append(record)
    run.logger.log_epoch(record)
    try:  # best.pt is renamed first: a kill between the renames redoes this epoch and writes both again
        ckpt.atomic_save(state, ck_dir / "last.pt", also=(ck_dir / "best.pt",) if improved else ())
    except UserError:
        log.truncate_after(epoch - 1)
        raise


def _summary(run: Run, run_dir: Path, history: list[dict], labels, clean, has_clean: bool) -> dict:
    cfg = run.cfg
    summary = {"run_dir": str(run_dir), "method": cfg.method, "arch": cfg.arch, "dataset": run.identity["dataset"],
               **{f"test_{k}": v for k, v in summarize(history).items()}}
    if history:
        aurocs = [v for k, v in history[-1].items() if re.fullmatch(r"net\d+_auroc", k)]
        finite = [v for v in aurocs if v is not None and math.isfinite(v)]
        if aurocs:
            # Undefined (None) when every training label is clean or every one is wrong: nothing to separate.
            summary["auroc"] = float(np.mean(finite)) if finite else None
        summary["actual_noise_rate"] = float(np.mean(labels != clean)) if has_clean else None
        summary["epoch_time_mean"] = float(np.mean([r["epoch_time"] for r in history]))
        # The work done, to compare methods at equal optimiser steps per net as well as at equal epochs.
        summary["epochs_run"] = len(history)
        summary["steps_per_net"] = float(sum(r.get("steps_per_net", 0) for r in history))
        summary["images_per_net"] = float(sum(r.get("images_per_net", 0) for r in history))
        val = [r["val_ens_top1"] for r in history if r.get("val_ens_top1") is not None]
        if val:
            summary["val_best"] = max(val)
            summary["val_last10_mean"] = float(np.mean(val[-10:]))
            summary["val_best_epoch"] = int(next(r["epoch"] for r in history if r.get("val_ens_top1") == max(val)))
    return summary


def _epoch_line(r: dict) -> str:
    parts = [f"epoch {r['epoch'] + 1}"]
    if "ens_top1" in r:
        parts.append(f"test top1 {r['ens_top1']:.2f}")
    if "val_ens_top1" in r:
        parts.append(f"val top1 {r['val_ens_top1']:.2f} (noisy labels)")
    if "net0_auroc" in r and r["net0_auroc"] == r["net0_auroc"]:
        parts.append(f"AUROC {r['net0_auroc']:.3f}")
    parts.append(f"{r['images_per_s']:.0f} img/s")
    parts.append(f"data-wait {100 * r['data_wait']:.1f}%")
    if r.get("skipped") or r.get("test_skipped"):
        parts.append(f"skipped images: {r.get('skipped', 0)} train, {r.get('test_skipped', 0)} test")
    return "  ".join(parts)


SKIPPED_REPORT = "skipped.json"


def report_skipped(run_dir: Path, loaders, main: bool, show: int = 5) -> list[str]:
    """Name every sample the loaders have skipped so far (damaged in the shards, or refused by the decoder), from
    all ranks, in run_dir/skipped.json (rewritten at each epoch's end while there is any); returns the console
    lines that name the first few. Every rank must call it (the decode failures are gathered)."""
    mine = sorted({r for ld in loaders if ld is not None for r in ld.skipped_samples})
    rows = sorted({Damaged(*r) for part in dist.gather_objects(mine) for r in part})  # by split, then index
    if not main or not rows:
        return []
    files.write_json(run_dir / SKIPPED_REPORT, [r._asdict() for r in rows], indent=1)
    lines = [f"  skipped {r.split} sample {r.index} ({r.shard}): {r.reason}" for r in rows[:show]]
    if len(rows) > show:
        lines.append(f"  ... {len(rows) - show} more")
    lines.append(f"  all {len(rows)} skipped samples: {run_dir / SKIPPED_REPORT}")
    return lines
