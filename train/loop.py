"""The one training loop: data -> device views -> method step -> optimisers; per epoch confidence, eval, metrics,
checkpoint. Every method runs through it; a method only supplies its losses (ccl.train.methods)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ccl.errors import UserError
from ccl.model import ARCHS, auto_arch, memory_format
from ccl.pipeline.augment import Augment
from ccl.pipeline.loader import make_loader
from ccl.pipeline.shards import ShardSet
from ccl.train import checkpoint as ckpt
from ccl.train.losses.confidence import detection_metrics
from ccl.train.config import TrainConfig
from ccl.train.methods import build_method
from ccl.train.metrics import Accuracy, MetricsLog, summarize


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops; the last good checkpoint stays as it was."""


def default_cache() -> Path:
    return Path(os.environ.get("CCL_CACHE", Path.home() / ".cache" / "ccl"))


def resolve_data(cfg: TrainConfig) -> Path:
    """The shard directory: --data, or the built-in digits set (built once into the cache)."""
    if cfg.data is None:
        from ccl.pipeline.convert import ensure_digits

        return ensure_digits(default_cache() / "shards", noise=cfg.noise, rate=cfg.noise_rate, seed=cfg.seed)
    path = Path(cfg.data)
    if not path.exists():
        raise UserError(f"data directory not found: {path} (expected shards written by tools/shard.py)")
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def precision(device: torch.device, enabled: bool):
    """One precision path: bf16 autocast on CPU, fp16 autocast with a GradScaler on CUDA, or neither."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    ctx = torch.autocast(device.type, dtype=dtype, enabled=enabled)
    scaler = torch.amp.GradScaler(device.type, enabled=enabled and device.type == "cuda")
    return ctx, scaler


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Constant, or cosine-decayed per epoch: a pure function of the epoch."""
    if not cfg.cosine:
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pick_run_dir(cfg: TrainConfig, dataset: str, resume: bool, overwrite: bool) -> Path:
    """runs/NAME: a fresh numbered name by default; --resume takes the newest run of that name."""
    root = Path(cfg.out)
    base = cfg.name or f"{dataset}-{cfg.method}-s{cfg.seed}"
    if cfg.name:
        candidates = [root / base]
    else:
        candidates = [root / base] + sorted(
            (p for p in root.glob(f"{base}-*") if p.name[len(base) + 1 :].isdigit()),
            key=lambda p: int(p.name[len(base) + 1 :]),
        )
    existing = [p for p in candidates if (p / "checkpoints" / "last.pt").is_file()]
    if resume:
        if not existing:
            raise UserError(f"nothing to resume: no checkpoint under {root / base}")
        return existing[-1]
    if cfg.name and existing and not overwrite:
        raise UserError(f"run {existing[0]} exists; pass --resume to continue it or --overwrite to start over")
    if cfg.name or not (root / base).exists():
        return root / base
    i = 2
    while (root / f"{base}-{i}").exists():
        i += 1
    return root / f"{base}-{i}"


@dataclass
class Run:
    """Everything a run is built from; made once by ``setup`` and used by train() and evaluate()."""

    cfg: TrainConfig
    shards: ShardSet
    device: torch.device
    method: torch.nn.Module
    aug: Augment
    identity: dict


def setup(cfg: TrainConfig, data_dir: Path) -> Run:
    shards = ShardSet.open(data_dir)
    m = shards.manifest
    if cfg.num_classes is not None and cfg.num_classes != shards.num_classes:
        raise UserError(f"--num-classes is {cfg.num_classes} but {data_dir} holds {shards.num_classes} classes")
    arch = cfg.arch if cfg.arch != "auto" else auto_arch(m["dataset"], shards.image_size)
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; expected auto or one of {', '.join(ARCHS)}")
    cfg = replace(cfg, arch=arch, num_classes=shards.num_classes)
    small = shards.image_size is not None and max(shards.image_size) <= 64
    device = resolve_device(cfg.device)
    num_train = shards.count("train")
    method = build_method(cfg, shards.num_classes, num_train, arch, small).to(device, memory_format=memory_format(device))
    if cfg.compile:
        for net in method.nets:
            net.compile()  # in place: the saved state_dict keeps the uncompiled module's keys
    size = shards.image_size[0] if small else 224
    aug = Augment(shards.mean, shards.std, size, style="cifar" if small else "imagenet").to(device)
    identity = {"method": cfg.method, "arch": arch, "num_classes": shards.num_classes, "dataset": m["dataset"],
                "num_train": num_train, "schedule": cfg.schedule}
    return Run(cfg, shards, device, method, aug, identity)


