"""Checkpoints: one dict of state_dicts, RNG states and the config, written to a temporary file and renamed.

Everything in a checkpoint is a tensor, a number, a string, or a list, tuple or dict of those, so it loads with
``torch.load(weights_only=True)``: a checkpoint cannot run code when it is read. (A pickle can; the label files
and CIFAR's own pickles that tools/shard.py reads are still pickles: load only files you trust.)
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ccl import files
from ccl.errors import UserError

FORMAT = 2  # 2: one optimiser over all parameters, RNG states as plain types, weights-only loading
# Config fields that must match for a checkpoint to continue (or be evaluated as) this run.
IDENTITY_FIELDS = ("method", "arch", "num_classes", "dataset", "num_train", "schedule")
REQUIRED = ("format", "method", "optimizer", "scaler", "rng", "epoch", "best", "identity", "config")


def atomic_save(obj: dict, path: Path, also: tuple[Path, ...] = ()) -> None:
    """obj to `path` (and the same bytes under each of `also`, renamed first), whole or not at all: a kill or a
    full disk mid-write leaves the previous checkpoints as they were, and no temporary file."""
    files.make_dir(path.parent)
    files.write_atomic(path, lambda f: torch.save(obj, f), also=also)


def rng_state(rng) -> dict:
    """Every RNG a run draws from, as plain types: Python's, numpy's, torch's, CUDA's, and the run's own."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if rng is not None:
        state["generator"] = rng.device.get_state()
        state["generator_device"] = rng.device.device.type
        state["host"] = rng.host.getstate()
    return state


def set_rng_state(state: dict, rng) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if rng is not None:
        if state.get("generator_device", rng.device.device.type) == rng.device.device.type:
            rng.device.set_state(state["generator"])
        else:  # a CUDA generator's state does not fit a CPU one (GPU checkpoint resumed on CPU): a seeded new stream
            rng.device.manual_seed(int(torch.as_tensor(state["generator"]).to(torch.int64).sum()))
        rng.host.setstate(_tuples(state["host"]))


def _tuples(x):
    """random.setstate wants the nested tuples back (the weights-only loader may hand lists)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def load(path: Path) -> dict:
    """A checkpoint of this version, read without running code; anything else is one line naming the problem."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # what torch.save writes; a text file, an image, a legacy pickle are not
        raise UserError(f"{path} is not a ccl checkpoint (not a PyTorch zip file); pass a runs/NAME/checkpoints/*.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, or a pickle holding objects (which weights_only refuses to run)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a ccl checkpoint (it holds a {type(state).__name__}, not a dict)")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise UserError(f"{path} is not a ccl checkpoint of this version (format {FORMAT}): "
                        f"missing {', '.join(missing)}")
    if state["format"] != FORMAT:
        raise UserError(f"{path} is a checkpoint of format {state['format']}; this version reads format {FORMAT}")
    return state


def check_identity(saved: dict, current: dict, path: Path, fields: tuple[str, ...] = IDENTITY_FIELDS) -> None:
    """A checkpoint from another config is refused with the first field that differs."""
    for key in fields:
        if saved.get(key) != current.get(key):
            raise UserError(
                f"checkpoint {path} is from another config: {key} is {saved.get(key)!r} there, {current.get(key)!r} here"
            )


def load_method_state(method: torch.nn.Module, state: dict, path: Path, strict: bool = True) -> None:
    """The method's networks and per-sample buffers; anything that does not fit (other data, another model, a
    checkpoint of an older layout) is one line naming the first differences."""
    own = method.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(f"checkpoint {path} does not fit this run: {key} has shape {tuple(value.shape)} there, "
                            f"{tuple(own[key].shape)} here")
    missing = sorted(set(own) - set(state)) if strict else []
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise UserError(f"checkpoint {path} does not fit this run ({'; '.join(parts)}): "
                        "it is from another method, model or version")
    method.load_state_dict(state, strict=strict)
