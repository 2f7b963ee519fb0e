"""The `ccl bench` commands: throughput measured side by side in one run, each engine in its own module."""

from __future__ import annotations

from pathlib import Path
from typing import Optional  # the commands' annotations are evaluated in this module

import typer
from rich.console import Console


def bench_pipeline_cmd(
    backend: list[str] = typer.Option(["reference", "torch", "dali"], help="Backends to compare (repeatable)."),
    batch_size: int = typer.Option(256, help="Batch size."),
    workers: int = typer.Option(2, help="Loader workers for every backend."),
    steps: int = typer.Option(20, help="Batches measured per backend and size."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this file."),
):
    """Images/s to make (weak, strong, mixup) batches ready for the model, per backend, at 32 and 64 px."""
    from ccl.bench.pipeline import bench_pipeline

    bench_pipeline(backends=tuple(backend), batch_size=batch_size, num_workers=workers, steps=steps,
         json_path=json_out)


def bench_kernel_cmd(
    n: list[int] = typer.Option([128, 512, 2048, 8192], help="Batch sizes N (repeatable)."),
    d: int = typer.Option(128, help="Embedding dimension D."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this file."),
):
    """Forward+backward time and peak memory of the contrastive kernel implementations, side by side."""
    from ccl.bench.kernel import bench_kernel

    bench_kernel(ns=tuple(n), d=d, json_path=json_out)


def bench_train_cmd(
    epochs: int = typer.Option(2, help="Epochs per variant (the first one past warm-up is timed)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this file."),
):
    """Epoch time of CCL on the built-in digits set: full vs inline confidence, alternate vs joint schedule."""
    from ccl.bench.train import bench_train

    bench_train(epochs=epochs, json_path=json_out, console=Console())


def bench_arch_cmd(
    arch: list[str] = typer.Option(["resnet18", "preact_resnet18"], help="Networks to compare (repeatable); the "
                                   "first is the base of the ratios."),
    batch_size: int = typer.Option(64, help="Batch size."),
    size: int = typer.Option(32, help="Image side in pixels (at most 64: the CIFAR stem)."),
    rounds: int = typer.Option(5, help="Timed steps per network, interleaved."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto (cuda when available)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this file."),
):
    """Parameter count and training-step time of networks (forward, CE, backward, SGD), side by side."""
    from ccl.bench.arch import bench_arch

    bench_arch(tuple(arch), batch_size=batch_size, rounds=rounds, size=size, device=device, json_path=json_out,
               console=Console())


def register(bench_app: typer.Typer) -> None:
    """Add `pipeline`, `kernel`, `train`, `arch` and `scale` to `ccl bench` (`ccl.cli` calls this once)."""
    from ccl.bench.scale import register as register_scale

    bench_app.command("pipeline")(bench_pipeline_cmd)
    bench_app.command("kernel")(bench_kernel_cmd)
    bench_app.command("train")(bench_train_cmd)
    bench_app.command("arch")(bench_arch_cmd)
    register_scale(bench_app)
