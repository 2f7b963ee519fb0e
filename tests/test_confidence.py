"""Label confidence (GMM on losses, TCL's embedding-space scores) and the noise-detection metrics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccl.train.losses.confidence import (ROLR_GMM, TCL_GMM, detection_metrics, gmm_confidence, tcl_centres,
                                  tcl_clean_scores, tcl_confidence)


def bimodal(n_low=700, n_high=300, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.normal(0.2, 0.05, n_low).clip(0)  # clean samples: small loss
    high = rng.normal(2.0, 0.3, n_high)  # noisy samples: large loss
    x = np.concatenate([low, high])
    is_low = np.arange(x.size) < n_low
    perm = rng.permutation(x.size)
    return x[perm], is_low[perm]


def test_gmm_gives_high_w_to_the_low_loss_mode():
    x, is_low = bimodal()
    w = gmm_confidence(x)
    assert w.shape == x.shape and w.dtype == np.float32
    assert ((w >= 0) & (w <= 1)).all()
    assert w[is_low].mean() > 0.9
    assert w[~is_low].mean() < 0.1
    # reversed: high scores are the clean ones
    w_rev = gmm_confidence(-x, lower_is_clean=False)
    assert w_rev[is_low].mean() > 0.9 and w_rev[~is_low].mean() < 0.1


def test_gmm_is_deterministic_and_accepts_tensors():
    x, _ = bimodal(seed=1)
    a = gmm_confidence(x, seed=3)
    b = gmm_confidence(torch.from_numpy(x).float(), seed=3)
    c = gmm_confidence(x, seed=3)
    assert np.array_equal(a, c)
    assert np.allclose(a, b, atol=1e-4)


def test_gmm_is_invariant_to_scale_and_shift():
    """Min-max normalisation first: the loss's units do not matter."""
    x, _ = bimodal(seed=2)
    assert np.allclose(gmm_confidence(x), gmm_confidence(10 * x + 3), atol=1e-4)


def test_gmm_degenerate_inputs():
    assert np.array_equal(gmm_confidence(np.full(50, 0.7)), np.ones(50, np.float32))  # constant: trust every label
    assert np.array_equal(gmm_confidence(np.array([1.0])), np.ones(1, np.float32))
    assert gmm_confidence(np.array([])).shape == (0,)
    w = gmm_confidence(np.array([0.1, 0.1, 0.1, 5.0, 5.0]))  # two distinct values only
    assert w[:3].min() > 0.5 > w[3:].max()
    with pytest.raises(ValueError, match="NaN"):
        gmm_confidence(np.array([0.1, float("nan"), 0.3]))
    with pytest.raises(ValueError):
        gmm_confidence(torch.tensor([0.1, float("inf")]))


def test_gmm_settings():
    assert ROLR_GMM == {"max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4}
    from sklearn.mixture import GaussianMixture
    defaults = GaussianMixture()
    assert TCL_GMM == {"max_iter": defaults.max_iter, "tol": defaults.tol, "reg_covar": defaults.reg_covar}


def ref_clean_scores(z, p, labels, temp):
    n, d = z.shape
    c = p.shape[1]
    centres = []
    for k in range(c):
        v = [sum(float(p[i, k]) * float(z[i, j]) for i in range(n)) for j in range(d)]
        norm = math.sqrt(sum(x * x for x in v))
        centres.append([x / norm for x in v])
    out = []
    for i in range(n):
        s = [sum(float(z[i, j]) * centres[k][j] for j in range(d)) / temp for k in range(c)]
        m = max(s)
        den = sum(math.exp(x - m) for x in s)
        out.append(math.exp(s[int(labels[i])] - m) / den)
    return np.array(out), np.array(centres)


def test_tcl_clean_scores_match_reference():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(7, 3, generator=g, dtype=torch.float64), dim=1)
    p = torch.softmax(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (7,), generator=g)
    ref, ref_centres = ref_clean_scores(z, p, labels, 0.25)
    assert np.allclose(tcl_centres(z, p).numpy(), ref_centres)
    assert np.allclose(tcl_clean_scores(z, p, labels, 0.25).numpy(), ref)
    assert np.allclose(tcl_clean_scores(z, p, labels, 0.25, chunk=2).numpy(), ref)  # chunking changes nothing


def test_tcl_confidence_finds_mislabelled_samples():
    """Three well separated clusters, predictions right, 30% of the labels wrong: the wrong ones get low w."""
    g = torch.Generator().manual_seed(1)
    c, n = 3, 300
    truth = torch.arange(n) % c
    centres = torch.eye(c, 8)
    z = F.normalize(centres[truth] + 0.15 * torch.randn(n, 8, generator=g), dim=1)
    probs = F.one_hot(truth, c).float() * 0.8 + 0.2 / c
    noisy = truth.clone()
    flip = torch.rand(n, generator=g) < 0.3
    noisy[flip] = (truth[flip] + 1) % c
    w = tcl_confidence(z, probs, noisy, temp=0.25)
    assert w[~flip.numpy()].mean() > 0.9 and w[flip.numpy()].mean() < 0.1
    m = detection_metrics(w, noisy, truth)
    assert m["auroc"] > 0.99 and m["actual_noise_rate"] == pytest.approx(flip.sum().item() / n)


def test_detection_metrics_hand_made():
    noisy = np.array([0, 1, 2, 3, 0, 1])
    clean = np.array([0, 1, 2, 0, 1, 1])  # samples 3 and 4 are mislabelled
    w = np.array([0.9, 0.8, 0.3, 0.6, 0.1, 0.7])
    m = detection_metrics(w, noisy, clean)
    # predicted clean: 0, 1, 3, 5 -> TP 0, 1, 5; FP 3; FN 2
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    # clean scores {.9, .8, .3, .7} vs noisy {.6, .1}: 7 of 8 pairs ranked right
    assert m["auroc"] == pytest.approx(7 / 8)
    assert m["actual_noise_rate"] == pytest.approx(2 / 6)
    assert set(m) == {"precision", "recall", "auroc", "actual_noise_rate"}
    # the threshold is inclusive; torch inputs work too
    m = detection_metrics(torch.tensor(w), torch.tensor(noisy), torch.tensor(clean), threshold=0.6)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)


def test_detection_metrics_degenerate():
    labels = np.array([0, 1, 2])
    m = detection_metrics(np.array([0.9, 0.2, 0.6]), labels, labels)  # all clean
    assert math.isnan(m["auroc"]) and m["actual_noise_rate"] == 0 and m["recall"] == pytest.approx(2 / 3)
    m = detection_metrics(np.array([0.1, 0.2, 0.3]), labels, (labels + 1) % 3)  # all noisy, none predicted clean
    assert math.isnan(m["auroc"]) and math.isnan(m["precision"]) and math.isnan(m["recall"])
    assert m["actual_noise_rate"] == 1
    # unknown clean labels (-1) are left out
    m = detection_metrics(np.array([0.9, 0.1, 0.5]), np.array([0, 1, 2]), np.array([0, 2, -1]))
    assert m["auroc"] == 1 and m["actual_noise_rate"] == 0.5
    m = detection_metrics(np.array([0.9]), np.array([0]), np.array([-1]))
    assert all(math.isnan(v) for v in m.values())
    with pytest.raises(ValueError):
        detection_metrics(np.array([0.9, 0.1]), labels, labels)
