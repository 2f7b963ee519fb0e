"""The trained model, put to use: `ccl predict` (classes of new images, as a CSV) and `ccl export` (the weights as
safetensors, with a JSON sidecar to rebuild the network anywhere ccl is installed).

Both rebuild the run with `ccl.train.restore.restore` (the checkpoint's config, the training set's manifest for the
classes and the normalisation), so a prediction sees exactly what `ccl eval` scores: the same decoder and resize
as the loader (`ccl.pipeline.decode.decode_to`), the eval view, the precision the run trained in, and the
ensemble as the softmax of the nets' summed logits (or one net's, with `--net K`).

The exported file holds each net's state_dict under `net0.`, `net1.` ...; the sidecar (same name, .json) names
the class and its arguments, the class names, the input size and the normalisation. `SNIPPET` rebuilds the
networks from the two files with ccl installed. For the torchvision ResNets (`resnet18`, `resnet50` with ccl's
linear classifier: every method but TCL), the sidecar's `torchvision` entry maps each torchvision key to its
exported tensor, and `TORCHVISION_SNIPPET` rebuilds plain `torchvision.models` ResNets without ccl (the CIFAR stem,
a 3x3/1 first conv and no max-pool, for small inputs; the projection head left out). The README shows both; tests
run both.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import typer

from ccl import files
from ccl.errors import UserError

FOLDER_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EXPORT_FORMAT = "ccl-export-1"

# Rebuilds the exported networks (nets[k] is net k; the ensemble sums their logits). Kept here so that the README's
# copy is tested against the code that writes the files.
SNIPPET = """\
import importlib, json; from safetensors.torch import load_file
meta, weights = json.load(open("model.json")), load_file("model.safetensors")
Model = getattr(importlib.import_module(meta["module"]), meta["class"])  # ccl.model.Net (ccl, ce, rolr, ...)
nets = [Model(**meta["kwargs"]).eval() for _ in meta["nets"]]
for name, net in zip(meta["nets"], nets): net.load_state_dict({k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")})
"""

# Rebuilds them as plain torchvision ResNets, without ccl (resnet18 and resnet50; the sidecar's "torchvision" entry
# is null for the other networks). net(x) is the classifier's logits.
TORCHVISION_SNIPPET = """\
import json, torch, torchvision; from safetensors.torch import load_file
meta, weights = json.load(open("model.json")), load_file("model.safetensors"); tv = meta["torchvision"]
nets = [getattr(torchvision.models, tv["model"])(num_classes=len(meta["classes"])) for _ in tv["keys"]]
for net in (nets if tv["cifar_stem"] else []): net.conv1, net.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
for net, keys in zip(nets, tv["keys"]): net.load_state_dict({k: weights[name] for k, name in keys.items()}); net.eval()
"""
TORCHVISION_ARCHS = ("resnet18", "resnet50")  # ccl.model.resnet._backbone: torchvision's, with fc = Identity


# ----------------------------------------------------------------------------------------------------------------
# Inputs: image files, folders of them, or a shard set's split


@dataclass(frozen=True)
class Item:
    """One image to predict: its name in the output, how to read its bytes, and its labels when known."""

    name: str
    path: Path | None = None  # a file; or, for a shard sample, None and `read` below
    index: int = -1  # the sample's index in its split (shard sets)
    label: int = -1  # its given label (shard sets)
    clean: int = -1  # its true label, -1 when unknown

    def read(self, locations=None) -> bytes:
        return self.path.read_bytes() if self.path is not None else locations.read(self.index)


def collect(inputs: list[Path], split: str) -> tuple[list[Item], dict]:
    """The items of every input, in order: a file as it is, a folder's image files (recursively, sorted), a shard
    set's split (a folder with a manifest.json). Returns (items, {shard set root: its sample locations})."""
    from ccl.pipeline.manifest import MANIFEST
    from ccl.pipeline.shards import ShardSet
    from ccl.pipeline.shards import sample_locations

    items: list[Item] = []
    sets: dict = {}
    for p in map(Path, inputs):
        if p.is_file():
            items.append(Item(str(p), p))
        elif (p / MANIFEST).is_file():
            shards = ShardSet.open(p)
            if split not in shards.splits:
                raise UserError(f"no split {split!r} in {p}; it has {', '.join(shards.splits)} (--split)")
            loc = sample_locations(shards, split)
            given, clean = shards.labels(split)
            sets[len(items)] = loc
            items += [Item(f"{p}:{split}/{loc.key[i]}", None, i, int(given[i]), int(clean[i]))
                      for i in range(len(given))]
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in FOLDER_EXTS and f.is_file())
            if not found:
                raise UserError(f"{p}: no image files ({', '.join(FOLDER_EXTS)}) in it or below it")
            items += [Item(str(f), f) for f in found]
        else:
            raise UserError(f"not found: {p} (expected image files, folders of them, or a shard set)")
    if not items:
        raise UserError("nothing to predict: give image files, folders or a shard set")
    return items, sets


def _pil_decode(data: bytes) -> torch.Tensor:
    from ccl.pipeline.shards import decode_image

    return torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)  # [3, H, W]


