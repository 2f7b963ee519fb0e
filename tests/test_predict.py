"""`ccl predict` and `ccl export`: the trained model put to use, round-tripped against `ccl eval` on digits."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ccl.pipeline.shards import ShardSet
from ccl.analysis import predict as P
from ccl.train.config import TrainConfig
from ccl.pipeline.shards import sample_locations
from ccl.train.loop import train
from ccl.train.restore import evaluate_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def run_dir(digits, tmp_path_factory):
    """Two nets (one CCL epoch of warm-up CE), in fp32 so that the exported nets compute the same numbers."""
    cfg = TrainConfig(data=str(digits), method="ccl", arch="resnet_tiny", epochs=1, warmup=1, batch_size=64,
                      workers=0, out=str(tmp_path_factory.mktemp("runs")), name="p", seed=0, amp=False)
    return Path(train(cfg, progress=False)["run_dir"])


def cli(*args):
    from ccl.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_on_the_test_shards_scores_what_ccl_eval_scores(run_dir, digits, tmp_path):
    ck = run_dir / "checkpoints" / "last.pt"
    out = tmp_path / "pred.csv"
    r = cli("predict", digits, "--checkpoint", ck, "--out", out, "--top-k", "3", "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    rows = read_csv(out)
    assert len(rows) == 360 and list(rows[0])[:7] == ["path", "pred", "pred_name", "prob", "top2", "top2_name",
                                                      "top2_prob"]
    ev = evaluate_checkpoint(ck, None, "test", "cpu")
    acc = 100 * np.mean([int(row["pred"]) == int(row["true"]) for row in rows])
    assert acc == pytest.approx(ev["ens_top1"], abs=1e-9) and f"{acc:.2f}%" in r.output
    probs = np.array([[float(row["prob"]), float(row["top2_prob"]), float(row["top3_prob"])] for row in rows])
    assert (np.diff(probs, axis=1) <= 0).all() and (probs.sum(1) <= 1 + 1e-5).all()
    # One net alone scores as ccl eval scores that net.
    r1 = cli("predict", digits, "--checkpoint", ck, "--out", out, "--net", "1", "--device", "cpu", "--quiet")
    assert r1.exit_code == 0, r1.output
    acc1 = 100 * np.mean([int(row["pred"]) == int(row["true"]) for row in read_csv(out)])
    assert acc1 == pytest.approx(ev["net1_top1"], abs=1e-9)


def test_predict_on_image_files_skips_and_lists_bad_ones(run_dir, digits, tmp_path):
    from PIL import Image

    from ccl.pipeline.shards import decode_image

    shards = ShardSet.open(digits)
    loc = sample_locations(shards, "test")
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(5):  # the test split's first images as files: PNG as stored, and one re-encoded as BMP
        (folder / f"{i}.png").write_bytes(loc.read(i))
    buf = io.BytesIO()
    Image.fromarray(decode_image(loc.read(5))).save(buf, format="BMP")
    (folder / "5.bmp").write_bytes(buf.getvalue())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "files.csv"
    ck = run_dir / "checkpoints" / "last.pt"
    r = cli("predict", tmp_path / "imgs", "--checkpoint", ck, "--out", out, "--device", "cpu", "--batch-size", "4")
    assert r.exit_code == 0, r.output
    rows = read_csv(out)
    assert [Path(row["path"]).name for row in rows] == ["0.png", "1.png", "2.png", "3.png", "4.png", "5.bmp"]
    assert "skipped 1 image" in r.output and "broken.png" in r.output
    # The same bytes predict the same as from the shards.
    ref = tmp_path / "ref.csv"
    assert cli("predict", digits, "--checkpoint", ck, "--out", ref, "--device", "cpu", "--quiet").exit_code == 0
    by_shard = read_csv(ref)[:6]
    assert [row["pred"] for row in rows] == [row["pred"] for row in by_shard]
    assert [float(row["prob"]) for row in rows] == pytest.approx([float(row["prob"]) for row in by_shard], abs=1e-5)


def _export_and_run_snippet(snippet: str, run, tmp_path, monkeypatch) -> dict:
    """`ccl export RUN --out model.safetensors` in tmp_path, then the README's snippet itself run there; its names."""
    assert snippet in README.read_text()  # the README shows the code the test runs
    monkeypatch.chdir(tmp_path)
    r = cli("export", run, "--out", "model.safetensors")
    assert r.exit_code == 0, r.output
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the documented snippet itself
    return scope


