"""A class-per-folder image tree (ROOT/<class>/<image>), with or without train/ and test/ subtrees."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ccl.errors import UserError
from ccl.pipeline.convert.source import Item, Source, image_files, require_dir, stratified_holdout


def read_folder(src: Path, test_fraction: float, allow_empty_classes: bool = False) -> Source:
    """A class-per-folder tree. With a train/ subtree that is the training split, and test/ (or val/) the test
    split, or without one a seeded per-class `test_fraction` of train/; without train/ the class folders are
    ROOT's own, and `test_fraction` is held out of them. Classes are the folder names, sorted. A class folder
    without images is an error unless `allow_empty_classes` (then a note)."""
    root = require_dir(src, "SRC")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    base = root / "train" if (root / "train").is_dir() else root
    if base == root and test_dir is not None:
        raise UserError(f"folder: {root} has {test_dir.name}/ but no train/; expected ROOT/train/<class>/ beside it")
    classes = _class_dirs(base)
    notes = []
    if base != root and test_dir is not None:
        train = _folder_items(base, classes, root)
        unknown = sorted(set(_class_dirs(test_dir)) - set(classes))
        if unknown:
            raise UserError(f"folder: {test_dir.name}/ has classes missing from train/: {', '.join(unknown[:5])}")
        splits = {"train": train, "test": _folder_items(test_dir, classes, root)}
        _check_classes(classes, train, base, allow_empty_classes, notes)
    else:
        if not 0.0 <= test_fraction < 1.0:
            raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction:g}")
        items = _folder_items(base, classes, root)
        _check_classes(classes, items, base, allow_empty_classes, notes)
        held = stratified_holdout(np.array([it.label for it in items]), test_fraction)
        splits = {"train": [it for it, h in zip(items, held) if not h]}
        if held.any():
            splits["test"] = [it for it, h in zip(items, held) if h]
        if base != root:
            notes.append(f"train/ without test/ or val/: {test_fraction:g} of each class held out as the test split")
    if not splits["train"]:
        raise UserError(f"folder: {root} holds no images in its class folders")
    return Source(plain_name(root.resolve().name), classes, splits, train_clean=True, shuffle=True, notes=notes)


def _check_classes(classes: list[str], items: list[Item], base: Path, allow_empty: bool, notes: list[str]) -> None:
    """Every class folder must hold images: an empty one (or one whose only contents are folder links, which are
    not followed) would be a class that nothing can teach."""
    counts = np.bincount([it.label for it in items], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if not empty:
        return
    if not counts.any():
        raise UserError(f"folder: no images in any class folder of {base} ({', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''})")
    if not allow_empty:
        raise UserError(f"folder: class folder(s) with no images in {base}: {', '.join(empty[:10])}"
                        f"{' ...' if len(empty) > 10 else ''} (links to folders inside a class are not followed); "
                        "remove them, or pass --allow-empty-classes to keep them as classes")
    notes.append(f"class folder(s) with no images kept as classes: {', '.join(empty)}")


def plain_name(name: str) -> str:
    """The folder's name as a data set name the manifest accepts (it names the run directory): letters,
    digits, '.', '_', '-', starting with a letter or digit."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._-")[:128]
    return clean or "folder"


def _class_dirs(root: Path) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top = root.resolve()
    for name in names:  # a class folder that links to ROOT or above it would list every class's images as its own
        target = (root / name).resolve()
        if top == target or top.is_relative_to(target):
            raise UserError(f"folder: class folder {root / name} links to {target}, which holds {root} (a loop)")
    if not names:
        raise UserError(f"folder: {root} has no class subfolders; expected ROOT/<class>/<image> (or train/ and test/)")
    return names


def _folder_items(root: Path, classes: list[str], rel_to: Path) -> list[Item]:
    items = []
    for label, name in enumerate(classes):
        if (root / name).is_dir():
            items += [Item(str(p.relative_to(rel_to)), label, path=str(p)) for p in image_files(root / name)]
    return items


