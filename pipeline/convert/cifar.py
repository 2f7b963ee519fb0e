"""CIFAR-10 and CIFAR-100 from the official python pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ccl.errors import UserError
from ccl.pipeline.convert.source import Item, Source, require_dir


def read_cifar(src, which: str) -> Source:
    """The official python pickles: cifar-10-batches-py/ or cifar-100-python/ (SRC may be that folder or its parent)."""
    if which == "cifar10":
        folder, train_files, test_file, meta_file, label_key, names_key = (
            "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
            "labels", "label_names",
        )  # fmt: skip
    else:
        folder, train_files, test_file, meta_file, label_key, names_key = (
            "cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names",
        )  # fmt: skip
    root = require_dir(src, "SRC")
    if not (root / train_files[0]).exists() and (root / folder).is_dir():
        root = root / folder
    for name in train_files + [test_file, meta_file]:
        if not (root / name).is_file():
            raise UserError(f"{which}: {root / name} is missing; expected the official python version ({folder}/)")
    classes = [str(c) for c in _unpickle(root / meta_file)[names_key]]
    splits = {}
    for split, files in (("train", train_files), ("test", [test_file])):
        items = []
        for fname in files:
            d = _unpickle(root / fname)
            if "data" not in d or label_key not in d:
                raise UserError(f"{root / fname}: expected the keys 'data' and {label_key!r} of a {which} pickle")
            data = np.asarray(d["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise UserError(f"{root / fname}: 'data' should be [N, 3072] uint8, got {list(data.shape)}")
            arrays = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # [N, 32, 32, 3]
            labels = list(d[label_key])
            if len(labels) != len(arrays):
                raise UserError(f"{root / fname}: {len(arrays)} images but {len(labels)} labels")
            items += [Item(f"{fname}[{i}]", int(y), array=a) for i, (a, y) in enumerate(zip(arrays, labels))]
        splits[split] = items
    return Source(which, classes, splits, train_clean=True)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # latin1 reads the Python 2 pickles of the official release (str keys, numpy arrays).
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a readable CIFAR pickle ({e})") from None


