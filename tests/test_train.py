"""The trainer end to end on the built-in digits shards: learning, metrics, checkpoints, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from ccl.errors import UserError
from ccl.train import loop
from ccl.train.config import TrainConfig
from ccl.train.loop import NonFiniteLoss, setup, train


def small_cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), arch="resnet_tiny", epochs=3, warmup=1, batch_size=32, workers=0, out=str(out),
                name="run", lr=3e-3)
    return TrainConfig(**{**base, **kw})


def history(summary) -> list[dict]:
    path = f"{summary['run_dir']}/metrics.jsonl"
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("schedule", ["joint", "alternate"])
def test_every_parameter_of_both_nets_gets_a_gradient(digits, tmp_path, schedule):
    run = setup(small_cfg(digits, tmp_path, schedule=schedule), digits)
    method = run.method
    method.w.uniform_()  # some samples clean, some noisy: every term of Eq. 15 is live
    from ccl.pipeline.loader import make_loader

    batch = next(iter(make_loader(run.shards, "train", batch_size=32, train=True, device="cpu", num_workers=0)))
    views = run.aug.make_views(batch.images, method.views(epoch=5), None)
    for p in range(method.passes(epoch=5)):
        method.zero_grad()
        method(batch, views, 5, p).loss.backward()
        learning = method.training_nets(5, p)
        for k in learning:
            missing = [n for n, q in method.nets[k].named_parameters() if q.grad is None or not q.grad.abs().sum()]
            assert not missing, f"net {k} without gradient: {missing[:5]}"
        for k in set(range(2)) - set(learning):  # the fixed peer of the alternate schedule stays untouched
            assert all(q.grad is None for q in method.nets[k].parameters())


def test_ccl_learns_far_above_chance_and_writes_its_run(digits, tmp_path):
    cfg = small_cfg(digits, tmp_path, arch="resnet_small", epochs=5, warmup=2, batch_size=64, lr=1e-3,
                    val_fraction=0.1)
    summary = train(cfg, progress=False)
    hist = history(summary)
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3, 4]
    # Chance is 10% on 10 classes, and 40% of the training labels are wrong. Past warm-up CCL's accuracy on this
    # small set dips before it climbs again, by how much depends on the machine's float order (README, "Does CCL
    # beat RoLR here?"): the bar is far above chance at the best epoch, and above chance at the last.
    accs = [r["ens_top1"] for r in hist]
    assert max(accs) > 50 and hist[-1]["ens_top1"] > 25, accs
    assert 0.3 < summary["actual_noise_rate"] < 0.5
    assert "net0_auroc" in hist[-1] and "net1_auroc" in hist[-1]
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["method"] == "ccl" and config["identity"]["num_train"] == 1437


# RoLR, TCL and DivideMix: their own short runs in test_baselines.py and test_dividemix.py.
@pytest.mark.parametrize("method", ["ce"])
def test_other_methods_run_through_the_same_loop(digits, tmp_path, method):
    cfg = small_cfg(digits, tmp_path, method=method, arch="resnet_small", epochs=3, warmup=1, batch_size=64, lr=1e-3)
    summary = train(cfg, progress=False)
    hist = history(summary)
    assert all(r["train_loss"] == r["train_loss"] for r in hist)  # finite
    assert max(r["ens_top1"] for r in hist) > 25, [r["ens_top1"] for r in hist]  # chance is 10%


def test_inline_confidence_and_joint_schedule(digits, tmp_path):
    summary = train(small_cfg(digits, tmp_path, confidence="inline", schedule="joint"), progress=False)
    last = history(summary)[-1]
    assert last["net0_auroc"] > 0.5  # w separates clean from noisy samples better than chance


def test_resume_after_a_kill_ends_as_an_uninterrupted_run(digits, tmp_path, monkeypatch):
    cfg = small_cfg(digits, tmp_path, epochs=3, warmup=1)
    straight = history(train(replace(cfg, name="straight"), progress=False))

    real_evaluate = loop.evaluate
    calls = {"n": 0}

    def dying_evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # killed in the third epoch, after its training steps
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(loop, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, name="killed"), progress=False)
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    resumed = history(train(replace(cfg, name="killed"), resume=True, progress=False))

    keys = ["ens_top1", "net0_top1", "net1_top1", "net0_auroc", "train_loss"]
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(digits, tmp_path, monkeypatch):
    cfg = small_cfg(digits, tmp_path, epochs=2, warmup=1)
    train(cfg, progress=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    from ccl.train.methods.base import Method, Step

    real_forward = Method.forward

    def nan_forward(self, *a, **k):
        step = real_forward(self, *a, **k)
        return Step(step.loss * float("nan"), step.logged, step.names)

    monkeypatch.setattr(Method, "forward", nan_forward)
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        train(replace(cfg, epochs=3), resume=True, progress=False)
    assert last.read_bytes() == before


def test_bad_input_gets_one_clear_error(digits, tmp_path):
    with pytest.raises(UserError, match="data directory not found"):
        train(small_cfg(tmp_path / "nope", tmp_path), progress=False)
    with pytest.raises(UserError, match="holds 10 classes"):
        train(small_cfg(digits, tmp_path, num_classes=7), progress=False)
    with pytest.raises(UserError, match="unknown method"):
        train(small_cfg(digits, tmp_path, method="mixmatch"), progress=False)
    with pytest.raises(UserError, match="unknown architecture"):
        train(small_cfg(digits, tmp_path, arch="vgg"), progress=False)


def test_a_checkpoint_from_another_config_is_refused(digits, tmp_path):
    train(small_cfg(digits, tmp_path, method="ce", epochs=1), progress=False)
    with pytest.raises(UserError, match="another config"):
        train(small_cfg(digits, tmp_path, method="ccl", epochs=2), resume=True, progress=False)


def _ccl(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ccl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_help_and_one_line_errors(tmp_path):
    out = _ccl("train", "--help")
    assert out.returncode == 0 and "--method" in out.stdout and "--resume" in out.stdout
    out = _ccl("train", "--data", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "data directory not found" in out.stdout + out.stderr and "Traceback" not in out.stdout + out.stderr


def test_default_command_builds_the_digits_set_and_trains(tmp_path):
    import os

    env = {**os.environ, "CCL_CACHE": str(tmp_path / "cache")}
    out = _ccl("train", "--epochs", "2", "--warmup", "1", "--arch", "resnet_tiny", "--out", str(tmp_path / "runs"),
               "--workers", "0", "--quiet", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "cache" / "shards").is_dir()
    run = next((tmp_path / "runs").iterdir())
    assert (run / "metrics.jsonl").is_file() and (run / "checkpoints" / "last.pt").is_file()
    ev = _ccl("eval", "--checkpoint", str(run / "checkpoints" / "last.pt"), env=env)
    assert ev.returncode == 0 and "ens" in ev.stdout, ev.stdout + ev.stderr


def test_ablation_flags_reach_the_loss(digits, tmp_path):
    cfg = TrainConfig.from_dict({**small_cfg(digits, tmp_path).to_dict(), "ccl": {"ablations": "cml"}})
    run = setup(cfg, digits)
    run.method.w.fill_(0.5)
    from ccl.pipeline.loader import make_loader

    batch = next(iter(make_loader(run.shards, "train", batch_size=16, train=True, device="cpu", num_workers=0)))
    step = run.method(batch, run.aug.make_views(batch.images, ("weak", "strong"), None), 5)
    out = dict(zip(step.names, step.logged.tolist()))
    assert out["cml_mean0"] == 0 and out["cml_mean1"] == 0
    assert out["cvl_mean0"] > 0  # the other half of Eq. 15 is still there


def test_table_writes_its_files_and_skips_finished_cells(digits, tmp_path, monkeypatch):
    from ccl.analysis import table

    kw = dict(methods=["ce"], noise=["sym:0.4", "pair:0.2"], seeds=[0], epochs=1, warmup=0, arch="resnet_tiny",
              out=tmp_path / "grid", data=digits, base={"workers": 0, "batch_size": 64})
    first = table.run_table(**kw)
    key = f"ce|default|{digits.name}"  # with --data: one column, named after the data, whatever --noise says
    cell = first[key]
    assert list(first) == [key] and (tmp_path / "grid" / "runs" / f"ce-{digits.name}-s0").is_dir()
    assert cell["test_final"][0] > 0 and (tmp_path / "grid" / "table.md").is_file()

    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(table, "train", no_training)
    again = table.run_table(**kw)[key]
    assert json.dumps(again) == json.dumps(cell)  # as text: CE has no AUROC, and NaN != NaN


def test_table_columns_are_noise_settings_or_the_one_data_set(tmp_path):
    from ccl.analysis.table import grid_columns

    cols = grid_columns(["sym:0.5", "pair:0.4"])
    assert [(c.label, c.token) for c in cols] == [("sym:0.5", "sym0.5"), ("pair:0.4", "pair0.4")]
    assert cols[1].options == {"noise": "pair", "noise_rate": 0.4}
    (col,) = grid_columns(["sym:0.5", "pair:0.4"], data=tmp_path / "animal10n")
    assert (col.label, col.options) == ("animal10n", {"data": str(tmp_path / "animal10n")})
    with pytest.raises(UserError, match="should read TYPE:RATE"):
        grid_columns(["sym"])