def _loader(run: Run, split: str, train: bool):
    cfg = run.cfg
    return make_loader(run.shards, split, backend=cfg.backend, batch_size=cfg.batch_size, train=train,
                       device=run.device, num_workers=cfg.workers, seed=cfg.seed, strict=cfg.strict)


@torch.no_grad()
def evaluate(run: Run, loader, ctx) -> dict[str, float]:
    """Top-1/top-5 of every head (each net and the ensemble) on a split, against its clean labels when known."""
    run.method.eval()
    acc = Accuracy()
    for batch in loader:
        with ctx:
            logits = run.method.eval_logits(run.aug.eval(batch.images))
        target = torch.where(batch.clean >= 0, batch.clean, batch.label)
        acc.update(logits, target)
    run.method.train()
    return acc.result()


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Train one run; returns its summary. Writes runs/NAME/{config.json, metrics.jsonl, checkpoints/}."""
    cfg = cfg.validate()
    data_dir = resolve_data(cfg)
    seed_everything(cfg.seed)
    run = setup(cfg, data_dir)
    cfg, method, device = run.cfg, run.method, run.device
    run_dir = pick_run_dir(cfg, run.identity["dataset"], resume, overwrite)
    ck_dir = run_dir / "checkpoints"
    ck_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / "metrics.jsonl")

    ctx, scaler = precision(device, cfg.amp)
    opts = [torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) for net in method.nets]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # all augmentation randomness of the run
    method.generator = gen

    start, best = 0, -1.0
    if resume:
        state = ckpt.load(ck_dir / "last.pt")
        ckpt.check_identity(state["identity"], run.identity, ck_dir / "last.pt")
        method.load_state_dict(state["method"])
        for opt, s in zip(opts, state["optimizers"]):
            opt.load_state_dict(s)
        scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"], gen)
        start, best = state["epoch"] + 1, state["best"]
        log.truncate_after(state["epoch"])
    else:
        if overwrite and log.path.exists():
            log.path.unlink()
        record = {"config": cfg.to_dict(), "identity": run.identity, "data": str(data_dir), "git_sha": git_sha(),
                  "command": sys.argv}
        (run_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")

    train_loader = _loader(run, "train", train=True)
    test_loader = _loader(run, "test", train=False)
    labels, clean = run.shards.labels("train")
    has_clean = bool((clean >= 0).all())

    train_in_order = _loader(run, "train", train=False)

    def train_pass(view: str):
        """The training split in index order, as the requested view (for the full confidence pass)."""
        make = {"strong": run.aug.strong, "weak": run.aug.weak}.get(view)
        for batch in train_in_order:
            yield batch, (make(batch.images, generator=gen) if make else run.aug.eval(batch.images))

    bar = _progress(progress)
    with bar:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            for opt in opts:
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, epoch)
            method.train()
            sums: dict[str, float] = {}
            steps = images = 0
            wait = 0.0
            phases = method.phases(epoch)
            n_strong = method.views_needed(epoch)
            for p, phase in enumerate(phases):
                train_loader.set_epoch(epoch * len(phases) + p)  # a fresh order for every pass
                task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs} nets {phase}", total=len(train_loader))
                it = iter(train_loader)
                while True:
                    tw = time.perf_counter()
                    batch = next(it, None)
                    wait += time.perf_counter() - tw
                    if batch is None:
                        break
                    weak, strongs = (run.aug.views(batch.images, n_strong, generator=gen) if n_strong
                                     else (run.aug.weak(batch.images, generator=gen), []))
                    with ctx:
                        out = method.step(batch, (weak, strongs), phase, epoch)
                    loss = out["loss"]
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(
                            f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {steps + 1}; "
                            f"the last good checkpoint is kept in {ck_dir}"
                        )
                    for k in phase:
                        opts[k].zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    for k in phase:
                        scaler.step(opts[k])
                    scaler.update()
                    for key, v in out.items():
                        sums[key] = sums.get(key, 0.0) + float(v.detach())
                    steps += 1
                    images += batch.images.shape[0]
                    rate = images / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs} nets {phase} "
                               f"loss {float(loss.detach()):.3f} {rate:.0f} img/s")
                bar.remove_task(task)
            train_time = time.perf_counter() - t0

            est_time = 0.0
            if method.needs_estimate(epoch):
                te = time.perf_counter()
                with ctx:
                    method.estimate(train_pass, inline=cfg.confidence == "inline")
                est_time = time.perf_counter() - te
            record = {"epoch": epoch, "lr": lr_at(cfg, epoch), "warmup": method.warming_up(epoch)}
            record |= {f"train_{k}": v / max(steps, 1) for k, v in sums.items()}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                record |= evaluate(run, test_loader, ctx)
            if bool(method.has_w) and has_clean:
                for k in range(method.num_nets):
                    det = detection_metrics(method.w[k].cpu().numpy(), labels, clean)
                    record |= {f"net{k}_{key}": v for key, v in det.items()}
            record |= {"images_per_s": images / max(train_time, 1e-9), "data_wait": wait / max(train_time, 1e-9),
                       "epoch_time": train_time, "estimate_time": est_time, "skipped": train_loader.skipped}
            log.append(record)
            top1 = record.get("ens_top1", -1.0)
            improved = top1 > best
            best = max(best, top1)
            state = {"method": method.state_dict(), "optimizers": [o.state_dict() for o in opts],
                     "scaler": scaler.state_dict(), "rng": ckpt.rng_state(gen), "epoch": epoch, "best": best,
                     "identity": run.identity, "config": cfg.to_dict()}
            ckpt.atomic_save(state, ck_dir / "last.pt")
            if improved:
                ckpt.atomic_save(state, ck_dir / "best.pt")
            if progress:
                bar.console.print(_epoch_line(record))
    history = log.read()
    summary = {"run_dir": str(run_dir), "method": cfg.method, "arch": cfg.arch, "dataset": run.identity["dataset"],
               **{f"test_{k}": v for k, v in summarize(history).items()}}
    if history and "net0_auroc" in history[-1]:
        summary["auroc"] = float(np.nanmean([history[-1][f"net{k}_auroc"] for k in range(method.num_nets)]))
    if history:
        summary["actual_noise_rate"] = float(np.mean(labels != clean)) if has_clean else None
        summary["epoch_time_mean"] = float(np.mean([r["epoch_time"] for r in history]))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=True)


class _NoProgress(contextlib.nullcontext):
    """The progress bar's interface, doing nothing (tests, table runs)."""

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def remove_task(self, *a, **k):
        pass


