"""A run directory no accident can corrupt, converter inputs that cannot hang or exhaust the machine, and one line
for every user mistake: each test is a case a careless or hostile user tried.

The full-disk cases mount a small tmpfs, so they run as root and are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ccl.errors import UserError
from ccl.pipeline.convert import ConvertOptions, convert
from ccl.train.config import TrainConfig
from ccl.train.loop import train

REPO = Path(__file__).resolve().parents[1]
SHARD = [sys.executable, str(REPO / "tools" / "shard.py")]


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """40 images of 32x32 in two classes: 30 train, 10 test. An epoch of CE on it takes well under a second."""
    root = tmp_path_factory.mktemp("tiny")
    for c in ("a", "b"):
        _images(root / "raw" / c, 20, seed=ord(c))
    convert("folder", root / "raw", root / "set", ConvertOptions(workers=1, progress=False, test_fraction=0.25),
            log=lambda s: None)  # fmt: skip
    return root / "set"


def cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), method="ce", arch="resnet_tiny", epochs=2, batch_size=8, workers=0, out=str(out),
                name="run")
    return TrainConfig(**{**base, **kw})


def epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` at path (root only): writes there fail with ENOSPC once it is full."""
    if os.geteuid() != 0:
        pytest.skip("a small disk needs root (mount -t tmpfs)")
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def remount(path: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True)


def cli(*args):
    from ccl.cli import app

    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def one_line_error(code: int, stderr: str, status: int = 2) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == status and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# A run directory belongs to one run


@pytest.mark.timeout(300)
def test_full_disk_at_the_first_checkpoint_then_a_rerun_does_not_mix(tiny, tmp_path):
    out = tmp_path / "disk"
    with small_disk(out, "128k"):
        with pytest.raises(UserError, match=r"No space left on device.*free") as e:
            train(cfg(tiny, out), progress=False)
        assert str(out / "run" / "checkpoints") in str(e.value)
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        assert not [p for p in left if p.endswith((".tmp", ".partial"))], left
        with pytest.raises(UserError, match="nothing to resume"):
            train(cfg(tiny, out), resume=True, progress=False)
        remount(out, "size=8m")
        summary = train(cfg(tiny, out), progress=False)  # the same command again: a run of its own
        assert epochs(out / "run") == [0, 1] and summary["test_epochs"] == 2


@pytest.mark.timeout(300)
def test_a_run_whose_checkpoints_were_deleted_is_not_mixed_into(tiny, tmp_path):
    first = train(cfg(tiny, tmp_path, epochs=3), progress=False)
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints")
    with pytest.raises(UserError, match="--overwrite"):
        train(cfg(tiny, tmp_path), progress=False)
    assert epochs(tmp_path / "run") == [0, 1, 2]  # untouched
    second = train(cfg(tiny, tmp_path, seed=1), overwrite=True, progress=False)
    assert epochs(tmp_path / "run") == [0, 1] and second["test_epochs"] == 2
    assert first["test_epochs"] == 3


@pytest.mark.timeout(300)
def test_two_runs_of_one_name_at_once_the_second_is_refused(tiny, tmp_path):
    code = ("import sys; from ccl.train.config import TrainConfig; from ccl.train.loop import train; "
            f"train(TrainConfig(data={str(tiny)!r}, method='ce', arch='resnet_tiny', epochs=400, batch_size=8, "
            f"workers=0, out={str(tmp_path)!r}, name='run'), progress=False)")
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").is_file():  # the first is training
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        with pytest.raises(UserError, match=rf"in use by .*process {first.pid}"):
            train(cfg(tiny, tmp_path), progress=False)
        with pytest.raises(UserError, match=rf"process {first.pid}"):
            train(cfg(tiny, tmp_path), overwrite=True, progress=False)
    finally:
        first.kill()
        first.wait(30)
    assert epochs(tmp_path / "run") == list(range(len(epochs(tmp_path / "run"))))  # one run's epochs, in order


