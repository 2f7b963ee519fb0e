"""The readings CCL's paper leaves open, each an option (`CCLConfig`), and the tools that settle them: equal-work
counters, --patience and `ccl table --grid`."""

from __future__ import annotations

import json

import pytest
import torch

from ccl.errors import UserError
from ccl.train import losses as L
from ccl.train.config import CCLConfig, TrainConfig
from ccl.train.loop import train
from ccl.analysis.table import Cell, Column, aggregate, grid_cells, markdown, parse_grid, run_name, run_table

from test_losses import check_against, make, ref_ccl_total, ref_sharpen, ref_soft_ce
from test_train import history, small_cfg


def ref_reading(logits, labels, w, own, peer, pg_src, vecs, *, c, target, T, cw):
    """Eq. 15 written out with the readings: PG from `pg_src`, the cross-model target `target` ("peer" or "mean"),
    sharpened by T when set, the four contrastive terms scaled by cw."""
    tgt = peer if target == "peer" else (own + peer) / 2
    if T is not None:
        tgt = ref_sharpen(tgt, T)
    acl, vm, cclrl, mm = (cw * v for v in vecs)
    # the plain reference reads PG from its "own" argument and the cross-model CE's target from its "peer"
    return ref_ccl_total(logits, labels, w, pg_src, tgt, acl, vm, cclrl, mm, c, L.Ablation())


@pytest.mark.parametrize("target", ["peer", "mean"])
@pytest.mark.parametrize("T", [None, 0.5])
@pytest.mark.parametrize("cw", [1.0, 0.5])
@pytest.mark.parametrize("pg_from", ["own", "other"])
def test_ccl_total_readings_match_reference(float64, target, T, cw, pg_from):
    logits, labels, own, peer, w, vecs = make(7)
    other = torch.softmax(torch.randn(own.shape, generator=torch.Generator().manual_seed(3)) * 5, -1)
    pg_src = own if pg_from == "own" else other
    out = L.ccl_total(logits, labels, w, own, peer, *vecs, c=0.6, sharpen_T=T, contrastive_weight=cw,
                      cml_target=target, probs_pg=None if pg_from == "own" else other)
    ref = ref_reading(logits, labels, w, own, peer, pg_src, vecs, c=0.6, target=target, T=T, cw=cw)
    check_against(out["loss"], ref, [logits, *vecs])


def test_readings_change_the_loss_and_defaults_are_eq_15(float64):
    logits, labels, own, peer, w, vecs = make(8)
    plain = L.ccl_total(logits, labels, w, own, peer, *vecs, c=0.6)["loss"]
    assert torch.allclose(plain, ref_ccl_total(logits, labels, w, own, peer, *vecs, c=0.6, abl=L.Ablation()))
    for kw in ({"cml_target": "mean"}, {"contrastive_weight": 0.5}, {"probs_pg": peer}):
        assert not torch.allclose(L.ccl_total(logits, labels, w, own, peer, *vecs, c=0.6, **kw)["loss"], plain), kw
    # with the mean target, the cross-model CE is exactly the soft CE to (own + peer) / 2
    out = L.ccl_total(logits, labels, w, own, peer, *vecs, cml_target="mean")
    assert torch.allclose(out["cml_ce"], ref_soft_ce(logits, (own + peer) / 2))
    with pytest.raises(ValueError, match="cml_target"):
        L.ccl_total(logits, labels, w, own, peer, *vecs, cml_target="both")