def decode(data: bytes, hw: tuple[int, int], variable: bool) -> torch.Tensor:
    """uint8 [3, H, W] as the loader decodes it; formats its decoder does not read (BMP, TIFF) through PIL."""
    from ccl.pipeline.decode import DECODE_ERRORS, decode_to

    with warnings.catch_warnings():
        # torchvision 0.29 warns on every decode call that its decoders are deprecated (as in the loader)
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        try:
            return decode_to(data, hw, variable)
        except DECODE_ERRORS:
            return decode_to(data, hw, variable, _pil_decode)


def batches(items: list[Item], sets: dict, hw, variable: bool, batch_size: int,
            skipped: list) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(positions, uint8 [B, 3, H, W]) batches of the items that decode; the others go to `skipped` as
    (name, reason)."""
    from ccl.pipeline.decode import DECODE_ERRORS

    starts = sorted(sets)
    pos, imgs = [], []
    for j, item in enumerate(items):
        loc = None
        if item.path is None:
            loc = sets[max(s for s in starts if s <= j)]
        try:
            imgs.append(decode(item.read(loc), hw, variable))
            pos.append(j)
        except (*DECODE_ERRORS, OSError) as e:
            skipped.append((item.name, f"{type(e).__name__}: {e}".strip()))
        if len(imgs) == batch_size:
            yield pos, torch.stack(imgs)
            pos, imgs = [], []
    if imgs:
        yield pos, torch.stack(imgs)


# ----------------------------------------------------------------------------------------------------------------
# Prediction


def head_name(run, net: int | None) -> str:
    k = len(run.method.nets)
    if net is None:
        return "ens"
    if not 0 <= net < k:
        raise UserError(f"--net {net}: the run has {k} net{'s' * (k > 1)} (0..{k - 1})")
    return f"net{net}"


@torch.no_grad()
def predict(checkpoint: Path, inputs: list[Path], *, net: int | None = None, top_k: int = 5, split: str = "test",
            batch_size: int = 256, device: str = "auto", data: Path | None = None, progress: bool = True) -> dict:
    """Predict every input image. Returns {"rows": [...], "skipped": [(name, reason)], "classes", "head",
    "accuracy" (against the true labels of a shard set, when known), "epoch"}."""
    from ccl.model import eval_mode
    from ccl.pipeline.decode import resolve_load_size
    from ccl.train.loop import precision
    from ccl.train.restore import restore

    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    items, sets = collect(inputs, split)
    run, state = restore(Path(checkpoint), data, device)
    head = head_name(run, net)
    classes = run.shards.classes
    k = min(top_k, len(classes))
    hw, variable = resolve_load_size(run.shards.image_size, None)
    ctx, _ = precision(run.device, run.cfg.amp)
    rows, skipped = [], []
    from rich.console import Console

    from ccl.progress import bar as progress_bar

    bar = progress_bar(progress, console=Console(stderr=True))
    with bar, eval_mode(run.method):
        task = bar.add_task("predict", total=len(items))
        for pos, x in batches(items, sets, hw, variable, batch_size, skipped):
            x = x.to(run.device, non_blocking=True)
            with ctx:
                logits = run.method.eval_logits(run.aug.eval_view(x))[head]
            p, c = F.softmax(logits.float(), dim=1).topk(k, dim=1)  # [B, k]
            for j, pj, cj in zip(pos, p.cpu().tolist(), c.cpu().tolist()):
                rows.append((items[j], cj, pj))
            bar.update(task, completed=pos[-1] + 1)
    known = [(it, c) for it, c, _ in rows if it.clean >= 0]
    accuracy = 100.0 * sum(c[0] == it.clean for it, c in known) / len(known) if known else None
    return {"rows": rows, "skipped": skipped, "classes": classes, "head": head, "top_k": k, "accuracy": accuracy,
            "epoch": state["epoch"] + 1, "labelled": any(it.label >= 0 for it, _, _ in rows)}


def write_csv(result: dict, path: Path) -> None:
    """path, pred, pred_name, prob, then top2..topK (index, name, prob), and for a shard set its given label and
    true label (-1 when unknown)."""
    classes, k = result["classes"], result["top_k"]
    head = ["path", "pred", "pred_name", "prob"]
    for t in range(2, k + 1):
        head += [f"top{t}", f"top{t}_name", f"top{t}_prob"]
    if result["labelled"]:
        head += ["label", "true"]
    path = Path(path)
    files.make_dir(path.parent)

    def rows(f) -> None:
        out = csv.writer(f)
        out.writerow(head)
        for item, c, p in result["rows"]:
            row = [item.name]
            for t in range(k):
                row += [c[t], classes[c[t]], f"{p[t]:.6g}"]
            if result["labelled"]:
                row += [item.label, item.clean]
            out.writerow(row)

    files.write_text(path, rows)  # a killed write leaves no half table under the final name


# ----------------------------------------------------------------------------------------------------------------
# Export


def model_spec(run) -> tuple[type, dict]:
    """The class of the run's networks and the arguments that rebuild one (an empty network of the same shape)."""
    from ccl.model import Net
    from ccl.model.heads import TCLNet

    net = run.method.nets[0]
    kwargs = {"arch": run.cfg.arch, "num_classes": run.shards.num_classes, "small_input": run.aug.style == "cifar"}
    if type(net) is TCLNet:
        kwargs |= {"proj_dim": run.cfg.tcl.proj_dim, "dropout": run.cfg.tcl.dropout}
    elif type(net) is Net:
        kwargs["proj_dim"] = net.head[-1].out_features
    else:
        raise TypeError(f"export does not know how to rebuild {type(net).__name__}")
    return type(net), kwargs


