"""`ccl analyze`: each measure against a hand-computed case, taxonomies, and the command on two tiny runs."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import pytest
import torch

from ccl.errors import UserError
from ccl import contamination as M
from ccl.analysis.contamination.taxonomy import Taxonomy, WordNet, builtin_taxonomies, load_taxonomy, resolve_taxonomies


def _rotation(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))  # a uniformly random orthogonal matrix


# -- cross-model consistency ------------------------------------------------------------------------------------


def test_identical_twins_are_perfectly_consistent():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(200, 16))
    logits = rng.normal(size=(200, 10)) * 3
    assert M.m_embed(e, e, num_pairs=500) == pytest.approx(1.0)
    assert M.m_embed(e, e, num_pairs=500, align=False) == pytest.approx(1.0)
    assert M.m_logit(logits, logits) == 0.0
    assert M.softmax_tv(logits, logits) == pytest.approx(0.0)


def test_rotated_embedding_keeps_m_embed_but_not_the_raw_form():
    rng = np.random.default_rng(1)
    e0 = rng.normal(size=(300, 8))
    e1 = e0 @ _rotation(8, 2)  # the same relations in another basis
    assert M.m_embed(e0, e1, num_pairs=2000) == pytest.approx(1.0, abs=1e-9)
    assert abs(M.m_embed(e0, e1, num_pairs=2000, align=False)) < 0.9  # Eq. 4 to the letter sees the basis


def test_unrelated_embeddings_score_near_zero_even_after_alignment():
    # The rotation is fitted on one half and scored on the other, so it cannot manufacture agreement.
    rng = np.random.default_rng(3)
    e0, e1 = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    assert abs(M.m_embed(e0, e1, num_pairs=4000)) < 0.1


def test_m_embed_by_hand():
    # Two pairs only: (0,1) and (1,0) give the same |cosine|; d0 = (1, 0), d1 = (1, 1) / ... -> cos 45 degrees.
    e0 = np.array([[1.0, 0.0], [0.0, 0.0]])
    e1 = np.array([[1.0, 1.0], [0.0, 0.0]])
    assert M.m_embed(e0, e1, num_pairs=10, align=False) == pytest.approx(math.cos(math.pi / 4))


def test_m_logit_by_hand_and_against_scipy():
    from scipy.stats import wasserstein_distance

    l0 = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    l1 = l0 + np.array([1.0, -2.0])  # class 0 shifted by 1, class 1 by -2: W1 = 1 and 2
    assert M.m_logit(l0, l1) == pytest.approx(1.5)
    # A permutation of the samples leaves each class's distribution, and so M_logit, unchanged.
    assert M.m_logit(l0, l1[[2, 0, 1]]) == pytest.approx(1.5)
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(50, 5)), rng.normal(size=(50, 5)) * 2
    ref = np.mean([wasserstein_distance(a[:, c], b[:, c]) for c in range(5)])
    assert M.m_logit(a, b) == pytest.approx(ref)


def test_softmax_tv_by_hand():
    l0 = np.log(np.array([[0.5, 0.5], [1.0, 1e-12]]))
    l1 = np.log(np.array([[0.75, 0.25], [1e-12, 1.0]]))
    assert M.softmax_tv(l0, l1) == pytest.approx((0.25 + 1.0) / 2, abs=1e-6)


# -- semantic imbalance -----------------------------------------------------------------------------------------


def test_equal_class_variances_give_the_maximal_entropy():
    # Every class is the same two points, shifted: equal variances.
    base = np.array([[1.0, 0.0], [-1.0, 0.0]])
    emb = np.concatenate([base + 10 * c for c in range(4)])
    labels = np.repeat(np.arange(4), 2)
    var = M.class_variances(emb, labels, 4)
    np.testing.assert_allclose(var, 1.0)  # mean squared distance to the class mean: 1
    h, hmax = M.variance_entropy(var)
    assert h == pytest.approx(math.log(4)) and hmax == pytest.approx(math.log(4))


def test_unequal_variances_lower_the_entropy_by_hand():
    h, hmax = M.variance_entropy(np.array([3.0, 1.0]))
    assert h == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert h < hmax
    assert M.variance_entropy(np.array([1.0, 0.0]))[0] == 0.0  # one class holds all the spread


def test_class_with_one_sample_has_no_variance():
    var = M.class_variances(np.array([[0.0], [2.0], [5.0]]), np.array([0, 0, 1]), 3)
    assert var[0] == pytest.approx(1.0) and np.isnan(var[1]) and np.isnan(var[2])
    assert M.variance_entropy(var)[1] == pytest.approx(0.0)  # one class with a variance: log 1


# -- similarity probe -------------------------------------------------------------------------------------------


def test_class_similarity_by_hand():
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = np.array([0, 0, 1, 2])
    anchors = [np.array([0]), np.array([2]), np.array([3])]
    s = M.class_similarity(emb, labels, anchors)
    assert s[0, 0] == pytest.approx(1.0)  # the other sample of class 0, never the anchor itself
    assert s[0, 1] == pytest.approx(0.0)
    assert s[0, 2] == pytest.approx(1 / math.sqrt(2))
    assert np.isnan(s[1, 1])  # class 1 has no sample besides its anchor
    assert M.most_similar(s, 1)[0] == [(2, pytest.approx(1 / math.sqrt(2)))]


def test_anchors_prefer_eligible_samples_and_are_seeded():
    labels = np.array([0, 0, 0, 1, 1])
    eligible = np.array([False, True, False, False, False])
    a = M.pick_anchors(labels, 3, 2, seed=0, eligible=eligible)
    assert a[0].tolist() == [1]  # only the eligible one
    assert len(a[1]) == 2  # class 1 has no eligible sample: all of its own
    assert len(a[2]) == 0
    assert [x.tolist() for x in M.pick_anchors(labels, 3, 1, seed=5)] == \
           [x.tolist() for x in M.pick_anchors(labels, 3, 1, seed=5)]


# -- LCA ----------------------------------------------------------------------------------------------------------

TOY = {  # three levels below the root
    "cat": ["root", "animal", "mammal", "cat"],
    "dog": ["root", "animal", "mammal", "dog"],
    "frog": ["root", "animal", "amphibian", "frog"],
    "car": ["root", "vehicle", "road", "car"],
    "truck": ["root", "vehicle", "road", "truck"],
    "ship": ["root", "vehicle", "water", "ship"],
}


def test_lca_on_a_three_level_toy_taxonomy():
    classes = list(TOY)
    tax = Taxonomy.from_paths("toy", "test", TOY, classes)
    d = tax.distance_matrix("depth")
    i = {c: k for k, c in enumerate(classes)}
    assert d[i["cat"], i["dog"]] == 1  # LCA mammal
    assert d[i["cat"], i["frog"]] == 2  # LCA animal
    assert d[i["cat"], i["truck"]] == 3  # LCA root
    assert d[i["ship"], i["car"]] == 2
    assert np.all(np.diag(d) == 0)
    # Logits whose top-1/top-2 are (cat, dog), (cat, truck), (car, truck): distances 1, 3, 1.
    logits = np.zeros((3, 6))
    for row, (a, b) in enumerate([("cat", "dog"), ("cat", "truck"), ("car", "truck")]):
        logits[row, i[a]], logits[row, i[b]] = 2.0, 1.0
    assert M.lca_top2(d, logits) == pytest.approx(5 / 3)
    # Shi et al.'s use: true vs predicted on errors. Row 1's truth is frog (pred cat: 2); the others are right.
    y = np.array([i["cat"], i["frog"], i["car"]])
    assert M.lca_errors(d, logits, y) == pytest.approx(2.0)
    # Information content: -log2(share of classes below). cat: log2 6; mammal: log2 3; root: 0.
    ic = tax.distance_matrix("ic")
    assert ic[i["cat"], i["dog"]] == pytest.approx(math.log2(6) - math.log2(3))
    assert ic[i["cat"], i["truck"]] == pytest.approx(math.log2(6))


def test_taxonomy_file_errors_are_one_line_user_errors(tmp_path):
    f = tmp_path / "tax.json"
    f.write_text(json.dumps({"name": "toy", "source": "test", "paths": {k: TOY[k] for k in ("cat", "dog")}}))
    with pytest.raises(UserError, match="missing: frog, car, truck, ship"):
        load_taxonomy(f, list(TOY))
    f.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_taxonomy(f, list(TOY))
    bad = dict(TOY, dog=["root", "plant", "mammal", "dog"])  # mammal under two parents
    f.write_text(json.dumps({"paths": bad}))
    with pytest.raises(UserError, match="two parents"):
        load_taxonomy(f, list(TOY))
    with pytest.raises(UserError, match="not found"):
        load_taxonomy(tmp_path / "nope.json", list(TOY))


def test_builtin_taxonomies_cover_their_data_sets():
    c10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (tax,) = builtin_taxonomies(c10)
    d = tax.distance_matrix("depth")
    cat, dog, airplane = c10.index("cat"), c10.index("dog"), c10.index("airplane")
    assert d[cat, dog] < d[cat, airplane]  # carnivores meet lower than a cat and a plane
    c100 = list(json.loads((tax_dir() / "cifar100-superclass.json").read_text())["paths"])
    assert len(c100) == 100 and {t.name for t in builtin_taxonomies(c100)} == {"superclass", "wordnet"}
    digits = [str(k) for k in range(10)]
    assert [t.name for t in builtin_taxonomies(digits)] == ["shape"]
    taxes, note = resolve_taxonomies(["a", "b"], None)
    assert taxes == [] and "--taxonomy" in note


def tax_dir():
    from ccl.analysis.contamination.taxonomy import BUILTIN_DIR

    return BUILTIN_DIR


@pytest.mark.skipif(WordNet.find() is None, reason="no WordNet database installed (Debian: wordnet-base)")
def test_shipped_wordnet_trees_match_wordnet():
    wn = WordNet.find()
    for f in sorted(tax_dir().glob("*-wordnet.json")):
        data = json.loads(f.read_text())
        assert wn.class_paths(data["synsets"]) == data["paths"], f.name
    # Classes named by WordNet ids (WebVision) get their tree from WordNet itself.
    (tax,) = resolve_taxonomies(["n02084071 dog", "n02121620 cat", "n02691156 airplane"], None)[0]
    d = tax.distance_matrix("depth")
    assert d[0, 1] < d[0, 2]


# -- noise detection, confusion ---------------------------------------------------------------------------------


def test_confidence_view_separates_clean_from_noisy():
    w = np.array([0.9, 0.8, 0.95, 0.1, 0.2])
    is_clean = np.array([True, True, True, False, False])
    d = M.confidence_view(w, is_clean, bins=10)
    assert sum(d["hist_clean"]) == 3 and sum(d["hist_noisy"]) == 2
    assert d["average_precision"] == pytest.approx(1.0) and d["auroc"] == pytest.approx(1.0)
    assert d["recall"][0] == pytest.approx(1.0) and d["precision"][-1] == pytest.approx(1.0)


def test_confusion_by_hand():
    cm = M.confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


# -- tracking hook ------------------------------------------------------------------------------------------------


def test_track_gives_the_keys_and_identical_twins_agree():
    from ccl.model import build_nets
    from ccl.train.track import track

    nets = build_nets("resnet_tiny", 4, 2, True, seed=0)
    nets[1].load_state_dict(nets[0].state_dict())  # identical twins
    nets.train()
    x = torch.randn(40, 3, 16, 16)
    y = torch.arange(40) % 4
    out = track(nets, [(x[:20], y[:20]), (x[20:], y[20:])], num_pairs=200)
    assert set(out) == {"track_m_embed", "track_m_logit", "track_var_entropy", "track_var_entropy_net0",
                        "track_var_entropy_net1"}
    assert out["track_m_embed"] == pytest.approx(1.0) and out["track_m_logit"] == pytest.approx(0.0)
    assert 0 < out["track_var_entropy"] <= math.log(4) + 1e-9
    assert all(net.training for net in nets)  # modes restored
    single = track(nets[:1], [(x, y)])
    assert "track_m_embed" not in single and "track_var_entropy" in single


# -- the command on two tiny runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(digits, tmp_path_factory):
    """A CE run and a CCL run of one epoch of resnet_tiny on the digits fixture. CCL skips warm-up, so that its one
    epoch trains with its own loss and ends with a confidence estimate (w) to show."""
    from ccl.train.config import TrainConfig
    from ccl.train.loop import train

    out = tmp_path_factory.mktemp("runs")
    for method in ("ce", "ccl"):
        train(TrainConfig(data=str(digits), method=method, arch="resnet_tiny", epochs=1, warmup=0, batch_size=64,
                          workers=0, out=str(out), name=method, device="cpu"), progress=False)
    return out / "ce", out / "ccl"


def _cli(*args):
    from typer.testing import CliRunner

    from ccl.cli import app

    result = CliRunner().invoke(app, ["analyze", *map(str, args)])
    if not result.exit_code:
        return 0, result.output
    try:
        return result.exit_code, result.stderr  # the error stream alone, where the runner keeps it apart
    except ValueError:
        return result.exit_code, result.output


FAST = ("--device", "cpu", "--pairs", "500", "--tsne-points", "60", "--quiet")


@pytest.mark.timeout(1800)  # trains the two runs on first use: minutes when the CPU is shared
def test_analyze_writes_every_measure_and_a_self_contained_page(tiny_runs, tmp_path):
    from PIL import Image

    ce, ccl = tiny_runs
    code, text = _cli(ce, ccl, "--out", tmp_path, *FAST)
    assert code == 0, text
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    assert analysis["settings"]["pairs"] == 500
    by_method = {r["method"]: r for r in analysis["runs"]}
    assert set(by_method) == {"ce", "ccl"}
    for r in by_method.values():
        for key in ("consistency", "imbalance", "similarity", "lca", "detection", "tsne", "confusion", "curves",
                    "accuracy", "seconds", "timings"):
            assert key in r, key
        assert r["num_samples"] == 360 and r["labels_are_clean"]
        for k in range(r["num_nets"]):
            h = r["imbalance"][f"net{k}"]
            assert h["max_entropy"] == pytest.approx(math.log(10)) and 0 < h["entropy"] <= h["max_entropy"] + 1e-9
            assert np.asarray(r["similarity"][f"net{k}"]["matrix"], dtype=float).shape == (10, 10)
        assert r["lca"]["applicable"] and r["lca"]["taxonomies"][0]["name"] == "shape"
        assert np.asarray(r["confusion"]["pred_vs_true"]).sum() == 360
        assert np.asarray(r["detection"]["noisy_vs_true_train"]).sum() == 1437
        assert r["curves"]["epochs"] == 1
    twin, single = by_method["ccl"], by_method["ce"]
    cons = twin["consistency"]
    assert cons["applicable"] and -1 <= cons["m_embed"] <= 1 and -1 <= cons["m_embed_raw"] <= 1
    assert cons["m_logit"] >= 0 and 0 <= cons["softmax_tv"] <= 1
    assert not single["consistency"]["applicable"] and "1 network" in single["consistency"]["reason"]
    assert twin["detection"]["applicable"] and 0 <= twin["detection"]["net1"]["auroc"] <= 1
    assert not single["detection"]["applicable"]
    assert {"net0", "net1", "ens"} <= set(twin["lca"]["taxonomies"][0])
    measures = {row["measure"]: row["values"] for row in analysis["summary"]}
    assert measures["M_embed (Eq. 4, Procrustes-aligned)"][0] is None  # ce first, as named on the command line

    html = (tmp_path / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched from a network
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    # Per run: variances, similarity per net, t-SNE, curves, two confusions; CCL adds w histograms and PR.
    assert len(images) == (1 + 1 + 1 + 1 + 2) + (1 + 2 + 1 + 1 + 2 + 2)
    for b64 in images:
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.verify()
        assert img.format == "PNG" and img.size[0] > 50


@pytest.mark.timeout(1800)
def test_analyze_bad_input_is_one_line(tiny_runs, tmp_path):
    ce, _ = tiny_runs
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    code, text = _cli(empty, *FAST)
    assert code == 2 and "no checkpoints/last.pt" in text and len(text.strip().splitlines()) == 1, text

    code, text = _cli(ce, "--split", "nonexistent", "--out", tmp_path / "a", *FAST)
    assert code == 2 and "no split 'nonexistent'" in text and len(text.strip().splitlines()) == 1, text

    tax = tmp_path / "tax.json"
    tax.write_text(json.dumps({"name": "partial", "paths": {str(d): ["digit", str(d)] for d in range(8)}}))
    code, text = _cli(ce, "--taxonomy", tax, "--out", tmp_path / "b", *FAST)
    assert code == 2 and "2 of the data set's 10 classes are missing: 8, 9" in text, text
    assert len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_track_set_holds_a_fixed_seeded_subset(digits):
    from ccl.pipeline.shards import ShardSet
    from ccl.train.track import TrackSet

    shards = ShardSet.open(digits)
    a = TrackSet.from_shards(shards, "test", size=50, seed=3)
    b = TrackSet.from_shards(shards, "test", size=50, seed=3)
    assert a.images.shape == (50, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)  # the same subset every time
    _, clean = shards.labels("test")
    assert set(a.labels.tolist()) <= set(clean.tolist())
    batches = list(a.batches(lambda x: x.float() / 255, batch_size=20))
    assert [len(y) for _, y in batches] == [20, 20, 10] and batches[0][0].dtype == torch.float32
