"""Data parallel under torchrun (ccl.train.dist): two CPU processes on gloo against one.

Every test launches `python -m torch.distributed.run --standalone --nproc_per_node 2 ...` in a subprocess with a
hard timeout, so a hang fails the test instead of CI. The collectives themselves are checked by workers in this
same file (`python tests/test_dist.py WORKER` under torchrun; see the bottom), the trainer by `ccl train`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
CLI = ["-m", "ccl.cli", "train"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CCL_DIST_TIMEOUT_MIN="2")
    env.pop("WORLD_SIZE", None)
    return env


def launch(nproc: int, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`ccl train ARGS` on nproc processes (torchrun for 2, a plain process for 1)."""
    cmd = (TORCHRUN + [str(nproc)] if nproc > 1 else [sys.executable]) + CLI + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), check=False)


def worker(name: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    out = subprocess.run(TORCHRUN + ["2", str(HERE), name], capture_output=True, text=True, timeout=timeout,
                         env=_env() | env, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def train_args(data, out, name, **kw) -> list[str]:
    opts = {"data": data, "arch": "resnet_tiny", "epochs": 2, "warmup": 1, "batch-size": 64, "workers": 0,
            "lr": 3e-3, "out": out, "name": name} | kw
    return [a for k, v in opts.items() for a in (f"--{k}", str(v))] + ["--quiet", "--set", "dist_backend=gloo"]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------------
# The collectives, in torchrun workers


@pytest.mark.timeout(200)
def test_ddp_gradients_are_identical_and_the_fixed_peer_keeps_none(digits):
    out = worker("ddp_steps_worker", timeout=180, CCL_TEST_DIGITS=str(digits))
    assert "checked" in out.stdout


@pytest.mark.timeout(150)
def test_collectives_gather_with_gradient_merge_and_counts():
    worker("collectives_worker")


# ----------------------------------------------------------------------------------------------------------------
# The trainer


@pytest.mark.timeout(900)
def test_two_processes_against_one_and_resume_across_world_sizes(digits, tmp_path):
    """2 processes x batch 32 against 1 x batch 64 (the same global batch and seed), 2 epochs of ccl; then each
    run's checkpoint resumes on the other world size for a third epoch."""
    two, one = tmp_path / "two", tmp_path / "one"
    r2 = launch(2, train_args(digits, tmp_path, "two", **{"batch-size": 32}), timeout=400)
    assert r2.returncode == 0, r2.stderr[-6000:]
    r1 = launch(1, train_args(digits, tmp_path, "one"), timeout=300)
    assert r1.returncode == 0, r1.stderr[-6000:]
    h2, h1 = history(two), history(one)
    assert [r["epoch"] for r in h2] == [r["epoch"] for r in h1] == [0, 1]
    # Every training sample exactly once per epoch, in both runs (digits: 1437 training samples, an odd count,
    # so the two ranks hold 719 and 718: uneven shards that must neither hang nor repeat a sample).
    assert [r["images"] for r in h2] == [r["images"] for r in h1] == [1437, 1437]
    # Only rank 0 wrote: one record per epoch, one summary.
    assert json.loads((two / "summary.json").read_text())["test_epochs"] == 2
    # The per-sample losses in rank 0's checkpoint are the whole training set's (merged from both ranks), and w
    # was fitted on them: every rank checks that its w hashes the same as the others' (dist.assert_same).
    state2 = checkpoint(two)
    loss = state2["method"]["sample_loss"]
    assert loss.shape == (2, 1437) and bool((loss > 0).all()), int((loss == 0).sum())
    assert bool(state2["method"]["has_w"]) and len(state2["rng_ranks"]) == 2
    # The logged means are over both ranks' steps (a mean, not a sum: two nets' CE near ln 10 each at epoch 0).
    assert abs(h2[0]["train_loss"] / h1[0]["train_loss"] - 1) < 0.1, (h2[0]["train_loss"], h1[0]["train_loss"])
    # Accuracy: the runs see the same samples per epoch, but grouped differently (each rank's BatchNorm normalises
    # over its 32, not 64) and with other augmentation draws, and after 2 epochs resnet_tiny is still near chance
    # and noisy: measured at seed 0, 10.6% (1 process) against 17.2% (2 processes), and 15.3% for 1 process at
    # another lr. 20 points of the 360-image test split allow that noise; the exact equivalence is checked above
    # (gradients, merged state) and in the collectives' workers.
    a2, a1 = h2[-1]["ens_top1"], h1[-1]["ens_top1"]
    assert abs(a2 - a1) <= 20, (a2, a1)

    # 2 -> 1 and 1 -> 2: the global per-sample buffers let either world size continue, here at the same global
    # batch (batch_size is per process, so it changes, and --allow-changes records it).
    back1 = launch(1, train_args(digits, tmp_path, "two", epochs=3) + ["--resume", "--allow-changes"], timeout=300)
    assert back1.returncode == 0, back1.stderr[-6000:]
    back2 = launch(2, train_args(digits, tmp_path, "one", epochs=3, **{"batch-size": 32}) + ["--resume",
                                                                                          "--allow-changes"],
                   timeout=400)
    assert back2.returncode == 0, back2.stderr[-6000:]
    for run_dir in (two, one):
        hist = history(run_dir)
        assert [r["epoch"] for r in hist] == [0, 1, 2] and hist[-1]["images"] == 1437
    assert "rng_ranks" not in checkpoint(two) and len(checkpoint(one)["rng_ranks"]) == 2


@pytest.mark.timeout(600)
def test_a_killed_rank_ends_the_job_and_the_checkpoint_resumes(digits, tmp_path):
    """kill -9 of rank 1 mid-run: torchrun stops the job with a non-zero status within a bounded time, the last
    checkpoint loads, and one process continues from it."""
    run_dir = tmp_path / "k"
    cmd = TORCHRUN + ["2"] + CLI + train_args(digits, tmp_path, "k", epochs=20, **{"batch-size": 32})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        last = run_dir / "checkpoints" / "last.pt"
        deadline = time.monotonic() + 300
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.is_file() and proc.poll() is None, "the run ended or stalled before its first checkpoint"
        victim = _rank_pid(proc.pid, 1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"the job exited {took:.1f} s after rank 1 was killed, status {proc.returncode}")
    assert proc.returncode != 0, err[-3000:]
    assert "FAILED" in err or "ChildFailedError" in err, err[-3000:]
    assert took < 120
    epoch = checkpoint(run_dir)["epoch"]  # intact: written atomically, so it loads
    assert epoch < 19
    resumed = launch(1, train_args(digits, tmp_path, "k", epochs=epoch + 2, **{"batch-size": 32}) + ["--resume"],
                     timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert history(run_dir)[-1]["epoch"] == epoch + 1


def _rank_pid(agent: int, rank: int) -> int:
    """The pid of a torchrun worker by its RANK (a child of the agent whose environment says so)."""
    for _ in range(50):
        for child in Path("/proc").iterdir():
            if not child.name.isdigit():
                continue
            try:
                ppid = int((child / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (child / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == agent and f"RANK={rank}".encode() in env:
                return int(child.name)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under {agent}")


# ----------------------------------------------------------------------------------------------------------------
# The scale path (ccl bench scale)


@pytest.mark.timeout(300)
def test_bench_scale_measures_and_the_fast_label_scan_agrees_with_the_loop(digits, tmp_path):
    import numpy as np
    from ccl.pipeline.scan import scan_labels_fast, scan_shard
    from ccl.pipeline.shards import ShardSet
    from ccl.bench.scale import bench_scale
    from rich.console import Console

    with open(os.devnull, "w") as quiet:
        rows = bench_scale((3000,), 1000, tmp_path / "sets", keep=True, json_path=tmp_path / "s.json",
                           console=Console(file=quiet))
    (row,) = rows
    assert row["n"] == 3000 and row["shards"] == 3 and row["buffers_mb"] == pytest.approx(4 * 3000 * 4 / 2**20)
    assert row["mean_w_clean"] > row["mean_w_noisy"]  # the GMM separates the two modes
    assert json.loads((tmp_path / "s.json").read_text())["rows"][0]["n"] == 3000
    # The fast scan gives the loop's arrays on the synthetic set and on real shards (with clean labels).
    for root in (tmp_path / "sets" / "n3000-s1000", Path(digits)):
        shards = ShardSet.open(root)
        for split in shards.splits:
            meta = shards.manifest["splits"][split]
            for rec in meta["shards"]:
                slow = scan_shard(root, rec, split, shards.num_classes, meta["has_clean"], verify=False, fast=False)
                fast = scan_labels_fast(root, rec, shards.num_classes, meta["has_clean"])
                assert fast is not None
                for a, b in zip((slow.offset, slow.size, slow.png, slow.label, slow.clean), fast):
                    assert np.array_equal(a, b)
    # An index it does not recognise (a sample's labels disagree) is left to scan_shard's loop: None.
    root = tmp_path / "sets" / "n3000-s1000"
    rec = ShardSet.open(root).manifest["splits"]["train"]["shards"][0]
    tar = root / rec["file"]
    data = bytearray(tar.read_bytes())
    data[512 + 1024 * 7 + 512 + 8] ^= 1  # sample 7's label in labels.i64
    tar.write_bytes(bytes(data))
    assert scan_labels_fast(root, rec, 1000, False) is None
    assert 7 in scan_shard(root, rec, "train", 1000, False, verify=False).damaged  # the loop names it


# ----------------------------------------------------------------------------------------------------------------
# Workers: run under torchrun by the tests above (`python tests/test_dist.py NAME`)


def ddp_steps_worker() -> None:
    """DDP steps of ccl (warm-up, joint, alternate) on digits: after every backward, every gradient is the same on
    both ranks; a net that does not learn in a pass (alternate) and the unused projection heads (warm-up) keep
    grad None, so Adam leaves them alone; parameters stay identical after every step."""
    import torch.distributed as tdist
    from ccl.pipeline.loader import make_loader
    from ccl.train import dist
    from ccl.train.config import TrainConfig
    from ccl.train.loop import setup

    dist.init("gloo", "cpu")
    data = Path(os.environ["CCL_TEST_DIGITS"])  # built by the test's fixture
    for schedule in ("joint", "alternate"):
        cfg = TrainConfig(data=str(data), arch="resnet_tiny", batch_size=16, workers=0, warmup=1, schedule=schedule,
                          device="cpu")
        run = setup(cfg, data)
        method = run.method
        model = dist.wrap(method, sync_bn=False)
        opt = torch.optim.Adam(method.parameters(), lr=1e-3)
        loader = make_loader(run.shards, "train", batch_size=16, train=True, device="cpu", num_workers=0)
        batches = iter(loader)
        for epoch in (0, 1):  # 0: warm-up (CE), 1: the method's loss
            for p in range(method.passes(epoch)):
                batch = next(batches)
                views = run.aug.make_views(batch.images, method.views(epoch), None)
                opt.zero_grad(set_to_none=True)
                model(batch, views, epoch, p, None).loss.backward()
                learning = method.training_nets(epoch, p)
                for name, q in method.named_parameters():
                    k = int(name.split(".")[1])
                    unused = k not in learning or (method.warming_up(epoch) and ".head." in name)
                    assert (q.grad is None) == unused, (schedule, epoch, p, name, q.grad is None)
                grads = torch.cat([q.grad.reshape(-1) for q in method.parameters() if q.grad is not None])
                hashes = dist.gather_objects(dist.fingerprint(grads))
                assert hashes[0] == hashes[1], (schedule, epoch, p, "gradients differ between ranks")
                opt.step()
                params = torch.cat([q.detach().reshape(-1) for q in method.parameters()])
                hashes = dist.gather_objects(dist.fingerprint(params))
                assert hashes[0] == hashes[1], (schedule, epoch, p, "parameters differ between ranks")
        # The fixed peer's BatchNorm statistics: averaging only the nets that trained leaves the others bit-exact.
        before = [b.clone() for b in method.nets[1].buffers()]
        dist.average_bn_stats(method.nets, {0})
        assert all(torch.equal(a, b) for a, b in zip(before, method.nets[1].buffers()))
        del model
    tdist.barrier()
    print("checked")
    dist.shutdown()


def collectives_worker() -> None:
    """gather-with-gradient against one process on the whole batch (uneven sizes); merge, counts, assert_same."""
    from ccl.train import dist
    from ccl.train.metrics import Accuracy

    dist.init("gloo", "cpu")
    r = dist.rank()
    # -- global_batch: rank 0 holds rows 0-4, rank 1 rows 5-8 (uneven, as on an epoch's last step).
    g = torch.Generator().manual_seed(0)
    z_all = torch.nn.functional.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=1)
    lab_all = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    lo, hi = (0, 5) if r == 0 else (5, 9)

    def loss_fn(z, zg, rows, n_total):
        # local anchors against every rank's contrasts; positive = the anchor's own row in the global batch
        s = z @ zg.T / 0.5  # [n, N]
        target = torch.arange(zg.shape[0])[rows]
        return torch.nn.functional.cross_entropy(s, target, reduction="sum") / n_total

    z = z_all[lo:hi].clone().requires_grad_(True)
    zg, lab_g, rows = dist.global_batch(z, lab_all[lo:hi])
    assert rows == slice(lo, hi) and torch.equal(lab_g, lab_all) and torch.allclose(zg.detach(), z_all)
    loss_fn(z, zg, rows, 9).backward()
    ref = z_all.clone().requires_grad_(True)
    loss_fn(ref, ref, slice(0, 9), 9).backward()
    assert torch.allclose(z.grad, ref.grad[lo:hi], atol=1e-12), (z.grad, ref.grad[lo:hi])
    # Without the backward all-reduce the cross-rank part of the gradient would be lost: make sure it is there.
    local_only = z_all[lo:hi].clone().requires_grad_(True)
    loss_fn(local_only, torch.cat([z_all[:lo], local_only, z_all[hi:]]), slice(lo, hi), 9).backward()
    assert not torch.allclose(local_only.grad, ref.grad[lo:hi])

    # -- CCL's fused contrastive terms on the global batch (how the gather_negatives option is used): each rank's
    # per-anchor losses and gradients are those of one process on the whole batch.
    from ccl.train.losses.contrastive import ccl_contrastive

    zz = [torch.nn.functional.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=1) for _ in range(4)]
    y0, y1 = torch.tensor([0, 1, 2, 0, 1, 2, 1, 1, 0]), torch.tensor([2, 2, 1, 0, 0, 1, 2, 0, 1])
    mine = [z[lo:hi].clone().requires_grad_(True) for z in zz]
    *glob, rows = dist.global_batch(*mine, y0[lo:hi], y1[lo:hi])
    c = ccl_contrastive(*glob, tau=0.5, impl="reference", detach_peer=True)
    sum(v[rows].sum() for v in c.values()).div(9).backward()
    full = [z.clone().requires_grad_(True) for z in zz]
    c_ref = ccl_contrastive(*full, y0, y1, tau=0.5, impl="reference", detach_peer=True)
    sum(v.sum() for v in c_ref.values()).div(9).backward()
    for key in c:
        assert torch.allclose(c[key][rows], c_ref[key][lo:hi], atol=1e-12), key
    for a, b in zip(mine, full):
        assert torch.allclose(a.grad, b.grad[lo:hi], atol=1e-12)

    # -- merge_owned_: each rank's samples, zeros elsewhere -> everything everywhere, exactly.
    t = torch.zeros(2, 10)
    t[:, r::2] = torch.arange(10.0)[r::2] + 0.1
    dist.merge_owned_(t)
    assert torch.equal(t, (torch.arange(10.0) + 0.1).expand(2, 10))
    # -- assert_same: equal passes, different raises.
    dist.assert_same("w", t)
    try:
        dist.assert_same("w", t + r)
    except ValueError as e:
        assert "differs between ranks" in str(e)
    else:
        raise AssertionError("assert_same missed a difference")
    # -- reduce_accuracy: counts of both halves give the whole split's accuracy.
    acc = Accuracy()
    logits = torch.eye(4)[[0, 1, 2, 3]] if r == 0 else torch.eye(4)[[0, 0, 0]]
    acc.update({"ens": logits}, torch.tensor([0, 1, 2, 0]) if r == 0 else torch.tensor([0, 1, 1]))
    res = dist.reduce_accuracy(acc).result()
    assert acc.total == 7 and abs(res["ens_top1"] - 100 * 4 / 7) < 1e-9, res
    dist.shutdown()


if __name__ == "__main__":
    {"ddp_steps_worker": ddp_steps_worker, "collectives_worker": collectives_worker}[sys.argv[1]]()
