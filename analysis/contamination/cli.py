"""The `ccl analyze` command. `register(app)` adds it to the `ccl` Typer app."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ccl.errors import Interrupted

console = Console(stderr=True)

TAXONOMY_HELP = (
    "JSON class taxonomy for the LCA distance, instead of the built-in trees (CIFAR-10/10N, CIFAR-100/100N, "
    "Animal-10N, digits; WordNet ids through an offline WordNet): "
    '{"name": ..., "source": ..., "paths": {"CLASS": ["ROOT", ..., "CLASS"], ...}}, one path per class from the '
    "root down to the class itself."
)


def analyze_cmd(
    runs: list[Path] = typer.Argument(..., help="Run directories written by `ccl train` (runs/NAME).",
                                      show_default=False),
    split: str = typer.Option("test", help="Split to measure on (e.g. test, train, val_imagenet)."),
    out: Optional[Path] = typer.Option(None, help="Output directory for analysis.json and report.html. "
                                       "\\[default: RUN/plots for one run, ./analysis for several]", show_default=False),
    checkpoint: str = typer.Option("last", help="Checkpoint of each run: last or best."),
    embedding: str = typer.Option("backbone", help="Embedding measured: backbone (penultimate feature f(x), "
                                  "trained by every method) or head (the projection z of the contrastive terms)."),
    taxonomy: Optional[Path] = typer.Option(None, help=TAXONOMY_HELP, show_default=False),
    pairs: int = typer.Option(10000, help="Random sample pairs for M_embed."),
    anchors: int = typer.Option(5, help="Anchor samples per class for the similarity probe."),
    tsne_points: int = typer.Option(2000, help="At most this many samples in each t-SNE plot."),
    seed: int = typer.Option(0, help="Seed of pairs, anchors and t-SNE."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    data: Optional[Path] = typer.Option(None, help="Shard directory to use instead of the one each run trained on.",
                                        show_default=False),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Measure semantic contamination (the CCL paper's Eq. 4, Fig. 2b, Fig. 3, Tables 6 and 8) in trained runs and
    write analysis.json and a self-contained report.html with the runs side by side."""
    from ccl.analysis.contamination.report import Settings, analyze

    target = out or (runs[0] / "plots" if len(runs) == 1 else Path("analysis"))
    settings = Settings(split=split, checkpoint=checkpoint, embedding=embedding, pairs=pairs, anchors=anchors,
                        tsne_points=tsne_points, seed=seed, device=device, taxonomy=str(taxonomy) if taxonomy else None,
                        data=str(data) if data else None)
    try:
        analyze(runs, target, settings, progress=not quiet, console=console)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; nothing was written") from None
    Console().print(f"wrote {target / 'analysis.json'} and {target / 'report.html'}")


def register(app: typer.Typer) -> None:
    """Add `ccl analyze` to the app (`ccl.cli` calls this once)."""
    app.command("analyze")(analyze_cmd)
