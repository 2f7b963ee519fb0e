"""Label noise: the synthetic generators of DESIGN §3 and loaders for label files published with other work.

Synthetic noise is a pure function of (clean labels, rate, seed[, features]); every generator draws from one
`numpy.random.Generator`, so the same seed gives the same labels on any machine. Each follows a peer's code, named
in `CONVENTIONS` (which the manifest's noise record carries):

- sym:      DivideMix, Robust-LR and TCL: int(r N) samples, chosen by a random permutation, get a label drawn
            uniformly from *all* C classes, the true one included, so the realised rate is about r (C - 1) / C
            (LiJunnan1992/DivideMix `dataloader_cifar.py` l. 58-71, `random.randint(0, 9)`; chenmc1996/Robust-LR
            `dataloader_cifar.py`, the same block; Hzzone/TCL `models/tcl/data/create_noise.py`, random_in_noise).
- sym_exclusive: T_ij = r / (C - 1) for j != i: each sample flips with probability r to one of the other C - 1
            classes (the true label is never redrawn, so the expected rate is r itself).
- pair:     i -> (i + 1) mod C with probability r.
- asym:     the CIFAR-10 class map of DivideMix/RoLR (truck->automobile, bird->airplane, deer->horse, cat<->dog),
            applied as their code applies it: int(r N) samples chosen by a random permutation take their class's
            image under the map, which leaves the other five classes unchanged, so the measured rate is about r/2.
            Other data sets have no such map: asym falls back to pair, and the manifest says so.
- instance: Xia et al. 2020, "Part-dependent label noise", as their generator runs (xiaoboxia/Part-dependent-
            label-noise `tools.py` get_instance_noisy_label, l. 24-45, fed by `data.py` with the raw 0-255 pixels
            in CHW order): per-sample flip rates q_n ~ N(r, 0.1^2) truncated to [0, 1]; per true class c a
            projection W_c ~ N(0, 1) of shape [D, C]; p_n = q_n * softmax(x_n W_c) with the true class masked
            out, plus 1 - q_n on the true class; the noisy label is drawn from p_n. On raw pixels x_n W_c is in
            the thousands, so the softmax is nearly one-hot and most of a class's flips go to one class.

Label files: CIFAR-10N/100N `*_human.pt` (a dict of arrays saved with torch.save; pick the key; its `clean_label`
must equal the data's labels one by one, as UCSC-REAL/cifar-10-100n `data/cifar.py` load_label asserts),
DivideMix/RoLR `r_mode.json` noise files (a JSON list of labels), TCL `.npy` arrays.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from ccl.errors import UserError

NOISE_TYPES = ("none", "sym", "sym_exclusive", "pair", "asym", "instance")
# What each synthetic type does, in one line: the manifest's noise record carries it as `convention`, so a shard
# set says which rule made its labels (a set built before a rule changed says nothing, or something else).
CONVENTIONS = {
    "none": None,
    "sym": "DivideMix/Robust-LR/TCL: int(r*N) samples, chosen by a random permutation, relabelled uniformly from all "
           "C classes, the true one included (realised rate about r(C-1)/C)",
    "sym_exclusive": "each sample flips with probability r to a class drawn uniformly from the other C-1 (rate r)",
    "pair": "each sample flips with probability r to class (i+1) mod C",
    "asym": "DivideMix/Robust-LR: int(r*N) samples, chosen by a random permutation, take their class's image under "
            "the CIFAR-10 map (9->1, 2->0, 4->7, 3<->5; other classes keep theirs)",
    "instance": "Xia et al. 2020 get_instance_noisy_label: truncated-normal rates (std 0.1), per-class N(0,1) "
                "projections of the raw 0-255 pixels in CHW order",
}
# DivideMix/RoLR CIFAR-10 asymmetric map: truck->automobile, bird->airplane, deer->horse, cat<->dog.
CIFAR10_ASYM = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
CIFAR10N_KEYS = ("aggre_label", "random_label1", "random_label2", "random_label3", "worse_label", "clean_label")
CIFAR100N_KEYS = ("noisy_label", "clean_label")
# Above this many classes the manifest leaves the C x C transition matrix out (it would dwarf the rest).
MAX_MATRIX_CLASSES = 200


def check_rate(rate: float) -> float:
    rate = float(rate)
    if math.isnan(rate) or not 0.0 <= rate < 1.0:
        raise UserError(f"--noise-rate must be in [0, 1), got {rate:g}")
    return rate


def check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """int64 [N] labels in 0..C-1, else a one-line UserError naming the first bad position."""
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise UserError(
            f"{what}: label {labels[i]} at position {i} is outside 0..{num_classes - 1} "
            f"({bad.size} such labels; expected {num_classes} classes)"
        )
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic generators


def _chosen(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """The peers' selection: the first int(r N) of a random permutation, int64 indices (DivideMix/RoLR:
    `random.shuffle(idx); noise_idx = idx[:int(r * 50000)]`)."""
    return rng.permutation(n)[: int(rate * n)]


def sym_noise(labels: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """The peers' symmetric noise: int(r N) chosen samples relabelled uniformly from all C classes."""
    labels = np.asarray(labels, dtype=np.int64)  # [N]
    noisy = labels.copy()
    chosen = _chosen(labels.size, rate, rng)
    noisy[chosen] = rng.integers(0, num_classes, size=chosen.size)  # the true class may come back
    return noisy


