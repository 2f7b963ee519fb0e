"""Converter and shard reader: every source format from a tiny fake tree in its real layout, read back.

Also: byte-identical reruns, corrupt inputs, interruption and overwrite rules, DALI index files, and the same
(index, label, clean) triples through the webdataset library and a CPU-only DALI pipeline.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccl.errors import UserError
from ccl.pipeline.convert.source import stratified_holdout
from ccl.pipeline.convert import ConvertOptions, convert, ensure_digits
from ccl.pipeline.shards import ShardSet
from ccl.pipeline.tarshard import ShardWriter, build_index
from shardtools import parse_index

REPO = Path(__file__).resolve().parents[1]


def opts(**kw) -> ConvertOptions:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return ConvertOptions(**kw)


def quiet(_msg: str) -> None:
    pass


def jpeg_bytes(seed: int, size=(64, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_jpeg(path: Path, seed: int, size=(64, 64)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = jpeg_bytes(seed, size)
    path.write_bytes(data)
    return data


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def all_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def check_readback(out: Path, expect_counts: dict[str, int]) -> ShardSet:
    """Counts, keys, component set, index order, and agreement of labels() with the tar contents."""
    ss = ShardSet.open(out)
    assert {s: ss.count(s) for s in ss.splits} == expect_counts
    for split in ss.splits:
        ss.verify(split)
        label, clean = ss.labels(split)
        assert label.shape == clean.shape == (ss.count(split),)
        assert ((label >= 0) & (label < ss.num_classes)).all()
        seen = 0
        for tar, idx in zip(ss.shards(split), ss.index_files(split)):
            members = tar_members(tar)
            keys = sorted({name.split(".", 1)[0] for name in members})
            assert keys == [f"{i:09d}" for i in range(seen, seen + len(keys))]
            for k in keys:
                i = int(k)
                assert int(members[f"{k}.cls"]) == label[i]
                assert np.frombuffer(members[f"{k}.labels.i64"], "<i8").tolist() == [i, label[i], clean[i]]
                if clean[i] >= 0:
                    assert int(members[f"{k}.clean.cls"]) == clean[i]
                else:
                    assert f"{k}.clean.cls" not in members
                assert (f"{k}.jpg" in members) != (f"{k}.png" in members)
            assert idx.read_text() == build_index(tar)  # our index = the one derived from the tar
            seen += len(keys)
        assert ss.has_clean(split) == bool((clean >= 0).all())
    return ss


# ----------------------------------------------------------------------------------------------------------------
# Fake trees in the real layouts


def make_cifar10(root: Path, per_batch: int = 12, n_test: int = 10) -> tuple[Path, np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_labels = []
    for b in range(1, 6):
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        train_labels += labels
        batch = {
            "batch_label": f"training batch {b} of 5",
            "labels": labels,
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
        }
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch, protocol=2))
    test_labels = [int(x) for x in rng.integers(0, 10, n_test)]
    test = {"batch_label": "testing batch 1 of 1", "labels": test_labels,
            "data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), "filenames": ["t.png"] * n_test}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, np.array(train_labels), np.array(test_labels)


def make_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [i % 100 for i in range(n)]
        d = {"filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": f"{name} batch",
             "fine_labels": fine, "coarse_labels": [f // 5 for f in fine],
             "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Formats


def test_digits_split_labels_and_noise(tmp_path):
    out = tmp_path / "digits"
    res = convert("digits", None, out, opts(noise="sym", noise_rate=0.4, seed=3, shard_size=400), log=quiet)
    ss = check_readback(out, {"train": 1437, "test": 360})
    m = ss.manifest
    assert m["dataset"] == "digits" and ss.num_classes == 10 and ss.image_size == (32, 32)
    assert [len(ss.shards("train")), len(ss.shards("test"))] == [4, 1]
    assert m["noise"]["type"] == "sym" and m["noise"]["rate"] == 0.4 and m["noise"]["seed"] == 3
    label, clean = ss.labels("train")
    assert abs(m["noise"]["actual_rate"] - np.mean(label != clean)) < 1e-6
    assert 0.34 < m["noise"]["actual_rate"] < 0.46
    t = np.array(m["noise"]["transition_matrix"])
    assert t.shape == (10, 10) and np.allclose(t.sum(1), 1, atol=1e-3)
    # Stratified: every class keeps ~20% of its images for test; test labels are clean.
    tl, tc = ss.labels("test")
    assert (tl == tc).all() and np.bincount(tl, minlength=10).min() >= 34
    # Clean labels agree with scikit-learn's, in the split's order.
    from sklearn.datasets import load_digits

    target = load_digits().target
    held = stratified_holdout(target, 360 / 1797, total=360)
    assert (clean == target[~held]).all() and (tc == target[held]).all()
    # Images: 32x32 RGB, grey (R == G == B).
    s = next(ss.iter_samples("train"))
    assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8 and (s.image[..., 0] == s.image[..., 2]).all()
    assert 0.2 < ss.mean[0] < 0.45 and ss.std[0] > 0.1
    assert res["images"] == 1797 and res["images_per_s"] > 0


def test_ensure_digits_builds_once(tmp_path):
    path = ensure_digits(tmp_path, noise="pair", rate=0.2, seed=1)
    assert path.name == "digits-pair0.2-s1"
    ss = ShardSet.open(path)
    assert ss.count("train") == 1437 and len(ss.shards("train")) > 1  # several shards for loader workers
    assert ss.manifest["noise"]["type"] == "pair"
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert ensure_digits(tmp_path, noise="pair", rate=0.2, seed=1) == path
    assert (path / "manifest.json").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_cifar10_pickles_and_label_files(tmp_path):
    folder, train_y, test_y = make_cifar10(tmp_path / "raw")
    out = tmp_path / "c10"
    convert("cifar10", tmp_path / "raw", out, opts(shard_size=25, workers=2), log=quiet)  # parent folder works too
    ss = check_readback(out, {"train": 60, "test": 10})
    assert ss.classes[9] == "truck" and ss.image_size == (32, 32)
    label, clean = ss.labels("train")
    assert (label == train_y).all() and (clean == train_y).all()
    assert ss.manifest["noise"]["type"] == "none" and ss.manifest["noise"]["actual_rate"] == 0.0
    # Pixels survive the PNG round trip: sample 13 is data_batch_2[1].
    batch2 = pickle.loads((folder / "data_batch_2").read_bytes(), encoding="latin1")
    img13 = [s for s in ss.iter_samples("train") if s.index == 13][0].image
    assert (img13 == batch2["data"][1].reshape(3, 32, 32).transpose(1, 2, 0)).all()

    # CIFAR-10N: a dict of numpy arrays saved with torch.save; the key picks the labels.
    rng = np.random.default_rng(5)
    worse = np.where(rng.random(60) < 0.4, (train_y + 1) % 10, train_y)
    human = {"clean_label": train_y, "worse_label": worse, "aggre_label": train_y,
             "random_label1": worse, "random_label2": train_y, "random_label3": worse}
    torch.save(human, tmp_path / "CIFAR-10_human.pt")
    out_n = tmp_path / "c10n"
    pt = str(tmp_path / "CIFAR-10_human.pt")
    convert("cifar10", folder, out_n, opts(labels=pt, label_key="worse_label"), log=quiet)
    ss = check_readback(out_n, {"train": 60, "test": 10})
    label, clean = ss.labels("train")
    assert (label == worse).all() and (clean == train_y).all()
    noise = ss.manifest["noise"]
    assert noise["type"] == "file" and noise["source"] == "CIFAR-10_human.pt:worse_label"
    assert noise["actual_rate"] == pytest.approx(np.mean(worse != train_y), abs=1e-6)

    with pytest.raises(UserError, match="--label-key"):
        convert("cifar10", folder, tmp_path / "x", opts(labels=str(tmp_path / "CIFAR-10_human.pt")), log=quiet)
    # DivideMix/RoLR r_mode.json and TCL .npy.
    (tmp_path / "0.4_sym.json").write_text(json.dumps([int(v) for v in worse]))
    convert("cifar10", folder, tmp_path / "c10j", opts(labels=str(tmp_path / "0.4_sym.json")), log=quiet)
    assert (ShardSet.open(tmp_path / "c10j").labels("train")[0] == worse).all()
    np.save(tmp_path / "sym_noise_cifar10_40.npy", worse.astype(np.int32))
    convert("cifar10", folder, tmp_path / "c10t", opts(labels=str(tmp_path / "sym_noise_cifar10_40.npy")), log=quiet)
    assert (ShardSet.open(tmp_path / "c10t").labels("train")[0] == worse).all()
    # Wrong length / range: one-line errors, nothing written.
    (tmp_path / "short.json").write_text(json.dumps([0] * 59))
    with pytest.raises(UserError, match="59 labels, the train split has 60"):
        convert("cifar10", folder, tmp_path / "bad", opts(labels=str(tmp_path / "short.json")), log=quiet)
    (tmp_path / "range.json").write_text(json.dumps([0] * 59 + [10]))
    with pytest.raises(UserError, match=r"outside 0\.\.9"):
        convert("cifar10", folder, tmp_path / "bad", opts(labels=str(tmp_path / "range.json")), log=quiet)
    assert not (tmp_path / "bad").exists()


def test_cifar10_asym_and_instance(tmp_path):
    folder, train_y, _ = make_cifar10(tmp_path / "raw", per_batch=40)
    convert("cifar10", folder, tmp_path / "a", opts(noise="asym", noise_rate=0.45, seed=0), log=quiet)
    label, clean = ShardSet.open(tmp_path / "a").labels("train")
    flipped = label != clean
    assert flipped.any()
    assert all({9: 1, 2: 0, 4: 7, 3: 5, 5: 3}[c] == lab for c, lab in zip(clean[flipped], label[flipped]))
    convert("cifar10", folder, tmp_path / "i", opts(noise="instance", noise_rate=0.4, seed=0, workers=2), log=quiet)
    m = ShardSet.open(tmp_path / "i").manifest
    assert m["noise"]["type"] == "instance" and 0.2 < m["noise"]["actual_rate"] < 0.6


def test_cifar100(tmp_path):
    make_cifar100(tmp_path / "raw")
    convert("cifar100", tmp_path / "raw" / "cifar-100-python", tmp_path / "o",
            opts(noise="pair", noise_rate=0.3, shard_size=64), log=quiet)  # fmt: skip
    ss = check_readback(tmp_path / "o", {"train": 200, "test": 100})
    assert ss.num_classes == 100 and ss.classes[7] == "fine7"
    label, clean = ss.labels("train")
    assert (clean == np.arange(200) % 100).all()
    assert ((label == clean) | (label == (clean + 1) % 100)).all()
    # asym has no CIFAR-100 map: pair is used and the manifest says so.
    convert("cifar100", tmp_path / "raw", tmp_path / "a", opts(noise="asym", noise_rate=0.3), log=quiet)
    m = ShardSet.open(tmp_path / "a").manifest
    assert "pair" in m["noise"]["note"] and m["notes"]


def test_animal10n_copies_jpeg_bytes(tmp_path):
    src = tmp_path / "animal10n"
    originals = {}
    for sub, n in (("training", 30), ("testing", 10)):
        for i in range(n):
            name = f"{i % 10}_{i:05d}.jpg"
            originals[f"{sub}/{name}"] = write_jpeg(src / sub / name, seed=i + (100 if sub == "testing" else 0))
    convert("animal10n", src, tmp_path / "o", opts(shard_size=8, workers=2), log=quiet)
    ss = check_readback(tmp_path / "o", {"train": 30, "test": 10})
    assert ss.classes[1] == "lynx" and ss.image_size == (64, 64)
    assert not ss.has_clean("train") and ss.has_clean("test")  # crowd labels: the truth is unknown
    label, clean = ss.labels("train")
    assert (clean == -1).all() and ss.manifest["noise"]["actual_rate"] is None
    # Every stored jpg is byte-for-byte one of the source files with that label.
    by_bytes = {data: int(Path(name).name.split("_")[0]) for name, data in originals.items()}
    for tar in ss.shards("train"):
        for name, data in tar_members(tar).items():
            if name.endswith(".jpg"):
                assert by_bytes[data] == label[int(name[:9])]
    # Samples are written in a seeded permuted order so each shard mixes classes.
    assert len(set(label[:8].tolist())) > 2


def test_webvision_layout_mini_and_imagenet(tmp_path):
    root = tmp_path / "webvision"
    info = root / "info"
    info.mkdir(parents=True)
    (info / "synsets.txt").write_text("".join(f"n{i:08d} class {i}\n" for i in range(60)))
    google, flickr, val = [], [], []
    for i in range(24):
        label = (i * 7) % 60  # some labels >= 50: dropped by --num-classes 50
        rel = f"google/q{label + 1:04d}/{i:06d}.jpg"
        write_jpeg(root / rel, seed=i)
        google.append(f"{rel} {label}")
    for i in range(6):
        rel = f"q{i + 1:04d}/{i:06d}.jpg"  # a list written relative to flickr/
        write_jpeg(root / "flickr" / rel, seed=50 + i)
        flickr.append(f"{rel} {i}")
    for i in range(8):
        write_jpeg(root / "val_images_256" / f"val{i + 1:06d}.jpg", seed=200 + i)
        val.append(f"val{i + 1:06d}.jpg {i * 8}")
    (info / "train_filelist_google.txt").write_text("\n".join(google) + "\n")
    (info / "train_filelist_flickr.txt").write_text("\n".join(flickr) + "\n")
    (info / "val_filelist.txt").write_text("\n".join(val) + "\n")
    imnet = tmp_path / "imagenet_val"
    lines = []
    for i in range(5):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        write_jpeg(imnet / name, seed=300 + i, size=(80, 60))
        lines.append(f"{name} {i * 20}")
    (imnet / "val.txt").write_text("\n".join(lines) + "\n")

    out = tmp_path / "o"
    convert("webvision", root, out, opts(num_classes=50, webvision_lists=("google", "flickr"),
                                         imagenet_val=str(imnet), shard_size=7), log=quiet)  # fmt: skip
    n_google = sum(1 for i in range(24) if (i * 7) % 60 < 50)
    ss = check_readback(out, {"train": n_google + 6, "test": 7, "val_imagenet": 3})
    assert ss.num_classes == 50 and ss.classes[3] == "n00000003 class 3"
    assert ss.manifest["dataset"] == "webvision50" and ss.image_size is None  # 64x64 and 80x60 mixed
    assert not ss.has_clean("train") and ss.has_clean("val_imagenet")
    assert sorted(ss.labels("val_imagenet")[0].tolist()) == [0, 20, 40]
    assert sorted(ss.labels("test")[0].tolist()) == [0, 8, 16, 24, 32, 40, 48]

    # A file list naming a missing image: an error naming it, or skipped and recorded.
    (root / "google/q0001/000000.jpg").unlink()
    with pytest.raises(UserError, match=r"missing, first: .*google/q0001/000000\.jpg"):
        convert("webvision", root, tmp_path / "m", opts(num_classes=50), log=quiet)
    convert("webvision", root, tmp_path / "m", opts(num_classes=50, skip_missing=True), log=quiet)
    m = ShardSet.open(tmp_path / "m").manifest
    assert m["skipped"] == [{"split": "train", "path": "google/q0001/000000.jpg", "reason": "missing file"}]
    # Names in a list stay inside their folder; a binary list is a one-line error.
    good = (info / "train_filelist_google.txt").read_text()
    for bad in ("../../etc/passwd 3", "/etc/passwd 3", "google/../../x.jpg 1"):
        (info / "train_filelist_google.txt").write_text(good + bad + "\n")
        with pytest.raises(UserError, match="is not a path inside"):
            convert("webvision", root, tmp_path / "m3", opts(num_classes=50), log=quiet)
    (info / "train_filelist_google.txt").write_bytes(b"\xff\xfe\x00 binary")
    with pytest.raises(UserError, match="not a text file"):
        convert("webvision", root, tmp_path / "m3", opts(num_classes=50), log=quiet)
    (info / "train_filelist_google.txt").write_text(good)
    with pytest.raises(UserError, match="val_filelist.txt is missing"):
        (info / "val_filelist.txt").unlink()
        convert("webvision", root, tmp_path / "m2", opts(num_classes=50), log=quiet)


def test_folder_formats_and_bad_images(tmp_path):
    # Without train/ and test/: a seeded held-out fraction per class.
    flat = tmp_path / "flat"
    for c in ("zebra", "ant", "moth"):
        for i in range(10):
            write_jpeg(flat / c / f"{i}.jpg", seed=hash((c, i)) % 1000)
    Image.new("RGB", (64, 64), (10, 200, 30)).save(flat / "ant" / "extra.bmp")  # re-encoded as PNG
    (flat / "ant" / "notes.txt").write_text("not an image")
    (flat / "moth" / "truncated.jpg").write_bytes(jpeg_bytes(9)[:400])
    (flat / "moth" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 20)
    out = tmp_path / "o"
    convert("folder", flat, out, opts(test_fraction=0.2, shard_size=5, workers=2), log=quiet)
    ss = check_readback(out, {"train": 25, "test": 6})
    assert ss.classes == ["ant", "moth", "zebra"]
    m = ss.manifest
    assert m["num_skipped"] == 2
    assert sorted(s["path"] for s in m["skipped"]) == ["moth/corrupt.jpg", "moth/truncated.jpg"]
    assert all(s["reason"] for s in m["skipped"])
    pngs = [n for t in ss.shards("train") + ss.shards("test") for n in tar_members(t) if n.endswith(".png")]
    assert len(pngs) == 1
    with pytest.raises(UserError, match="cannot decode"):
        convert("folder", flat, tmp_path / "strict", opts(strict=True), log=quiet)
    assert not (tmp_path / "strict" / "manifest.json").exists()

    # With train/ and val/ subtrees.
    tree = tmp_path / "tree"
    for split, n in (("train", 6), ("val", 2)):
        for c in ("cat", "dog"):
            for i in range(n):
                write_jpeg(tree / split / c / f"{c}{i}.jpg", seed=i + len(c) + 10 * n)
    convert("folder", tree, tmp_path / "o2", opts(), log=quiet)
    ss = check_readback(tmp_path / "o2", {"train": 12, "test": 4})
    assert ss.classes == ["cat", "dog"] and sorted(ss.labels("test")[0].tolist()) == [0, 0, 1, 1]


# ----------------------------------------------------------------------------------------------------------------
# Qualities


def test_byte_identical_reruns(tmp_path):
    make_cifar10(tmp_path / "raw")
    a, b = tmp_path / "a", tmp_path / "b"
    o = dict(noise="sym", noise_rate=0.5, seed=7, shard_size=16)
    convert("cifar10", tmp_path / "raw", a, opts(workers=1, **o), log=quiet)
    convert("cifar10", tmp_path / "raw", b, opts(workers=2, **o), log=quiet)
    fa, fb = all_files(a), all_files(b)
    assert list(fa) == list(fb) and fa == fb
    convert("cifar10", tmp_path / "raw", tmp_path / "c", opts(workers=1, **{**o, "seed": 8}), log=quiet)
    assert ShardSet.open(tmp_path / "c").labels("train")[0].tolist() != ShardSet.open(a).labels("train")[0].tolist()


def test_interrupted_conversion_leaves_no_manifest_and_rerun_completes(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "raw")
    ref = tmp_path / "ref"
    convert("cifar10", tmp_path / "raw", ref, opts(shard_size=16), log=quiet)
    out = tmp_path / "out"
    original = ShardWriter._finish_shard
    calls = []

    def finish_then_die(self):
        original(self)
        calls.append(1)
        raise KeyboardInterrupt  # killed right after the first shard was renamed into place

    monkeypatch.setattr(ShardWriter, "_finish_shard", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert("cifar10", tmp_path / "raw", out, opts(shard_size=16), log=quiet)
    monkeypatch.setattr(ShardWriter, "_finish_shard", original)
    # shards without a manifest are of no use: the interrupted conversion removes what it wrote
    assert calls == [1] and not (out / "train-000000.tar").exists()
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="manifest.json is missing"):
        ShardSet.open(out)
    (out / ".train-000001.tar.partial").write_bytes(b"junk from a killed writer")
    (out / "train-000099.tar").write_bytes(b"a stale shard")
    (out / "keep-me.txt").write_text("not ours")
    convert("cifar10", tmp_path / "raw", out, opts(shard_size=16), log=quiet)  # no --overwrite needed
    files = all_files(out)
    assert files.pop("keep-me.txt") and files == all_files(ref)


def test_overwrite_rules(tmp_path):
    out = tmp_path / "o"
    convert("digits", None, out, opts(shard_size=2000), log=quiet)
    with pytest.raises(UserError, match="--overwrite"):
        convert("digits", None, out, opts(shard_size=2000), log=quiet)
    convert("digits", None, out, opts(shard_size=500, overwrite=True), log=quiet)
    ss = ShardSet.open(out)
    assert len(ss.shards("train")) == 3 and sorted(p.name for p in out.glob("*.tar")) == [
        "test-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar"]  # fmt: skip


def test_bad_input_errors(tmp_path):
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        convert("digits", None, tmp_path / "o", opts(noise="sym", noise_rate=1.0), log=quiet)
    with pytest.raises(UserError, match="no such directory"):
        convert("cifar10", tmp_path / "nope", tmp_path / "o", opts(), log=quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="data_batch_1 is missing"):
        convert("cifar10", tmp_path / "empty", tmp_path / "o", opts(), log=quiet)
    with pytest.raises(UserError, match="training"):
        convert("animal10n", tmp_path / "empty", tmp_path / "o", opts(), log=quiet)
    bad = tmp_path / "a10n"
    write_jpeg(bad / "training" / "cat_001.jpg", 0)
    (bad / "testing").mkdir()
    with pytest.raises(UserError, match="<label>_<id>.jpg"):
        convert("animal10n", bad, tmp_path / "o", opts(), log=quiet)
    with pytest.raises(UserError, match="takes no SRC"):
        convert("digits", tmp_path, tmp_path / "o", opts(), log=quiet)
    with pytest.raises(UserError, match="no shard set"):
        ShardSet.open(tmp_path / "missing")


def test_verify_catches_a_changed_shard(tmp_path):
    out = tmp_path / "o"
    convert("digits", None, out, opts(shard_size=1000), log=quiet)
    ss = ShardSet.open(out / "manifest.json")
    ss.verify("train")
    with open(out / "train-000001.tar", "r+b") as f:
        f.seek(700)
        f.write(b"X")
    with pytest.raises(UserError, match="sha256"):
        ss.verify("train")
    (out / "test-000000.idx").unlink()
    with pytest.raises(UserError, match="missing"):
        ss.verify("test")


def test_writer_bytes_equal_tarfile_ustar(tmp_path):
    """The hand-built headers are exactly what the tarfile module writes for the same fixed metadata."""
    samples = [(i, bytes(range(i * 37 % 256)) * (i + 1), "png", i % 3, -1 if i == 4 else (i + 1) % 3) for i in range(5)]
    w = ShardWriter(tmp_path, "train", 3)
    for s in samples:
        w.write(*s)
    records = w.close()
    assert [r["count"] for r in records] == [3, 2] and [r["first_index"] for r in records] == [0, 3]

    def reference(part) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index, image, ext, label, clean in part:
                comps = [(ext, image), ("cls", str(label).encode())]
                comps += [("clean.cls", str(clean).encode())] if clean >= 0 else []
                comps += [("labels.i64", np.array([index, label, clean], "<i8").tobytes())]
                for comp, data in comps:
                    info = tarfile.TarInfo(f"{index:09d}.{comp}")
                    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                    info.uname = info.gname = "ccl"
                    tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    assert (tmp_path / "train-000000.tar").read_bytes() == reference(samples[:3])
    assert (tmp_path / "train-000001.tar").read_bytes() == reference(samples[3:])
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_index_matches_dalis_wds2idx(tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    out = tmp_path / "o"
    convert("digits", None, out, opts(shard_size=700), log=quiet)
    for tar in sorted(out.glob("*.tar")):
        ref = tmp_path / (tar.stem + ".ref.idx")
        creator = wds2idx.IndexCreator(str(tar), str(ref), verbose=False)
        creator.create_index()
        creator.close()
        assert ref.read_text() == tar.with_suffix(".idx").read_text()
        assert len(parse_index(ref)) == sum(1 for n in tar_members(tar) if n.endswith(".labels.i64"))


def test_webdataset_and_dali_read_the_same_triples(tmp_path):
    wds = pytest.importorskip("webdataset")
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    out = tmp_path / "o"
    convert("digits", None, out, opts(noise="sym", noise_rate=0.4, shard_size=400), log=quiet)
    ss = ShardSet.open(out)
    expected = np.stack([np.arange(ss.count("train")), *ss.labels("train")], axis=1)  # [N, 3]

    triples = []
    for s in wds.WebDataset([str(p) for p in ss.shards("train")], shardshuffle=False, empty_check=False):
        index = int(s["__key__"])
        clean = int(s["clean.cls"]) if "clean.cls" in s else -1
        triples.append([index, int(s["cls"]), clean])
        assert np.frombuffer(s["labels.i64"], "<i8").tolist() == triples[-1]
        assert ("png" in s) or ("jpg" in s)
    assert (np.array(triples) == expected).all()

    batch = 128

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        image, labels = fn.readers.webdataset(
            paths=[str(p) for p in ss.shards("train")], index_paths=[str(p) for p in ss.index_files("train")],
            ext=["jpg;png", "labels.i64"], dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
            random_shuffle=False, name="reader",
        )  # fmt: skip
        return fn.decoders.image(image, device="cpu", output_type=types.RGB), labels

    p = pipe()
    p.build()
    rows, first_image = [], None
    while len(rows) < len(expected):
        images, labels = p.run()
        for i in range(len(labels)):
            rows.append(np.array(labels[i]))
            if first_image is None:
                first_image = np.array(images[i])
    assert (np.stack(rows)[: len(expected)] == expected).all()
    assert (first_image == next(ss.iter_samples("train")).image).all()


def test_cli_one_line_errors_and_success(tmp_path):
    script = str(REPO / "tools" / "shard.py")
    cmd = [sys.executable, script, "digits", str(tmp_path / "o"), "--noise", "sym", "--noise-rate", "1.5"]
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: --noise-rate must be in [0, 1), got 1.5"]
    bad = subprocess.run([sys.executable, script, "cifar10", str(tmp_path / "missing"), str(tmp_path / "o")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no such directory" in bad.stderr
    ok = subprocess.run([sys.executable, script, "digits", "-", str(tmp_path / "o"), "--shard-size", "1000"],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "images/s" in ok.stdout and ShardSet.open(tmp_path / "o").count("test") == 360


# ----------------------------------------------------------------------------------------------------------------
# Untrusted input: the manifest schema, index files, image structure, CIFAR pickles


def _edit_manifest(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def small_set(tmp_path) -> Path:
    out = tmp_path / "set"
    convert("digits", None, out, opts(shard_size=500), log=quiet)
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(dataset="../escaped"), r"dataset: '\.\./escaped' is not a plain name"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="/etc/passwd"), r"'/etc/passwd' is not a plain"),
    (lambda m: m["splits"]["train"]["shards"][0].update(index="../x.idx"), r"'\.\./x\.idx' is not a plain"),
    (lambda m: m["splits"]["train"]["shards"][1].pop("file"), r"shards\[1\]\.file: field required"),
    (lambda m: m.update(num_classes="10"), r"num_classes: Input should be a valid integer, got '10'"),
    (lambda m: m["splits"]["test"].update(count="360"), r"splits\.test\.count: Input should be a valid integer"),
    (lambda m: m["splits"]["train"]["shards"][0].update(count=5), r"first_index is 500, expected 5"),
    (lambda m: m.update(std=[0.0, 0.3, 0.3]), r"std\[0\]: Input should be greater than 0"),
    (lambda m: m.update(mean=[0.5, float("nan"), 7]), r"mean\[1\]: Input should be a finite number"),
    (lambda m: m.update(image_size=[0, 32]), r"image_size\[0\]: Input should be greater than or equal to 1"),
    (lambda m: m.update(image_size=[32, 10**6]), r"image_size\[1\]: Input should be less than or equal to 65535"),
    (lambda m: m.update(classes=m["classes"][:9]), r"classes: 9 names, but num_classes is 10"),
    (lambda m: m["splits"]["train"]["shards"][0].update(sha256="abc"), r"sha256: 'abc' is not a sha256"),
    (lambda m: m.update(format_version=2), r"format_version: Input should be 1"),
])  # fmt: skip
def test_manifest_schema_refuses_with_one_line(small_set, edit, message):
    _edit_manifest(small_set, edit)
    with pytest.raises(UserError, match=message) as e:
        ShardSet.open(small_set)
    assert "\n" not in str(e.value)


def test_manifest_problems_are_all_listed(small_set):
    from ccl.pipeline import manifest as schema

    def edit(m):
        m.update(dataset="a/b", num_classes="10", std=[0, 0.1, 0.1], extra=1)
        del m["splits"]["train"]["shards"][0]["file"]

    _edit_manifest(small_set, edit)
    found = schema.problems(json.loads((small_set / "manifest.json").read_text()))
    assert len(found) == 5 and all("\n" not in p for p in found)
    with pytest.raises(UserError, match=r"\(and 4 more: `ccl check .*` lists them\)"):
        ShardSet.open(small_set)


def test_num_classes_smaller_than_the_labels(small_set):
    _edit_manifest(small_set, lambda m: m.update(num_classes=8, classes=m["classes"][:8]))
    with pytest.raises(UserError, match=r"label \d \(clean \d\), outside 0\.\.7: num_classes .* is wrong"):
        ShardSet.open(small_set).labels("train")


@pytest.mark.parametrize("content, message", [
    (b"v1.2 1\npng abc 10 000000000.png\n", "offset and size must be non-negative integers"),
    (b"v1.2 1\npng -512 10 000000000.png\n", "offset and size must be non-negative integers"),
    (b"v1.2 1\npng 1000 10 000000000.png\n", "not where a tar member's data can start"),
    (b"v1.2 1\npng 512 99999999 000000000.png\n", "lies past the end of the tar"),
    (b"\x89\xff\xfe binary \x00\x01", "binary content"),
    (b"hello\n", "not a webdataset index file"),
    (b"v1.2 2\npng 512 10 000000000.png\n", "header says 2 samples, found 1"),
    (b"v1.2 1\npng 512 10\n", "expected 'component offset size name' groups"),
])  # fmt: skip
def test_bad_index_files_are_one_line_errors(small_set, content, message):
    idx = small_set / "train-000000.idx"
    idx.write_bytes(content)
    _edit_manifest(small_set, lambda m: m["splits"]["train"]["shards"][0].update(
        index_sha256=hashlib.sha256(content).hexdigest()))
    for verify in (True, False):
        with pytest.raises(UserError, match=message) as e:
            ShardSet.open(small_set).scan("train", verify=verify)
        assert "\n" not in str(e.value)


def test_index_checksums_written_and_old_manifests_still_load(small_set):
    m = json.loads((small_set / "manifest.json").read_text())
    for rec in m["splits"]["train"]["shards"]:
        assert rec["index_sha256"] == hashlib.sha256((small_set / rec["index"]).read_bytes()).hexdigest()
    _edit_manifest(small_set, lambda m: [r.pop("index_sha256") for s in m["splits"].values() for r in s["shards"]])
    ss = ShardSet.open(small_set)
    assert ss.verify("train") == [] and ss.count("train") == 1437  # checked against the tar instead


def test_absolute_shard_path_is_never_touched(small_set, monkeypatch):
    _edit_manifest(small_set, lambda m: m["splits"]["train"]["shards"][0].update(file="/etc/passwd"))
    touched = []
    real_stat = Path.stat

    def stat(self, *a, **k):
        touched.append(str(self))
        return real_stat(self, *a, **k)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(UserError, match="not a plain"):
        ShardSet.open(small_set)
    assert not [p for p in touched if "passwd" in p]


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _interlaced_png(w: int, h: int) -> bytes:
    """An Adam7-interlaced 8-bit grey PNG (PIL writes none), built by hand."""
    import zlib

    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):  # fmt: skip
        pw, ph = (w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy
        if pw > 0 and ph > 0:
            raw += (b"\x00" + bytes(range(pw))) * ph

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 0, 0, 0, 1])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
def test_image_structure_check_accepts_what_the_decoders_read():
    import torchvision.io as tio

    from ccl.pipeline.imagecheck import image_problem

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    rgb = Image.fromarray(arr)
    good = [_png(rgb.convert(mode)) for mode in ("RGB", "L", "RGBA", "P", "1", "LA")]
    # 16-bit samples: torchvision decodes them to uint16, which an 8-bit batch misreads; refused here, stored as
    # 8-bit by tools/shard.py
    assert "16-bit" in image_problem(_png(rgb.convert("I;16")))
    interlaced = _interlaced_png(13, 11)
    good.append(interlaced)
    for kw in ({}, {"progressive": True}, {"optimize": True}, {"subsampling": 0}, {"quality": 20},
               {"progressive": True, "optimize": True, "quality": 100}, {"exif": b"Exif\x00\x00" + bytes(20)}):
        for mode in ("RGB", "L", "CMYK"):
            buf = io.BytesIO()
            rgb.convert(mode).save(buf, "JPEG", **kw)
            good.append(buf.getvalue())
    for data in good:
        assert image_problem(data) is None, data[:4]
        assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).size  # PIL agrees
    assert tio.decode_image(torch.frombuffer(bytearray(interlaced), dtype=torch.uint8)).shape[1:] == (11, 13)
    assert image_problem(good[0], (37, 53)) is None
    assert "53x37 pixels, but the set's images are 32x32" in image_problem(good[0], (32, 32))


def test_image_structure_check_refuses_what_crashes_or_confuses_decoders():
    from ccl.pipeline.imagecheck import image_problem

    png = _png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    jpg = jpeg_bytes(3)
    idat = png.index(b"IDAT")
    cases = {
        "garbage markers": (b"\xff\xd8\xff\xe0 not a jpeg" * 20, "bad length"),
        "not an image": (b"hello", "neither PNG nor JPEG"),
        "empty": (b"", "neither PNG nor JPEG (starts empty)"),
        "IDAT CRC": (png[: idat + 10] + bytes([png[idat + 10] ^ 1]) + png[idat + 11 :], "CRC mismatch in chunk IDAT"),
        "truncated PNG": (png[:-20], "truncated"),
        "truncated JPEG": (jpg[:400], "truncated"),
        "unknown JPEG marker": (jpg[:2] + b"\xff\x99\x00\x04ab" + jpg[2:], "unsupported marker 0xFF99"),
        "arithmetic coding": (jpg.replace(b"\xff\xc0", b"\xff\xc9", 1), "unsupported coding"),
    }
    for name, (data, message) in cases.items():
        why = image_problem(data)
        assert why is not None and message in why, (name, why)
    # A fixed CRC on a bad filter byte or a short zlib stream: libpng refuses these too (torchvision crashed).
    import zlib

    w = h = 4
    raw = bytearray((b"\x00" + bytes(3 * w)) * h)
    raw[(1 + 3 * w) * 2] = 7  # row 2's filter type

    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0]))
    assert "filter" in image_problem(head + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))
    short = zlib.compress(bytes(raw[:-3]))
    assert "inflates to" in image_problem(head + chunk(b"IDAT", short) + chunk(b"IEND", b""))


def test_converter_reencodes_what_only_pil_reads(tmp_path):
    """A JPEG without Huffman tables (MJPEG style) decodes in PIL with default tables, but fails the structure
    check: it is stored as PNG of PIL's pixels and listed under 'reencoded'."""
    data = jpeg_bytes(5)
    pos, out = 2, data[:2]
    while data[pos + 1] != 0xDA:  # drop the DHT segments before the scan
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data[pos + 1] != 0xC4:
            out += data[pos : pos + 2 + length]
        pos += 2 + length
    mjpeg = out + data[pos:]
    pixels = np.asarray(Image.open(io.BytesIO(mjpeg)).convert("RGB"))
    for c in ("a", "b"):
        for i in range(3):
            write_jpeg(tmp_path / "raw" / c / f"{i}.jpg", seed=i)
    (tmp_path / "raw" / "a" / "mjpeg.jpg").write_bytes(mjpeg)
    convert("folder", tmp_path / "raw", tmp_path / "o", opts(test_fraction=0.0), log=quiet)
    ss = check_readback(tmp_path / "o", {"train": 7})
    assert [r["path"] for r in ss.manifest["reencoded"]] == ["a/mjpeg.jpg"] and ss.manifest["num_reencoded"] == 1
    assert "Huffman" in ss.manifest["reencoded"][0]["reason"]
    stored = [s.image for s in ss.iter_samples("train") if s.image.shape == pixels.shape and (s.image == pixels).all()]
    assert len(stored) == 1


