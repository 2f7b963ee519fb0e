"""A class-per-folder image tree (ROOT/<class>/<image>), with or without train/ and test/ subtrees."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ccl.errors import UserError
from ccl.pipeline.convert.source import Item, Source, image_files, require_dir, stratified_holdout


def read_folder(src: Path, test_fraction: float) -> Source:
    """A class-per-folder tree. With train/ and test/ (or val/) subtrees those are the splits; otherwise a
    seeded per-class `test_fraction` is held out. Classes are the folder names, sorted."""
    root = require_dir(src, "SRC")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = _class_dirs(root / "train")
        train = _folder_items(root / "train", classes, root)
        unknown = sorted(set(_class_dirs(test_dir)) - set(classes))
        if unknown:
            raise UserError(f"folder: {test_dir.name}/ has classes missing from train/: {', '.join(unknown[:5])}")
        splits = {"train": train, "test": _folder_items(test_dir, classes, root)}
    else:
        if not 0.0 <= test_fraction < 1.0:
            raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction:g}")
        classes = _class_dirs(root)
        items = _folder_items(root, classes, root)
        held = stratified_holdout(np.array([it.label for it in items]), test_fraction)
        splits = {"train": [it for it, h in zip(items, held) if not h]}
        if held.any():
            splits["test"] = [it for it, h in zip(items, held) if h]
    if not splits["train"]:
        raise UserError(f"folder: {root} holds no images in its class folders")
    return Source(plain_name(root.resolve().name), classes, splits, train_clean=True, shuffle=True)


def plain_name(name: str) -> str:
    """The folder's name as a data set name the manifest accepts (it names the run directory): letters,
    digits, '.', '_', '-', starting with a letter or digit."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._-")[:128]
    return clean or "folder"


def _class_dirs(root: Path) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UserError(f"folder: {root} has no class subfolders; expected ROOT/<class>/<image> (or train/ and test/)")
    return names


def _folder_items(root: Path, classes: list[str], rel_to: Path) -> list[Item]:
    items = []
    for label, name in enumerate(classes):
        if (root / name).is_dir():
            items += [Item(str(p.relative_to(rel_to)), label, path=str(p)) for p in image_files(root / name)]
    return items


