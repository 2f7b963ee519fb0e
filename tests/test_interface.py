"""The method/loop interface: one optimiser equals one per net, no host sync per step, typed per-method configs,
defensive checkpoints and resume."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import replace

import pytest
import torch
from ccl.progress import NoProgress
from ccl.train import checkpoint as ckpt
from ccl.bench.train import HostSyncCounter
from ccl.train.config import TrainConfig, apply_overrides
from ccl.train.loop import lr_at, make_optimizer, resolve_device, setup, train

from ccl.errors import UserError


def small_cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), arch="resnet_tiny", epochs=2, warmup=1, batch_size=32, workers=0, out=str(out),
                name="run", lr=3e-3)
    return TrainConfig(**{**base, **kw})


def _batches(run, n):
    from ccl.pipeline.loader import make_loader

    loader = make_loader(run.shards, "train", batch_size=32, train=True, device="cpu", num_workers=0)
    return [b for b, _ in zip(loader, range(n))]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("schedule", ["alternate", "joint"])
def test_one_optimiser_gives_the_updates_of_one_optimiser_per_net(digits, tmp_path, schedule, optimizer):
    cfg = small_cfg(digits, tmp_path, schedule=schedule, weight_decay=5e-4, amp=False, optimizer=optimizer, lr=1e-3)
    run = setup(cfg, digits)
    run.method.w.uniform_(generator=torch.Generator().manual_seed(0))
    one, per_net = run.method, copy.deepcopy(run.method)
    opt = make_optimizer(cfg, one.parameters())
    assert type(opt).__name__.lower() == optimizer
    opts = [make_optimizer(cfg, net.parameters()) for net in per_net.nets]
    epoch = 5  # past warm-up: the alternate schedule trains one net per pass
    for batch in _batches(run, 3):
        views = run.aug.make_views(batch.images, one.views(epoch), torch.Generator().manual_seed(1))
        for p in range(one.passes(epoch)):
            opt.zero_grad(set_to_none=True)
            one(batch, views, epoch, p).loss.backward()
            opt.step()
            learning = per_net.training_nets(epoch, p)
            for k in learning:  # the old way: only the learning nets' optimisers
                opts[k].zero_grad(set_to_none=True)
            per_net(batch, views, epoch, p).loss.backward()
            for k in learning:
                opts[k].step()
    for (name, a), b in zip(one.named_parameters(), per_net.parameters()):
        assert torch.equal(a, b), name
    if schedule == "alternate":  # both nets did learn, one per pass
        assert len(opt.state) == len(list(one.parameters()))
        if optimizer == "adam":
            assert all(s["step"] == 3 for s in opt.state.values())


def test_the_lr_schedules_of_the_papers_code():
    tcl = TrainConfig(epochs=200, lr=0.12, cosine=True, lr_ramp=20, lr_floor=0.01)  # Hzzone/TCL, per epoch
    assert lr_at(tcl, 0) == pytest.approx(0.12 / 20) and lr_at(tcl, 9) == pytest.approx(0.06)
    assert lr_at(tcl, 20) == pytest.approx(0.12)  # the cosine starts at lr after the ramp
    assert lr_at(tcl, 120) == pytest.approx(0.0012 + (0.12 - 0.0012) * 0.5)  # cos(pi * 100 / 200) = 0
    rolr = TrainConfig(epochs=515, lr=0.02, lr_decay_epoch=416)  # RoLR.py: lr / 10 for the last 99 epochs
    assert lr_at(rolr, 415) == pytest.approx(0.02) and lr_at(rolr, 416) == pytest.approx(0.002)
    assert lr_at(rolr, 514) == pytest.approx(0.002)
    plain = TrainConfig(epochs=10, cosine=True)  # the cosine as it was: to 0, no ramp
    assert lr_at(plain, 0) == pytest.approx(1e-3) and lr_at(plain, 5) == pytest.approx(5e-4)
    for bad in ({"optimizer": "lamb"}, {"momentum": 1.0}, {"lr_floor": 2.0}, {"lr_decay": 0.0}, {"lr_ramp": -1}):
        with pytest.raises(UserError):
            TrainConfig(**bad).validate()


@pytest.mark.parametrize("method", ["ce", "ccl", "rolr", "tcl"])
def test_the_training_step_makes_no_host_sync(digits, tmp_path, method):
    from ccl.train import loop
    from ccl.train.methods import Rng

    cfg = small_cfg(digits, tmp_path, method=method, log_every=10)
    run = setup(cfg, digits)
    opt = torch.optim.Adam(run.method.parameters(), lr=1e-3)
    ctx, scaler = loop.precision(run.device, cfg.amp)
    rng = Rng(torch.Generator().manual_seed(0), __import__("random").Random(0))
    batches = _batches(run, 20)

    class Loader(list):
        skipped = 0

        def set_epoch(self, epoch):
            pass

    epoch = 5 if method != "ce" else 0
    with HostSyncCounter() as counter:
        loop.train_epoch(run, opt, scaler, ctx, rng, Loader(batches), epoch, NoProgress())
    steps = 20 * run.method.passes(epoch)

    def at(*files):
        return [w for w in counter.where if any(f in w for f in files)]

    # The loop, the methods and the losses: one read per logging interval and one at the end of the epoch.
    ours = at("train/loop.py", "train/methods/", "train/losses/__init__", "train/metrics.py")
    assert len(ours) <= steps // cfg.log_every + 1, ours
    assert not at("train/methods/", "train/losses/__init__"), counter.where


def test_logs_accumulate_on_the_device_and_flag_a_non_finite_loss():
    from ccl.train.methods.base import Parts
    from ccl.train.metrics import DeviceMeter

    meter = DeviceMeter("cpu")
    meter.add(Parts().add("0", ce=torch.tensor(2.0)).step(torch.tensor(1.0)))
    meter.add(Parts().add("0", ce=torch.tensor(4.0)).step(torch.tensor(3.0)))
    meter.add(Parts().add("1", ce=torch.tensor(6.0)).step(torch.tensor(5.0)))  # another pass, other names
    means, bad = meter.read()
    assert means == {"loss": 3.0, "ce0": 3.0, "ce1": 6.0} and not bad
    meter.add(Parts().step(torch.tensor(float("nan"))))
    assert meter.read()[1]


def test_method_settings_come_from_dotted_keys_and_are_typed():
    values = apply_overrides({"method": "ccl"}, ["ccl.tau=0.3", "ccl.ablations=mimicry,cml", "tcl.temp=0.1",
                                                 "rolr.lambda_p=2", "epochs=7"])
    cfg = TrainConfig.from_dict(values).validate()
    assert cfg.ccl.tau == 0.3 and cfg.ccl.ablations.no_mimicry and cfg.ccl.ablations.no_cml
    assert cfg.tcl.temp == 0.1 and cfg.rolr.lambda_p == 2.0 and cfg.epochs == 7
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # config.json round-trips
    with pytest.raises(UserError, match="unknown config key: ccl.tua"):
        TrainConfig.from_dict(apply_overrides({}, ["ccl.tua=0.3"]))
    with pytest.raises(UserError, match="unknown config section"):
        apply_overrides({}, ["dino.tau=0.3"])
    with pytest.raises(UserError, match="epochs must be a whole number"):
        TrainConfig.from_dict({"epochs": "3x"})
    with pytest.raises(UserError, match="epochs must be a whole number"):
        TrainConfig.from_dict({"epochs": 3.5})
    with pytest.raises(UserError, match="unknown ablation"):
        TrainConfig.from_dict({"ccl": {"ablations": "mimcry"}})
    with pytest.raises(UserError, match="lr must be a positive finite number"):
        TrainConfig(lr=float("inf")).validate()
    with pytest.raises(UserError, match="ccl.tau must be a positive"):
        TrainConfig.from_dict({"ccl": {"tau": 0}}).validate()


def test_every_weight_the_papers_name_reaches_the_loss(digits, tmp_path):
    run = setup(small_cfg(digits, tmp_path), digits)
    run.method.w.fill_(0.3)
    batch = _batches(run, 1)[0]
    views = run.aug.make_views(batch.images, ("weak", "strong"), torch.Generator().manual_seed(0))

    def loss(**ccl):
        run.method.cfg = replace(run.cfg, ccl=replace(run.cfg.ccl, **ccl))
        with torch.no_grad():
            return run.method(batch, views, 5).loss.item()

    base = loss()
    assert loss(div_weight=0.0) < base and loss(cvl_weight=0.0) < base and loss(cml_weight=0.0) < base
    assert loss(cvl_weight=2.0) > base


def test_bad_devices_and_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    for bad in ({}, torch.zeros(3), {"format": 1}):
        path = tmp_path / "bad.pt"
        torch.save(bad, path)
        with pytest.raises(UserError, match="not a ccl checkpoint"):
            ckpt.load(path)
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="not a ccl checkpoint"):
        ckpt.load(tmp_path / "junk.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_a_checkpoint_cannot_run_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "method": _Evil()}, path)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        ckpt.load(path)
    assert "pickle code ran" not in capsys.readouterr().out


def test_resume_refuses_a_changed_run_unless_asked_and_records_it(digits, tmp_path):
    cfg = small_cfg(digits, tmp_path, method="ce", epochs=1)
    train(cfg, progress=False)
    with pytest.raises(UserError, match=r"--resume would change the run: lr"):
        train(replace(cfg, epochs=2, lr=1e-2), resume=True, progress=False)
    train(replace(cfg, epochs=2, lr=1e-2), resume=True, allow_changes=True, progress=False)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["lr"] == 1e-2
    assert record["changes"] == [{"from_epoch": 1, "changed": {"lr": [3e-3, 1e-2]}}]


def test_resume_of_a_run_that_predates_an_option_takes_its_default(digits, tmp_path):
    cfg = small_cfg(digits, tmp_path, method="ce", epochs=1)
    train(cfg, progress=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    for key in ("momentum", "lr_ramp", "optimizer"):  # as a checkpoint written before these options existed
        del state["config"][key]
    del state["config"]["ccl"]["tau"]
    torch.save(state, last)
    train(replace(cfg, epochs=2), resume=True, progress=False)  # the defaults: the same run
    with pytest.raises(UserError, match=r"--resume would change the run: optimizer \('adam' -> 'sgd'\)"):
        train(replace(cfg, epochs=3, optimizer="sgd"), resume=True, progress=False)


def test_a_run_without_noise_reports_auroc_as_not_applicable(tmp_path):
    from ccl.pipeline.convert import ensure_digits

    clean = ensure_digits(tmp_path / "shards", noise="none", rate=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        summary = train(small_cfg(clean, tmp_path, epochs=2, warmup=1), progress=False)
    assert summary["auroc"] is None and summary["actual_noise_rate"] == 0.0


def test_model_selection_uses_a_held_out_part_of_the_training_set(digits, tmp_path):
    from ccl.train.loop import held_out

    val = held_out(1437, 0.2, seed=3)
    assert val.sum() == 287 and (held_out(1437, 0.2, seed=3) == val).all() and not held_out(1437, 0.0, 3).any()
    cfg = small_cfg(digits, tmp_path, method="ce", epochs=2, warmup=0, val_fraction=0.2, seed=3)
    summary = train(cfg, progress=False)
    hist = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["images"] == 1437 - 287 for r in hist)  # the held-out part is never trained on
    assert all("val_ens_top1" in r for r in hist) and (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    best = max(range(len(hist)), key=lambda i: hist[i]["val_ens_top1"])
    assert summary["test_at_best_val"] == hist[best]["ens_top1"]
    assert summary["test_best_oracle"] == max(r["ens_top1"] for r in hist) and "test_best" not in summary
    state = ckpt.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert state["epoch"] == best and not state["method"]["active"][torch.from_numpy(val)].any()


def test_without_a_validation_part_no_best_checkpoint_is_chosen(digits, tmp_path):
    train(small_cfg(digits, tmp_path, method="ce", epochs=1, warmup=0), progress=False)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()


@pytest.mark.parametrize("names", [("weak",), ("weak", "strong"), ("weak", "strong", "strong"), ("weak", "weak"),
                                   ("weak", "weak", "strong"), ("strong", "weak")])
def test_make_views_draws_one_view_per_name_each_with_its_own_draws(digits, tmp_path, names):
    run = setup(small_cfg(digits, tmp_path), digits)
    batch = _batches(run, 1)[0]
    views = run.aug.make_views(batch.images, names, torch.Generator().manual_seed(0))
    assert len(views) == len(names)
    assert all(v.shape == views[0].shape and v.dtype == torch.float32 for v in views)
    for i in range(len(views)):
        for j in range(i):  # repeated names are separate augmentations, not one view twice
            assert not torch.equal(views[i], views[j]), (names, i, j)


def test_an_unknown_view_name_is_an_error_not_a_fallback(digits, tmp_path):
    run = setup(small_cfg(digits, tmp_path), digits)
    batch = _batches(run, 1)[0]
    with pytest.raises(ValueError, match="unknown view 'straong'"):
        run.aug.make_views(batch.images, ("weak", "straong"))
    (ev,) = run.aug.make_views(batch.images, ("eval",))
    assert torch.equal(ev, run.aug.eval_view(batch.images))
