"""DivideMix and DivideMix + CCL's terms: each loss piece against a hand-written reference (values and gradients),
the co-divide split, the empty-part edge cases without a host sync, and short runs on the digits shards."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ccl.train.config import TrainConfig
from ccl.train.losses import dividemix as dm
from ccl.train.losses import div
from ccl.train.methods import Rng

N, C = 6, 4


def _softmax_row(row):
    e = [float(torch.exp(row[j] - row.max())) for j in range(len(row))]
    return [v / sum(e) for v in e]


def _sharpen_row(p, T):
    q = [v ** (1 / T) for v in p]
    return [v / sum(q) for v in q]


# ----------------------------------------------------------------------------------------------------------------
# co-refinement and co-guessing: the code's formulas, written out sample by sample (Train_CIFAR.py l.63-84)


def test_co_refine_is_the_sharpened_mix_of_label_and_mean_prediction(float64):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, N, C, generator=g), -1).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    w = torch.tensor([1.0, 0.0, 0.5, 0.9, 0.2, 0.7])
    for T in (0.5, 1.0, 0.25):
        out = dm.co_refine(w, labels, probs, T)
        for i in range(N):
            avg = [(float(probs[0, i, c].detach()) + float(probs[1, i, c].detach())) / 2 for c in range(C)]
            mix = [float(w[i]) * (c == int(labels[i])) + (1 - float(w[i])) * avg[c] for c in range(C)]
            assert out[i].tolist() == pytest.approx(_sharpen_row(mix, T), rel=1e-12)
        assert not out.requires_grad  # a target: no gradient flows back into the predictions
    assert dm.co_refine(torch.ones(N), labels, probs).argmax(-1).tolist() == labels.tolist()


def test_co_guess_is_the_sharpened_mean_of_both_nets_over_both_views(float64):
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(4, N, C, generator=g), -1).requires_grad_()
    out = dm.co_guess(probs, 0.5)
    for i in range(N):
        mean = [sum(float(probs[k, i, c].detach()) for k in range(4)) / 4 for c in range(C)]
        assert out[i].tolist() == pytest.approx(_sharpen_row(mean, 0.5), rel=1e-12)
        # sharpening with T = 0.5 squares: the guess is more confident than the mean it came from
        assert max(out[i].tolist()) >= max(mean)
    assert not out.requires_grad


# ----------------------------------------------------------------------------------------------------------------
# MixMatch losses, ramp, penalties


def _ref_mixmatch(logits, target, labelled):
    """Lx, Lu as the code's SemiLoss (l.196-203) computes them on the slices it passes, one scalar at a time."""
    lx, lu, nx, nu = 0.0, 0.0, 0, 0
    for i in range(logits.shape[0]):
        logz = torch.logsumexp(logits[i], 0)
        if labelled[i]:
            lx = lx - sum(target[i, c] * (logits[i, c] - logz) for c in range(C))
            nx += 1
        else:
            p = [torch.exp(logits[i, c] - logz) for c in range(C)]
            lu = lu + sum((p[c] - target[i, c]) ** 2 for c in range(C)) / C
            nu += 1
    return lx / max(nx, 1), lu / max(nu, 1)


@pytest.mark.parametrize("pattern", ["mixed", "all_labelled", "none_labelled"])
def test_mixmatch_losses_values_and_gradients(float64, pattern):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(N, C, generator=g, requires_grad=True)
    target = torch.softmax(torch.randn(N, C, generator=g), -1)
    labelled = {"mixed": torch.tensor([1, 0, 1, 1, 0, 0]).bool(), "all_labelled": torch.ones(N, dtype=torch.bool),
                "none_labelled": torch.zeros(N, dtype=torch.bool)}[pattern]
    out = dm.mixmatch_losses(logits, target, labelled)
    ref_lx, ref_lu = _ref_mixmatch(logits, target, labelled)
    assert float(out["lx"].detach()) == pytest.approx(float(ref_lx), rel=1e-12, abs=1e-15)
    assert float(out["lu"].detach()) == pytest.approx(float(ref_lu), rel=1e-12, abs=1e-15)
    assert float(out["n_labelled"]) == labelled.sum() and float(out["n_unlabelled"]) == (~labelled).sum()
    # the gradient of Lx + 3 Lu against the reference's; an empty part contributes exactly nothing
    (grad,) = torch.autograd.grad(out["lx"] + 3 * out["lu"], logits)
    ref = ref_lx + 3 * ref_lu
    ref_grad = torch.autograd.grad(ref, logits)[0] if torch.is_tensor(ref) else torch.zeros_like(logits)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)
    if pattern == "all_labelled":
        assert float(out["lu"]) == 0.0
    if pattern == "none_labelled":
        assert float(out["lx"]) == 0.0