@pytest.mark.parametrize("reading", ["own_weak", "own_strong", "peer_weak"])
def test_pg_prediction_takes_the_named_view(digits, tmp_path, monkeypatch, reading):
    """The CCL step hands ccl_total the probabilities of the view `ccl.pg_prediction` names."""
    from ccl.pipeline.loader import make_loader
    from ccl.train.loop import setup
    from ccl.train.methods import ccl as ccl_method

    cfg = small_cfg(digits, tmp_path, ccl=CCLConfig(pg_prediction=reading))
    run = setup(cfg, digits)
    seen = []
    real = L.ccl_total

    def spy(logits_s, labels, w, own, peer, *a, probs_pg=None, **kw):
        seen.append((logits_s.detach(), own, peer, probs_pg))
        return real(logits_s, labels, w, own, peer, *a, probs_pg=probs_pg, **kw)

    monkeypatch.setattr(ccl_method.losses, "ccl_total", spy)
    batch = next(iter(make_loader(run.shards, "train", batch_size=32, train=True, device="cpu", num_workers=0)))
    views = run.aug.make_views(batch.images, run.method.views(epoch=5), None)
    run.method(batch, views, 5, 0)
    assert len(seen) == 2  # one per net (joint schedule)
    for logits_s, own, peer, pg in seen:
        want = {"own_weak": own, "peer_weak": peer, "own_strong": torch.softmax(logits_s.float(), 1)}[reading]
        assert torch.allclose(pg, want, atol=1e-6)  # ccl_total detaches it (test_losses)


def test_reading_options_are_checked():
    for bad in ({"ccl": {"pg_prediction": "strong"}}, {"ccl": {"cml_target": "avg"}},
                {"ccl": {"contrastive_weight": -1.0}}, {"ccl": {"confidence_every": "step"}},
                {"ccl": {"tau": float("inf")}}):
        with pytest.raises(UserError):
            TrainConfig.from_dict({"method": "ccl", **bad}).validate()
    with pytest.raises(UserError, match="alternate"):  # Algorithm 1 l.7 needs a pass per net
        TrainConfig(method="ccl", ccl=CCLConfig(confidence_every="net")).validate()
    TrainConfig(method="ccl", schedule="alternate", ccl=CCLConfig(confidence_every="net")).validate()
    with pytest.raises(UserError, match="val-fraction"):
        TrainConfig(patience=3).validate()


def test_confidence_every_net_refreshes_between_the_nets_passes(digits, tmp_path, monkeypatch):
    """Algorithm 1 l.7: under the alternate schedule, w is estimated after each epoch and again between net 0's
    pass and net 1's -- from net 0 as that pass left it."""
    from ccl.train.methods.ccl import CCL

    calls = []
    real = CCL.refresh

    def counting(self, batches):
        calls.append(float(sum(p.detach().abs().sum() for p in self.nets[0].parameters())))
        return real(self, batches)

    monkeypatch.setattr(CCL, "refresh", counting)
    counts = {}
    for every in ("epoch", "net"):
        calls.clear()
        cfg = small_cfg(digits, tmp_path / every, method="ccl", schedule="alternate", epochs=3, warmup=1,
                        ccl=CCLConfig(confidence_every=every))
        train(cfg, progress=False)
        counts[every] = list(calls)
    # after every epoch in both; between the passes of each of the 2 epochs past warm-up in "net"
    assert len(counts["epoch"]) == 3 and len(counts["net"]) == 5
    # the estimate between the passes sees net 0 after its pass (changed since the epoch began) and as the epoch
    # ends (net 1's pass leaves it as it is)
    assert counts["net"][0] != counts["net"][1] == counts["net"][2]


def test_steps_per_net_count_equal_work(digits, tmp_path):
    """RoLR's code reads the data twice per net per epoch; CCL's joint schedule once: the run record says so."""
    per = {}
    for method in ("ccl", "rolr"):
        cfg = small_cfg(digits, tmp_path / method, method=method, epochs=2, warmup=1)
        summary = train(cfg, progress=False)
        hist = history(summary)
        per[method] = [r["steps_per_net"] for r in hist]
        assert summary["steps_per_net"] == pytest.approx(sum(per[method]))
        assert all(r["images_per_net"] > 0 for r in hist)
    # warm-up: both one pass per net; after it RoLR takes twice CCL's steps per net
    assert per["rolr"][1] == 2 * per["ccl"][1]
    assert per["ccl"][0] == per["ccl"][1]