@pytest.mark.timeout(300)
def test_a_torn_last_line_in_metrics_is_cut_on_resume(tiny, tmp_path):
    train(cfg(tiny, tmp_path, epochs=2), progress=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    os.truncate(metrics, metrics.stat().st_size - 40)  # a short write on a full disk
    summary = train(cfg(tiny, tmp_path, epochs=3), resume=True, progress=False)
    got = epochs(tmp_path / "run")  # every line parses
    assert got == [0, 2] and summary["test_epochs"] == 2


@pytest.mark.timeout(300)
def test_overwrite_removes_everything_the_old_run_wrote(tiny, tmp_path):
    train(cfg(tiny, tmp_path, val_fraction=0.2), progress=False)
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    (tmp_path / "run" / "plots").mkdir()
    train(cfg(tiny, tmp_path, epochs=1), overwrite=True, progress=False)
    run = tmp_path / "run"
    assert not (run / "checkpoints" / "best.pt").exists() and not (run / "plots").exists()
    assert epochs(run) == [0]


def test_a_run_name_is_one_path_component(tiny, tmp_path):
    for name in ("../escaped", str(tmp_path / "abs"), "a/b", "..", "."):
        with pytest.raises(UserError, match="--name"):
            train(cfg(tiny, tmp_path / "runs", name=name), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# Writes that fail: one line, the previous state kept


@pytest.mark.timeout(300)
def test_read_only_out_and_out_that_is_a_file(tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file"):
        train(cfg(tiny, tmp_path / "file"), progress=False)
    ro = tmp_path / "ro"
    with small_disk(ro, "1m"):
        remount(ro, "ro")
        with pytest.raises(UserError, match="[Rr]ead-only"):
            train(cfg(tiny, ro), progress=False)


@pytest.mark.timeout(300)
def test_full_disk_in_the_cli_is_one_line(tiny, tmp_path):
    out = tmp_path / "disk"
    with small_disk(out, "128k"):
        code, _, err = cli("train", "--data", str(tiny), "--method", "ce", "--arch", "resnet_tiny", "--epochs", "1",
                           "--batch-size", "8", "--workers", "0", "--out", str(out), "--name", "r", "--quiet")
    line = one_line_error(code, err)
    assert "No space left on device" in line and "free" in line


@pytest.mark.timeout(300)
def test_full_disk_in_the_converter_is_one_line_and_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "raw" / c).mkdir(parents=True)
        for i in range(30):  # noise does not compress: about 48 KB per image
            Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "raw" / c / f"{i}.png")
    out = tmp_path / "disk"
    with small_disk(out, "512k"):
        r = subprocess.run([*SHARD, "folder", str(tmp_path / "raw"), str(out), "--workers", "1", "--shard-size", "4"],
                           capture_output=True, text=True, timeout=120)
        left = sorted(p.name for p in out.iterdir())
    line = one_line_error(r.returncode, r.stderr)
    assert "No space left on device" in line and "free" in line
    assert left == [], left


@pytest.mark.timeout(300)
def test_eval_and_views_outputs_that_cannot_be_written(tiny, tmp_path):
    train(cfg(tiny, tmp_path, epochs=1), progress=False)
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    code, _, err = cli("eval", "--checkpoint", str(ck), "--device", "cpu", "--json", str(tmp_path))
    assert "directory" in one_line_error(code, err)
    (tmp_path / "notes.txt").write_text("my notes\n")
    code, _, err = cli("eval", "--checkpoint", str(tmp_path / "notes.txt"))
    assert "not a ccl checkpoint" in one_line_error(code, err)
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("views", "--data", str(tiny), "--out", str(tmp_path / "afile"), "--draws", "16")
    one_line_error(code, err)


# ----------------------------------------------------------------------------------------------------------------
# Options checked when the run starts


@pytest.mark.parametrize("setting", ["ccl.tau=inf", "ccl.tau=nan", "ccl.cml_weight=1e400", "rolr.lambda_p=inf",
                                     "lr_floor=nan", "seed=-1"])
def test_options_out_of_range_are_refused_at_the_start(setting):
    from ccl.train.config import apply_overrides

    with pytest.raises(UserError):
        TrainConfig.from_dict(apply_overrides({}, [setting])).validate()


def test_warmup_that_fills_the_run_is_said(tiny, tmp_path, capsys):
    train(cfg(tiny, tmp_path, method="ccl", epochs=1, warmup=3, batch_size=16), progress=False)
    err = capsys.readouterr().err
    assert "warning:" in err and "warm-up" in err


@pytest.mark.timeout(300)
def test_relative_data_is_stored_resolved(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny.parent)
    train(cfg(tiny.name, tmp_path, epochs=1), progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["data"] == str(tiny.resolve())
    monkeypatch.chdir(tmp_path)  # from another folder, the run still resumes
    train(cfg(saved["config"]["data"], tmp_path, epochs=2), resume=True, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# The converter: only regular files, a size cap, 8-bit pixels, sound class folders


def _convert(src: Path, out: Path, *extra: str, timeout: float = 120):
    """tools/shard.py in a child with 3 GB of address space: a read without limit fails there, not here."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    return subprocess.run([*SHARD, "folder", str(src), str(out), "--workers", "1", "--no-progress", *extra],
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


@pytest.mark.timeout(300)
def test_devices_and_fifos_are_skipped_and_listed(tmp_path):
    for c in ("a", "b"):
        _images(tmp_path / "raw" / c, 5)
    os.symlink("/dev/zero", tmp_path / "raw" / "a" / "zero.png")
    os.mkfifo(tmp_path / "raw" / "b" / "f.png")
    r = _convert(tmp_path / "raw", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert "regular file" in reasons["a/zero.png"] and "regular file" in reasons["b/f.png"], reasons
    (tmp_path / "raw" / "b" / "f.png").unlink()
    big = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "raw" / "b" / "big.png")  # about 48 KB
    r = _convert(tmp_path / "raw", tmp_path / "out2", "--max-image-bytes", "20000")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert sorted(reasons) == ["a/zero.png", "b/big.png"] and "20000" in reasons["b/big.png"], reasons


def _png16(path: Path, rgb: bool) -> np.ndarray:
    """A 16-bit PNG gradient; returns what 8 bits of it should be (the top byte, as PIL reads 16-bit colour)."""
    a = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    if rgb:
        import zlib

        px = np.stack([a, a[::-1], a.T], -1).astype(">u2")
        raw = b"".join(b"\0" + px[y].tobytes() for y in range(32))

        def chunk(t, body):
            return len(body).to_bytes(4, "big") + t + body + zlib.crc32(body, zlib.crc32(t)).to_bytes(4, "big")

        ihdr = (32).to_bytes(4, "big") * 2 + bytes([16, 2, 0, 0, 0])
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                         + chunk(b"IEND", b""))
        return (px.astype(np.uint16) >> 8).astype(np.uint8)
    Image.fromarray(a).save(path)
    return np.repeat((a >> 8).astype(np.uint8)[..., None], 3, -1)


@pytest.mark.timeout(300)
def test_sixteen_bit_pngs_are_stored_as_eight_bit(tmp_path):
    from ccl.pipeline.loader import make_loader
    from ccl.pipeline.shards import ShardSet

    want = {}
    for c, rgb in (("a", False), ("b", True)):
        (tmp_path / "raw" / c).mkdir(parents=True)
        for i in range(4):
            want[(c, i)] = _png16(tmp_path / "raw" / c / f"{i}.png", rgb)
    convert("folder", tmp_path / "raw", tmp_path / "set", ConvertOptions(workers=1, progress=False, test_fraction=0),
            log=lambda s: None)  # fmt: skip
    loader = make_loader(ShardSet.open(tmp_path / "set"), "train", batch_size=8, train=False, device="cpu",
                         num_workers=0)
    got = [img.permute(1, 2, 0).numpy() for b in loader for img in b.images]
    assert len(got) == 8 and all(g.max() > 200 for g in got), [g.max() for g in got]
    expected = list(want.values())
    for g in got:
        assert any(np.array_equal(g, w) for w in expected)


@pytest.mark.timeout(300)
def test_check_refuses_a_sixteen_bit_png_in_the_shards(tmp_path):
    from ccl.pipeline.check import check
    from ccl.pipeline.imagecheck import image_problem
    from ccl.pipeline.tarshard import ShardWriter

    for c in ("a", "b"):
        _images(tmp_path / "raw" / c, 3)
    convert("folder", tmp_path / "raw", tmp_path / "set", ConvertOptions(workers=1, progress=False, test_fraction=0),
            log=lambda s: None)  # fmt: skip
    _png16(tmp_path / "g.png", rgb=False)
    data = (tmp_path / "g.png").read_bytes()
    assert image_problem(data) is not None
    # the same set, its first image replaced by a 16-bit PNG (written as a converter that trusted it would)
    m = json.loads((tmp_path / "set" / "manifest.json").read_text())
    from ccl.pipeline.shards import ShardSet

    samples = list(ShardSet.open(tmp_path / "set").iter_samples("train"))
    for p in (tmp_path / "set").glob("train-*"):
        p.unlink()
    w = ShardWriter(tmp_path / "set", "train", 100)
    for s in samples:
        buf = (tmp_path / "x.png")
        Image.fromarray(s.image).save(buf)
        w.write(s.index, data if s.index == 0 else buf.read_bytes(), "png", s.label, s.clean)
    m["splits"]["train"]["shards"] = w.close()
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(m))
    rep = check(tmp_path / "set", backends=["torch"], workers=1)
    assert not rep["ok"] and any("16" in d["reason"] for d in rep["damaged"]), rep["damaged"]


def test_train_without_test_is_recognised_and_one_class_is_an_error(tmp_path):
    for c in ("cat", "dog"):
        _images(tmp_path / "raw" / "train" / c, 5)
    convert("folder", tmp_path / "raw", tmp_path / "set", ConvertOptions(workers=1, progress=False),
            log=lambda s: None)  # fmt: skip
    m = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert m["classes"] == ["cat", "dog"] and set(m["splits"]) == {"train", "test"}
    _images(tmp_path / "one" / "cat", 5)
    with pytest.raises(UserError, match="2 classes"):
        convert("folder", tmp_path / "one", tmp_path / "set1", ConvertOptions(workers=1, progress=False))


def test_empty_class_folders_are_an_error_unless_allowed(tmp_path):
    _images(tmp_path / "raw" / "a", 5)
    _images(tmp_path / "raw" / "b", 5)
    (tmp_path / "raw" / "empty").mkdir()
    (tmp_path / "elsewhere").mkdir()
    _images(tmp_path / "elsewhere" / "x", 3)
    (tmp_path / "raw" / "linked").mkdir()
    os.symlink(tmp_path / "elsewhere" / "x", tmp_path / "raw" / "linked" / "imgs")  # not followed
    with pytest.raises(UserError, match="empty, linked"):
        convert("folder", tmp_path / "raw", tmp_path / "set", ConvertOptions(workers=1, progress=False))
    res = convert("folder", tmp_path / "raw", tmp_path / "set",
                  ConvertOptions(workers=1, progress=False, allow_empty_classes=True), log=lambda s: None)
    assert res["manifest"]["classes"] == ["a", "b", "empty", "linked"]
    for c in ("a", "b"):
        for p in (tmp_path / "raw" / c).iterdir():
            p.unlink()
    r = _convert(tmp_path / "raw", tmp_path / "set2")
    assert "a, b, empty, linked" in one_line_error(r.returncode, r.stderr)
    r = _convert(tmp_path / "raw", tmp_path / "set3", "--allow-empty-classes")
    one_line_error(r.returncode, r.stderr)