def test_mixmatch_matches_the_codes_slices(float64):
    """The code's Lx and Lu when the labelled rows come first: -mean(sum(log_softmax * t)) and mean((p - t)^2)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, C, generator=g)
    target = torch.softmax(torch.randn(8, C, generator=g), -1)
    labelled = torch.tensor([True] * 3 + [False] * 5)
    out = dm.mixmatch_losses(logits, target, labelled)
    lx = -torch.mean(torch.sum(torch.log_softmax(logits[:3], 1) * target[:3], 1))
    lu = torch.mean((torch.softmax(logits[3:], 1) - target[3:]) ** 2)
    assert torch.allclose(out["lx"], lx) and torch.allclose(out["lu"], lu)


def test_linear_rampup_is_the_codes_ramp():
    # lambda_u * clip((epoch - warmup) / 16, 0, 1), on the fractional epoch
    assert dm.linear_rampup(3.0, 10, 25.0) == 0.0
    assert dm.linear_rampup(10.0, 10, 25.0) == 0.0
    assert dm.linear_rampup(10.5, 10, 25.0) == pytest.approx(25.0 * 0.5 / 16)
    assert dm.linear_rampup(18.0, 10, 25.0) == pytest.approx(12.5)
    assert dm.linear_rampup(26.0, 10, 25.0) == 25.0
    assert dm.linear_rampup(300.0, 10, 25.0) == 25.0
    assert dm.linear_rampup(5.0, 10, 150.0, length=0) == 150.0  # no ramp
    # a step's fraction kept on the device: the same values as a tensor
    for e in (3.0, 10.5, 18.0, 30.0):
        t = dm.linear_rampup(torch.tensor(e), 10, 25.0)
        assert torch.is_tensor(t) and float(t) == pytest.approx(dm.linear_rampup(e, 10, 25.0))


def test_the_prior_penalty_is_the_codes_and_the_warmup_penalty_is_negative_entropy(float64):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(N, C, generator=g, requires_grad=True)
    # l.108-111: prior = 1/C; pred_mean = softmax(logits).mean(0); sum(prior * log(prior / pred_mean))
    prior = torch.full((C,), 1.0 / C)
    ref = torch.sum(prior * torch.log(prior / torch.softmax(logits, 1).mean(0)))
    got = div(logits)
    assert torch.allclose(got, ref, rtol=1e-12)
    assert torch.allclose(torch.autograd.grad(got, logits)[0], torch.autograd.grad(ref, logits)[0], rtol=1e-10)
    # l.205-208: mean(sum(p log p)), the negative entropy
    p_rows = [_softmax_row(logits[i].detach()) for i in range(N)]
    ref_ne = sum(sum(v * torch.log(torch.tensor(v)).item() for v in row) for row in p_rows) / N
    ne = dm.neg_entropy(logits)
    assert float(ne) == pytest.approx(ref_ne, rel=1e-10)
    ref_t = torch.mean(torch.sum(torch.softmax(logits, 1).log() * torch.softmax(logits, 1), 1))
    assert torch.allclose(torch.autograd.grad(ne, logits)[0], torch.autograd.grad(ref_t, logits)[0], rtol=1e-10)
    uniform = torch.zeros(3, C, requires_grad=True)
    assert float(dm.neg_entropy(uniform)) == pytest.approx(-torch.log(torch.tensor(float(C))).item())


def test_plus_loss_is_the_masked_mean_of_eq15s_weighting(float64):
    g = torch.Generator().manual_seed(5)
    cvl = torch.rand(N, generator=g, requires_grad=True)
    cml = torch.rand(N, generator=g, requires_grad=True)
    w = torch.tensor([0.9, 0.6, 0.1, 1.0, 0.3, 0.55])
    mask = w > 0.5
    got = dm.plus_loss(cvl, cml, w, mask, cvl_weight=2.0, cml_weight=0.5)
    picked = [i for i in range(N) if mask[i]]
    ref = sum((1 - w[i]) / 2 * (2.0 * cvl[i] + 0.5 * cml[i]) for i in picked) / len(picked)
    assert torch.allclose(got, ref, rtol=1e-12)
    g_got = torch.autograd.grad(got, (cvl, cml))
    g_ref = torch.autograd.grad(ref, (cvl, cml))
    assert all(torch.allclose(a, b, rtol=1e-12) for a, b in zip(g_got, g_ref))
    empty = dm.plus_loss(cvl, cml, w, torch.zeros(N, dtype=torch.bool))
    assert float(empty) == 0.0 and torch.isfinite(torch.autograd.grad(empty, cvl)[0]).all()


# ----------------------------------------------------------------------------------------------------------------
# co-divide and the step


def _cfg(data, out=None, **kw) -> TrainConfig:
    base = dict(data=str(data), method="dividemix", arch="resnet_tiny", epochs=3, warmup=1, batch_size=32, workers=0,
                out=str(out or "runs"), name="run", lr=3e-3)
    sections = {k: kw.pop(k) for k in list(kw) if k in ("dividemix", "ccl")}
    return TrainConfig.from_dict({**base, **kw, **sections})


def test_co_divide_takes_each_nets_split_from_its_peer(digits):
    from ccl.train.loop import setup

    run = setup(_cfg(digits), digits)
    method = run.method
    n = method.w.shape[1]
    g = torch.Generator().manual_seed(0)
    # two different loss profiles, each with a clear low-loss group
    a = torch.where(torch.rand(n, generator=g) < 0.6, 0.1, 2.0) + 0.05 * torch.rand(n, generator=g)
    b = torch.where(torch.rand(n, generator=g) < 0.3, 0.1, 2.0) + 0.05 * torch.rand(n, generator=g)
    w = method.confidence_from_losses(torch.stack([a, b]))
    w_swapped = method.confidence_from_losses(torch.stack([b, a]))
    assert torch.equal(w_swapped, w.flip(0))  # swapping the nets swaps the splits
    p = method.cfg.dividemix.p_threshold
    assert torch.equal(w[0] > p, b < 1) and torch.equal(w[1] > p, a < 1)  # net 0's labelled set is net 1's small loss
    # net 0's division does not depend on its own losses
    assert torch.equal(method.confidence_from_losses(torch.stack([a.flip(0), b]))[0], w[0])


def _step_inputs(run, epoch):
    from ccl.pipeline.loader import make_loader

    batch = next(iter(make_loader(run.shards, "train", batch_size=32, train=True, device="cpu", num_workers=0)))
    g = torch.Generator().manual_seed(0)
    makers = {"weak": run.aug.weak, "strong": run.aug.strong}
    views = tuple(makers[v](batch.images, generator=g) for v in run.method.views(epoch))
    return batch, views, Rng(g, random.Random(0))


class _NoHostRead:
    """Every way a step could read a tensor's value on the host raises while this is active."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")

    def __enter__(self):
        self.saved = {k: getattr(torch.Tensor, k) for k in self.NAMES}

        def refuse(self_, *a, **k):
            raise AssertionError("host read of a tensor inside the step")

        for k in self.NAMES:
            setattr(torch.Tensor, k, refuse)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(torch.Tensor, k, v)


