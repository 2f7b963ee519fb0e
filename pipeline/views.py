"""`ccl views`: a picture of what the model sees, and a record of what the strong view draws.

For a shard set (default: the built-in digits set, built once into $CCL_CACHE/shards, else ~/.cache/ccl/shards),
`render_views` takes the first `n` images of a split and writes
- views.png: one row each for the originals, the weak view, the strong view (RoLR's RandAugment + Cutout), the
  mixup of the weak views (Beta(1, 1), TCL's), and TCL's two contrastive views; matplotlib draws it when
  installed, else PIL;
- views.json: the op counts and value ranges of `draws` strong-view draws, under `ops.<name>.min` / `.max` /
  `.mean` in each op's own units (rotate in degrees, the enhance ops as factors, posterize in bits kept,
  solarize as the 8-bit threshold, shear as the factor, translate as a fraction of the side), next to the range
  each op is specified to cover (`ops.<name>.spec`); and the same for Cutout and the contrastive view.
The views come from `ccl.pipeline.augment.Augment`, the module both loader backends feed, at the size and style
the training loop picks (the image's own size up to 64 px, else 224 px, imagenet style).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

from ccl import files
from ccl.errors import UserError
from ccl.pipeline.augment import (
    OP_INDEX,
    OPS,
    PARAMETERLESS_OPS,
    RA_RANGES,
    TCL_JITTER,
    TCL_JITTER_STRENGTH,
    TCL_P,
    Augment,
    apply_mixup,
    draw_mixup,
)

ROWS = ("original", "weak", "strong", "mixup", "contrastive 1", "contrastive 2")
UNITS = {
    "rotate": "degrees", "shear_x": "shear factor", "shear_y": "shear factor", "translate_x": "fraction of the width",
    "translate_y": "fraction of the height", "solarize": "8-bit threshold", "posterize": "bits kept",
    "brightness": "enhance factor", "color": "enhance factor", "contrast": "enhance factor",
    "sharpness": "enhance factor",
}
MIXUP_ALPHA = 1.0  # TCL's mixup_alpha (its configs)


def _open_shards(data: Optional[Path]):
    from ccl.pipeline.shards import ShardSet

    if data is None:
        from ccl.pipeline.convert import default_cache, ensure_digits

        data = ensure_digits(default_cache() / "shards")
    return ShardSet.open(data)


def _augment_for(shards) -> Augment:
    """The training loop's choice: the image's own size up to 64 px (cifar style), else 224 px (imagenet)."""
    hw = shards.image_size
    small = hw is not None and max(hw) <= 64
    return Augment(shards.mean, shards.std, int(hw[0]) if small else 224, style="cifar" if small else "imagenet")


def _first_images(shards, split: str, n: int) -> torch.Tensor:
    from ccl.pipeline.loader import make_loader

    loader = make_loader(shards, split, batch_size=n, train=False, device="cpu", num_workers=0)
    for batch in loader:
        return batch.images[:n]  # uint8 [n, 3, H, W]
    raise UserError(f"{shards.root}: the {split} split has no images")


def draw_summary(aug: Augment, in_hw: tuple[int, int], draws: int, generator: torch.Generator) -> dict:
    """The strong and contrastive views' parameter draws for `draws` images of size in_hw, summarised."""
    p = aug.sample_strong(draws, in_hw, generator, device="cpu")
    ops = {}
    for name in OPS:
        v = p.value[p.ops == OP_INDEX[name]].double()
        entry = {"count": int(v.numel()), "unit": UNITS.get(name)}
        if name in PARAMETERLESS_OPS or v.numel() == 0:
            entry.update(min=None, max=None, mean=None, spec=None)
        else:
            lo, hi = RA_RANGES[name]
            spec = [lo, hi] if name != "posterize" else [int(lo), int(hi) - 1]
            entry.update(min=round(v.min().item(), 4), max=round(v.max().item(), 4), mean=round(v.mean().item(), 4),
                         spec=spec)
        ops[name] = entry
    ra_hw = aug._ra_hw(in_hw)
    y0, y1, x0, x1 = p.cutout.double().unbind(1)
    side = torch.maximum(y1 - y0, x1 - x0) / ra_hw[1]  # the drawn side (less where the box meets an edge)
    c = aug.sample_contrastive(draws, in_hw, generator, device="cpu")
    area = c.box[:, 2] * c.box[:, 3] / (in_hw[0] * in_hw[1])
    jitter = {}
    for j, name in enumerate(TCL_JITTER):
        f = c.factor[:, j].double()
        centre = 0.0 if name == "hue" else 1.0
        jitter[name] = {"min": round(f.min().item(), 4), "max": round(f.max().item(), 4),
                        "spec": [centre - TCL_JITTER_STRENGTH[j], centre + TCL_JITTER_STRENGTH[j]]}
    return {
        "ops": ops,
        "ops_per_image": aug.ra_ops,
        "cutout": {"side_fraction_min": round(side.min().item(), 4), "side_fraction_max": round(side.max().item(), 4),
                   "spec": [0.0, aug.cutout]},
        "contrastive": {
            "crop_area_min": round(area.min().item(), 4), "crop_area_max": round(area.max().item(), 4),
            "crop_area_spec": list(aug.contrastive_scale),
            "p": {"flip": float(c.flip.double().mean()), "jitter": float(c.jitter.double().mean()),
                  "gray": float(c.gray.double().mean()), "solarize": float(c.solarize.double().mean())},
            "p_spec": dict(TCL_P),
            "jitter": jitter,
        },
    }


