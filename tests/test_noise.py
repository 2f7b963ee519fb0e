"""Synthetic label noise (sym, sym_exclusive, pair, asym, instance), its measurement, and the label-file loaders."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from ccl.errors import UserError
from ccl.pipeline.convert import ConvertOptions, Item, convert
from ccl.pipeline.convert import noise as nz
from ccl.pipeline.convert.engine import _feature_chunk

N, C = 50_000, 10


@pytest.fixture(scope="module")
def clean():
    return np.random.default_rng(123).integers(0, C, N)


def tolerance(rate: float, n: int) -> float:
    return 5 * math.sqrt(rate * (1 - rate) / n)  # 5 binomial standard errors


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_sym_is_the_peers_all_class_redraw(clean, rate):
    """DivideMix/RoLR/TCL: int(r N) shuffled samples get a label drawn from all C classes, the true one included."""
    noisy, info = nz.make_noisy_labels("sym", clean, C, rate, seed=0)
    assert info["type"] == "sym" and info["rate"] == rate and info["seed"] == 0 and info["source"] is None
    assert "all C classes" in info["convention"] and "DivideMix" in info["convention"]
    # The number of changed labels is Binomial(int(r N), (C-1)/C): the realised rate is r (C-1)/C, not r.
    chosen = int(rate * N)
    expected, sd = chosen * (C - 1) / C, math.sqrt(chosen * (C - 1) / C**2)
    assert abs(int((noisy != clean).sum()) - expected) < 5 * sd
    t = nz.transition_matrix(clean, noisy, C)
    off = t[~np.eye(C, dtype=bool)]
    assert np.allclose(np.diag(t), 1 - rate + rate / C, atol=0.03) and np.allclose(off, rate / C, atol=0.02)


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_sym_exclusive_rate_and_uniform_off_diagonal(clean, rate):
    noisy, info = nz.make_noisy_labels("sym_exclusive", clean, C, rate, seed=0)
    assert info["type"] == "sym_exclusive" and "other C-1" in info["convention"]
    # T_ij = r/(C-1): the true label is never redrawn, so the measured rate is r itself (not r (C-1)/C).
    assert abs(nz.actual_rate(clean, noisy) - rate) < tolerance(rate, N)
    t = nz.transition_matrix(clean, noisy, C)
    off = t[~np.eye(C, dtype=bool)]
    assert np.allclose(np.diag(t), 1 - rate, atol=0.03) and np.allclose(off, rate / (C - 1), atol=0.02)


def test_pair_flips_only_to_the_next_class(clean):
    noisy, _ = nz.make_noisy_labels("pair", clean, C, 0.35, seed=1)
    flipped = noisy != clean
    assert (noisy[flipped] == (clean[flipped] + 1) % C).all()
    assert abs(flipped.mean() - 0.35) < tolerance(0.35, N)


def test_asym_uses_the_cifar10_class_map(clean):
    noisy, info = nz.make_noisy_labels("asym", clean, C, 0.4, seed=2, dataset="cifar10")
    flipped = noisy != clean
    mapping = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    assert all(mapping[c] == n for c, n in zip(clean[flipped][:2000], noisy[flipped][:2000]))
    for c in range(C):
        rate_c = flipped[clean == c].mean()
        assert (abs(rate_c - 0.4) < 0.04) if c in mapping else rate_c == 0
    # As DivideMix/RoLR choose them: int(r N) samples of all classes, so about r/2 of the labels change.
    in_map = np.isin(clean, list(mapping))
    chosen = int(0.4 * N)
    expected, sd = chosen * in_map.mean(), math.sqrt(chosen * in_map.mean() * (1 - in_map.mean()))
    assert abs(int(flipped.sum()) - expected) < 5 * sd
    assert info["class_map"] == {"9": 1, "2": 0, "4": 7, "3": 5, "5": 3} and "CIFAR-10 map" in info["convention"]
    # Elsewhere there is no map: pair noise, with a note saying so.
    noisy, info = nz.make_noisy_labels("asym", clean, C, 0.4, seed=2, dataset="digits")
    assert ((noisy == clean) | (noisy == (clean + 1) % C)).all() and "pair" in info["note"]
    assert info["convention"] == nz.CONVENTIONS["pair"]


def _top_target_share(clean, noisy, num_classes):
    """Per class, the share of its flipped labels that went to its most common wrong class; the mean over classes."""
    shares = []
    for c in range(num_classes):
        wrong = noisy[(clean == c) & (noisy != c)]
        if wrong.size:
            shares.append(np.bincount(wrong, minlength=num_classes).max() / wrong.size)
    return float(np.mean(shares))


def test_instance_noise_rate_and_dependence_on_the_image():
    rng = np.random.default_rng(0)
    n = 6000
    labels = rng.integers(0, C, n)
    features = rng.integers(0, 256, (n, 192), dtype=np.uint8)
    noisy, info = nz.make_noisy_labels("instance", labels, C, 0.4, seed=3, features=features)
    assert info["type"] == "instance" and "raw 0-255 pixels in CHW order" in info["convention"]
    assert abs(nz.actual_rate(labels, noisy) - 0.4) < 0.03
    # The flip target depends on the sample, not only its class: class 0's errors spread over several classes.
    wrong = noisy[(labels == 0) & (noisy != 0)]
    assert len(np.unique(wrong)) >= 3
    # Same seed, same labels; another seed, other labels.
    again, _ = nz.make_noisy_labels("instance", labels, C, 0.4, seed=3, features=features)
    other, _ = nz.make_noisy_labels("instance", labels, C, 0.4, seed=4, features=features)
    assert (again == noisy).all() and (other != noisy).any()
    low, _ = nz.make_noisy_labels("instance", labels, C, 0.1, seed=3, features=features)
    assert nz.actual_rate(labels, low) < 0.15


def test_instance_noise_on_raw_pixels_concentrates_each_class_on_one_target():
    """Xia et al.'s code feeds raw 0-255 pixels: x W_c is in the thousands, the softmax is nearly one-hot, and
    most of a class's flips go to one class (about two thirds on CIFAR-10). The same generator fed standardised
    or [0, 1] pixels spreads them far more evenly."""
    rng = np.random.default_rng(1)
    n = 6000
    labels = rng.integers(0, C, n)
    features = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # fixed inputs: 32x32 RGB noise images
    shares = []
    for seed in range(3):
        noisy = nz.instance_noise(labels, features, C, 0.4, np.random.default_rng(seed))
        shares.append(_top_target_share(labels, noisy, C))
    assert min(shares) > 0.55, shares  # measured 0.65-0.72 over seeds 0-2 of this input
    centred = (features.astype(np.float64) - 127.5) / 73.9  # zero-mean, unit-variance pixels
    spread = _top_target_share(labels, nz.instance_noise(labels, centred, C, 0.4, np.random.default_rng(0)), C)
    assert spread < 0.3, spread  # near 1 / (C - 1) = 0.11 when nothing dominates


def test_instance_noise_is_xias_per_sample_loop():
    """The vectorised generator against a literal per-sample transcription of get_instance_noisy_label
    (`tools.py` l. 24-45) fed the same draws: flip rates, W[c] per class in class order, one uniform per sample."""
    from scipy import stats

    rng = np.random.default_rng(5)
    n, d, c_n = 300, 48, 5
    labels = rng.integers(0, c_n, n)
    x = rng.integers(0, 256, (n, d), dtype=np.uint8)
    ours = nz.instance_noise(labels, x, c_n, 0.3, np.random.default_rng(9))
    draws = np.random.default_rng(9)
    flip_rate = stats.truncnorm.rvs(-0.3 / 0.1, 0.7 / 0.1, loc=0.3, scale=0.1, size=n, random_state=draws)
    w = np.stack([draws.standard_normal((d, c_n)) for _ in range(c_n)])  # [C, D, C]
    u = draws.random(n)
    ref = []
    for i in range(n):
        y = labels[i]
        a = x[i].astype(np.float64) @ w[y]
        a[y] = -np.inf
        p = np.exp(a - a.max())
        p = flip_rate[i] * p / p.sum()
        p[y] += 1 - flip_rate[i]
        ref.append(min(int((u[i] > np.cumsum(p)).sum()), c_n - 1))
    assert (ours == np.array(ref)).all()


def test_instance_features_are_raw_pixels_in_chw_order():
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # HWC, as readers hold it
    out = _feature_chunk(([Item("a", 0, array=arr)], 1 << 20))
    assert out.dtype == np.uint8 and (out[0] == arr.transpose(2, 0, 1).reshape(-1)).all()


@pytest.mark.parametrize("kind", ["sym", "sym_exclusive", "pair", "asym"])
def test_seed_determinism(clean, kind):
    a, _ = nz.make_noisy_labels(kind, clean, C, 0.3, seed=11, dataset="cifar10")
    b, _ = nz.make_noisy_labels(kind, clean, C, 0.3, seed=11, dataset="cifar10")
    c, _ = nz.make_noisy_labels(kind, clean, C, 0.3, seed=12, dataset="cifar10")
    assert (a == b).all() and (a != c).any()


def test_rates_outside_unit_interval_are_user_errors(clean):
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(UserError, match=r"\[0, 1\)"):
            nz.make_noisy_labels("sym", clean, C, bad, seed=0)
    with pytest.raises(UserError, match="--noise must be one of"):
        nz.make_noisy_labels("shuffle", clean, C, 0.2, seed=0)
    assert (nz.make_noisy_labels("sym", clean, C, 0.0, seed=0)[0] == clean).all()


def test_summary_with_unknown_clean_labels():
    labels = np.array([0, 1, 2, 1])
    out = nz.noise_summary({"type": "none"}, np.array([-1, -1, -1, -1]), labels, 3)
    assert out["actual_rate"] is None and out["transition_matrix"] is None
    out = nz.noise_summary({"type": "file"}, np.array([0, 1, -1, 2]), labels, 3)
    assert out["actual_rate"] == pytest.approx(1 / 3, abs=1e-6)
    assert out["transition_matrix"][2] == [0.0, 1.0, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# Label files


def test_cifar_n_pt_with_key_choice(tmp_path):
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 10, 100)
    human = {"clean_label": clean, "aggre_label": clean, "worse_label": (clean + 1) % 10,
             "random_label1": clean, "random_label2": clean, "random_label3": clean}  # fmt: skip
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save(human, path)  # torch's zip format, a pickled dict of numpy arrays
    labels, info = nz.load_label_file(path, num_classes=10, count=100, key="worse_label")
    assert (labels == (clean + 1) % 10).all() and labels.dtype == np.int64
    assert info["type"] == "file" and info["source"] == "CIFAR-10_human.pt:worse_label"
    assert len(info["source_sha256"]) == 64
    with pytest.raises(UserError, match="--label-key .*aggre_label.*worse_label"):
        nz.load_label_file(path, num_classes=10, count=100)
    with pytest.raises(UserError, match="no key 'noisy_label'"):
        nz.load_label_file(path, num_classes=10, count=100, key="noisy_label")
    with pytest.raises(UserError, match="holds 100 labels, the train split has 99"):
        nz.load_label_file(path, num_classes=10, count=99, key="aggre_label")
    c100 = tmp_path / "CIFAR-100_human.pt"
    torch.save({"noisy_label": np.arange(100) % 100, "clean_label": np.arange(100)}, c100)
    with pytest.raises(UserError, match=r"label 10 at position 10 is outside 0\.\.9"):
        nz.load_label_file(c100, num_classes=10, count=100, key="noisy_label")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read"):
        nz.load_label_file(tmp_path / "junk.pt", num_classes=10, count=100)


def test_r_mode_json_and_tcl_npy(tmp_path):
    labels = [i % 10 for i in range(50)]
    (tmp_path / "0.5_sym.json").write_text(json.dumps(labels))  # DivideMix/RoLR: a JSON list
    got, info = nz.load_label_file(tmp_path / "0.5_sym.json", num_classes=10, count=50)
    assert got.tolist() == labels and info["source"] == "0.5_sym.json"
    np.save(tmp_path / "sym_noise_cifar10_50.npy", np.array(labels, dtype=np.int32))  # TCL: int32 array
    got, _ = nz.load_label_file(tmp_path / "sym_noise_cifar10_50.npy", num_classes=10, count=50)
    assert got.tolist() == labels
    (tmp_path / "neg.json").write_text(json.dumps([-1] + labels[1:]))
    with pytest.raises(UserError, match="outside"):
        nz.load_label_file(tmp_path / "neg.json", num_classes=10, count=50)
    (tmp_path / "frac.json").write_text(json.dumps([0.5] * 50))
    with pytest.raises(UserError, match="whole numbers"):
        nz.load_label_file(tmp_path / "frac.json", num_classes=10, count=50)
    np.save(tmp_path / "grid.npy", np.zeros((5, 10), dtype=np.int64))
    with pytest.raises(UserError, match="flat list"):
        nz.load_label_file(tmp_path / "grid.npy", num_classes=10, count=50)
    (tmp_path / "labels.csv").write_text("1,2,3")
    with pytest.raises(UserError, match="unknown label file type"):
        nz.load_label_file(tmp_path / "labels.csv", num_classes=10, count=3)
    with pytest.raises(UserError, match="no such file"):
        nz.load_label_file(tmp_path / "absent.json", num_classes=10, count=3)


def _cifar10(root, n_per_batch=12):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = []
    for b in range(1, 6):
        y = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        labels += y
        d = {"labels": y, "data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)}
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(d, protocol=2))
    d = {"labels": [0, 1], "data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    return folder, np.array(labels)


def test_cifar_n_clean_label_must_match_the_data_label_by_label(tmp_path):
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 10, 100)
    noisy = np.where(rng.random(100) < 0.2, (truth + 3) % 10, truth)
    good = tmp_path / "CIFAR-10_human.pt"
    torch.save({"clean_label": truth, "worse_label": noisy}, good)
    labels, info = nz.load_label_file(good, num_classes=10, count=100, key="worse_label", truth=truth)
    assert (labels == noisy).all() and "warning" not in info
    # The same file read against data in another order: each label is still a CIFAR label, the sum of the
    # differences may even cancel, but the clean labels disagree one by one.
    order = rng.permutation(100)
    with pytest.raises(UserError, match=r"clean_label disagrees with the data's labels at \d+ of 100 positions"):
        nz.load_label_file(good, num_classes=10, count=100, key="worse_label", truth=truth[order])
    # Unknown truth (-1) is not compared; no truth at all skips the check.
    nz.load_label_file(good, num_classes=10, count=100, key="worse_label", truth=np.full(100, -1))
    nz.load_label_file(good, num_classes=10, count=100, key="worse_label")
    torch.save({"clean_label": truth[:99], "worse_label": noisy}, tmp_path / "short.pt")
    with pytest.raises(UserError, match="clean_label holds 99 labels"):
        nz.load_label_file(tmp_path / "short.pt", num_classes=10, count=100, key="worse_label", truth=truth)


def test_wrong_order_cifar_n_file_stops_the_conversion(tmp_path):
    folder, truth = _cifar10(tmp_path / "raw")
    shuffled = truth[np.random.default_rng(0).permutation(truth.size)]
    torch.save({"clean_label": shuffled, "aggre_label": shuffled}, tmp_path / "CIFAR-10_human.pt")
    opts = ConvertOptions(labels=str(tmp_path / "CIFAR-10_human.pt"), label_key="aggre_label", workers=1,
                          progress=False)
    with pytest.raises(UserError, match="another data set or another image order"):
        convert("cifar10", folder, tmp_path / "out", opts, log=lambda s: None)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_labels_in_fewer_classes_than_the_data_warn_with_the_measured_rate(tmp_path):
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 100, 500)  # a CIFAR-100 train split ...
    c10 = rng.integers(0, 10, 500)  # ... given a CIFAR-10 noise file
    (tmp_path / "0.5_sym.json").write_text(json.dumps(c10.tolist()))
    labels, info = nz.load_label_file(tmp_path / "0.5_sym.json", num_classes=100, count=500, truth=truth)
    rate = nz.actual_rate(truth, c10)
    assert f"use 10 of the {np.unique(truth).size} classes" in info["warning"]
    assert f"measured noise rate {rate:.4f}" in info["warning"]
    _, info = nz.load_label_file(tmp_path / "0.5_sym.json", num_classes=100, count=500)
    assert "use 10 of the 100 classes" in info["warning"] and "measured" not in info["warning"]
    (tmp_path / "ok.json").write_text(json.dumps(truth.tolist()))
    assert "warning" not in nz.load_label_file(tmp_path / "ok.json", num_classes=100, count=500, truth=truth)[1]


def test_conversion_records_the_class_warning(tmp_path):
    folder, truth = _cifar10(tmp_path / "raw")
    (tmp_path / "five.json").write_text(json.dumps([int(v) % 5 for v in truth]))
    logged = []
    opts = ConvertOptions(labels=str(tmp_path / "five.json"), workers=1, progress=False)
    m = convert("cifar10", folder, tmp_path / "out", opts, log=logged.append)["manifest"]
    assert "use 5 of the" in m["noise"]["warning"] and m["noise"]["warning"] in m["notes"]
    assert any(line.startswith("warning: --labels five.json") for line in logged)


def test_cached_digits_from_an_older_generator_are_rebuilt(tmp_path):
    from ccl.pipeline.convert import ensure_digits

    path = ensure_digits(tmp_path, noise="sym", rate=0.3, seed=2)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["noise"]["convention"] == nz.CONVENTIONS["sym"]
    del manifest["noise"]["convention"]  # what a set made before the conventions looks like
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert ensure_digits(tmp_path, noise="sym", rate=0.3, seed=2) == path
    assert json.loads((path / "manifest.json").read_text())["noise"]["convention"] == nz.CONVENTIONS["sym"]