def torchvision_spec(run, nets: list[int]) -> dict | None:
    """The sidecar's `torchvision` entry: the torchvision builder, whether the CIFAR stem replaces its first conv and
    max-pool, and per exported net {torchvision key: exported key} (backbone.X -> X, classifier -> fc; the
    projection head has no place in torchvision's ResNet). None for networks torchvision does not build: ccl's own
    (preact_resnet18, resnet_small, resnet_tiny) and TCL's MLP classifier."""
    from ccl.model import Net

    if run.cfg.arch not in TORCHVISION_ARCHS or type(run.method.nets[0]) is not Net:
        return None
    keys = []
    for k in nets:
        mapping = {}
        for name in run.method.nets[k].state_dict():
            part, _, rest = name.partition(".")
            if part == "backbone":
                mapping[rest] = f"net{k}.{name}"
            elif part == "classifier":
                mapping[f"fc.{rest}"] = f"net{k}.{name}"
        keys.append(mapping)
    return {"model": run.cfg.arch, "cifar_stem": run.aug.style == "cifar", "keys": keys,
            "output": "forward(x) -> logits [N, C]"}


def export(run_path: Path, out: Path, *, net: int | None = None, device: str = "cpu", data: Path | None = None) -> dict:
    """Write the run's networks (all, or net `net`) to `out` (safetensors) and the sidecar `out`.json; returns
    the sidecar."""
    from safetensors.torch import save

    from ccl.analysis.inference import resolve_checkpoint
    from ccl.train.restore import restore

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: expected a .safetensors file name")
    ck = resolve_checkpoint(run_path)
    run, state = restore(ck, data, device)
    nets = list(range(len(run.method.nets))) if net is None else [int(head_name(run, net)[3:])]
    cls, kwargs = model_spec(run)
    tensors = {f"net{k}.{name}": t.detach().cpu().contiguous()
               for k in nets for name, t in run.method.nets[k].state_dict().items()}
    size = run.aug.size
    meta = {
        "format": EXPORT_FORMAT, "module": cls.__module__,
        "class": cls.__name__, "kwargs": kwargs, "nets": [f"net{k}" for k in nets],
        "ensemble": "softmax of the nets' summed logits" if len(nets) > 1 else None,
        "classes": list(run.shards.classes),
        "input": {"size": [size, size], "channels": "RGB", "scale": "uint8 / 255, then (x - mean) / std",
                  "mean": list(run.shards.mean), "std": list(run.shards.std),
                  "resize": ("to size x size" if run.aug.style == "cifar" else
                             "short side to size / 0.875, then the centre size x size crop")},
        "output": "forward(x) -> (logits [N, C], unit embedding [N, D])",
        "torchvision": torchvision_spec(run, nets),
        "source": {"checkpoint": str(ck), "epoch": state["epoch"] + 1, "method": run.cfg.method,
                   "dataset": run.identity["dataset"]},
    }
    files.make_dir(out.parent)
    sidecar = out.with_suffix(".json")
    files.write_atomic(out, save(tensors, metadata={"format": EXPORT_FORMAT, "sidecar": sidecar.name}))
    files.write_json(sidecar, meta, indent=2)
    return meta