@pytest.mark.parametrize("plus", ["", "cvl,cml"])
@pytest.mark.parametrize("split", ["all_labelled", "none_labelled", "mixed"])
def test_a_step_with_an_empty_part_is_finite_and_never_reads_the_device(digits, plus, split):
    from ccl.train.loop import setup

    # "reference": the fused "torch" kernel checks for underflow with one host read per call (its own, not
    # DivideMix's); the GPU kernel ("triton") has none.
    run = setup(_cfg(digits, dividemix={"plus": plus}, kernel="reference"), digits)
    method = run.method
    method.w.copy_({"all_labelled": torch.ones_like(method.w), "none_labelled": torch.zeros_like(method.w),
                    "mixed": torch.rand(method.w.shape, generator=torch.Generator().manual_seed(0))}[split])
    epoch = 3
    batch, views, rng = _step_inputs(run, epoch)
    for p in range(method.passes(epoch)):
        method.zero_grad()
        with _NoHostRead():
            step = method(batch, views, epoch, p, rng)
            step.loss.backward()
        logged = dict(zip(step.names, step.logged.tolist()))
        assert all(v == v and abs(v) != float("inf") for v in logged.values()), logged
        if split == "all_labelled":
            assert logged[f"labelled{p}"] == 1.0 and logged[f"lu{p}"] == 0.0
        if split == "none_labelled":
            assert logged[f"labelled{p}"] == 0.0 and logged[f"lx{p}"] == 0.0
            if plus:
                assert logged[f"plus{p}"] == 0.0  # the terms apply to the labelled part only (plus_on=labelled)
        (m,) = method.training_nets(epoch, p)
        grads = [q.grad for q in method.nets[m].parameters() if q.grad is not None]
        assert grads and all(torch.isfinite(q).all() for q in grads)
        assert all(q.grad is None for q in method.nets[1 - m].parameters())  # the peer stays fixed


