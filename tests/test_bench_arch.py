"""`ccl bench arch`: the parameter counts it prints are the networks' own, and every arch gets a timed row."""

from ccl.bench.arch import bench_arch, parameter_count
from ccl.model import build_nets


def test_parameter_count_is_the_networks_own_and_excludes_the_head_once():
    (net,) = build_nets("resnet_tiny", 10, 1, True, seed=0)
    counts = parameter_count("resnet_tiny")
    assert counts["total"] == sum(p.numel() for p in net.parameters())
    head = sum(p.numel() for p in net.head.parameters())
    assert counts["classifier"] == counts["total"] - head > 0


def test_bench_arch_times_every_arch_side_by_side(tmp_path):
    rows = bench_arch(("resnet_tiny", "resnet_small"), batch_size=4, rounds=1, json_path=tmp_path / "a.json")
    assert [r["arch"] for r in rows] == ["resnet_tiny", "resnet_small"]
    assert rows[0]["ratio"] == 1.0 and all(r["step_ms"] > 0 for r in rows)
    assert (tmp_path / "a.json").read_text().count('"arch"') == 2
