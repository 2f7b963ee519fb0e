"""`ccl labels`: the ranked table of suspect labels, its flag and metrics, the contact sheet, the k-fold
out-of-sample probabilities and the cleanlab comparison, and one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ccl.errors import UserError
from ccl.pipeline.shards import ShardSet, sample_locations
from ccl.analysis import labels as L
from ccl.analysis import labels_scoring as S
from ccl.analysis import labels_table as T
from ccl.train.config import TrainConfig
from ccl.analysis.crossval import stratified_folds, write_subset
from ccl.train.loop import train


def tiny_run(data, out, method: str, epochs: int) -> str:
    cfg = TrainConfig(data=str(data), method=method, arch="resnet_tiny", epochs=epochs, warmup=1, batch_size=64,
                      workers=0, out=str(out), name=method, seed=0)
    return train(cfg, progress=False)["run_dir"]


@pytest.fixture(scope="module")
def ccl_run(digits, tmp_path_factory):
    """A CCL run that has estimated w (one warm-up epoch, then one CCL epoch)."""
    return tiny_run(digits, tmp_path_factory.mktemp("runs"), "ccl", epochs=2)


@pytest.fixture(scope="module")
def ce_run(digits, tmp_path_factory):
    return tiny_run(digits, tmp_path_factory.mktemp("runs"), "ce", epochs=1)


def cli(*args: str):
    from ccl.cli import app

    return CliRunner().invoke(app, ["labels", *map(str, args)])


def truth(data) -> tuple[np.ndarray, np.ndarray]:
    return ShardSet.open(data).labels("train")


# ----------------------------------------------------------------------------------------------------------------
# pure parts


def test_order_is_w_then_probability_of_the_given_label_then_index():
    w = np.array([0.9, 0.1, 0.1, 0.5, 0.1], dtype=np.float32)
    p = np.array([0.2, 0.3, 0.1, 0.0, 0.3], dtype=np.float32)
    assert S.suspicion_order(w, p).tolist() == [2, 1, 4, 3, 0]


def test_flag_default_is_the_gmm_decision_point_and_rate_takes_the_first_rows():
    w = np.array([0.2, 0.7, 0.49, 0.5, 0.01])
    order = S.suspicion_order(w, np.zeros(5))
    assert S.suspect_flags(order, w).tolist() == [True, False, True, False, True]
    flags = S.suspect_flags(order, w, rate=0.4)
    assert flags.sum() == 2 and flags[order[:2]].all()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(UserError):
            S.suspect_flags(order, w, rate=bad)


def test_refurbished_label_from_summaries_is_the_argmax_of_eq_10():
    from ccl.train.losses import refurbish

    g = torch.Generator().manual_seed(0)
    n, c = 500, 7
    probs = torch.softmax(3 * torch.randn(n, c, generator=g), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    w = torch.rand(n, generator=g)
    w[:50] = 0.0  # the peer's prediction decides
    w[50:100] = 1.0  # the given label stays
    s = L.summarize_probs(probs.log(), labels)
    ours = S.refurbished_labels(w.numpy(), labels.numpy(), s["p_given"].numpy(), s["alt"].numpy(), s["p_alt"].numpy())
    y = refurbish(w, labels, probs)  # [N, C]
    top = y.max(1).values
    # Where Eq. 10 has a tie ours keeps the given label; otherwise both name the same class.
    chosen = y.gather(1, torch.as_tensor(ours)[:, None]).squeeze(1)
    assert torch.allclose(chosen, top, atol=1e-6)
    assert (ours[100:] != labels.numpy()[100:]).any() and (ours == labels.numpy()).any()
    assert (ours[50:100] == labels.numpy()[50:100]).all()


def test_confidence_never_rises_with_the_loss():
    w = np.array([0.9, 0.2, 0.8, 0.95, 0.1])
    loss = np.array([1.0, 2.0, 3.0, 0.5, 2.5])
    assert S.monotone_confidence(w, loss).tolist() == [0.9, 0.2, 0.1, 0.95, 0.1]


def test_estimated_w_splits_two_loss_clusters_at_the_gmm_decision_point():
    rng = np.random.default_rng(0)
    clean = rng.gamma(2.0, 0.05, 700)  # small losses, a long right tail
    noisy = rng.normal(3.0, 0.3, 300).clip(0)
    ce = np.concatenate([clean, noisy]).astype(np.float32)
    wrong = np.r_[np.zeros(700, bool), np.ones(300, bool)]
    w, w_ens = S.estimate_w([ce, ce[::-1].copy()], ce)
    assert w.shape == (2, 1000) and w_ens.shape == (1000,)
    assert ((w_ens < 0.5) == wrong).mean() > 0.98
    assert np.allclose(w[1], w_ens)  # net 1's w comes from its peer's (net 0's) losses
    assert (np.diff(w_ens[np.argsort(ce)]) <= 0).all()


def test_issue_metrics_count_wrong_labels_as_positives():
    given = np.array([0, 1, 2, 3, 4, 5])
    clean = np.array([0, 2, 2, 0, 4, -1])  # indices 1 and 3 are wrong; 5 is unknown
    flag = np.array([True, True, False, False, False, True])
    m = S.issue_metrics(flag, np.array([0.9, 0.8, 0.1, 0.7, 0.0, 1.0]), given, clean)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["flagged"] == 2 and m["wrong"] == 2
    assert m["auroc"] == pytest.approx(4 / 6)  # wrong {0.8, 0.7} vs right {0.9, 0.1, 0.0}: 4 of 6 pairs


def test_correction_is_the_share_of_flagged_wrong_labels_whose_suggestion_is_true():
    given = np.array([0, 1, 2, 3, 4, 5])
    clean = np.array([0, 2, 1, 0, 4, -1])  # 1, 2 and 3 are wrong; 5 is unknown
    flag = np.array([True, True, True, True, False, True])
    suggested = np.array([9, 2, 0, 0, 4, 7])  # right for 1 and 3, wrong for 2; 0 is flagged but its label right
    m = S.issue_metrics(flag, np.zeros(6), given, clean, suggested)
    assert (m["flagged_wrong"], m["corrected"]) == (3, 2) and m["correction"] == pytest.approx(2 / 3)
    assert "correction" not in S.issue_metrics(flag, np.zeros(6), given, clean)


def test_folds_are_stratified_seeded_and_balanced():
    labels = np.repeat(np.arange(4), [30, 21, 7, 2])
    f = stratified_folds(labels, 5, seed=3)
    assert f.min() == 0 and f.max() == 4
    sizes = np.bincount(f, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in range(4):
        per = np.bincount(f[labels == c], minlength=5)
        assert per.max() - per.min() <= 1
    assert (stratified_folds(labels, 5, seed=3) == f).all() and (stratified_folds(labels, 5, seed=4) != f).any()
    with pytest.raises(UserError):
        stratified_folds(labels, 1)


def test_fold_subsets_copy_images_and_labels_and_withhold_the_truth(digits, tmp_path):
    src = ShardSet.open(digits)
    label, _ = src.labels("train")
    held, rest = np.array([5, 0, 17]), np.arange(20, 60)
    sub = write_subset(src, "train", {"train": rest, "test": held}, tmp_path / "fold")
    src_loc, sub_loc = sample_locations(src, "train"), sample_locations(sub, "test")
    sub_label, sub_clean = sub.labels("test")
    assert sub_label.tolist() == label[held].tolist() and (sub_clean == -1).all()
    assert [sub_loc.read(j) for j in range(3)] == [src_loc.read(i) for i in held]
    assert sub.labels("train")[0].tolist() == label[rest].tolist() and sub.num_classes == src.num_classes
    assert "noise" not in sub.manifest or sub.manifest["noise"].get("type") == "withheld"


# ----------------------------------------------------------------------------------------------------------------
# a CCL run end to end


def test_csv_round_trips_sorted_and_its_metrics_match_a_hand_computation(ccl_run, digits, tmp_path):
    out = tmp_path / "labels.csv"
    r = cli(ccl_run, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    t = T.read_table(out)
    label, clean = truth(digits)
    n = label.size
    assert t["rank"].tolist() == list(range(1, n + 1))
    assert sorted(t["index"].tolist()) == list(range(n))
    assert (t["given"] == label[t["index"]]).all()  # row for row, the shard's labels
    assert list(t["key"][:3]) == [f"{i:09d}" for i in t["index"][:3]]
    assert {"w0", "w1", "w_ens", "pred0", "pred1", "prob0", "prob1", "pred_ens", "refurbished", "suggested"} <= set(t)
    assert np.allclose(t["w_mean"], (t["w0"] + t["w1"]) / 2, atol=1e-5)
    # Sorted by the ensemble's w, ties by its probability of the given label.
    key = np.stack([t["w_ens"], t["prob_given"]], 1)
    assert all(tuple(key[i]) <= tuple(key[i + 1]) for i in range(n - 1))
    # That w never trusts a label more than one the ensemble finds likelier: monotone in the ensemble's CE.
    by_p = np.argsort(t["prob_given"], kind="stable")
    assert (np.diff(t["w_ens"][by_p]) >= 0).all()
    # The flag is the GMM's decision point.
    assert (t["suspect"] == (t["w_ens"] < 0.5)).all()
    # A suspect row suggests a class other than its given one; every other row keeps its label.
    assert (t["suggested"][t["suspect"]] != t["given"][t["suspect"]]).all()
    assert (t["suggested"][~t["suspect"]] == t["given"][~t["suspect"]]).all()
    # The printed precision and recall, from the CSV and the manifest by hand.
    wrong = label[t["index"]] != clean[t["index"]]
    tp = int((t["suspect"] & wrong).sum())
    precision, recall = tp / t["suspect"].sum(), tp / wrong.sum()
    assert 0 < t["suspect"].sum() < n
    assert f"precision {100 * precision:.1f}%" in r.output and f"recall {100 * recall:.1f}%" in r.output, r.output
    assert "AUROC" in r.output


def test_the_true_label_and_how_often_the_suggestion_is_it(ccl_run, digits, tmp_path):
    out = tmp_path / "labels.csv"
    r = cli(ccl_run, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    t = T.read_table(out)
    label, clean = truth(digits)
    assert (t["true"] == clean[t["index"]]).all()
    fixed = t["suspect"] & (t["given"] != t["true"])
    right = int((t["suggested"][fixed] == t["true"][fixed]).sum())
    assert f"is the true one for {right} of the {int(fixed.sum())} flagged wrong labels" in r.output, r.output


def test_w_from_the_run_is_the_checkpoints_own(ccl_run, tmp_path):
    from ccl.train.restore import restore

    out = tmp_path / "run.csv"
    r = cli(ccl_run, "--w", "run", "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "w the run's own" in r.output
    t = T.read_table(out)
    run, _ = restore(f"{ccl_run}/checkpoints/last.pt", device="cpu")
    for m in (0, 1):
        assert np.allclose(t[f"w{m}"], run.method.w[m].numpy()[t["index"]], atol=1e-6)
    assert np.allclose(t["w_ens"], t["w_mean"]) and (t["suspect"] == (t["w_mean"] < 0.5)).all()
    assert all((t["w_mean"][i], t["prob_given"][i]) <= (t["w_mean"][i + 1], t["prob_given"][i + 1])
               for i in range(len(t["rank"]) - 1))


def test_rate_flags_that_fraction_and_top_prints_that_many_rows(ccl_run, tmp_path):
    out = tmp_path / "rate.csv"
    r = cli(ccl_run, "--out", out, "--rate", "0.1", "--top", "7", "--device", "cpu")
    assert r.exit_code == 0, r.output
    t = T.read_table(out)
    k = round(0.1 * len(t["rank"]))
    assert t["suspect"][:k].all() and not t["suspect"][k:].any()
    assert "the 7 most suspect labels" in r.output
    rows = [line for line in r.output.splitlines() if line.startswith("│")]
    assert len(rows) == 7 and rows[0].split("│")[1].strip() == "1" and rows[6].split("│")[1].strip() == "7"
    assert f"{t['index'][0]}" in rows[0]


def test_grid_writes_a_contact_sheet_of_the_top_suspects(ccl_run, tmp_path):
    from PIL import Image

    out = tmp_path / "g.csv"
    r = cli(ccl_run, "--out", out, "--grid", "--top", "10", "--device", "cpu")
    assert r.exit_code == 0, r.output
    png = tmp_path / "g.png"
    with Image.open(png) as im:
        w, h = im.size
    assert (w, h) == (8 * 112, 2 * (112 + 30))


def test_single_net_ce_gets_an_estimated_w(ce_run, digits, tmp_path):
    out = tmp_path / "ce.csv"
    r = cli(ce_run, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "w fitted on the eval view" in r.output
    t = T.read_table(out)
    assert "w1" not in t and "pred1" not in t
    # One net is its own peer and its own ensemble: one w, three names.
    assert np.allclose(t["w_mean"], t["w0"]) and np.allclose(t["w_ens"], t["w0"])
    assert (t["pred_ens"] == t["pred0"]).all()
    r = cli(ce_run, "--w", "run", "--device", "cpu")
    assert r.exit_code == 2 and "a ce run holds none" in r.output
    assert 0 < t["suspect"].sum() < len(t["rank"])
    label, clean = truth(digits)
    wrong = label[t["index"]] != clean[t["index"]]
    # One epoch of CE already ranks the wrong labels above chance (0.5; its spread here is about 0.015).
    assert S.issue_metrics(np.asarray(t["suspect"]), -np.asarray(t["rank"], float), label[t["index"]],
                           clean[t["index"]])["auroc"] > 0.55
    assert wrong.any()


def test_another_split_estimates_w_there(ccl_run, tmp_path):
    out = tmp_path / "test.csv"
    r = cli(ccl_run, "--split", "test", "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert len(T.read_table(out)["rank"]) == 360 and "w fitted on the eval view" in r.output


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere"], "run not found"),
    (["{tmp}"], "no checkpoints/last.pt"),
    (["{run}", "--split", "val"], "no split 'val'"),
    (["{run}", "--rate", "1.5"], "--rate must lie in (0, 1]"),
    (["{run}", "--out", "{tmp}/x.txt"], "expected a .csv or .parquet"),
    (["{run}", "--top", "0"], "--top must be at least 1"),
    (["{run}", "--w", "gmm"], "--w must be eval or run"),
    (["{run}", "--w", "run", "--split", "test"], "w belongs to the training split"),
])
def test_bad_input_is_one_line(ccl_run, tmp_path, args, message):
    r = cli(*(a.format(tmp=tmp_path, run=ccl_run) for a in args), "--device", "cpu")
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output


def test_parquet_round_trips_when_pyarrow_is_installed(ccl_run, digits, tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "labels.parquet"
    assert cli(ccl_run, "--out", out, "--device", "cpu").exit_code == 0
    t = T.read_table(out)
    label, _ = truth(digits)
    assert (t["given"] == label[t["index"]]).all() and t["suspect"].dtype == bool


# ----------------------------------------------------------------------------------------------------------------
# cleanlab, side by side


def test_compare_cleanlab_on_out_of_sample_probabilities(ccl_run, digits, tmp_path):
    pytest.importorskip("cleanlab")
    out = tmp_path / "cmp.csv"
    r = cli(ccl_run, "--out", out, "--compare-cleanlab", "--folds", "2", "--cv-epochs", "1", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "cleanlab" in r.output and "flagged by both" in r.output
    t = T.read_table(out)
    label, clean = truth(digits)
    assert set(np.unique(t["oos_pred"])) <= set(range(10))
    # cleanlab's printed figures, recomputed from its columns in the table and the manifest. (One epoch of a tiny
    # net on half the data learns little, so how good they are is the measurement's business, not this test's.)
    m = S.issue_metrics(t["cleanlab_issue"], -t["cleanlab_quality"], label[t["index"]], clean[t["index"]])
    row = next(line for line in r.output.splitlines() if line.strip().startswith("cleanlab "))
    cells = row.split()
    assert cells[1:6] == [str(m["flagged"]), f"{100 * m['precision']:.1f}%", f"{100 * m['recall']:.1f}%",
                          f"{100 * m['f1']:.1f}%", f"{m['auroc']:.3f}"], row
    # cleanlab's suggestion, Datalab's predicted_label: the argmax of the out-of-sample probabilities.
    wrong = t["cleanlab_issue"] & (label[t["index"]] != clean[t["index"]])
    right = int((t["oos_pred"][wrong] == clean[t["index"]][wrong]).sum())
    assert f"is the true one for {right} of its {int(wrong.sum())} flagged wrong labels" in r.output, r.output


def test_compare_cleanlab_without_cleanlab_is_one_line(ccl_run, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_cleanlab(name, *a, **k):
        if name.startswith("cleanlab"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_cleanlab)
    r = cli(ccl_run, "--compare-cleanlab", "--device", "cpu", "--out", "/dev/null.csv")
    assert r.exit_code == 2 and "needs cleanlab" in r.output


def test_help_keeps_its_square_brackets():
    """Typer's rich help reads [..] as markup: an unescaped bracket silently drops text (the install hint, defaults)."""
    import os

    from ccl.cli import app

    out = CliRunner().invoke(app, ["labels", "--help"], env={**os.environ, "COLUMNS": "400"})
    assert out.exit_code == 0
    assert "pip install -e '.[labels]'" in out.output and "[default: the run's]" in out.output, out.output
