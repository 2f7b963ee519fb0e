"""`ccl views`: the grid of views and the JSON of the strong and contrastive draws, on the built-in digits shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ccl.pipeline.augment import PARAMETERLESS_OPS, RA_RANGES
from ccl.pipeline.views import ROWS, render_views

pytestmark = pytest.mark.timeout(300)


def test_grid_and_draw_ranges(digits, tmp_path):
    res = render_views(digits, tmp_path / "v", n=4, draws=3000, seed=1)
    assert res["grid"] == tmp_path / "v" / "views.png" and res["json"] == tmp_path / "v" / "views.json"
    with Image.open(res["grid"]) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    d = json.loads(res["json"].read_text())
    assert d["rows"] == list(ROWS) and d["images"] == 4 and d["style"] == "cifar" and d["view_size"] == 32
    ops = d["ops"]
    assert sum(o["count"] for o in ops.values()) == 3 * 3000
    for name, o in ops.items():
        if name in PARAMETERLESS_OPS:
            assert o["min"] is None and o["count"] > 0
            continue
        lo, hi = RA_RANGES[name]
        if name == "posterize":
            assert (o["min"], o["max"]) == (4, 7)
            continue
        span = hi - lo
        # Every op reaches both ends of its whole range (about 640 draws each, so the gaps are ~0.2% of it).
        assert lo <= o["min"] < lo + 0.02 * span and hi - 0.02 * span < o["max"] <= hi, (name, o)  # 4 decimals
        assert o["spec"] == [lo, hi]
    assert ops["rotate"]["unit"] == "degrees" and ops["brightness"]["unit"] == "enhance factor"
    assert d["cutout"]["side_fraction_max"] == 0.5 and d["cutout"]["side_fraction_min"] < 0.1
    c = d["contrastive"]
    assert 0.2 <= c["crop_area_min"] < 0.22 and c["crop_area_max"] <= 1
    for key, p in c["p_spec"].items():
        assert abs(c["p"][key] - p) < 0.05, key
    assert 0.5 <= d["mixup"]["lam"] <= 1 and sorted(d["mixup"]["perm"]) == [0, 1, 2, 3]
    # Seeded: the same call writes the same draws.
    again = render_views(digits, tmp_path / "w", n=4, draws=3000, seed=1)["summary"]
    assert again["ops"] == d["ops"] and again["mixup"] == d["mixup"]


def test_pil_draws_the_grid_without_matplotlib(digits, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    res = render_views(digits, tmp_path, n=3, draws=200)
    with Image.open(res["grid"]) as im:
        grid = np.asarray(im.convert("RGB"))
    side, gap, label_w = 32 * 3, 2, 90
    assert grid.shape == (len(ROWS) * (side + gap), label_w + 3 * (side + gap), 3)
    # The tiles are the views themselves: the first original, scaled 3x, sits at the top left of the tiles.
    assert grid[:side, label_w:label_w + side].std() > 10


def test_default_data_is_the_cached_digits_set(digits, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "shards").symlink_to(digits.parent, target_is_directory=True)  # the session's build, not a new one
    monkeypatch.setenv("CCL_CACHE", str(cache))
    res = render_views(None, tmp_path / "out", n=2, draws=100)
    assert Path(res["summary"]["data"]).resolve() == digits.resolve()


def test_command_and_its_errors(digits, tmp_path):
    from ccl.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["views", "--data", str(digits), "--out", str(tmp_path / "o"), "--n", "3",
                             "--draws", "300"])
    assert ok.exit_code == 0, ok.output
    assert f"grid: {tmp_path / 'o' / 'views.png'}" in ok.output and "rotate" in ok.output
    assert (tmp_path / "o" / "views.json").is_file()
    bad = runner.invoke(app, ["views", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2
    assert bad.output.strip().startswith("error: no shard set at") and len(bad.output.strip().splitlines()) == 1
    zero = runner.invoke(app, ["views", "--data", str(digits), "--out", str(tmp_path / "x"), "--n", "0"])
    assert zero.exit_code == 2 and "must be positive" in zero.output