def _epoch_line(r: dict) -> str:
    parts = [f"epoch {r['epoch'] + 1}"]
    if "ens_top1" in r:
        parts.append(f"test top1 {r['ens_top1']:.2f}")
    if "net0_auroc" in r:
        parts.append(f"AUROC {r['net0_auroc']:.3f}")
    parts.append(f"{r['images_per_s']:.0f} img/s")
    parts.append(f"data-wait {100 * r['data_wait']:.1f}%")
    return "  ".join(parts)


def restore(checkpoint: Path, data: Path | None = None, device: str = "auto") -> tuple[Run, dict]:
    """Rebuild a finished (or interrupted) run from one of its checkpoints, for evaluation and analysis.

    Returns the `Run` (its method holds the checkpoint's networks and per-sample state, in eval mode) and the
    checkpoint dict. ``data`` overrides the shard directory the run trained on.
    """
    state = ckpt.load(Path(checkpoint))
    cfg = TrainConfig.from_dict(state["config"])
    cfg = replace(cfg, device=device, data=str(data) if data else cfg.data)
    run = setup(cfg, resolve_data(cfg))
    # Evaluation needs the same networks, not the same training set or schedule.
    ckpt.check_identity(state["identity"], run.identity, Path(checkpoint), ("method", "arch", "num_classes"))
    run.method.load_state_dict(state["method"])
    run.method.eval()
    return run, state


def evaluate_checkpoint(checkpoint: Path, data: Path | None, split: str = "test", device: str = "auto") -> dict:
    """`ccl eval`: rebuild the run from the checkpoint's config and evaluate it on a split."""
    run, state = restore(checkpoint, data, device)
    if split not in run.shards.manifest["splits"]:
        raise UserError(f"split {split!r} not in {run.shards.root}; it has {', '.join(run.shards.manifest['splits'])}")
    ctx, _ = precision(run.device, run.cfg.amp)
    result = evaluate(run, _loader(run, split, train=False), ctx)
    return {"checkpoint": str(checkpoint), "epoch": state["epoch"] + 1, "split": split, **result}
