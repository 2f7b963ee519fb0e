"""The `ccl` command: train, eval, table and bench. Thin: each command builds a config and calls one function."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ccl.errors import UserError
from ccl.model import ARCHS
from ccl.train.config import SECTIONS, TrainConfig, apply_overrides, load_config_file
from ccl.train.methods import METHODS

app = typer.Typer(help="ccl: train with noisy labels (CCL, TCL, RoLR, CE) from WebDataset shards.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
bench_app = typer.Typer(help="Throughput benchmarks, each measured side by side in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console()

_D = TrainConfig()  # the defaults shown in the help text


def _fail(msg: str, code: int = 2) -> None:
    # One line on stderr, never wrapped: scripts grep it, people read it.
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _run(fn, *args, **kwargs):
    """Call into the library; a user's mistake ends in one line, never a traceback. A bug of ours keeps its own."""
    from ccl.train.loop import NonFiniteLoss

    try:
        return fn(*args, **kwargs)
    except UserError as e:
        _fail(str(e))
    except NonFiniteLoss as e:
        _fail(str(e), code=1)
    except KeyboardInterrupt:
        _fail("interrupted; the last completed epoch's checkpoint is kept (continue with --resume)", code=130)


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


@app.command()
def train(
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

        values = _merge(_run(recipes.load, recipe)["config"], {"recipe": recipe})
    if config:
        values = _merge(values, _run(load_config_file, config))
    values = _run(apply_overrides, _merge(values, explicit), list(set_ or []))
    if ablate is not None:
        values.setdefault("ccl", {})["ablations"] = ablate
    if resume:
        from ccl.train.loop import saved_config

        base = _run(saved_config, _run(TrainConfig.from_dict, values))
        values = _merge(base, values)
    cfg = _run(TrainConfig.from_dict, values)
    from ccl.train.loop import train as run_train

    summary = _run(run_train, cfg, resume=resume, overwrite=overwrite, allow_changes=allow_changes,
                   progress=not quiet)
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


@app.command("recipes")
def recipes_cmd():
    """List the recipes `ccl train --recipe NAME` takes: each method's published settings, per dataset."""
    from ccl.train import recipes

    t = Table(title="recipes")
    for col in ("name", "dataset", "description"):
        t.add_column(col)
    for name in recipes.names():
        r = _run(recipes.load, name)
        t.add_row(name, r["dataset"], r["description"])
    console.print(t)


@app.command("eval")
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

    result = _run(evaluate_checkpoint, checkpoint, data, split, device)
    t = Table(title=f"{checkpoint} on {split} (epoch {result['epoch']})")
    t.add_column("head")
    t.add_column("top-1", justify="right")
    t.add_column("top-5", justify="right")
    for head in sorted({k.rsplit("_", 1)[0] for k in result if k.endswith("_top1")}):
        t.add_row(head, f"{result[head + '_top1']:.2f}", f"{result[head + '_top5']:.2f}")
    console.print(t)
    if json_out:
        from ccl import files

        _run(files.write_json, json_out, result)


@app.command()
def table(
    methods: str = typer.Option("ce,rolr,tcl,ccl", help="Comma-separated methods."),
    noise: str = typer.Option("sym:0.5,pair:0.4", help="Comma-separated TYPE:RATE settings."),
    seeds: str = typer.Option("0,1", help="Comma-separated seeds (noise and init)."),
    epochs: int = typer.Option(12, help="Epochs per run."),
    warmup: int = typer.Option(4, help="Warm-up epochs, the same for every method."),
    arch: str = typer.Option("resnet_small", help="Architecture for every run."),
    batch_size: int = typer.Option(64, help="Batch size for every run."),
    out: Path = typer.Option(Path("runs/table"), help="Directory for the runs, table.md and table.json."),
    data: Optional[Path] = typer.Option(None, help="A shard directory with its own labels: one column, named "
                                        "after the directory, instead of the built-in digits under --noise (then "
                                        "--noise is ignored)."),
    extra: Optional[Path] = typer.Option(None, help="JSON file of further TrainConfig options for every run."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE or SECTION.KEY=VALUE for every run "
                                             "(repeatable).", show_default=False),
    grid: Optional[list[str]] = typer.Option(None, "--grid", help="KEY=V1,V2,... (repeatable): train the product of "
                                             "the grids; a method section's key applies to that method alone, e.g. "
                                             "--grid ccl.sharpen_t=none,0.5 --grid schedule=joint,alternate.",
                                             show_default=False),
    val_fraction: float = typer.Option(0.0, help="Held-out fraction of the noisy training set (ranks the grid's "
                                       "cells; never the test split)."),
    patience: int = typer.Option(0, help="Stop a run when its held-out accuracy has not improved for this many "
                                 "epochs (needs --val-fraction); 0: every run takes --epochs."),
):
    """Run a methods x grid x noise x seeds table and write table.md and table.json (resumes a partly finished
    one: finished runs are read back, a killed one continues)."""
    from ccl.train.table import run_table

    base = _run(load_config_file, extra) if extra else {}
    base = _run(apply_overrides, base, list(set_ or []))
    seed_list = [s.strip() for s in seeds.split(",") if s.strip()]
    if not seed_list or not all(s.lstrip("-").isdigit() for s in seed_list):
        _fail(f"--seeds takes comma-separated whole numbers, e.g. 0,1,2; got {seeds!r}")
    base = {"batch_size": batch_size, "val_fraction": val_fraction, "patience": patience, **base}
    _run(run_table, methods=methods.split(","), noise=noise.split(","), seeds=[int(s) for s in seed_list],
         epochs=epochs, warmup=warmup, arch=arch, out=out, data=data, base=base, grid=list(grid or []),
         console=console)


@bench_app.command("pipeline")
def bench_pipeline_cmd(
    backend: list[str] = typer.Option(["reference", "torch", "dali"], help="Backends to compare (repeatable)."),
    batch_size: int = typer.Option(256, help="Batch size."),
    workers: int = typer.Option(2, help="Loader workers for every backend."),
    steps: int = typer.Option(20, help="Batches measured per backend and size."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this file."),
):
    """Images/s to make (weak, strong, mixup) batches ready for the model, per backend, at 32 and 64 px."""
    from ccl.train.bench.pipeline import bench_pipeline

    _run(bench_pipeline, backends=tuple(backend), batch_size=batch_size, num_workers=workers, steps=steps,
         json_path=json_out)


@bench_app.command("kernel")
def bench_kernel_cmd(
    n: list[int] = typer.Option([128, 512, 2048, 8192], help="Batch sizes N (repeatable)."),
    d: int = typer.Option(128, help="Embedding dimension D."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this file."),
):
    """Forward+backward time and peak memory of the contrastive kernel implementations, side by side."""
    from ccl.train.bench.kernel import bench_kernel

    _run(bench_kernel, ns=tuple(n), d=d, json_path=json_out)


@bench_app.command("train")
def bench_train_cmd(
    epochs: int = typer.Option(2, help="Epochs per variant (the first one past warm-up is timed)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this file."),
):
    """Epoch time of CCL on the built-in digits set: full vs inline confidence, alternate vs joint schedule."""
    from ccl.train.bench.train import bench_train

    _run(bench_train, epochs=epochs, json_path=json_out, console=console)


# Commands that live beside their engines, each added by its module's register(app).
from ccl.pipeline.check import register as _register_check  # noqa: E402
from ccl.pipeline.views import register as _register_views  # noqa: E402
from ccl.train.analyze.cli import register as _register_analyze  # noqa: E402
from ccl.train.bench.scale import register as _register_bench_scale  # noqa: E402
from ccl.train.labels import register as _register_labels  # noqa: E402
from ccl.train.predict import register as _register_predict  # noqa: E402
from ccl.train.runs import register as _register_runs  # noqa: E402

for _register in (_register_views, _register_check, _register_analyze, _register_labels, _register_runs,
                  _register_predict):
    _register(app)
_register_bench_scale(bench_app)

__all__ = ["app"]


if __name__ == "__main__":  # `python -m ccl.train.cli`, as the tests run it
    app()
