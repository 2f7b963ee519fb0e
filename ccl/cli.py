"""The `ccl` command. One Typer app, assembled from the commands of the module that owns each (training, the
analysis of finished runs, the data tools, the benchmarks), and the one place where a command that stops (a
user's mistake, a non-finite loss, Ctrl-C) becomes one line on stderr with its exit code. An exception that is
not a `ccl.errors.Stop` is a bug of ours and keeps its traceback."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from ccl import errors


class _Commands(TyperGroup):
    """The app's group: every command, subcommands included, runs inside `invoke`."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (errors.Stop, KeyboardInterrupt) as e:
            typer.echo(errors.message(e), err=True)  # one line, never wrapped: scripts grep it, people read it
            raise typer.Exit(getattr(e, "exit_code", 130)) from None


app = typer.Typer(cls=_Commands, help="ccl: train with noisy labels (CCL, TCL, RoLR, DivideMix, CE) from "
                  "WebDataset shards, and put the runs to use.", no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)
bench_app = typer.Typer(help="Throughput benchmarks, each measured side by side in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _assemble() -> None:
    from ccl.analysis.contamination.cli import register as analyze
    from ccl.analysis.labels import register as labels
    from ccl.analysis.predict import register as predict
    from ccl.analysis.runs import register as runs
    from ccl.analysis.table import register as table
    from ccl.bench.cli import register as bench
    from ccl.pipeline.check import register as check
    from ccl.pipeline.views import register as views
    from ccl.train.cli import register as train

    for register in (train, table, runs, views, check, analyze, labels, predict):
        register(app)
    bench(bench_app)


_assemble()

__all__ = ["app"]


if __name__ == "__main__":  # `python -m ccl.cli`, as the tests run it
    app()
