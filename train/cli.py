"""The `ccl` command: train, eval, table and bench. Thin: each command builds a config and calls one function."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ccl.errors import UserError
from ccl.train.config import TrainConfig, load_config_file

app = typer.Typer(help="ccl: train with noisy labels (CCL, TCL, RoLR, CE) from WebDataset shards.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
bench_app = typer.Typer(help="Throughput benchmarks, each measured side by side in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console()

_D = TrainConfig()  # the defaults shown in the help text


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def _run(fn, *args, **kwargs):
    """Call into the library; a user's mistake ends in one line, never a traceback."""
    from ccl.train.loop import NonFiniteLoss

    try:
        return fn(*args, **kwargs)
    except UserError as e:
        _fail(str(e))
    except NonFiniteLoss as e:
        _fail(str(e), code=1)
    except KeyboardInterrupt:
        _fail("interrupted; the last completed epoch's checkpoint is kept (continue with --resume)", code=130)


@app.command()
def train(
    data: Optional[Path] = typer.Option(None, help="Shard directory from tools/shard.py. Default: the built-in "
                                        "digits set with --noise/--noise-rate, built into ~/.cache/ccl on first use."),
    method: Optional[str] = typer.Option(None, help=f"ccl, tcl, rolr or ce. [default: {_D.method}]", show_default=False),
    arch: Optional[str] = typer.Option(None, help="auto, resnet18, resnet50, resnet_small or resnet_tiny; auto "
                                       "takes the paper's choice for the dataset. [default: auto]", show_default=False),
    epochs: Optional[int] = typer.Option(None, help=f"Epochs in all, warm-up included. [default: {_D.epochs}]",
                                         show_default=False),
    warmup: Optional[int] = typer.Option(None, help="Warm-up epochs of plain CE. [default: the method's: 10 for "
                                         "ccl/rolr, 20 for tcl]", show_default=False),
    batch_size: Optional[int] = typer.Option(None, help=f"Batch size. [default: {_D.batch_size}]", show_default=False),
    lr: Optional[float] = typer.Option(None, help=f"Adam learning rate. [default: {_D.lr}]", show_default=False),
    cosine: Optional[bool] = typer.Option(None, "--cosine/--no-cosine", help="Cosine lr decay over the run.",
                                          show_default=False),
    schedule: Optional[str] = typer.Option(None, help="Twin schedule: alternate (the paper's: one net trains, the "
                                           f"peer is fixed, then the reverse) or joint. [default: {_D.schedule}]",
                                           show_default=False),
    confidence: Optional[str] = typer.Option(None, help="Label-confidence losses from a full pass over the training "
                                             "set after each epoch, or inline from the epoch's own steps. "
                                             f"[default: {_D.confidence}]", show_default=False),
    tau: Optional[float] = typer.Option(None, help=f"Contrastive temperature. [default: {_D.tau}]", show_default=False),
    threshold: Optional[float] = typer.Option(None, help=f"PG confidence threshold c (Eq. 7). [default: {_D.threshold}]",
                                              show_default=False),
    kernel: Optional[str] = typer.Option(None, help="Contrastive kernel: auto, reference, torch or triton. "
                                         "[default: auto]", show_default=False),
    no_mimicry: bool = typer.Option(False, help="Ablation: without View- and Model-wise Mimicry (Table 7)."),
    no_threshold: bool = typer.Option(False, help="Ablation: PG without the threshold c."),
    no_refurbished: bool = typer.Option(False, help="Ablation: CCLRL without refurbished labels."),
    no_cvl: bool = typer.Option(False, help="Ablation: without Cross-view Learning."),
    no_cml: bool = typer.Option(False, help="Ablation: without Cross-model Learning."),
    num_classes: Optional[int] = typer.Option(None, help="Expected class count; checked against the manifest.",
                                              show_default=False),
    noise: Optional[str] = typer.Option(None, help=f"Built-in digits only: sym, pair, asym or instance. "
                                        f"[default: {_D.noise}]", show_default=False),
    noise_rate: Optional[float] = typer.Option(None, help=f"Built-in digits only. [default: {_D.noise_rate}]",
                                               show_default=False),
    backend: Optional[str] = typer.Option(None, help=f"Loader: torch or dali. [default: {_D.backend}]",
                                          show_default=False),
    workers: Optional[int] = typer.Option(None, help=f"Loader workers. [default: {_D.workers}]", show_default=False),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision: bf16 on CPU, fp16 + "
                                       "GradScaler on CUDA. [default: on]", show_default=False),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the networks.",
                                           show_default=False),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N. [default: auto]", show_default=False),
    seed: Optional[int] = typer.Option(None, help="Seed of init, order, augmentation (and digits noise). "
                                       "[default: 0]", show_default=False),
    out: Optional[Path] = typer.Option(None, help="Parent of the run directory. [default: runs]", show_default=False),
    name: Optional[str] = typer.Option(None, help="Run name. [default: DATASET-METHOD-sSEED, numbered if taken]",
                                       show_default=False),
    config: Optional[Path] = typer.Option(None, help="JSON file of options; options given here override it."),
    resume: bool = typer.Option(False, help="Continue the run from its checkpoints/last.pt."),
    overwrite: bool = typer.Option(False, help="Start a named run over, discarding its checkpoints."),
    strict: bool = typer.Option(False, help="A corrupt image is an error instead of skipped and counted."),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Train a model on noisy labels and write runs/NAME (config, metrics.jsonl, checkpoints)."""
    params = dict(locals())
    explicit = {k: v for k, v in params.items()
                if k in {f.name for f in dataclasses.fields(TrainConfig)} and v is not None}
    values = _run(load_config_file, config) if config else {}
    values |= {k: (str(v) if isinstance(v, Path) else v) for k, v in explicit.items()}
    flags = {k: True for k in ("no_mimicry", "no_threshold", "no_refurbished", "no_cvl", "no_cml") if params[k]}
    if flags:
        values["ablations"] = {**values.get("ablations", {}), **flags}
    if strict:
        values["strict"] = True
    cfg = _run(TrainConfig.from_dict, values)
    from ccl.train.loop import train as run_train

    summary = _run(run_train, cfg, resume=resume, overwrite=overwrite, progress=not quiet)
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    t = Table(title=f"{summary['method']} on {summary['dataset']} ({summary['arch']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in summary.items():
        if k in ("method", "dataset", "arch"):
            continue
        t.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
    console.print(t)


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Option(..., help="A checkpoint (runs/NAME/checkpoints/best.pt or last.pt)."),
    data: Optional[Path] = typer.Option(None, help="Shard directory. [default: the one the run trained on]",
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
        json_out.write_text(json.dumps(result, indent=2) + "\n")


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
    data: Optional[Path] = typer.Option(None, help="A shard directory to use for every noise setting instead of "
                                        "the built-in digits (then --noise is ignored)."),
    extra: Optional[Path] = typer.Option(None, help="JSON file of further TrainConfig options for every run."),
):
    """Run a methods x noise x seeds grid and write table.md and table.json (resumes a partly finished grid)."""
    from ccl.train.table import run_table

    base = _run(load_config_file, extra) if extra else {}
    _run(run_table, methods=methods.split(","), noise=noise.split(","), seeds=[int(s) for s in seeds.split(",")],
         epochs=epochs, warmup=warmup, arch=arch, out=out, data=data, base={"batch_size": batch_size, **base},
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


__all__ = ["app"]


if __name__ == "__main__":  # `python -m ccl.train.cli`, as the tests run it
    app()
