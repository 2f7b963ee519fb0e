"""Experiment tracking and the run record: `--logger tensorboard` read back with TensorBoard's own reader, the
`environment` record of config.json (one process, and two under torchrun), and `ccl runs` side by side."""

from __future__ import annotations

import builtins
import json
import math
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ccl.errors import UserError
from ccl.analysis import runs as R
from ccl.train import tracking
from ccl.train.config import TrainConfig
from ccl.train.loop import train
from ccl.train.metrics import DamagedLog


@pytest.fixture(scope="module")
def tb_run(digits, tmp_path_factory):
    pytest.importorskip("tensorboard")
    cfg = TrainConfig(data=str(digits), method="ccl", arch="resnet_tiny", epochs=2, warmup=1, batch_size=64,
                      workers=0, out=str(tmp_path_factory.mktemp("runs")), name="tb", seed=0, logger="tensorboard",
                      log_every=5)
    return Path(train(cfg, progress=False)["run_dir"])


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_every_metric_of_every_epoch_and_the_step_losses(tb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_run / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    hist = history(tb_run)
    checked = 0
    for record in hist:
        for k, v in record.items():
            if k == "epoch" or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
                continue
            assert k in tags, k
            (event,) = [e for e in ea.Scalars(k) if e.step == record["epoch"]]
            assert event.value == pytest.approx(float(v), rel=1e-6, abs=1e-6), k  # stored as float32
            checked += 1
    assert checked > 40 and {"ens_top1", "train_loss", "lr", "net0_auroc"} <= tags
    # The loss parts every --log-every steps, at the optimiser step since the run began (23 steps per epoch:
    # 1437 samples in batches of 64), and the lr.
    steps = [e.step for e in ea.Scalars("step/loss")]
    assert steps == [5, 10, 15, 20, 28, 33, 38, 43], steps
    assert {"step/lr", "step/ce0", "step/ce1"} <= tags
    # The config as hyperparameters.
    assert ea.summary_metadata and any("hparams" in m.plugin_data.plugin_name for m in ea.summary_metadata.values())


def test_config_json_records_the_environment(tb_run):
    import torch

    env = json.loads((tb_run / "config.json").read_text())["environment"]
    assert env["world_size"] == 1 and env["global_batch"] == 64 and env["batch_size_per_process"] == 64
    assert env["device_type"] == "cpu" and env["device_count"] == 1 and env["device_name"]
    assert env["torch"] == torch.__version__ and env["intra_op_threads"] == torch.get_num_threads()
    assert env["amp"] is True and env["amp_dtype"] == "bfloat16" and env["compile"] is False
    assert {"cuda", "cudnn", "triton", "dali", "kornia", "cpu_model", "hostname", "start_time"} <= set(env)


def test_a_missing_logger_package_is_one_line_naming_the_extra(monkeypatch):
    real = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(UserError, match=r"pip install 'ccl\[wandb\]'"):
        TrainConfig(logger="wandb").validate()
    with pytest.raises(UserError, match="unknown logger"):
        TrainConfig(logger="mlflow").validate()


def test_wandb_runs_offline_unless_its_settings_name_a_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.chdir(tmp_path)
    assert tracking.wandb_mode() == "offline"
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "settings").write_text("[default]\nmode = online\n")
    assert tracking.wandb_mode() is None  # wandb reads its settings itself
    (tmp_path / "cfg" / "settings").unlink()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() is None


def test_wandb_logs_offline_into_the_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = tracking.make_logger("wandb", tmp_path, {"lr": 0.1, "ccl": {"tau": 0.5}}, main=True)
    assert log.run.settings.mode == "offline" and dict(log.run.config)["ccl"] == {"tau": 0.5}
    log.log_step(3, {"loss": 2.5, "lr": 0.1})
    log.log_epoch({"epoch": 0, "ens_top1": 12.5, "auroc": None, "warmup": True})
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")), list(tmp_path.rglob("*"))
    assert wandb.run is None


def test_only_the_main_process_logs(tmp_path):
    assert type(tracking.make_logger("tensorboard", tmp_path, {}, main=False)) is tracking.NullLogger
    assert not (tmp_path / "tensorboard").exists()


# ----------------------------------------------------------------------------------------------------------------
# two processes