def sym_exclusive_noise(labels: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric noise, T_ij = r/(C-1) off the diagonal: flip with prob. r to one of the other C-1 classes."""
    labels = np.asarray(labels, dtype=np.int64)  # [N]
    flip = rng.random(labels.size) < rate  # [N]
    shift = rng.integers(1, num_classes, size=labels.size)  # [N] in 1..C-1, so never the true class
    return np.where(flip, (labels + shift) % num_classes, labels)


def pair_noise(labels: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Pair flipping: i -> (i + 1) mod C with probability r."""
    labels = np.asarray(labels, dtype=np.int64)
    flip = rng.random(labels.size) < rate
    return np.where(flip, (labels + 1) % num_classes, labels)


def class_map_noise(labels: np.ndarray, class_map: dict[int, int], rate: float, rng: np.random.Generator) -> np.ndarray:
    """The peers' asymmetric noise: int(r N) chosen samples take class_map[label]; classes outside the map keep
    theirs (DivideMix `dataloader_cifar.py` l. 72-74, `self.transition[train_label[i]]`)."""
    labels = np.asarray(labels, dtype=np.int64)
    target = labels.copy()
    for src, dst in class_map.items():
        target[labels == src] = dst
    noisy = labels.copy()
    chosen = _chosen(labels.size, rate, rng)
    noisy[chosen] = target[chosen]
    return noisy


def instance_noise(
    labels: np.ndarray,
    features: np.ndarray,
    num_classes: int,
    rate: float,
    rng: np.random.Generator,
    norm_std: float = 0.1,
    chunk: int = 4096,
) -> np.ndarray:
    """Instance-dependent noise of Xia et al. 2020 (part-dependent label noise, NeurIPS), seeded.

    features: [N, D] per-sample features as their code feeds them: the raw pixel values (0-255, uint8 or float),
    flattened in CHW order (`data.py`: `torch.from_numpy(train_images).float()` of the CIFAR rows, reshaped to
    (3, 32, 32) later). No scaling: on such features the logits x W_c are large, so each sample's flip goes
    almost surely to its argmax class, and a class's flips concentrate on a few targets.
    """
    from scipy import stats

    labels = np.asarray(labels, dtype=np.int64)  # [N]
    n = labels.size
    if features.shape[0] != n:
        raise ValueError(f"features hold {features.shape[0]} rows for {n} labels")
    flip_rate = stats.truncnorm.rvs(
        (0 - rate) / norm_std, (1 - rate) / norm_std, loc=rate, scale=norm_std, size=n, random_state=rng
    )  # [N] per-sample rates, mean ~ r
    dim = features.shape[1]
    probs = np.empty((n, num_classes), dtype=np.float64)  # [N, C]
    for c in range(num_classes):
        # One projection per true class, drawn in class order whether or not the class occurs (their
        # W = randn(C, D, C), W[y]).
        w = rng.standard_normal((dim, num_classes))  # [D, C]
        rows = np.flatnonzero(labels == c)
        for start in range(0, rows.size, chunk):
            r = rows[start : start + chunk]
            logits = features[r].astype(np.float64) @ w  # [n, C]
            logits[:, c] = -np.inf  # the flip never lands on the true class
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            p *= flip_rate[r, None]
            p[:, c] += 1.0 - flip_rate[r]
            probs[r] = p
    u = rng.random(n)[:, None]  # [N, 1]
    noisy = (u > np.cumsum(probs, axis=1)).sum(axis=1)  # inverse-CDF draw from each row
    return np.minimum(noisy, num_classes - 1).astype(np.int64)


def make_noisy_labels(
    kind: str,
    labels: np.ndarray,
    num_classes: int,
    rate: float,
    seed: int,
    *,
    dataset: str = "",
    features: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Noisy labels and the manifest's noise spec (without the measured fields) for one of NOISE_TYPES."""
    if kind not in NOISE_TYPES:
        raise UserError(f"--noise must be one of {', '.join(NOISE_TYPES)}, got {kind!r}")
    rate = check_rate(rate)
    labels = check_labels(labels, num_classes, "train labels")
    info = {"type": kind, "rate": rate, "seed": int(seed), "source": None}
    if kind == "none":
        info.update(rate=0.0, seed=None)
        return labels.copy(), info
    info["convention"] = CONVENTIONS[kind]
    if num_classes < 2:
        raise UserError(f"--noise {kind} needs at least 2 classes, the data set has {num_classes}")
    rng = np.random.default_rng(seed)
    if rate == 0.0:
        return labels.copy(), info
    if kind == "sym":
        noisy = sym_noise(labels, num_classes, rate, rng)
    elif kind == "sym_exclusive":
        noisy = sym_exclusive_noise(labels, num_classes, rate, rng)
    elif kind == "pair":
        noisy = pair_noise(labels, num_classes, rate, rng)
    elif kind == "asym":
        if dataset == "cifar10":
            noisy = class_map_noise(labels, CIFAR10_ASYM, rate, rng)
            info["class_map"] = {str(k): v for k, v in CIFAR10_ASYM.items()}
        else:
            noisy = pair_noise(labels, num_classes, rate, rng)
            info["convention"] = CONVENTIONS["pair"]
            info["note"] = (
                f"asym is the CIFAR-10 class map; {dataset or 'this data set'} has none, so pair noise "
                "(i -> i+1 mod C) was used"
            )
    else:  # instance
        if features is None:
            raise ValueError("instance noise needs features")
        noisy = instance_noise(labels, features, num_classes, rate, rng)
    return noisy, info


# ----------------------------------------------------------------------------------------------------------------
# Measurement


def transition_matrix(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Empirical T[i, j] = P(noisy = j | clean = i), float64 [C, C]; rows of absent classes are zero."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(clean), np.asarray(noisy)), 1)
    rows = counts.sum(axis=1, keepdims=True)
    return counts / np.maximum(rows, 1)


def actual_rate(clean: np.ndarray, noisy: np.ndarray) -> float:
    clean, noisy = np.asarray(clean), np.asarray(noisy)
    return float(np.mean(clean != noisy)) if clean.size else 0.0


def noise_summary(info: dict, clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> dict:
    """The manifest's `noise` entry: the spec plus the measured rate and transition matrix.

    clean may hold -1 (unknown): those samples are left out; with no known clean label both fields are null.
    """
    out = dict(info)
    clean, noisy = np.asarray(clean), np.asarray(noisy)
    known = clean >= 0
    if not known.any():
        out.update(actual_rate=None, transition_matrix=None)
        return out
    out["actual_rate"] = round(actual_rate(clean[known], noisy[known]), 6)
    if num_classes <= MAX_MATRIX_CLASSES:
        t = transition_matrix(clean[known], noisy[known], num_classes)
        out["transition_matrix"] = [[round(float(v), 4) for v in row] for row in t]
    else:
        out["transition_matrix"] = None
        out["transition_matrix_note"] = f"left out above {MAX_MATRIX_CLASSES} classes"
    return out


# ----------------------------------------------------------------------------------------------------------------
# Label files


def load_label_file(
    path, *, num_classes: int, count: int, key: str | None = None, truth: np.ndarray | None = None
) -> tuple[np.ndarray, dict]:
    """Training labels from a file, checked against the data: int64 [count] in 0..num_classes-1.

    .pt/.pth: CIFAR-10N/100N (`CIFAR-10_human.pt`: aggre_label, random_label1..3, worse_label, clean_label;
    `CIFAR-100_human.pt`: noisy_label, clean_label); .json: DivideMix/RoLR noise files (a list of labels,
    e.g. `0.5_sym.json`) or a dict of lists with `key`; .npy: TCL's label arrays.
    truth: the data's own labels in the same order (int64 [count], -1 where unknown), when known. A file that
    holds `clean_label` (CIFAR-N) must agree with them label by label: a file for another data set or another
    image order is an error, not a 90% noise rate. Labels that use fewer classes than the data (a CIFAR-10 file
    given to CIFAR-100) give a warning in the spec, with the measured rate.
    Returns the labels and the manifest's noise spec (type "file").
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--labels {path}: no such file")
    suffix = path.suffix.lower()
    obj = None
    if suffix in (".pt", ".pth"):
        obj = _load_pt(path)
        raw, used_key = _pick_key(obj, key, path)
    elif suffix == ".json":
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--labels {path}: not valid JSON ({e})") from None
        raw, used_key = _pick_key(obj, key, path)
    elif suffix == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise UserError(f"--labels {path}: not a plain numpy label array ({e})") from None
        if key is not None:
            raise UserError(f"--labels {path}: a .npy file holds one array; drop --label-key {key}")
        used_key = None
    else:
        raise UserError(
            f"--labels {path}: unknown label file type {suffix or '(none)'!r}; expected .pt (CIFAR-10N/100N), "
            ".json (DivideMix/RoLR noise file) or .npy (TCL)"
        )
    labels = _as_label_vector(raw, path)
    if labels.size != count:
        raise UserError(f"--labels {path}: holds {labels.size} labels, the train split has {count}")
    labels = check_labels(labels, num_classes, f"--labels {path.name}")
    known = None
    if truth is not None:
        truth = np.asarray(truth, dtype=np.int64)
        if truth.shape != labels.shape:
            raise ValueError(f"truth holds {truth.size} labels for {labels.size}")
        known = truth >= 0
    if isinstance(obj, dict) and "clean_label" in obj and known is not None and known.any():  # CIFAR-N
        _check_clean_label(_as_label_vector(obj["clean_label"], path), truth, known, path)
    source = path.name if used_key is None else f"{path.name}:{used_key}"
    info = {
        "type": "file",
        "rate": None,
        "seed": None,
        "source": source,
        "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    has_truth = known is not None and bool(known.any())
    used = np.unique(labels).size
    expected = np.unique(truth[known]).size if has_truth else num_classes
    if used < expected:
        rate = f"; measured noise rate {actual_rate(truth[known], labels[known]):.4f}" if has_truth else ""
        info["warning"] = (
            f"--labels {path.name}: its labels use {used} of the {expected} classes the data has{rate}; "
            "is it the label file of another data set?"
        )
    return labels, info


def _check_clean_label(clean: np.ndarray, truth: np.ndarray, known: np.ndarray, path: Path) -> None:
    """A CIFAR-N file's clean_label against the data's labels, one by one (UCSC-REAL/cifar-10-100n `data/cifar.py`
    load_label only asserts that the sums of the differences cancel)."""
    if clean.size != truth.size:
        raise UserError(f"--labels {path}: clean_label holds {clean.size} labels, the train split has {truth.size}")
    wrong = np.flatnonzero(known & (clean != truth))
    if wrong.size:
        i = int(wrong[0])
        raise UserError(
            f"--labels {path}: its clean_label disagrees with the data's labels at {wrong.size} of "
            f"{int(known.sum())} positions (first at {i}: {clean[i]} vs {truth[i]}); the file belongs to another "
            "data set or another image order (CIFAR-N follows the official python pickles' order)"
        )


def _load_pt(path: Path):
    import torch

    try:
        # The CIFAR-N files are pickled dicts of numpy arrays, which the weights-only loader refuses.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a bad file; all mean "cannot read this"
        raise UserError(f"--labels {path}: cannot read it as a torch.save file ({type(e).__name__}: {e})") from None


def _pick_key(obj, key: str | None, path: Path):
    if isinstance(obj, dict):
        keys = sorted(str(k) for k in obj)
        if key is None:
            label_keys = [k for k in keys if k.endswith("label") or k.startswith("random_label")]
            if len(obj) == 1:
                key = keys[0]
            else:
                raise UserError(
                    f"--labels {path}: holds several label arrays; choose one with --label-key "
                    f"({', '.join(label_keys or keys)})"
                )
        if key not in obj:
            raise UserError(f"--labels {path}: no key {key!r}; it has {', '.join(keys)}")
        return obj[key], key
    if key is not None:
        raise UserError(f"--labels {path}: holds one label array, not a dict; drop --label-key {key}")
    return obj, None


def _as_label_vector(raw, path: Path) -> np.ndarray:
    if hasattr(raw, "detach"):  # a torch tensor
        raw = raw.detach().cpu().numpy()
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError):
        raise UserError(f"--labels {path}: expected a flat list of integer labels") from None
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    if arr.ndim != 1 or arr.dtype == bool or not numeric:
        raise UserError(f"--labels {path}: expected a flat list of integer labels, got {arr.dtype} {list(arr.shape)}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise UserError(f"--labels {path}: labels must be whole numbers")
    return arr.astype(np.int64)
