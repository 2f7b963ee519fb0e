"""Loaders: batch structure, exact epochs (workers, ranks), ordering, the DALI backend, and bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ccl.errors import UserError
from ccl.pipeline.batch import Batch
from ccl.pipeline.convert import ConvertOptions, convert
from ccl.pipeline.loader import make_loader
from ccl.pipeline.plan import batch_sizes, plan_epoch, rechunk, steps_per_epoch
from ccl.pipeline.shards import ShardSet
from ccl.pipeline.tarshard import sha256_file
from shardtools import parse_index

try:  # the dali backend is optional (Linux x86_64 wheels only)
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed")


@pytest.fixture(scope="module")
def ss(digits) -> ShardSet:
    return ShardSet.open(digits)


def one_epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def _batch(first: int, n: int) -> Batch:
    zeros = torch.zeros(n, dtype=torch.long)
    return Batch(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(first, first + n), zeros, zeros - 1)


def indices(batches) -> list[int]:
    return [i for b in batches for i in b.index.tolist()]


# ---------------------------------------------------------------------------------------------------------------
# Batch structure


def test_batch_structure(ss):
    n = ss.count("train")
    loader = make_loader(ss, "train", batch_size=100, train=True, device="cpu", num_workers=0)
    batches = one_epoch(loader)
    assert len(batches) == len(loader) == 15 and loader.num_samples == n and loader.skipped == 0
    label_all, clean_all = ss.labels("train")
    for b in batches:
        assert isinstance(b, Batch)
        assert b.images.dtype == torch.uint8 and b.images.shape[1:] == (3, 32, 32)
        for t in (b.index, b.label, b.clean):
            assert t.dtype == torch.int64 and t.shape == (len(b),)
        assert 0 <= int(b.index.min()) and int(b.index.max()) < n
        # labels travel with their sample: they match the shard's labels at the sample's index
        assert torch.equal(b.label, torch.from_numpy(label_all[b.index.numpy()]))
        assert torch.equal(b.clean, torch.from_numpy(clean_all[b.index.numpy()]))
        assert 0 <= int(b.clean.min()) and int(b.label.max()) < ss.num_classes
    assert sum(len(b) for b in batches) == n and len(batches[-1]) == n % 100  # last partial batch kept
    images = torch.cat([b.images for b in batches])
    assert images.max() > 200 and images.min() == 0  # real pixel data, full uint8 range
    # decoded pixels are the stored image
    first = next(ss.iter_samples("train"))
    pos = indices(batches).index(first.index)
    assert torch.equal(images[pos], torch.from_numpy(np.array(first.image)).permute(2, 0, 1))
    moved = batches[0].to("cpu", non_blocking=True)
    assert torch.equal(moved.images, batches[0].images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_batch_pin_memory():
    b = _batch(0, 2)
    assert b.pin_memory().images.is_pinned()


# ---------------------------------------------------------------------------------------------------------------
# Exact epochs


@pytest.mark.parametrize("workers", [1, 2])
def test_every_index_once_per_epoch(ss, workers):
    n = ss.count("train")
    loader = make_loader(ss, "train", batch_size=128, train=True, device="cpu", num_workers=workers, seed=3)
    orders = []
    for epoch in range(2):
        got = indices(one_epoch(loader, epoch))
        assert sorted(got) == list(range(n))
        orders.append(got)
    assert orders[0] != orders[1]  # reshuffled by set_epoch
    # the order is a function of (seed, epoch) only, not of the number of workers
    ref = make_loader(ss, "train", batch_size=128, train=True, device="cpu", num_workers=0, seed=3)
    assert indices(one_epoch(ref, 1)) == orders[1]


@pytest.mark.parametrize("batch_size", [128, 359])  # 359: rank 0 holds 718 = 2 x 359 and must split a batch
def test_two_rank_split(ss, batch_size):
    n = ss.count("train")
    per_rank, steps = [], []
    for rank in range(2):
        loader = make_loader(
            ss, "train", batch_size=batch_size, train=True, device="cpu", num_workers=0, rank=rank, world_size=2
        )
        batches = one_epoch(loader, epoch=5)
        assert all(1 < len(b) <= batch_size for b in batches)
        steps.append((len(loader), len(batches)))
        per_rank.append(indices(batches))
    assert steps[0] == steps[1] == ((6, 6) if batch_size == 128 else (3, 3))  # equal step counts
    assert len(set(per_rank[0]) & set(per_rank[1])) == 0  # each sample on exactly one rank, no padding
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))  # and every sample on some rank


@pytest.mark.parametrize("n", [1, 2, 7, 100, 257, 1437])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("batch", [2, 3, 16, 128])
def test_plan_exact_and_balanced(n, world, batch):
    if n < world:
        return  # make_loader refuses this
    plans = [
        plan_epoch(n, batch_size=batch, train=True, seed=1, epoch=2, rank=r, world_size=world) for r in range(world)
    ]
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) == steps_per_epoch(n, batch, world)
    flat = np.concatenate([np.concatenate(p) for p in plans])
    assert sorted(flat.tolist()) == list(range(n))
    for p in plans:
        assert all(1 <= len(b) <= batch for b in p)
        if sum(len(b) for b in p) >= 2 * len(p):
            assert min(len(b) for b in p) >= 2  # BatchNorm needs two samples, when there are enough


def test_batch_sizes_and_rechunk():
    assert batch_sizes(10, 3, 4) == [4, 4, 2]
    assert batch_sizes(8, 3, 4) == [4, 2, 2]  # a short rank spreads its tail over one more batch
    assert batch_sizes(33, 12, 3) == [3] * 9 + [2, 2, 2]
    assert batch_sizes(9, 3, 4) == [4, 3, 2]  # no single-sample last batch
    with pytest.raises(UserError):
        batch_sizes(2, 3, 1)
    stream = [_batch(0, 4), _batch(4, 4), _batch(8, 1)]
    out = list(rechunk(stream, [4, 3, 2]))
    assert [len(b) for b in out] == [4, 3, 2]
    assert torch.cat([b.index for b in out]).tolist() == list(range(9))


def test_same_seed_same_order_and_eval_in_order(ss):
    a = make_loader(ss, "train", batch_size=200, train=True, device="cpu", num_workers=0, seed=7)
    b = make_loader(ss, "train", batch_size=200, train=True, device="cpu", num_workers=0, seed=7)
    c = make_loader(ss, "train", batch_size=200, train=True, device="cpu", num_workers=0, seed=8)
    assert indices(one_epoch(a, 4)) == indices(one_epoch(b, 4)) != indices(one_epoch(c, 4))
    test = make_loader(ss, "test", batch_size=64, train=False, device="cpu", num_workers=2)
    for epoch in range(2):
        assert indices(one_epoch(test, epoch)) == list(range(ss.count("test")))


# ---------------------------------------------------------------------------------------------------------------
# DALI backend


@needs_dali
def test_dali_matches_torch(ss):
    def collect(backend, split, train):
        loader = make_loader(ss, split, backend=backend, batch_size=128, train=train, device="cpu", num_workers=2)
        batches = one_epoch(loader, 1)
        assert len(batches) == len(loader)
        return {
            int(i): (int(lab), int(cl), img)
            for b in batches
            for i, lab, cl, img in zip(b.index, b.label, b.clean, b.images)
        }, indices(batches)

    t, _ = collect("torch", "train", True)
    d, order = collect("dali", "train", True)
    assert sorted(order) == list(range(ss.count("train")))  # every sample exactly once
    assert t.keys() == d.keys()
    for i in t:  # same labels, and PNG decodes to the same pixels
        assert t[i][:2] == d[i][:2] and torch.equal(t[i][2], d[i][2])
    _, test_order = collect("dali", "test", False)
    assert test_order == list(range(ss.count("test")))


@needs_dali
def test_dali_two_ranks_and_reseed(ss):
    per_rank, steps = [], []
    for rank in range(2):
        loader = make_loader(
            ss, "train", backend="dali", batch_size=359, train=True, device="cpu", num_workers=1,
            rank=rank, world_size=2,
        )  # fmt: skip
        batches = one_epoch(loader, 2)
        steps.append((len(loader), len(batches)))
        per_rank.append(indices(batches))
        assert indices(one_epoch(loader, 2)) == per_rank[-1]  # same (seed, epoch), same order
        assert indices(one_epoch(loader, 3)) != per_rank[-1]
    assert steps[0] == steps[1] == (3, 3)
    assert sorted(per_rank[0] + per_rank[1]) == list(range(ss.count("train")))


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def _corrupt_copy(digits: Path, dest: Path, index: int, resign: bool = False) -> ShardSet:
    """A copy of the set with one image's bytes zeroed in place (same tar size, so only sha256 notices).
    resign: the manifest's checksums updated to match, as if the image had been bad since conversion."""
    shutil.copytree(digits, dest)
    bad = ShardSet.open(dest)
    tar, idx = bad.shards("train")[0], bad.index_files("train")[0]
    offset, size = parse_index(idx)[index]["png"]
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    if resign:
        m = json.loads((dest / "manifest.json").read_text())
        m["splits"]["train"]["shards"][0]["sha256"] = sha256_file(tar)
        (dest / "manifest.json").write_text(json.dumps(m))
    return ShardSet.open(dest)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_changed_shard_is_refused_before_reading(digits, tmp_path, backend):
    if backend == "dali" and not HAVE_DALI:
        pytest.skip("NVIDIA DALI is not installed")
    bad = _corrupt_copy(digits, tmp_path / "bad", index=5)
    with pytest.raises(UserError, match="sha256"):
        make_loader(bad, "train", backend=backend, batch_size=128, train=True, device="cpu", num_workers=0)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_corrupt_image_skipped_named_or_strict(digits, tmp_path, backend):
    if backend == "dali" and not HAVE_DALI:
        pytest.skip("NVIDIA DALI is not installed")
    bad = _corrupt_copy(digits, tmp_path / "bad", index=5, resign=True)
    n = bad.count("train")
    loader = make_loader(bad, "train", backend=backend, batch_size=128, train=True, device="cpu", num_workers=2)
    for epoch in range(2):  # reported again every pass, and only once per pass
        got = indices(one_epoch(loader, epoch))
        assert 5 not in got and sorted(got) == [i for i in range(n) if i != 5]
        assert loader.skipped == 1 and [(r.split, r.index, r.key, r.shard) for r in loader.skipped_samples] == [
            ("train", 5, "000000005", "train-000000.tar")]
        assert "neither PNG nor JPEG" in loader.skipped_samples[0].reason
    assert len(loader) == steps_per_epoch(n - 1, 128, 1) and len(got) == n - 1
    with pytest.raises(UserError, match="index 5 in train-000000.tar"):
        make_loader(bad, "train", backend=backend, batch_size=128, train=True, device="cpu", strict=True)