@pytest.mark.timeout(400)
def test_torchrun_records_world_size_and_global_batch(digits, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_dist import launch, train_args

    r = launch(2, train_args(digits, tmp_path, "two", epochs=1, warmup=1, method="ce", **{"batch-size": 32}),
               timeout=350)
    assert r.returncode == 0, r.stderr[-6000:]
    record = json.loads((tmp_path / "two" / "config.json").read_text())
    env = record["environment"]
    assert env["world_size"] == 2 and env["local_world_size"] == 2
    assert env["batch_size_per_process"] == 32 and env["global_batch"] == 64
    assert "--nproc_per_node" not in " ".join(record["command"])  # what the command line alone would have lost


# ----------------------------------------------------------------------------------------------------------------
# ccl runs


def fake_run(root: Path, name: str, method: str, noise: str, seed: int, last10: float, auroc: float,
             steps: float | None = 100.0) -> Path:
    d = root / name
    d.mkdir(parents=True)
    kind, rate = noise.split(":")
    cfg = TrainConfig(method=method, arch="resnet_tiny", epochs=3, seed=seed, noise=kind, noise_rate=float(rate))
    (d / "config.json").write_text(json.dumps({
        "config": cfg.to_dict(), "identity": {"method": method, "arch": "resnet_tiny", "dataset": "digits"},
        "data": None, "environment": {"start_time": f"2026-01-01T00:00:{seed:02d}Z"}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "ens_top1": last10, "epoch_time": 2.0,
                                                         "estimate_time": 0.5}) + "\n" for e in range(3)))
    summary = {"test_last10_mean": last10, "test_final": last10, "auroc": auroc}
    if steps is not None:
        summary["steps_per_net"] = steps
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_runs_group_by_method_and_noise_with_mean_and_std_over_seeds(tmp_path):
    fake_run(tmp_path, "a0", "ccl", "sym:0.4", 0, 80.0, 0.9)
    fake_run(tmp_path, "a1", "ccl", "sym:0.4", 1, 84.0, 0.8)
    fake_run(tmp_path, "b0", "ce", "sym:0.4", 0, 60.0, 0.7)
    fake_run(tmp_path / "nested", "c0", "ccl", "pair:0.2", 0, 90.0, 0.95, steps=None)
    rows = R.summarise(R.find_runs([tmp_path]), "method,noise")
    by = {(r["method"], r["noise"]): r for r in rows}
    assert set(by) == {("ccl", "sym:0.4"), ("ce", "sym:0.4"), ("ccl", "pair:0.2")}
    m, s, n = by["ccl", "sym:0.4"]["value"]
    assert (m, n) == (82.0, 2) and s == pytest.approx(2 ** 0.5 * 2)  # sample std of 80 and 84
    assert by["ccl", "sym:0.4"]["seeds"] == [0, 1] and by["ccl", "sym:0.4"]["auroc"][0] == pytest.approx(0.85)
    assert by["ccl", "sym:0.4"]["train_time_s"][0] == 7.5 and by["ccl", "pair:0.2"]["steps_per_net"] is None
    md = R.markdown(rows, "test_last10_mean", ["method", "noise"])
    assert "| ccl | sym:0.4 | digits | resnet_tiny | 3 | 100 | 0,1 | 82.00 ± 2.83 | 0.850 ± 0.071 |" in md, md


def test_runs_command_prints_and_writes_markdown_and_json(tb_run, tmp_path):
    fake_run(tmp_path, "old", "ce", "sym:0.4", 0, 10.0, 0.5)
    from ccl.cli import app

    out = tmp_path / "cmp.md"
    r = CliRunner().invoke(app, ["runs", str(tb_run.parent), str(tmp_path), "--out", str(out), "--last", "1"])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [row["runs"] for row in rows] == [["tb"]]  # the one that started last
    summary = json.loads((tb_run / "summary.json").read_text())
    assert rows[0]["value"][0] == pytest.approx(summary["test_last10_mean"])
    if "steps_per_net" in summary:
        assert rows[0]["steps_per_net"][0] == summary["steps_per_net"]
    assert "test_last10_mean" in out.read_text() and "1 runs, 1 groups" in r.output
    bad = CliRunner().invoke(app, ["runs", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "no such directory" in bad.output


def test_runs_reads_metrics_through_metricslog_and_sets_a_damaged_run_aside(tmp_path):
    """A torn last line is left out (a killed run still counts); a damaged line before others makes that run
    unreadable: the listing goes on without it, with a warning line that names it."""
    fake_run(tmp_path, "good", "ccl", "sym:0.4", 0, 80.0, 0.9)
    torn = fake_run(tmp_path, "torn", "ccl", "sym:0.4", 1, 84.0, 0.8)
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "ens_to')
    bad = fake_run(tmp_path, "bad", "ccl", "sym:0.4", 2, 10.0, 0.1)
    lines = (bad / "metrics.jsonl").read_text().splitlines(keepends=True)
    (bad / "metrics.jsonl").write_text(lines[0] + "not json\n" + "".join(lines[2:]))
    with pytest.raises(DamagedLog, match="line 2"):
        R.read_run(bad)
    records, unreadable = R.read_runs(R.find_runs([tmp_path]))
    assert [r["run"] for r in records] == ["good", "torn"] and records[1]["epochs_done"] == 3
    assert [d.name for d, _ in unreadable] == ["bad"] and "line 2 is not a JSON record" in unreadable[0][1]
    from ccl.cli import app

    r = CliRunner().invoke(app, ["runs", str(tmp_path), "--out", str(tmp_path / "cmp.md")])
    assert r.exit_code == 0, r.output
    assert f"warning: skipped {bad.resolve()}: unreadable" in r.output and "2 runs, 1 groups" in r.output
    (row,) = json.loads((tmp_path / "cmp.json").read_text())
    assert row["runs"] == ["good", "torn"] and row["value"][0] == 82.0
    # Nothing readable: one line, exit 2.
    only = tmp_path / "only"
    (only / "bad").mkdir(parents=True)
    for f in ("config.json", "metrics.jsonl"):
        (only / "bad" / f).write_bytes((bad / f).read_bytes())
    r = CliRunner().invoke(app, ["runs", str(only)])
    assert r.exit_code == 2 and "none of the 1 runs" in r.output and "Traceback" not in r.output, r.output