# ----------------------------------------------------------------------------------------------------------------
# The commands


def predict_cmd(
    images: list[Path] = typer.Argument(..., help="Image files, folders of them (searched recursively), or a shard "
                                        "set (its --split).", show_default=False),
    checkpoint: Path = typer.Option(..., help="A checkpoint (RUN/checkpoints/last.pt or best.pt)."),
    out: Path = typer.Option(Path("predictions.csv"), help="The CSV to write."),
    net: Optional[int] = typer.Option(None, metavar="K", help="Predict with net K alone. \\[default: the ensemble, "
                                      "the softmax of the nets' summed logits]", show_default=False),
    top_k: int = typer.Option(5, help="Classes per image in the CSV, most probable first."),
    split: str = typer.Option("test", help="The split of a shard set given as input."),
    batch_size: int = typer.Option(256, help="Images per batch on the device."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    data: Optional[Path] = typer.Option(None, help="The run's shard set (for its manifest: classes, normalisation). "
                                        "\\[default: the one the run trained on]", show_default=False),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Predict the classes of images with a trained run: a CSV of path, class (index and name), its probability
    and the top-k; images that do not decode are skipped and listed."""
    from rich.console import Console

    result = predict(checkpoint, images, net=net, top_k=top_k, split=split, batch_size=batch_size, device=device,
                     data=data, progress=not quiet)
    write_csv(result, out)
    console = Console()
    n, skipped = len(result["rows"]), result["skipped"]
    line = f"{n} images -> {out} ({result['head']}, epoch {result['epoch']})"
    if result["accuracy"] is not None:
        line += f"; top-1 against the true labels {result['accuracy']:.2f}%"
    console.print(line, highlight=False, soft_wrap=True)
    if skipped:
        console.print(f"skipped {len(skipped)} image{'s' * (len(skipped) > 1)} that did not decode:", highlight=False)
        for name, why in skipped:
            console.print(f"  {name}: {why}", highlight=False, soft_wrap=True, markup=False)


def export_cmd(
    run: Path = typer.Argument(..., help="A run directory (its checkpoints/last.pt) or a checkpoint file.",
                               show_default=False),
    out: Path = typer.Option(Path("model.safetensors"), help="The weights (.safetensors); the sidecar JSON (class, "
                             "arguments, classes, input size, normalisation) goes beside it with .json."),
    net: Optional[int] = typer.Option(None, metavar="K", help="Export net K alone. \\[default: every net]",
                                      show_default=False),
    data: Optional[Path] = typer.Option(None, help="The run's shard set. \\[default: the one the run trained on]",
                                        show_default=False),
):
    """Export a run's networks as safetensors with a JSON sidecar; the README shows the five lines that rebuild
    them."""
    meta = export(run, out, net=net, data=data)
    typer.echo(f"{', '.join(meta['nets'])} ({meta['kwargs']['arch']}, {len(meta['classes'])} classes) -> {out}, "
               f"{Path(out).with_suffix('.json')}")


def register(app: typer.Typer) -> None:
    """Add `ccl predict` and `ccl export` to the app (`ccl.cli` calls this once)."""
    app.command("predict")(predict_cmd)
    app.command("export")(export_cmd)