def test_the_split_of_a_step_is_its_own_nets_division(digits):
    from ccl.train.loop import setup

    run = setup(_cfg(digits), digits)
    method = run.method
    method.w[0].fill_(1.0)  # net 0: everything labelled
    method.w[1].fill_(0.0)  # net 1: nothing labelled
    batch, views, rng = _step_inputs(run, 3)
    step0, step1 = method(batch, views, 3, 0, rng), method(batch, views, 3, 1, rng)
    assert dict(zip(step0.names, step0.logged.tolist()))["labelled0"] == 1.0
    assert dict(zip(step1.names, step1.logged.tolist()))["labelled1"] == 0.0


def test_views_and_schedule():
    cfg = TrainConfig(method="dividemix", warmup=2)
    plus = TrainConfig.from_dict({"method": "dividemix", "warmup": 2, "dividemix": {"plus": "cml"}})
    from ccl.train.methods.dividemix import DivideMix

    m = DivideMix(cfg, 10, 20, "resnet_tiny", True)
    assert m.views(0) == ("weak",) and m.views(2) == ("weak", "weak")
    assert DivideMix(plus, 10, 20, "resnet_tiny", True).views(2) == ("weak", "weak", "strong")
    assert [m.passes(e) for e in (0, 5)] == [2, 2] and m.training_nets(5, 1) == (1,)  # net 1, then net 2


def test_the_ramp_advances_per_step_over_the_codes_num_iter():
    from ccl.train.methods.dividemix import DivideMix

    m = DivideMix(TrainConfig(method="dividemix", warmup=2, batch_size=8), 10, 20, "resnet_tiny", True)
    m.w[0, :17] = 1.0  # net 0's division: 17 labelled -> the code's num_iter = 17 // 8 + 1 = 3 (TC:46)
    m.w[0, 17:] = 0.0
    m.streams(4, 0)
    assert [m._pass_fraction(4, 0) for _ in range(3)] == pytest.approx([0, 1 / 3, 2 / 3])
    m.streams(4, 1)  # net 1's division: all 20 labelled -> 20 // 8 + 1 = 3
    assert m._pass_fraction(4, 1) == 0.0  # each pass ramps from its start, as the code's train() per net
    m.w[0, 16:] = 0.0  # 16 labelled: the code's + 1 even when B divides |L|
    m.streams(5, 0)
    assert [m._pass_fraction(5, 0) for _ in range(2)] == pytest.approx([0, 1 / 3])


def test_the_streams_are_the_division_of_the_trained_samples():
    from ccl.train.methods.dividemix import DivideMix

    m = DivideMix(TrainConfig(method="dividemix", warmup=2, batch_size=8), 10, 20, "resnet_tiny", True)
    (warm,) = m.streams(0, 1)
    assert warm.subset is None and warm.batch_size == 16  # warm-up: every sample at twice the batch (DC l.169-173)
    m.w[1] = torch.linspace(0, 1, 20)
    m.active[:3] = False  # held out for validation: in neither part
    lab, unlab = m.streams(3, 1)  # pass 1 trains net 1 on its own division
    expect = (torch.linspace(0, 1, 20) > 0.5).numpy()
    assert list(lab.subset) == [i for i in range(3, 20) if expect[i]] and lab.batch_size == 8
    assert list(unlab.subset) == [i for i in range(3, 20) if not expect[i]] and unlab.batch_size == 8


def _digits_run(digits, tmp_path, **kw):
    from ccl.train.loop import setup

    run = setup(_cfg(digits, tmp_path, **kw), digits)
    return run


