"""`ccl train`, `ccl recipes` and `ccl eval`. Thin: each command builds a config and calls one function; `ccl.cli`
assembles them with the other commands."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ccl.errors import Interrupted
from ccl.model import ARCHS
from ccl.train.config import SECTIONS, TrainConfig, apply_overrides, load_config_file
from ccl.train.methods import METHODS

console = Console()

_D = TrainConfig()  # the defaults shown in the help text


def _section_help() -> str:
    lines = []
    for name, cls in SECTIONS.items():
        fields = ", ".join(f"{f.name}={_fmt_default(getattr(cls(), f.name))}" for f in dataclasses.fields(cls))
        lines.append(f"{name}: {fields}")
    return "; ".join(lines)


def _fmt_default(v) -> str:
    if dataclasses.is_dataclass(v):
        return "none"
    return str(v).lower() if isinstance(v, bool) or v is None else str(v)


def train_cmd(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, help="Shard directory from tools/shard.py. Default: the built-in "
                                        "digits set with --noise/--noise-rate, built into ~/.cache/ccl on first use.",
                                        show_default=False),
    method: str = typer.Option(_D.method, help=f"{', '.join(METHODS)}."),
    arch: str = typer.Option(_D.arch, help=f"auto, {', '.join(ARCHS)}; auto takes the paper's choice for the "
                             "dataset."),
    epochs: int = typer.Option(_D.epochs, help="Epochs in all, warm-up included."),
    warmup: Optional[int] = typer.Option(None, help="Warm-up epochs of plain CE. Default: the method's ("
                                         + ", ".join(f"{n} {m.default_warmup}" for n, m in METHODS.items()) + ").",
                                         show_default=False),
    batch_size: int = typer.Option(_D.batch_size, help="Batch size."),
    optimizer: str = typer.Option(_D.optimizer, help="adam (the CCL paper's) or sgd (RoLR's, DivideMix's and "
                                  "TCL's code; their recipes set it)."),
    lr: float = typer.Option(_D.lr, help="Learning rate."),
    momentum: float = typer.Option(_D.momentum, help="SGD momentum (Adam keeps its betas 0.9, 0.999)."),
    weight_decay: float = typer.Option(_D.weight_decay, help="Weight decay (coupled L2, as torch applies it)."),
    cosine: bool = typer.Option(_D.cosine, "--cosine/--no-cosine", help="Cosine lr decay over the run, per epoch."),
    lr_ramp: int = typer.Option(_D.lr_ramp, help="Epochs of linear lr ramp-up at the start (TCL's code)."),
    lr_floor: float = typer.Option(_D.lr_floor, help="Where the cosine ends, as a fraction of --lr."),
    lr_decay_epoch: Optional[int] = typer.Option(None, help="From this epoch on (counted from 0, warm-up "
                                                 "included) the lr is multiplied by --lr-decay. Default: never.",
                                                 show_default=False),
    lr_decay: float = typer.Option(_D.lr_decay, help="The factor of that step."),
    schedule: str = typer.Option(_D.schedule, help="Twin schedule: alternate (the paper's: one net trains, the peer "
                                 "is fixed, then the reverse) or joint."),
    confidence: str = typer.Option(_D.confidence, help="Label confidence from a full pass over the training set "
                                   "after each epoch, or inline from the epoch's own steps."),
    kernel: str = typer.Option(_D.kernel, help="Contrastive kernel: auto, reference, torch or triton."),
    set_: Optional[list[str]] = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                                             help="A method setting, repeatable, e.g. --set ccl.tau=0.3. "
                                             f"Sections and defaults: {_section_help()}.", show_default=False),
    ablate: Optional[str] = typer.Option(None, metavar="PARTS", help="CCL's ablations of Table 7, comma-separated: "
                                         "mimicry, threshold, refurbished, cvl, cml (e.g. --ablate mimicry,cml).",
                                         show_default=False),
    num_classes: Optional[int] = typer.Option(None, help="Expected class count; checked against the manifest.",
                                              show_default=False),
    noise: str = typer.Option(_D.noise, help="Built-in digits only: the noise type (see tools/shard.py --help)."),
    noise_rate: float = typer.Option(_D.noise_rate, help="Built-in digits only."),
    backend: str = typer.Option(_D.backend, help="Loader: torch or dali."),
    workers: int = typer.Option(_D.workers, help="Loader workers."),
    amp: bool = typer.Option(_D.amp, "--amp/--no-amp", help="Mixed precision: bf16 on CPU, fp16 + GradScaler on CUDA."),
    compile: bool = typer.Option(_D.compile, "--compile/--no-compile", help="torch.compile the networks."),
    device: str = typer.Option(_D.device, help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(_D.seed, help="Seed of init, order, augmentation (and the digits noise)."),
    val_fraction: float = typer.Option(_D.val_fraction, help="Hold out this fraction of the (noisy) training set "
                                       "and choose best.pt on it; 0: no best.pt. The test split never picks."),
    patience: int = typer.Option(_D.patience, help="Stop when the held-out accuracy has not improved for this many "
                                 "epochs after warm-up (needs --val-fraction); 0: run every epoch."),
    out: Path = typer.Option(Path(_D.out), help="Parent of the run directory."),
    name: Optional[str] = typer.Option(None, help="Run name. Default: DATASET-METHOD-sSEED, numbered if taken.",
                                       show_default=False),
    dist_backend: str = typer.Option(_D.dist_backend, help="Under torchrun: the process group's backend: auto "
                                     "(nccl on CUDA, gloo on CPU), nccl or gloo."),
    sync_bn: bool = typer.Option(_D.sync_bn, "--sync-bn/--no-sync-bn", help="Under torchrun: SyncBatchNorm, "
                                 "batch statistics over every process's batch (CUDA only)."),
    log_every: int = typer.Option(_D.log_every, help="Steps between reads of the logged losses (one host sync each)."),
    logger: str = typer.Option(_D.logger, help="Live curves: none, tensorboard (RUN/tensorboard) or wandb (offline "
                               "unless WANDB_MODE or wandb's settings say otherwise); pip install 'ccl[NAME]'."),
    eval_every: int = typer.Option(_D.eval_every, help="Epochs between test evaluations (and the last epoch)."),
    track_every: int = typer.Option(_D.track_every, help="Epochs between logging M_embed, M_logit and the variance "
                                    "entropy (ccl analyze's measures) on a fixed test subset; 0: off."),
    track_samples: int = typer.Option(_D.track_samples, help="Size of that test subset."),
    recipe: Optional[str] = typer.Option(None, help="A published setting to start from (`ccl recipes` lists them); "
                                         "options given here override it.", show_default=False),
    config: Optional[Path] = typer.Option(None, help="JSON file of options (method sections as nested objects); "
                                          "options given here override it and the recipe.", show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its checkpoints/last.pt, with its own options."),
    allow_changes: bool = typer.Option(False, "--allow-changes", help="With --resume: accept options that change the run (lr, seed, "
                                       "batch size, ...); they are recorded in config.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start a named run over, discarding its checkpoints."),
    strict: bool = typer.Option(_D.strict, "--strict/--no-strict", help="A corrupt image is an error instead of "
                                "skipped and counted."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
):
    """Train a model on noisy labels and write runs/NAME (config, metrics.jsonl, checkpoints, summary)."""
    params = dict(locals())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    # Only what the user typed overrides a config file or, on --resume, the run's own config.
    explicit = {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()
                if k in fields and _typed(ctx, k)}
    values = {}
    if recipe is not None:
        from ccl.train import recipes

        values = _merge(recipes.load(recipe)["config"], {"recipe": recipe})
    if config:
        values = _merge(values, load_config_file(config))
    values = apply_overrides(_merge(values, explicit), list(set_ or []))
    if ablate is not None:
        values.setdefault("ccl", {})["ablations"] = ablate
    if resume:
        from ccl.train.loop import saved_config

        base = saved_config(TrainConfig.from_dict(values))
        values = _merge(base, values)
    cfg = TrainConfig.from_dict(values)
    from ccl.train.loop import train as run_train

    try:
        summary = run_train(cfg, resume=resume, overwrite=overwrite, allow_changes=allow_changes, progress=not quiet)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; the last completed epoch's checkpoint is kept (continue with --resume)") from None
    _print_summary(summary)


def _merge(base: dict, over: dict) -> dict:
    """Config values `over` on top of `base`; method sections merge key by key."""
    out = {**base, **over}
    for s in SECTIONS:
        if isinstance(base.get(s), dict) and isinstance(over.get(s), dict):
            out[s] = {**base[s], **over[s]}
    return out


def _typed(ctx: typer.Context, param: str) -> bool:
    """Was this option given on the command line (rather than left at its default)?"""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name == "COMMANDLINE"


def _print_summary(summary: dict) -> None:
    t = Table(title=f"{summary['method']} on {summary['dataset']} ({summary['arch']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in summary.items():
        if k in ("method", "dataset", "arch"):
            continue
        t.add_row(k, "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v))
    console.print(t)


def recipes_cmd():
    """List the recipes `ccl train --recipe NAME` takes: each method's published settings, per dataset."""
    from ccl.train import recipes

    t = Table(title="recipes")
    for col in ("name", "dataset", "description"):
        t.add_column(col)
    for name in recipes.names():
        r = recipes.load(name)
        t.add_row(name, r["dataset"], r["description"])
    console.print(t)


