"""Synthetic label noise (sym, pair, asym, instance), its measurement, and the label-file loaders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ccl.errors import UserError
from ccl.pipeline.convert import noise as nz

N, C = 50_000, 10


@pytest.fixture(scope="module")
def clean():
    return np.random.default_rng(123).integers(0, C, N)


def tolerance(rate: float, n: int) -> float:
    return 5 * math.sqrt(rate * (1 - rate) / n)  # 5 binomial standard errors


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_sym_rate_and_uniform_off_diagonal(clean, rate):
    noisy, info = nz.make_noisy_labels("sym", clean, C, rate, seed=0)
    assert info == {"type": "sym", "rate": rate, "seed": 0, "source": None}
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
    assert info["class_map"] == {"9": 1, "2": 0, "4": 7, "3": 5, "5": 3}
    # Elsewhere there is no map: pair noise, with a note saying so.
    noisy, info = nz.make_noisy_labels("asym", clean, C, 0.4, seed=2, dataset="digits")
    assert ((noisy == clean) | (noisy == (clean + 1) % C)).all() and "pair" in info["note"]


def test_instance_noise_rate_and_dependence_on_the_image():
    rng = np.random.default_rng(0)
    n = 6000
    labels = rng.integers(0, C, n)
    features = rng.integers(0, 256, (n, 192), dtype=np.uint8)
    noisy, info = nz.make_noisy_labels("instance", labels, C, 0.4, seed=3, features=features)
    assert info["type"] == "instance"
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


@pytest.mark.parametrize("kind", ["sym", "pair", "asym"])
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
