"""tools/gpu_check.sh: the GPU readiness script's smoke mode runs its every code path on the CPU at tiny sizes (so
the script cannot rot between GPU runs), skips only what needs CUDA and says why, and a check that finds something
wrong makes the run exit non-zero.

The smoke run costs about 170 CPU seconds (measured: 168, which took 530 s of wall time on a 2-core machine at load
average 11); it runs once for the module. It goes through the shim of symbolic links (CCL_GPU_CHECK_SHIM=1), the
way a GPU machine without the package installed runs this checkout.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ccl.train.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
ITEMS = ["versions", "kernel_correctness", "augment_device", "train_amp", "train_compile", "resume_cpu",
         "bench_train", "bench_kernel", "bench_pipeline", "bench_dali"]
# A hang guard, not the expected time: the shared 2-core machines that run the suite can be several times
# oversubscribed.
SMOKE_TIMEOUT = 900


def _run(out: Path, *args: str, timeout: float, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHON=sys.executable, CCL_GPU_CHECK_SHIM="1", **env)
    full_env.pop("TRITON_INTERPRET", None)  # conftest's setting; the script sets its own per mode
    proc = subprocess.Popen(["bash", str(SCRIPT), str(out), *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the script then ends the runs it started (each in a session of its own) and keeps its report.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run(out, "--smoke", timeout=SMOKE_TIMEOUT)
    report_path = out / "gpu_check.json"
    assert report_path.is_file(), f"no report; exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    return proc, report, {item["name"]: item for item in report["items"]}, out


@pytest.mark.timeout(SMOKE_TIMEOUT + 60)
def test_smoke_passes_and_reports_every_item(smoke):
    proc, report, items, out = smoke
    failed = {n: i["reason"] for n, i in items.items() if i["status"] == "failed"}
    assert proc.returncode == 0, f"failed items: {failed}\n{proc.stdout[-2000:]}"
    assert [i["name"] for i in report["items"]] == ITEMS
    assert report["mode"] == "smoke" and report["device"] == "cpu"
    assert report["finished"] and report["passed"] and report["exit_code"] == 0 and report["failed"] == []
    # On the CPU only DALI's mixed decoder is skipped whole; every other item runs, with what needs CUDA named.
    assert {n for n, i in items.items() if i["status"] != "passed"} == {"bench_dali"}
    assert "CUDA" in items["bench_dali"]["reason"]
    for item in report["items"]:
        for part in item["skipped_parts"]:
            assert ": " in part, f"{item['name']}: a skipped part without its reason: {part!r}"
    assert any("compiled Triton" in p for p in items["kernel_correctness"]["skipped_parts"])
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check: passed") and "| bench_train | passed |" in md


@pytest.mark.timeout(SMOKE_TIMEOUT + 60)
def test_smoke_checks_compare_what_they_claim(smoke):
    _, _, items, _ = smoke
    versions = items["versions"]["details"]
    assert versions["ccl_code"] == str(ROOT / "train")  # this checkout's code, reached through the shim
    assert "ccl=links" in versions["install"]
    cases = items["kernel_correctness"]["details"]["cases"]
    assert {c["impl"] for c in cases} == {"torch", "triton"}  # triton: the interpreter, at N <= 32
    assert {c["dtype"] for c in cases} == {"float32", "bfloat16", "float16"}
    assert all(c["ok"] and c["finite"] for c in cases)
    for case in items["augment_device"]["details"]["cases"]:
        assert set(case["pixels"]) == set(case["cpu_generator_draws"]) == {"weak", "strong", "contrastive"}
        assert all(v is True for draws in case["cpu_generator_draws"].values() for v in draws.values())
    amp = items["train_amp"]["details"]["runs"]
    assert sorted(r["method"] for r in amp) == sorted([*METHODS, "ccl-alternate"])  # DivideMix too
    assert all(r["losses_finite"] and r["exit"] == 0 and r["epochs"] == 2 for r in amp)
    assert [r["method"] for r in items["train_compile"]["details"]["runs"]] == ["ccl"]
    assert items["resume_cpu"]["details"]["epochs_logged"] == 3
    assert "ens_top1" in items["resume_cpu"]["details"]["eval"]


@pytest.mark.timeout(SMOKE_TIMEOUT + 60)
def test_smoke_measures(smoke):
    _, _, items, _ = smoke
    kernel = items["bench_kernel"]["details"]["rows"]
    assert {r["impl"] for r in kernel} == {"reference", "torch"} and all(r["time_ms"] > 0 for r in kernel)
    train = items["bench_train"]["details"]["rows"]
    assert {(r["train_px"], r["schedule"]) for r in train} == {(224, "joint"), (32, "alternate")}
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in train)
    pipeline = items["bench_pipeline"]["details"]["rows"]
    assert len(pipeline) == 2 and all(r["images_per_s"] > 0 and r["backend"] == "torch" for r in pipeline)


@pytest.mark.timeout(300)
def test_a_failed_check_fails_the_run(tmp_path):
    proc = _run(tmp_path, "--smoke", "--only", "kernel_correctness", timeout=280,
                CCL_GPU_CHECK_BREAK="kernel_correctness")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    items = {i["name"]: i for i in report["items"]}
    assert proc.returncode == 1 and report["exit_code"] == 1 and report["failed"] == ["kernel_correctness"]
    assert "out of tolerance" in items["kernel_correctness"]["reason"]
    assert items["versions"]["status"] == "passed"
    assert all(items[n]["reason"] == "not selected (--only)" for n in ITEMS[2:])
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check: FAILED: kernel_correctness")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [[], ["--smoke"], ["OUT", "--only", "nonsense"]])
def test_usage_errors_exit_2(tmp_path, args):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=50,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2, proc.stderr