def eval_cmd(
    checkpoint: Path = typer.Option(..., help="A checkpoint (runs/NAME/checkpoints/best.pt or last.pt)."),
    data: Optional[Path] = typer.Option(None, help="Shard directory. \\[default: the one the run trained on]",
                                        show_default=False),
    split: str = typer.Option("test", help="Split to evaluate (e.g. test, val_imagenet)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result to this file."),
):
    """Evaluate a checkpoint: top-1/top-5 of each net and of the ensemble."""
    from ccl.train.loop import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, split, device)
    t = Table(title=f"{checkpoint} on {split} (epoch {result['epoch']})")
    t.add_column("head")
    t.add_column("top-1", justify="right")
    t.add_column("top-5", justify="right")
    for head in sorted({k.rsplit("_", 1)[0] for k in result if k.endswith("_top1")}):
        t.add_row(head, f"{result[head + '_top1']:.2f}", f"{result[head + '_top5']:.2f}")
    console.print(t)
    if json_out:
        from ccl import files

        files.write_json(json_out, result)


def register(app: typer.Typer) -> None:
    """Add `ccl train`, `ccl recipes` and `ccl eval` to the app (`ccl.cli` calls this once)."""
    app.command("train")(train_cmd)
    app.command("recipes")(recipes_cmd)
    app.command("eval")(eval_cmd)
