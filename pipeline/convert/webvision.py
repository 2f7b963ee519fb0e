"""WebVision 1.0 (and mini-WebVision) from its file lists, with the optional ImageNet validation split."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from ccl.errors import UserError
from ccl.pipeline.convert.source import ConvertOptions, Item, Source, check_missing, image_files, require_dir


def read_webvision(src: Path, opts: ConvertOptions) -> Source:
    """WebVision 1.0: info/train_filelist_{google,flickr}.txt, info/val_filelist.txt + val_images_256/.

    Keeps labels < --num-classes (50: mini-WebVision). An optional second test split `val_imagenet` holds the
    ILSVRC12 validation images of those classes (--imagenet-val DIR).
    """
    root = require_dir(src, "SRC")
    num_classes = opts.num_classes or 1000
    info = root / "info"
    synsets = _read_synsets(info / "synsets.txt")
    classes = [synsets[i] if i < len(synsets) else str(i) for i in range(num_classes)]
    train: list[Item] = []
    for which in opts.webvision_lists:
        if which not in ("google", "flickr"):
            raise UserError(f"--webvision-lists takes google and/or flickr, got {which!r}")
        train += _read_filelist(info / f"train_filelist_{which}.txt", root, num_classes, fallback=root / which)
    test = _read_filelist(info / "val_filelist.txt", root / "val_images_256", num_classes)
    splits = {"train": train, "test": test}
    if opts.imagenet_val:
        splits["val_imagenet"] = _read_imagenet_val(Path(opts.imagenet_val), opts.imagenet_labels, num_classes, synsets)
    source = Source("webvision" if num_classes == 1000 else f"webvision{num_classes}", classes, splits,
                    train_clean=False, shuffle=True)  # fmt: skip
    check_missing(source, opts.skip_missing)
    return source


def _read_synsets(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None


def _read_filelist(path: Path, base: Path, num_classes: int, fallback: Path | None = None) -> list[Item]:
    """`relative/path.jpg label` lines; keeps labels < num_classes. Paths resolve against `base`, or against
    `fallback` when the first entry is only found there (lists written relative to google/ or flickr/)."""
    if not path.is_file():
        raise UserError(f"{path} is missing; expected a file list of 'relative/path.jpg label' lines")
    entries = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"{path}:{lineno}: expected 'relative/path.jpg label', got {line.strip()!r}")
        label = int(parts[1])
        if label < 0:
            raise UserError(f"{path}:{lineno}: label {label} is negative")
        rel = PurePosixPath(parts[0])
        if rel.is_absolute() or ".." in rel.parts or "\\" in parts[0]:
            # A list is data: its names stay inside the folder they are relative to.
            raise UserError(f"{path}:{lineno}: {parts[0]!r} is not a path inside {base} (absolute, or with '..')")
        if label < num_classes:
            entries.append((parts[0], label))
    if entries and fallback is not None and not (base / entries[0][0]).exists() and (fallback / entries[0][0]).exists():
        base = fallback
    return [Item(rel, label, path=str(base / rel)) for rel, label in entries]


def _read_imagenet_val(folder: Path, labels_file: str | None, num_classes: int, synsets: list[str]) -> list[Item]:
    """ILSVRC12 val images: a flat folder with a label file (lines `ILSVRC2012_val_00000001.JPEG 65`, class
    indices in WebVision's synsets order, e.g. Caffe's val.txt), or class folders named 0..999 or by WordNet id."""
    if not folder.is_dir():
        raise UserError(f"--imagenet-val {folder}: no such directory")
    lf = Path(labels_file) if labels_file else folder / "val.txt"
    if labels_file and not lf.is_file():
        raise UserError(f"--imagenet-labels {lf}: no such file")
    if lf.is_file():
        return _read_filelist(lf, folder, num_classes)
    wnid_index = {s.split()[0]: i for i, s in enumerate(synsets)}
    items = []
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for d in subdirs:
        label = int(d.name) if d.name.isdigit() else wnid_index.get(d.name)
        if label is None:
            raise UserError(
                f"--imagenet-val {folder}: cannot map the folder {d.name!r} to a class; expected val.txt "
                "('name label' lines), or class folders named 0..999 or by WordNet id (with info/synsets.txt)"
            )
        if label < num_classes:
            items += [Item(str(p.relative_to(folder)), label, path=str(p)) for p in image_files(d)]
    if not subdirs:
        raise UserError(f"--imagenet-val {folder}: expected val.txt ('name label' lines) or class folders")
    return items


