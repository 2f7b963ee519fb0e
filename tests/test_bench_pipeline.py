"""A smoke run of the pipeline benchmark on tiny settings (no timing assertions)."""

import json

import pytest

from ccl.errors import UserError
from ccl.bench.pipeline import BACKENDS, Cutout, bench_pipeline


def _check_row(row, backend):
    assert row["backend"] == backend
    if "error" in row:  # only acceptable for an optional backend that is not installed
        assert backend == "dali" and "DALI" in row["error"]
        return
    assert row["images"] == 2 * 16 and row["images_per_s"] > 0 and row["image_size"] == 32
    assert row["peak_rss_main_mb"] > 0


def test_bench_in_process_all_backends(digits):
    import torch

    lines, threads = [], torch.get_num_threads()
    rows = bench_pipeline(
        [digits], batch_size=16, num_workers=1, steps=2, warmup=1, rounds=1, isolate=False, log=lines.append
    )
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    assert [r["backend"] for r in rows] == list(BACKENDS) and len(lines) == len(BACKENDS)
    for row, backend in zip(rows, BACKENDS):
        _check_row(row, backend)
    assert rows[0]["ratio_to_reference"] == 1.0


def test_bench_isolated_writes_json(digits, tmp_path):
    out = tmp_path / "bench.json"
    rows = bench_pipeline(
        [digits], backends=("torch",), batch_size=16, num_workers=1, steps=2, warmup=1, rounds=1,
        json_path=out, log=lambda s: None,
    )  # fmt: skip
    _check_row(rows[0], "torch")
    assert rows[0]["ratio_to_reference"] is None  # no reference row to compare with
    record = json.loads(out.read_text())
    assert record["results"] == rows and "command" in record and "environment" in record


def test_bench_rejects_unknown_backend(digits):
    with pytest.raises(UserError, match="backend"):
        bench_pipeline([digits], backends=("tensorflow",))


def test_cutout_is_per_sample_and_bounded():
    import torch

    x = torch.ones(3, 32, 32)
    outs = [Cutout(0.5)(x) for _ in range(20)]
    zeros = [int((o == 0).all(0).sum()) for o in outs]
    assert max(zeros) <= 16 * 16 and len(set(zeros)) > 1  # side <= half the width, drawn per call
    assert torch.equal(x, torch.ones(3, 32, 32))  # the input is not modified
