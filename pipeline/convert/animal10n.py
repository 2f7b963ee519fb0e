"""Animal-10N: training/ and testing/ folders of `<label>_<id>.jpg`."""

from __future__ import annotations

import os
from pathlib import Path

from ccl.errors import UserError
from ccl.pipeline.convert.source import IMAGE_SUFFIXES, Item, Source, require_dir

ANIMAL10N_CLASSES = [
    "cat", "lynx", "wolf", "coyote", "cheetah", "jaguar", "chimpanzee", "orangutan", "hamster", "guinea pig",
]  # fmt: skip


def read_animal10n(src: Path) -> Source:
    """Animal-10N: training/ and testing/ folders of JPEGs named `<label>_<id>.jpg`."""
    root = require_dir(src, "SRC")
    splits = {}
    for split, sub in (("train", "training"), ("test", "testing")):
        folder = root / sub
        if not folder.is_dir():
            raise UserError(
                f"animal10n: {folder} is missing; expected training/ and testing/ folders of <label>_<id>.jpg"
            )
        items = []
        for name in sorted(os.listdir(folder)):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            head = name.split("_", 1)[0]
            if "_" not in name or not head.isdigit() or int(head) >= len(ANIMAL10N_CLASSES):
                raise UserError(f"animal10n: {sub}/{name} is not named <label>_<id>.jpg with a label in 0..9")
            items.append(Item(f"{sub}/{name}", int(head), path=str(folder / name)))
        if not items:
            raise UserError(f"animal10n: {folder} holds no <label>_<id>.jpg images")
        splits[split] = items
    # Train labels are the crowd's (about 8% wrong); the test labels were checked.
    return Source("animal10n", list(ANIMAL10N_CLASSES), splits, train_clean=False, shuffle=True)