def test_patience_stops_when_validation_stops_improving(digits, tmp_path):
    cfg = small_cfg(digits, tmp_path, method="ce", epochs=8, warmup=0, lr=1e-12, val_fraction=0.2, patience=2)
    summary = train(cfg, progress=False)
    hist = history(summary)
    # lr ~ 0: the held-out accuracy never improves on epoch 0's, so epochs 1 and 2 are the patience
    assert summary["epochs_run"] == len(hist) == 3, [r.get("val_ens_top1") for r in hist]
    assert summary["val_best_epoch"] == 0


def test_grid_cells_names_and_sections():
    base = {"epochs": 2}
    grid = parse_grid(["ccl.sharpen_t=none,0.5", "ccl.cml_target=peer,mean", "schedule=joint,alternate"])
    cells = grid_cells(["ccl", "rolr"], grid, base)
    ccl_cells = [c for c in cells if c.method == "ccl"]
    rolr_cells = [c for c in cells if c.method == "rolr"]
    assert len(ccl_cells) == 8 and len(rolr_cells) == 2  # a ccl.* key does not multiply RoLR's rows
    assert ccl_cells[0].settings == () and ccl_cells[0].label == "default"  # the defaults are left out of the name
    col = Column("sym:0.5", "sym0.5", {})
    names = {run_name(c, col, 0) for c in cells}
    assert len(names) == len(cells)
    assert "ccl-sym0.5-sharpen_t=0.5-cml_target=mean-s0" in names
    for bad in (["ccl.tau"], ["x=1", "x=2"], ["ccl.pg_prediction=nope"]):
        with pytest.raises(UserError):
            grid_cells(["ccl"], parse_grid(bad), base)


def test_table_refuses_a_finished_run_with_other_settings(tmp_path, monkeypatch):
    """A run's name holds only the grid's settings: a table with another --set in the same --out must not read
    back the old runs as its own."""
    from ccl.analysis import table as table_mod

    def fake_train(cfg, resume=False, progress=False):
        d = tmp_path / "out" / "runs" / cfg.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
        return {"test_final": 50.0}

    monkeypatch.setattr(table_mod, "train", fake_train)
    kw = dict(methods=["ce"], noise=["sym:0.5"], seeds=[0], epochs=2, warmup=1, arch="resnet_tiny",
              out=tmp_path / "out")
    run_table(**kw, base={"lr": 0.001})
    run_table(**kw, base={"lr": 0.001})  # the same settings: read back
    with pytest.raises(UserError, match="other settings"):
        run_table(**kw, base={"lr": 0.01})
    with pytest.raises(UserError, match="epochs"):
        run_table(**{**kw, "epochs": 3}, base={"lr": 0.001})


def test_equal_steps_reads_every_run_at_the_columns_smallest_step_count(tmp_path):
    """RoLR steps twice per epoch: at equal steps it is read at half the epochs of a method that steps once."""
    col = Column("sym:0.5", "sym0.5", {})
    cells = [Cell("ccl", ()), Cell("rolr", ())]
    results = {}
    for cell, per_epoch in ((cells[0], 10), (cells[1], 20)):
        d = tmp_path / cell.method
        d.mkdir()
        curve = [{"epoch": e, "steps_per_net": per_epoch, "ens_top1": 10.0 * (e + 1), "val_ens_top1": 5.0 * e}
                 for e in range(6)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve) + '{"epoch": 6, "ens')
        results[run_name(cell, col, 0)] = d  # read as `ccl runs` reads a run: unfinished, figures from its curve
    table = aggregate(results, cells, [col], [0])
    ccl, rolr = table["ccl|default|sym:0.5"], table["rolr|default|sym:0.5"]
    assert ccl["equal_steps"] == rolr["equal_steps"] == 60  # the smaller total: CCL's
    assert ccl["test_equal_steps"][0] == 60.0  # its last epoch (60 steps)
    assert rolr["test_equal_steps"][0] == 30.0  # RoLR's epoch 2 (3 x 20 = 60 steps); the torn tail is ignored
    assert rolr["val_equal_steps"][0] == 10.0
    assert "equal steps: 60 per net" in markdown(table, [col])
