"""Damaged data never takes a run down: fuzzed shards through the loaders, decoder crashes and hangs, silent
wrong data turned into named skips or one-line errors, and a converter killed with SIGKILL.

The fuzz test updates the manifest's checksums after mutating a shard (otherwise the checksum scan refuses
every mutated shard before a decoder sees it), so that the decoders and the checks in front of them are what
is tested. `CCL_FUZZ_N` sets the mutations per (backend, format) (default 24). Run as a script to measure:

    python tests/test_reliability.py 200        # counts per outcome, both backends, PNG and JPEG shards
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccl.errors import UserError
from ccl.pipeline import decode as decode_mod
from ccl.pipeline.convert import ConvertOptions, convert
from ccl.pipeline.loader import make_loader
from ccl.pipeline.shards import ShardSet
from ccl.pipeline.tarshard import sha256_file
from shardtools import parse_index

REPO = Path(__file__).resolve().parents[1]
FUZZ_N = int(os.environ.get("CCL_FUZZ_N", "24"))

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
BACKENDS = ["torch", "dali"] if HAVE_DALI else ["torch"]


# ----------------------------------------------------------------------------------------------------------------
# Helpers: small sets, mutation, re-signing, a forked reader


def make_set(root: Path, ext: str, n: int = 32) -> Path:
    """One shard of n 32x32 images (PNG or JPEG, copied as they are), two classes, train split only."""
    rng = np.random.default_rng(0)
    raw = root / f"raw-{ext}"
    for i in range(n):
        (raw / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((32, 32), Image.BILINEAR)
        im.save(raw / f"c{i % 2}" / f"{i}.{ext}", "PNG" if ext == "png" else "JPEG", quality=90)
    out = root / f"set-{ext}"
    convert("folder", raw, out, ConvertOptions(shard_size=n, workers=1, progress=False, test_fraction=0.0),
            log=lambda s: None)  # fmt: skip
    return out


def resign(root: Path) -> None:
    """Recompute every checksum in the manifest, as if the data had been written that way."""
    m = json.loads((root / "manifest.json").read_text())
    for split in m["splits"].values():
        for rec in split["shards"]:
            rec["sha256"] = sha256_file(root / rec["file"])
            rec["bytes"] = (root / rec["file"]).stat().st_size
            if "index_sha256" in rec:
                rec["index_sha256"] = sha256_file(root / rec["index"])
    (root / "manifest.json").write_text(json.dumps(m))


def mutate(src: Path, dest: Path, seed: int) -> list[int]:
    """A copy of src whose train tar has 1-16 random bytes changed, checksums updated to match."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    tar = ShardSet.open(dest).shards("train")[0]
    data = bytearray(tar.read_bytes())
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, len(data), int(rng.integers(1, 17)))
    for p in pos:
        data[p] = int(rng.integers(0, 256))
    tar.write_bytes(bytes(data))
    resign(dest)
    return sorted(int(p) for p in pos)


def read_epoch(set_dir: Path, backend: str, workers: int = 1, split: str = "train") -> dict:
    """One epoch as training reads it: {index: (label, clean, sha1 of the pixels)} and the skip records."""
    loader = make_loader(ShardSet.open(set_dir), split, backend=backend, batch_size=8, train=split == "train",
                         device="cpu", num_workers=workers, seed=0)  # fmt: skip
    loader.set_epoch(0)
    samples = {}
    for b in loader:
        for i, lab, cl, img in zip(b.index.tolist(), b.label.tolist(), b.clean.tolist(), b.images):
            samples[i] = (lab, cl, hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest())
    skipped = [(r.index, r.reason) for r in loader.skipped_samples]
    assert loader.skipped == len(skipped)
    return {"status": "ok", "samples": samples, "skipped": skipped}


