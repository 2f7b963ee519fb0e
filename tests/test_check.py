"""`ccl check`: a clean set passes; every kind of damage is listed, one line each; decoder crashes are caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ccl.cli import app
from ccl.pipeline.check import check, summary
from ccl.pipeline.shards import ShardSet
from shardtools import parse_index
from test_reliability import HAVE_DALI, resign, sets  # noqa: F401 - sets is a fixture



def run_cli(*args: str):
    return CliRunner().invoke(app, ["check", *args], catch_exceptions=False)


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    (dest / "check.json").unlink(missing_ok=True)
    return dest


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.timeout(600)
def test_clean_set_passes_with_counts_and_timings(digits, tmp_path):
    root = _copy(digits, tmp_path / "set")
    backends = "torch,dali" if HAVE_DALI else "torch"
    res = run_cli(str(root), "--backend", backends, "--workers", "2", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "OK: no problems found" in res.output and "per 10k images" in res.output
    rep = json.loads((root / "check.json").read_text())
    assert rep["ok"] and rep["problems"] == rep["damaged"] == rep["decode_failures"] == []
    ss = ShardSet.open(root)
    label, clean = ss.labels("train")
    train = rep["splits"]["train"]
    assert train["count"] == train["readable"] == 1437 and sum(train["class_counts"]) == 1437
    assert train["class_counts"] == [int((label == c).sum()) for c in range(10)]
    assert train["noise_rate"] == pytest.approx(float((label != clean).mean()), abs=1e-6)
    for what in ["scan", *backends.split(",")]:
        assert rep["timing"][what]["images"] == 1797 and rep["timing"][what]["seconds_per_10k"] > 0


@pytest.mark.timeout(120)
def test_every_schema_problem_listed(digits, tmp_path):
    root = _copy(digits, tmp_path / "set")
    m = json.loads((root / "manifest.json").read_text())
    m.update(dataset="../escaped", num_classes="10", std=[0, 0.2, 0.2], mean=[0.1, 0.1, 9])
    m["splits"]["train"]["shards"][2]["file"] = "/etc/passwd"
    (root / "manifest.json").write_text(json.dumps(m))
    res = run_cli(str(root), "--backend", "none", "--report", str(tmp_path / "r.json"))
    assert res.exit_code == 1
    rep = json.loads((tmp_path / "r.json").read_text())
    assert len(rep["problems"]) == 5 and not rep["ok"]
    for needle in ("dataset", "num_classes", "std[0]", "mean[2]", "'/etc/passwd' is not a plain"):
        assert sum(needle in p for p in rep["problems"]) == 1, needle
    assert sum(line.startswith("problem: ") for line in res.output.splitlines()) == 5


@pytest.mark.timeout(120)
def test_damaged_shards_and_samples_listed(digits, tmp_path):
    root = _copy(digits, tmp_path / "set")
    ss = ShardSet.open(root)
    tars, idxs = ss.shards("train"), ss.index_files("train")
    old_sha = json.loads((root / "manifest.json").read_text())["splits"]["train"]["shards"][0]["sha256"]
    _overwrite(tars[0], 5000, b"\xff")  # a checksum mismatch (the manifest keeps the old checksum below)
    lines = idxs[1].read_text().splitlines()  # an index that disagrees with its tar (checksum updated)
    lines[1] = lines[1].replace(" 512 ", " 1024 ", 1)
    idxs[1].write_text("\n".join(lines) + "\n")
    off, size = parse_index(idxs[2])[4]["png"]  # a damaged image (checksum updated)
    _overwrite(tars[2], off + size // 2, b"\x00\x00\x00\x00")
    lab = parse_index(idxs[3])[0]["labels.i64"][0]  # a damaged label (checksum updated)
    _overwrite(tars[3], lab + 8, b"\x09")
    resign(root)
    m = json.loads((root / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["sha256"] = old_sha
    (root / "manifest.json").write_text(json.dumps(m))
    rep = check(root, backends=[], workers=1)
    assert not rep["ok"]
    assert len(rep["problems"]) == 2
    assert "sha256" in rep["problems"][0] and "train-000000.tar" in rep["problems"][0]
    assert "train-000001.idx disagrees with train-000001.tar" in rep["problems"][1]
    first = m["splits"]["train"]["shards"]
    got = {(d["index"], d["shard"]) for d in rep["damaged"]}
    assert got == {(first[2]["first_index"] + 4, "train-000002.tar"), (first[3]["first_index"], "train-000003.tar")}
    assert rep["splits"]["train"]["unusable_shards"] == 2
    text = "\n".join(summary(rep))
    assert "NOT OK: 4 problem(s)" in text and "damaged: train" in text


@pytest.mark.timeout(300)
def test_decoder_crash_is_caught_and_named(digits, tmp_path):
    """--decode-damaged hands a corrupt PNG to torchvision, whose libpng error handling segfaults: the check
    loses a child process, not itself, and names the image."""
    root = _copy(digits, tmp_path / "set")
    idx, tar = ShardSet.open(root).index_files("test")[0], ShardSet.open(root).shards("test")[0]
    off, size = parse_index(idx)[11]["png"]
    _overwrite(tar, off + size // 2, b"\x00\x01\x02\x03")
    resign(root)
    rep = check(root, backends=["torch"], workers=1, decode_damaged=True)
    assert [(d["split"], d["index"]) for d in rep["damaged"]] == [("test", 11)]
    fails = [(d["split"], d["index"], d["backend"]) for d in rep["decode_failures"]]
    assert fails == [("test", 11, "torch")]
    assert "crashed (SIGSEGV)" in rep["decode_failures"][0]["reason"]
    assert rep["timing"]["torch"]["images"] == 1797


@pytest.mark.timeout(300)
@pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed")
def test_dali_decoder_on_garbage_jpeg(sets, tmp_path):  # noqa: F811 - the fixture
    root = _copy(sets["jpg"], tmp_path / "set")
    tar, idx = ShardSet.open(root).shards("train")[0], ShardSet.open(root).index_files("train")[0]
    off, size = parse_index(idx)[6]["jpg"]
    _overwrite(tar, off, (b"\xff\xd8\xff\xe0 not a jpeg" * 200)[:size])
    resign(root)
    rep = check(root, backends=["dali"], workers=1, dali_device="cpu", decode_damaged=True)
    assert [d["index"] for d in rep["damaged"]] == [6]
    assert [(d["index"], d["backend"]) for d in rep["decode_failures"]] == [(6, "dali")]
    assert rep["timing"]["dali"]["images"] == 32


def test_usage_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(app, ["check", str(tmp_path / "nope")], catch_exceptions=False)
    assert res.exit_code == 2 and "no shard set" in res.output and "Traceback" not in res.output
    (tmp_path / "empty").mkdir()
    res = run_cli(str(tmp_path / "empty"), "--backend", "none")
    assert res.exit_code == 2 and "manifest.json is missing" in res.output
    res = run_cli(str(tmp_path / "empty"), "--backend", "tpu")
    assert res.exit_code == 2 and "--backend takes" in res.output