def _to_pixels(aug: Augment, v: torch.Tensor) -> np.ndarray:
    """Normalised float [N, 3, S, S] -> uint8 [N, S, S, 3] for display."""
    x = (v * aug.std + aug.mean).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _grid_matplotlib(rows: list[np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n + 1.2, 1.2 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(zip(ROWS, rows)):
        for i in range(n):
            ax = axes[r][i]
            ax.imshow(images[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grid_pil(rows: list[np.ndarray], path: Path, scale: int = 3, gap: int = 2, label_w: int = 90) -> None:
    from PIL import Image, ImageDraw

    n, s = rows[0].shape[0], rows[0].shape[1] * scale
    canvas = Image.new("RGB", (label_w + n * (s + gap), len(rows) * (s + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(zip(ROWS, rows)):
        top = r * (s + gap)
        draw.text((4, top + s // 2 - 5), label, fill=(0, 0, 0))
        for i in range(n):
            tile = Image.fromarray(images[i]).resize((s, s), Image.NEAREST)
            canvas.paste(tile, (label_w + i * (s + gap), top))
    canvas.save(path)


def render_views(
    data: Optional[Path] = None,
    out: Path = Path("views"),
    *,
    n: int = 8,
    draws: int = 4096,
    seed: int = 0,
    split: str = "train",
    use_matplotlib: Optional[bool] = None,
) -> dict:
    """Write out/views.png and out/views.json; returns {"grid", "json", "summary"}. See the module docstring.

    use_matplotlib: None takes matplotlib when it is installed, else PIL.
    """
    if n < 1 or draws < 1:
        raise UserError(f"--n and --draws must be positive, got {n} and {draws}")
    shards = _open_shards(data)
    aug = _augment_for(shards)
    x = _first_images(shards, split, n)  # uint8 [n, 3, H, W]
    g = torch.Generator().manual_seed(seed)
    weak = aug.weak(x, generator=g)
    strong = aug.strong(x, generator=g)
    lam, perm = draw_mixup(x.shape[0], MIXUP_ALPHA, generator=g, host=random.Random(seed))
    mixed = apply_mixup(weak, lam, perm)
    c1, c2 = aug.contrastive(x, generator=g), aug.contrastive(x, generator=g)
    original = aug.eval_view(x)
    rows = [_to_pixels(aug, v) for v in (original, weak, strong, mixed, c1, c2)]

    out = files.make_dir(out)
    grid = out / "views.png"
    if use_matplotlib is None:
        try:
            import matplotlib  # noqa: F401

            use_matplotlib = True
        except ImportError:
            use_matplotlib = False
    (_grid_matplotlib if use_matplotlib else _grid_pil)(rows, grid)

    summary = {
        "data": str(shards.root),
        "split": split,
        "images": int(x.shape[0]),
        "seed": seed,
        "draws": draws,
        "input_size": list(x.shape[-2:]),
        "view_size": aug.size,
        "style": aug.style,
        "rows": list(ROWS),
        "mixup": {"alpha": MIXUP_ALPHA, "lam": round(lam, 6), "perm": perm.tolist()},
        **draw_summary(aug, tuple(x.shape[-2:]), draws, torch.Generator().manual_seed(seed + 1)),
    }
    path = out / "views.json"
    files.write_json(path, summary, indent=1)
    return {"grid": grid, "json": path, "summary": summary}


# ----------------------------------------------------------------------------------------------------------------
# The command


def views(
    data: Optional[Path] = typer.Option(None, help="Shard directory from tools/shard.py. Default: the built-in "
                                        "digits set, built into $CCL_CACHE/shards (else ~/.cache/ccl/shards)."),
    out: Path = typer.Option(Path("views"), help="Folder for views.png and views.json."),
    n: int = typer.Option(8, help="Images per row."),
    draws: int = typer.Option(4096, help="Strong and contrastive parameter draws summarised in views.json."),
    seed: int = typer.Option(0, help="Seed of every draw."),
    split: str = typer.Option("train", help="The split whose first images are shown."),
) -> None:
    """What the model sees: originals, weak, strong, mixup and TCL's two contrastive views as a PNG grid, and the
    drawn RandAugment ops with their value ranges as JSON."""
    res = render_views(data, out, n=n, draws=draws, seed=seed, split=split)
    ops = res["summary"]["ops"]
    typer.echo(f"grid: {res['grid']}")
    typer.echo(f"draws: {res['json']}")
    for name in ("rotate", "shear_x", "translate_x", "solarize", "posterize", "brightness"):
        typer.echo(f"  {name:12s} [{ops[name]['min']}, {ops[name]['max']}] {ops[name]['unit']}")


def register(app: typer.Typer) -> None:
    """Add `views` to the `ccl` app (`ccl.cli` calls this once)."""
    app.command("views")(views)