def test_unverified_reads_check_each_image(digits, tmp_path):
    """checksum=False skips the scan; the torch reader then checks each image before its decoder sees it."""
    bad = _corrupt_copy(digits, tmp_path / "bad", index=5)
    loader = make_loader(bad, "train", batch_size=128, train=False, device="cpu", num_workers=0, checksum=False)
    got = indices(one_epoch(loader))
    assert got == [i for i in range(bad.count("train")) if i != 5]
    assert [r.index for r in loader.skipped_samples] == [5] and "neither PNG nor JPEG" in loader.skipped_samples[0].reason
    with pytest.raises(UserError, match="dali backend needs the checksum scan"):
        make_loader(bad, "train", backend="dali", batch_size=128, train=True, device="cpu", checksum=False)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_missing_truncated_or_mismatched_shard(digits, tmp_path, backend):
    if backend == "dali" and not HAVE_DALI:
        pytest.skip("NVIDIA DALI is not installed")
    root = tmp_path / "set"
    shutil.copytree(digits, root)
    tars = ShardSet.open(root).shards("train")
    kw = dict(backend=backend, batch_size=64, train=True, device="cpu", num_workers=0)

    data = tars[1].read_bytes()
    tars[1].write_bytes(data[:-512])  # truncated: caught by the size check, always
    with pytest.raises(UserError, match="bytes"):
        make_loader(ShardSet.open(root), "train", **kw)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, different bytes: caught by sha256
    tars[1].write_bytes(bytes(flipped))
    with pytest.raises(UserError, match="sha256"):
        make_loader(ShardSet.open(root), "train", **kw)
    tars[1].unlink()
    with pytest.raises(UserError, match="missing"):
        make_loader(ShardSet.open(root), "train", **kw)