def test_folder_dataset_name_is_a_plain_name(tmp_path):
    src = tmp_path / "my data (v2)"
    for c in ("a", "b"):
        for i in range(2):
            write_jpeg(src / c / f"{i}.jpg", seed=i)
    convert("folder", src, tmp_path / "o", opts(test_fraction=0.0), log=quiet)
    assert ShardSet.open(tmp_path / "o").manifest["dataset"] == "my_data_v2_"


def test_cifar_pickles_with_bytes_keys_or_bad_names(tmp_path):
    folder, train_y, _ = make_cifar10(tmp_path / "raw", per_batch=4, n_test=4)
    for f in folder.iterdir():  # re-saved as pickle.load(..., encoding="bytes") leaves them: bytes keys
        d = pickle.loads(f.read_bytes(), encoding="latin1")
        d = {k.encode(): ([n.encode() for n in v] if k == "label_names" else v) for k, v in d.items()}
        f.write_bytes(pickle.dumps(d, protocol=2))
    convert("cifar10", folder, tmp_path / "o", opts(), log=quiet)
    ss = ShardSet.open(tmp_path / "o")
    assert ss.classes[0] == "airplane" and (ss.labels("train")[0] == train_y).all()
    meta = pickle.loads((folder / "batches.meta").read_bytes(), encoding="bytes")
    for bad in ("airplane,car", 10, None):
        meta[b"label_names"] = bad
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
        with pytest.raises(UserError, match="should be a list of class names"):
            convert("cifar10", folder, tmp_path / "bad", opts(), log=quiet)
    (folder / "batches.meta").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(UserError, match="expected a CIFAR pickle holding a dict"):
        convert("cifar10", folder, tmp_path / "bad", opts(), log=quiet)