@pytest.mark.timeout(120)
def test_a_pass_is_an_exact_epoch_of_the_labelled_set_with_unlabelled_batches_in_cycles(digits, tmp_path):
    """The code's batches (DC l.178-189, TC:45-52): per step B labelled and B unlabelled samples, ceil(|L| / B)
    steps; every labelled sample once; the unlabelled sampler restarts with a fresh shuffle when it runs out."""
    import math

    import numpy as np

    from ccl.train.loop import pass_batches

    run = _digits_run(digits, tmp_path, batch_size=16)
    method = run.method
    n = method.w.shape[1]
    g = torch.Generator().manual_seed(0)
    for labelled_share in (0.8, 0.1):  # |U| < |L|: the unlabelled set cycles; |U| > |L|: some are not drawn
        method.w.copy_((torch.rand(method.w.shape, generator=g) < labelled_share).float())
        labelled = set(np.flatnonzero(method.w[0].numpy() > 0.5).tolist())
        source = pass_batches(run, None, 3, 0, 2)
        batches = list(source)
        assert len(source) == len(batches) == math.ceil(len(labelled) / 16)
        seen_l, seen_u = [], []
        for b in batches:
            idx = b.index.tolist()
            is_l = [i in labelled for i in idx]
            k = sum(is_l)
            assert is_l == [True] * k + [False] * (len(idx) - k)  # labelled rows first
            assert len(idx) - k <= 16 and (k == 16 or b is batches[-1])
            seen_l += idx[:k]
            seen_u += idx[k:]
        assert sorted(seen_l) == sorted(labelled)  # each labelled sample exactly once
        unlabelled = n - len(labelled)
        assert len(seen_u) == min(len(batches) * 16, len(seen_u))
        # in cycles: no repeat before every unlabelled sample has been drawn once
        assert len(set(seen_u[:unlabelled])) == len(seen_u[:unlabelled])
        if len(seen_u) > unlabelled:
            assert set(seen_u[:unlabelled]) == set(range(n)) - labelled
            assert seen_u[unlabelled:2 * unlabelled] != seen_u[:len(seen_u[unlabelled:2 * unlabelled])]  # reshuffled
        # the same pass again gives the same batches (a pure function of seed, epoch and pass); another pass not
        again = [b.index.tolist() for b in pass_batches(run, None, 3, 0, 2)]
        assert again == [b.index.tolist() for b in batches]
        assert again != [b.index.tolist() for b in pass_batches(run, None, 4, 0, 2)]


def test_both_samplers_split_by_rank(digits):
    """Under torchrun each sampler hands every rank its slice of the same permutation: disjoint, covering the part,
    with equal step counts."""
    import numpy as np

    from ccl.pipeline.loader import make_loader
    from ccl.pipeline.shards import ShardSet

    shards = ShardSet.open(digits)
    part = np.arange(5, 700, 3)  # a division's part
    plans = []
    for rank in range(3):
        ld = make_loader(shards, "train", batch_size=16, train=True, device="cpu", num_workers=0, rank=rank,
                         world_size=3)
        ld.select(part)
        ld.set_epoch(7)
        plans.append(ld.plan())
        assert len(ld) == len(plans[-1])
    assert len({len(p) for p in plans}) == 1
    drawn = np.concatenate([np.concatenate(p) for p in plans])
    assert sorted(drawn.tolist()) == part.tolist()
    ld.select(part[:2])  # fewer samples than ranks: no step on any rank
    assert len(ld) == 0 and list(iter(ld._sampler)) == []


def test_config_mistakes_are_one_line_errors():
    from ccl.errors import UserError

    with pytest.raises(UserError, match="dividemix.plus"):
        TrainConfig.from_dict({"method": "dividemix", "dividemix": {"plus": "cvl,acl"}}).validate()
    with pytest.raises(UserError, match="plus_on"):
        TrainConfig.from_dict({"method": "dividemix", "dividemix": {"plus_on": "noisy"}}).validate()


# ----------------------------------------------------------------------------------------------------------------
# short runs on the digits shards


@pytest.mark.timeout(900)
@pytest.mark.parametrize("plus", ["", "cvl,cml"])
def test_dividemix_learns_far_above_chance(digits, tmp_path, plus):
    from ccl.train.loop import train

    # with the GMM on a 2-epoch loss history (the code's 5 at 90% noise, TC:178-181); batch 32: warm-up batches of
    # 64, then 32 labelled + 32 unlabelled per step (the code's batching)
    cfg = _cfg(digits, tmp_path, arch="resnet_tiny", epochs=6, warmup=4, batch_size=32, lr=3e-3,
               dividemix={"plus": plus, "loss_history": 2})
    summary = train(cfg, progress=False)
    hist = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3, 4, 5]
    assert all(r["train_loss"] == r["train_loss"] for r in hist)
    assert "train_lx0" in hist[-1] and "train_lu1" in hist[-1] and ("train_plus0" in hist[-1]) == bool(plus)
    # the co-divide ran, and its labelled sets hold mostly clean labels (40% of the training labels are wrong)
    assert max(hist[-1]["net0_auroc"], hist[-1]["net1_auroc"]) > 0.7, hist[-1]
    # chance is 10%: two epochs of DivideMix after warm-up keep the nets far above it (a collapse would not)
    assert hist[-1]["ens_top1"] > 40, [r["ens_top1"] for r in hist]
    state = torch.load(f"{summary['run_dir']}/checkpoints/last.pt", weights_only=True)["method"]
    assert state["loss_history"].shape[1] == 2 and int(state["history_count"]) == 3  # after epochs 3, 4 and 5