def test_export_rebuilds_with_the_readme_snippet_and_matches_predict(run_dir, digits, tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    scope = _export_and_run_snippet(P.SNIPPET, run_dir, tmp_path, monkeypatch)
    nets, meta = scope["nets"], scope["meta"]
    assert meta["nets"] == ["net0", "net1"] and meta["classes"] == ShardSet.open(digits).classes
    assert meta["torchvision"] is None  # resnet_tiny is ccl's own network: ccl.model rebuilds it
    loc = sample_locations(ShardSet.open(digits), "test")
    x = torch.stack([P.decode(loc.read(i), tuple(meta["input"]["size"]), False) for i in range(16)])
    mean, std = (torch.tensor(meta["input"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        probs = torch.softmax(sum(net((x.float() / 255 - mean) / std)[0] for net in nets), dim=1)
    assert cli("predict", digits, "--checkpoint", run_dir / "checkpoints" / "last.pt", "--out", "p.csv",
               "--device", "cpu", "--quiet").exit_code == 0
    rows = read_csv(tmp_path / "p.csv")[:16]
    assert probs.argmax(1).tolist() == [int(row["pred"]) for row in rows]
    assert probs.max(1).values.tolist() == pytest.approx([float(row["prob"]) for row in rows], abs=1e-4)
    # One net alone.
    assert cli("export", run_dir, "--out", "one.safetensors", "--net", "1").exit_code == 0
    from safetensors.torch import load_file

    assert {k.split(".", 1)[0] for k in load_file("one.safetensors")} == {"net1"}


@pytest.mark.parametrize("args, message", [
    (["--net", "2"], "--net 2: the run has 2 nets"),
    (["--top-k", "0"], "--top-k must be at least 1"),
])
def test_bad_predict_options_are_one_line(run_dir, digits, tmp_path, args, message):
    r = cli("predict", digits, "--checkpoint", run_dir / "checkpoints" / "last.pt", "--out", tmp_path / "x.csv",
            "--quiet", *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_export_needs_a_safetensors_name(run_dir, tmp_path):
    r = cli("export", run_dir, "--out", tmp_path / "model.pt")
    assert r.exit_code == 2 and "expected a .safetensors file name" in r.output


@pytest.fixture(scope="module")
def resnet18_run(tmp_path_factory):
    """Two torchvision ResNet-18s with the CIFAR stem, one step on 16 random 16x16 images (12 to train on): trained
    BatchNorm statistics and weights to export, in seconds."""
    from PIL import Image

    from ccl.pipeline.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("r18")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "raw" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "raw" / c / f"{i}.png")
    convert("folder", root / "raw", root / "set", ConvertOptions(workers=1, progress=False, test_fraction=0.25),
            log=lambda s: None)
    cfg = TrainConfig(data=str(root / "set"), method="ccl", arch="resnet18", epochs=1, warmup=1, batch_size=12,
                      workers=0, out=str(root / "runs"), name="r18", seed=0, amp=False)
    return Path(train(cfg, progress=False)["run_dir"])


def test_the_readme_torchvision_snippet_rebuilds_resnet18_with_ccls_logits(resnet18_run, tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    from ccl.train.restore import restore

    scope = _export_and_run_snippet(P.TORCHVISION_SNIPPET, resnet18_run, tmp_path, monkeypatch)  # no ccl.model
    nets, tv = scope["nets"], scope["meta"]["torchvision"]
    assert tv["model"] == "resnet18" and tv["cifar_stem"] and len(nets) == 2
    assert all(type(net) is torchvision_resnet() and not net.training for net in nets)
    run, _ = restore(resnet18_run / "checkpoints" / "last.pt", device="cpu")
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for net, ours in zip(nets, run.method.nets):
            assert not ours.training and ours.backbone.bn1.num_batches_tracked > 0  # eval mode, trained statistics
            torch.testing.assert_close(net(x), ours(x)[0], rtol=0, atol=1e-5)


def torchvision_resnet():
    import torchvision

    return torchvision.models.ResNet
