"""`ccl train`, `ccl recipes` and `ccl eval`. Thin: each command builds a config and calls one function; `ccl.cli`
assembles them with the other commands."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ccl.errors import Interrupted
from ccl.train import config
from ccl.train.config import SECTIONS, TrainConfig, apply_overrides, load_config_file

console = Console()


def _section_help() -> str:
    lines = []
    for name, cls in SECTIONS.items():
        fields = ", ".join(f"{f.name}={config.format_default(getattr(cls(), f.name))}" for f in dataclasses.fields(cls))
        lines.append(f"{name}: {fields}")
    return "; ".join(lines)


def _field_options() -> list[inspect.Parameter]:
    """One option per TrainConfig field, made from the field: its name (--batch-size, --amp/--no-amp), type,
    default (shown in --help unless it is None) and help (`ccl.train.config.help_text`)."""
    params = []
    for f, tp in config.options():
        base, optional = config.base_type(tp)
        if f.metadata.get("path"):
            base = Path
        default = None if optional else (Path(f.default) if base is Path else f.default)
        option = typer.Option(default, config.cli_flag(f.name, tp), help=config.help_text(f),
                              show_default=not optional)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[base] if optional else base))
    return params


def _command_options() -> list[inspect.Parameter]:
    """The options of the command itself, which say where the values come from and what to do with the run."""
    ablations = ", ".join(config.ABLATIONS)
    options = {
        "set_": (Optional[list[str]], typer.Option(
            None, "--set", metavar="SECTION.KEY=VALUE", show_default=False,
            help=f"A method setting, repeatable, e.g. --set ccl.tau=0.3. Sections and defaults: {_section_help()}.")),
        "ablate": (Optional[str], typer.Option(
            None, metavar="PARTS", show_default=False,
            help=f"CCL's ablations of Table 7, comma-separated: {ablations} (e.g. --ablate mimicry,cml).")),
        "config": (Optional[Path], typer.Option(
            None, show_default=False,
            help="JSON file of options (method sections as nested objects); options given here override it and the "
            "recipe.")),
        "resume": (bool, typer.Option(False, "--resume", help="Continue the run from its checkpoints/last.pt, with "
                                      "its own options.")),
        "allow_changes": (bool, typer.Option(False, "--allow-changes", help="With --resume: accept options that "
                                             "change the run (lr, seed, batch size, ...); they are recorded in "
                                             "config.json.")),
        "overwrite": (bool, typer.Option(False, "--overwrite", help="Start a named run over, discarding its "
                                         "checkpoints.")),
        "quiet": (bool, typer.Option(False, "--quiet", help="No progress bars.")),
    }
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=tp)
            for name, (tp, option) in options.items()]


def train_cmd(ctx: typer.Context, **params):
    """Train a model on noisy labels and write runs/NAME (config, metrics.jsonl, checkpoints, summary)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    # Only what the user typed overrides a config file or, on --resume, the run's own config.
    explicit = {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()
                if k in fields and _typed(ctx, k)}
    recipe, set_, ablate = params["recipe"], params["set_"], params["ablate"]
    values = {}
    if recipe is not None:
        from ccl.train import recipes

        values = _merge(recipes.load(recipe)["config"], {"recipe": recipe})
    if params["config"]:
        values = _merge(values, load_config_file(params["config"]))
    values = apply_overrides(_merge(values, explicit), list(set_ or []))
    if ablate is not None:
        values.setdefault("ccl", {})["ablations"] = ablate
    if params["resume"]:
        from ccl.train.restore import saved_config

        base = saved_config(TrainConfig.from_dict(values))
        values = _merge(base, values)
    cfg = TrainConfig.from_dict(values)
    from ccl.train.loop import train as run_train

    try:
        summary = run_train(cfg, resume=params["resume"], overwrite=params["overwrite"],
                            allow_changes=params["allow_changes"], progress=not params["quiet"])
    except KeyboardInterrupt:
        raise Interrupted("interrupted; the last completed epoch's checkpoint is kept (continue with --resume)") from None
    _print_summary(summary)


# The command's options: one per config field, then its own. Typer reads them from the signature.
train_cmd.__signature__ = inspect.Signature([
    inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
    *_field_options(), *_command_options()])


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
    from ccl.train.restore import evaluate_checkpoint

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