def in_child(fn, *args, timeout: float = 120.0) -> dict:
    """fn(*args) in a forked child; a crash, a hang or an exception comes back as a status, never kills us."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        # As in a DataLoader worker: the parent's OpenMP pool is gone in a fork, and a parallel region here would
        # wait for it forever (earlier tests in this process may have started one).
        torch.set_num_threads(1)
        try:
            res = fn(*args)
        except UserError as e:
            res = {"status": "usererror", "msg": str(e)}
        except BaseException as e:  # noqa: BLE001 - reported to the parent as a traceback-worthy failure
            res = {"status": "exception", "msg": f"{type(e).__name__}: {e}"}
        data = pickle.dumps(res)
        with os.fdopen(w, "wb") as f:  # length first: the child's own children may hold the pipe open
            f.write(len(data).to_bytes(8, "little") + data)
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout
    data = b""
    with os.fdopen(r, "rb", buffering=0) as f:  # read while it runs: a result larger than a pipe buffer
        while len(data) < 8 or len(data) < 8 + int.from_bytes(data[:8], "little"):
            ready, _, _ = select.select([f], [], [], 0.1)
            if ready:
                chunk = f.read(1 << 20)
                if not chunk:
                    break  # EOF before a whole result: the child died
                data += chunk
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"status": "hang"}
    _, status = os.waitpid(pid, 0)
    data = data[8:] if len(data) >= 8 and len(data) == 8 + int.from_bytes(data[:8], "little") else b""
    code = os.waitstatus_to_exitcode(status)
    if code < 0 or not data:
        return {"status": "crash", "msg": f"signal {-code}" if code < 0 else f"exit {code}"}
    return pickle.loads(data)


def classify(res: dict, ref: dict) -> str:
    """One word per trial. 'same' (mutation harmless), 'skipped' (every change caught and named), 'decoded
    other pixels' (a JPEG's entropy data changed: decodes, to other pixels) are what may happen; 'crash',
    'hang', 'error', 'traceback', 'wrong label', 'unreported' are what must not."""
    if res["status"] in ("crash", "hang"):
        return res["status"]
    if res["status"] == "usererror":
        return "error"
    if res["status"] == "exception":
        return "traceback"
    got, named = res["samples"], {i for i, _ in res["skipped"]}
    if set(got) | named != set(ref) or set(got) & named:
        return "unreported"
    if any(ref[i][:2] != v[:2] for i, v in got.items()):
        return "wrong label"
    if any(ref[i] != v for i, v in got.items()):
        return "decoded other pixels"
    return "skipped" if named else "same"


def fuzz(src: Path, work: Path, backend: str, n: int) -> dict[str, int]:
    ref = in_child(read_epoch, src, backend)
    assert ref["status"] == "ok" and not ref["skipped"], ref
    counts: dict[str, int] = {}
    for seed in range(n):
        mutate(src, work / "mut", seed)
        outcome = classify(in_child(read_epoch, work / "mut", backend), ref["samples"])
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _warm() -> None:
    # Import what the readers import lazily, once in the parent, so that each forked trial starts in milliseconds.
    import torchvision.io  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401

    if HAVE_DALI:
        import nvidia.dali.plugin.pytorch  # noqa: F401


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzzsets")
    _warm()
    return {ext: make_set(root, ext) for ext in ("png", "jpg")}


# ----------------------------------------------------------------------------------------------------------------
# The fuzz test


@pytest.mark.timeout(600)
@pytest.mark.parametrize("ext", ["png", "jpg"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzzed_shards_never_take_the_run_down(sets, tmp_path, backend, ext):
    counts = fuzz(sets[ext], tmp_path, backend, FUZZ_N)
    print(f"\n{ext} {backend} over {FUZZ_N} mutations: {counts}")
    allowed = {"same", "skipped"} | ({"decoded other pixels"} if ext == "jpg" else set())
    assert set(counts) <= allowed, counts
    reached = FUZZ_N - counts.get("same", 0)
    assert reached > FUZZ_N // 3  # the mutations did reach the images and labels


# ----------------------------------------------------------------------------------------------------------------
# Decoder crashes and hangs: isolated, the image skipped and named, the epoch goes on


_REAL_DECODER = decode_mod.image_decoder


def _crashing_decoder(victim: bytes, how: str):
    real = _REAL_DECODER()

    def decode(data: bytes):
        if data == victim:
            if how == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(3600)
        return real(data)

    return decode


@pytest.mark.timeout(900)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("how", ["crash", "hang"])
def test_decoder_crash_or_hang_costs_one_image(digits, monkeypatch, workers, how):
    ss = ShardSet.open(digits)
    offset, size = parse_index(ss.index_files("test")[0])[7]["png"]
    with open(ss.shards("test")[0], "rb") as f:
        f.seek(offset)
        victim = f.read(size)
    monkeypatch.setattr(decode_mod, "image_decoder", lambda: _crashing_decoder(victim, how))
    if how == "hang":  # long enough that a busy machine's scheduling pauses are not taken for a hang
        monkeypatch.setattr(decode_mod, "DECODE_STALL_S", 10.0)

    def epoch():
        loader = make_loader(ShardSet.open(digits), "test", batch_size=64, train=False, device="cpu",
                             num_workers=workers)  # fmt: skip
        out = []
        for e in range(2):  # the replaced decoder child serves the next epoch too
            loader.set_epoch(e)
            got = [i for b in loader for i in b.index.tolist()]
            out.append((got, [(r.index, r.reason) for r in loader.skipped_samples]))
        return {"status": "ok", "epochs": out}

    res = in_child(epoch, timeout=600)
    assert res["status"] == "ok", res
    for got, skipped in res["epochs"]:
        assert got == [i for i in range(360) if i != 7]
        assert [i for i, _ in skipped] == [7]
        assert ("crashed (SIGSEGV)" if how == "crash" else "hung") in skipped[0][1]


# ----------------------------------------------------------------------------------------------------------------
# What broke, one case each


def _image_field(root: Path, split: str, index: int):
    ss = ShardSet.open(root)
    for tar, idx, rec in zip(ss.shards(split), ss.index_files(split), ss.manifest["splits"][split]["shards"]):
        k = index - rec["first_index"]
        if 0 <= k < rec["count"]:
            comps = parse_index(idx)[k]
            ext = "png" if "png" in comps else "jpg"
            return tar, idx, comps, ext
    raise AssertionError(index)


def _overwrite(tar: Path, offset: int, data: bytes) -> None:
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_pixels_in_eight_pngs_do_not_stop_training(digits, tmp_path, backend):
    """The PNG bytes of 8 images damaged in place (sizes kept, checksums updated): torch died with a worker
    segfault, dali stopped at 'Failed to decode sample'. Now both finish the epoch and name the 8."""
    root = tmp_path / "set"
    shutil.copytree(digits, root)
    victims = [3, 40, 41, 300, 301, 600, 1000, 1436]
    rng = np.random.default_rng(0)
    for i in victims:
        tar, _, comps, ext = _image_field(root, "train", i)
        off, size = comps[ext]
        _overwrite(tar, off + 41 + int(rng.integers(0, size - 60)), bytes(rng.integers(0, 256, 8, dtype=np.uint8)))
    resign(root)
    res = in_child(read_epoch, root, backend, 2)
    assert res["status"] == "ok", res
    assert sorted(i for i, _ in res["skipped"]) == victims
    assert len(res["samples"]) == 1437 - len(victims) and not set(res["samples"]) & set(victims)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_jpeg_with_matching_checksum(sets, tmp_path, backend):
    """A JPEG replaced by garbage markers, the manifest updated to match: DALI died with SIGSEGV (rc 139)."""
    root = tmp_path / "set"
    shutil.copytree(sets["jpg"], root)
    tar, _, comps, _ = _image_field(root, "train", 5)
    off, size = comps["jpg"]
    _overwrite(tar, off, (b"\xff\xd8\xff\xe0 not a jpeg" * 200)[:size])
    resign(root)
    res = in_child(read_epoch, root, backend, 2)
    assert res["status"] == "ok", res
    assert [i for i, _ in res["skipped"]] == [5] and "JPEG" in res["skipped"][0][1]


@pytest.mark.timeout(120)
def test_flipped_label_bytes(digits, tmp_path):
    """Label damage trained silently (rc 0) or died in the loss (IndexError: Target 1073741824)."""
    root = tmp_path / "set"
    shutil.copytree(digits, root)
    tar, _, comps, _ = _image_field(root, "train", 9)
    lab_off = comps["labels.i64"][0]
    _overwrite(tar, lab_off + 8, bytes([int(ShardSet.open(digits).labels("train")[0][9]) ^ 1]))  # the label
    with pytest.raises(UserError, match="sha256"):  # the checksums catch it first
        make_loader(ShardSet.open(root), "train", batch_size=64, train=True, device="cpu", num_workers=0)
    resign(root)  # past the checksums: the label's second copy (cls) catches it
    ss = ShardSet.open(root)
    assert ss.labels("train")[0][9] == -1
    for off, what in ((lab_off + 8, "label"), (lab_off + 15, "high byte"), (lab_off + 16, "clean label")):
        shutil.copy(digits / tar.name, tar)
        _overwrite(tar, off, b"\x40")
        resign(root)
        loader = make_loader(ShardSet.open(root), "train", batch_size=128, train=True, device="cpu", num_workers=0)
        got = [i for b in loader for i in b.index.tolist()]
        assert 9 not in got and len(got) == 1436, what
        assert [r.index for r in loader.skipped_samples] == [9] and "labels disagree" in loader.skipped_samples[0].reason


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_index_pointing_at_another_image(digits, tmp_path, backend):
    """An .idx offset moved to another sample's image served the wrong image on both backends."""
    root = tmp_path / "set"
    shutil.copytree(digits, root)
    ss = ShardSet.open(root)
    idx = ss.index_files("train")[0]
    entries = parse_index(idx)
    lines = idx.read_text().splitlines()
    a, b = entries[3]["png"], entries[4]["png"]
    lines[1 + 3] = lines[1 + 3].replace(f"png {a[0]} {a[1]}", f"png {b[0]} {b[1]}")
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="index changed"):
        make_loader(ShardSet.open(root), "train", backend=backend, batch_size=64, train=True, device="cpu")
    m = json.loads((root / "manifest.json").read_text())  # a manifest from before index checksums
    for rec in m["splits"]["train"]["shards"]:
        rec.pop("index_sha256", None)
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="disagrees with train-000000.tar"):
        make_loader(ShardSet.open(root), "train", backend=backend, batch_size=64, train=True, device="cpu")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_test_image_is_named(digits, tmp_path, backend):
    """A corrupt test image was dropped without a word (accuracy over 359 of 360, 'skipped: 0')."""
    root = tmp_path / "set"
    shutil.copytree(digits, root)
    tar, _, comps, _ = _image_field(root, "test", 300)
    off, size = comps["png"]
    _overwrite(tar, off + size // 2, b"\x00\x01\x02\x03")
    resign(root)
    res = in_child(read_epoch, root, backend, 0, "test")
    assert res["status"] == "ok", res
    assert sorted(res["samples"]) == [i for i in range(360) if i != 300]
    assert [i for i, _ in res["skipped"]] == [300]


# ----------------------------------------------------------------------------------------------------------------
# The converter


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(p.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's parent (init) has yet to reap it


@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_kill_9_of_the_converter_leaves_no_workers_and_no_manifest(tmp_path):
    from test_shards import make_cifar10

    make_cifar10(tmp_path / "raw", per_batch=2000, n_test=10)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "shard.py"), "cifar10", str(tmp_path / "raw"), str(out),
           "--workers", "2", "--shard-size", "100", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while time.monotonic() < deadline and not (out / "train-000002.tar").exists():
            workers = _children(proc.pid) or workers
            time.sleep(0.05)
        workers = _children(proc.pid) or workers
        assert (out / "train-000002.tar").exists() and len(workers) >= 2, "the conversion never got going"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "encoder workers outlived the converter"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert rerun.returncode == 0, rerun.stderr
    assert ShardSet.open(out).count("train") == 10000


@pytest.mark.timeout(120)
def test_manifest_identical_across_runs_with_skipped_images(tmp_path):
    """The skip reason held '<_io.BytesIO object at 0x7f...>', so identical conversions differed."""
    src = tmp_path / "raw"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(src / c / f"{i}.png")
    (src / "a" / "junk.jpg").write_bytes(b"not an image at all")
    o = ConvertOptions(workers=1, progress=False, test_fraction=0.0)
    convert("folder", src, tmp_path / "x", o, log=lambda s: None)
    convert("folder", src, tmp_path / "y", o, log=lambda s: None)
    mx, my = (tmp_path / "x" / "manifest.json").read_bytes(), (tmp_path / "y" / "manifest.json").read_bytes()
    assert mx == my and b" at 0x" not in mx
    assert json.loads(mx)["skipped"][0]["reason"].startswith("UnidentifiedImageError: cannot identify image file")


# ----------------------------------------------------------------------------------------------------------------
# Measurement


if __name__ == "__main__":
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    _warm()
    with tempfile.TemporaryDirectory() as tmp:
        for ext in ("png", "jpg"):
            src = make_set(Path(tmp), ext)
            for backend in BACKENDS:
                t0 = time.perf_counter()
                counts = fuzz(src, Path(tmp), backend, n)
                print(f"{ext} {backend}: {dict(sorted(counts.items()))} ({time.perf_counter() - t0:.0f} s)", flush=True)


@pytest.mark.timeout(600)
def test_a_run_counts_and_names_every_skipped_sample(digits, tmp_path):
    """Damaged images in the train and test splits: the run goes on, metrics.jsonl counts them per split, and
    skipped.json names each one (split, index, shard, reason)."""
    from ccl.train.config import TrainConfig
    from ccl.train.loop import SKIPPED_REPORT, train

    root = tmp_path / "set"
    shutil.copytree(digits, root)
    victims = {"train": [12, 700], "test": [30]}
    rng = np.random.default_rng(1)
    for split, indices in victims.items():
        for i in indices:
            tar, _, comps, ext = _image_field(root, split, i)
            off, size = comps[ext]
            _overwrite(tar, off + 41 + int(rng.integers(0, size - 60)), bytes(rng.integers(0, 256, 8, dtype=np.uint8)))
    resign(root)
    cfg = TrainConfig(data=str(root), method="ce", arch="resnet_tiny", epochs=1, warmup=0, batch_size=128, workers=0,
                      out=str(tmp_path / "runs"), name="run")
    train(cfg, progress=False)
    record = json.loads((tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (record["skipped"], record["test_skipped"]) == (2, 1)
    named = json.loads((tmp_path / "runs" / "run" / SKIPPED_REPORT).read_text())
    assert [(r["split"], r["index"]) for r in named] == [("test", 30), ("train", 12), ("train", 700)]
    assert all(r["shard"].endswith(".tar") and r["reason"] for r in named)
