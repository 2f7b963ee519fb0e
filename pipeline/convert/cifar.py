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
    meta = _unpickle(root / meta_file)
    names = meta.get(names_key)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(c, (str, bytes)) for c in names):
        raise UserError(f"{root / meta_file}: {names_key!r} should be a list of class names, got "
                        f"{type(names).__name__ if names is not None else 'nothing'}")
    classes = [c.decode("latin1") if isinstance(c, bytes) else c for c in names]
    splits = {}
    for split, files in (("train", train_files), ("test", [test_file])):
        items = []
        for fname in files:
            d = _unpickle(root / fname)
            if "data" not in d or label_key not in d:
                raise UserError(f"{root / fname}: expected the keys 'data' and {label_key!r} of a {which} pickle")
            try:
                data = np.asarray(d["data"], dtype=np.uint8)
            except (TypeError, ValueError):
                raise UserError(f"{root / fname}: 'data' should be [N, 3072] uint8") from None
            if data.ndim != 2 or data.shape[1] != 3072:
                raise UserError(f"{root / fname}: 'data' should be [N, 3072] uint8, got {list(data.shape)}")
            arrays = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # [N, 32, 32, 3]
            try:
                labels = np.asarray(d[label_key])
            except (TypeError, ValueError):
                labels = np.asarray([], dtype=object)
            if labels.ndim != 1 or labels.dtype.kind not in "iu":
                raise UserError(f"{root / fname}: {label_key!r} should be a list of integer labels")
            if len(labels) != len(arrays):
                raise UserError(f"{root / fname}: {len(arrays)} images but {len(labels)} labels")
            items += [Item(f"{fname}[{i}]", int(y), array=a) for i, (a, y) in enumerate(zip(arrays, labels))]
        splits[split] = items
    return Source(which, classes, splits, train_clean=True)


def _unpickle(path: Path) -> dict:
    """A CIFAR pickle as a dict with str keys. (Pickles run code: only the files of the folder the user named
    are loaded.)"""
    try:
        with open(path, "rb") as f:
            # latin1 reads the Python 2 pickles of the official release (str keys, numpy arrays).
            d = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise UserError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a CIFAR pickle holding a dict, got {type(d).__name__}")
    # Re-saved copies (pickle.load(..., encoding="bytes") then dumped again) have bytes keys: accept both.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


