"""Recipes: every shipped recipe loads, cites a source for each value, and runs a tiny step on data of its layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ccl.errors import UserError
from ccl.train import recipes
from ccl.train.config import TrainConfig
from ccl.train.loop import train

# Fabricated data per layout: (classes, image side). The folder's name becomes the manifest's dataset name.
LAYOUTS = {"cifar10": (10, 32), "cifar100": (100, 32), "animal10n": (10, 64), "webvision": (50, 72)}


def _fabricate(root, dataset: str):
    from ccl.pipeline.convert import ConvertOptions, convert

    classes, side = LAYOUTS[dataset]
    src = root / "src" / dataset
    rng = np.random.default_rng(0)
    for c in range(classes):
        (src / f"c{c:03d}").mkdir(parents=True)
        for i in range(3 if classes > 10 else 6):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / f"c{c:03d}" / f"{i}.png")
    out = root / "shards" / dataset
    convert("folder", src, out, ConvertOptions(test_fraction=0.25, workers=1, progress=False), log=lambda s: None)
    return out


def test_every_recipe_loads_and_cites_every_value():
    names = recipes.names()
    assert {"ccl-cifar10", "ccl-cifar100", "ccl-animal10n", "ccl-webvision"} <= set(names)
    assert {"rolr-cifar10", "rolr-cifar100", "dividemix-cifar10", "dividemix-cifar100", "tcl-cifar10", "tcl-cifar100",
            "tcl-cifar100-90", "tcl-webvision"} <= set(names)
    for name in names:
        r = recipes.load(name)
        assert r["description"] and r["dataset"] in (*LAYOUTS, "any")
        assert TrainConfig.from_dict(r["config"]).method in name


def test_tcl_cifar100_sets_the_90_percent_options_only_in_its_90_percent_recipe():
    """Hzzone/TCL sets sep_gmm and scale2 in cifar100_90_prer18.yml alone (l.29-30): tcl-cifar100 keeps the code's
    defaults for them (tcl.py l.48: off; l.52: unset, so the estimated clean fraction), as TCLConfig's own defaults
    are; tcl-cifar100-90 sets them. Every other value is the same."""
    base, ninety = (recipes.load(n)["config"] for n in ("tcl-cifar100", "tcl-cifar100-90"))
    defaults = TrainConfig().tcl
    assert (base["tcl"]["sep_gmm"], base["tcl"]["scale2"]) == (defaults.sep_gmm, defaults.scale2) == (False, None)
    assert (ninety["tcl"]["sep_gmm"], ninety["tcl"]["scale2"]) == (True, 1.0)

    def rest(config):
        return {**config, "tcl": {k: v for k, v in config["tcl"].items() if k not in ("sep_gmm", "scale2")}}

    assert rest(base) == rest(ninety)
    assert recipes.load("tcl-cifar100-90")["dataset"] == recipes.load("tcl-cifar100")["dataset"] == "cifar100"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", recipes.names())
def test_a_recipe_runs_a_tiny_step_on_data_of_its_layout(tmp_path_factory, name):
    r = recipes.load(name)
    layout = r["dataset"] if r["dataset"] != "any" else "cifar10"
    data = _fabricate(tmp_path_factory.mktemp(name), layout)
    out = tmp_path_factory.mktemp("runs")
    # The recipe's own values, shortened to one epoch of a few small batches past warm-up, on a tiny network: the
    # recipe's own network is built below, but training it (twin ResNet-50s at 224 px) costs minutes on a CPU.
    cfg = TrainConfig.from_dict({**r["config"], "recipe": name, "data": str(data), "epochs": 1, "warmup": 0,
                                 "batch_size": 16, "workers": 0, "out": str(out), "name": "run",
                                 "arch": "resnet_tiny"})
    summary = train(cfg, progress=False)
    record = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_loss"] == record["train_loss"] and summary["arch"] == "resnet_tiny"


@pytest.mark.parametrize("arch", sorted({recipes.load(n)["config"]["arch"] for n in recipes.names()}))
def test_every_recipe_network_builds_and_runs_a_batch(arch):
    import torch

    from ccl.model.resnet import build_nets

    layouts = [recipes.load(n)["dataset"] for n in recipes.names() if recipes.load(n)["config"]["arch"] == arch]
    classes, side = LAYOUTS[layouts[0] if layouts[0] != "any" else "cifar10"]
    small = side <= 32
    (net,) = build_nets(arch, classes, 1, small_input=small, seed=0)
    with torch.no_grad():
        logits, z = net.eval()(torch.zeros(2, 3, 32 if small else 64, 32 if small else 64))
    assert logits.shape == (2, classes) and z.shape[0] == 2


def test_recipe_mistakes_are_one_line_errors(tmp_path, digits):
    with pytest.raises(UserError, match="unknown recipe 'ccl-mnist'"):
        recipes.load("ccl-mnist")
    cfg = TrainConfig(recipe="ccl-cifar10", data=str(digits), epochs=1, warmup=0, arch="resnet_tiny", workers=0,
                      out=str(tmp_path), name="run")
    with pytest.raises(UserError, match="recipe ccl-cifar10 is for cifar10 shards, but the data is 'digits'"):
        train(cfg, progress=False)


def test_a_recipe_with_an_unknown_key_is_refused(tmp_path, monkeypatch):
    bad = {"description": "x", "dataset": "any", "config": {"method": "ccl", "ccl": {"tua": 0.3}}, "sources": {}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    monkeypatch.setattr(recipes.resources, "files", lambda _: tmp_path)
    with pytest.raises(UserError, match="unknown config key: ccl.tua"):
        recipes.load("bad")