def test_bad_arguments(ss):
    with pytest.raises(UserError, match="backend"):
        make_loader(ss, "train", backend="tf", batch_size=8, train=True, device="cpu")
    with pytest.raises(UserError, match="split"):
        make_loader(ss, "val", batch_size=8, train=False, device="cpu")
    with pytest.raises(UserError, match="rank"):
        make_loader(ss, "train", batch_size=8, train=True, device="cpu", rank=2, world_size=2)


def test_variable_size_images(tmp_path):
    """Images of differing sizes and aspect ratios (real WebVision) are resized and cropped, never a crash."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "raw" / f"c{c}").mkdir(parents=True)
        for k in range(12):
            h, w = (int(v) for v in rng.integers(20, 90, size=2))
            image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "raw" / f"c{c}" / f"{k}.jpg")
    opts = ConvertOptions(shard_size=10, workers=1, progress=False, test_fraction=0.25)
    convert("folder", tmp_path / "raw", tmp_path / "set", opts, log=lambda s: None)
    varset = ShardSet.open(tmp_path / "set")
    assert varset.image_size is None
    for backend in ("torch", "dali") if HAVE_DALI else ("torch",):
        loader = make_loader(
            varset, "train", backend=backend, batch_size=8, train=True, device="cpu", num_workers=0, load_size=32
        )
        batches = one_epoch(loader)
        assert all(b.images.shape[1:] == (3, 32, 32) for b in batches)
        assert sorted(indices(batches)) == list(range(varset.count("train")))
