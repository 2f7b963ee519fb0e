"""`ccl bench arch`: parameter count and training-step time of the networks, side by side in one run.

The step is what training does per batch on one net: forward, cross-entropy, backward and an SGD step, on
random 32 x 32 images (the CIFAR stem) or 224 x 224 ones, in float32 on the chosen device, in the memory layout
training uses there (`ccl.model.memory_format`). The archs' steps are interleaved round by round, so that load
from other processes hits them alike; the median over rounds is reported, with each arch's ratio to the first.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ccl import files
from ccl.errors import UserError
from ccl.model import ARCHS, build_nets, memory_format


def parameter_count(arch: str, num_classes: int = 10, small_input: bool = True) -> dict[str, int]:
    """Parameters of the classifier network (backbone + classifier) and of the whole net with its projection
    head, as ccl builds it."""
    (net,) = build_nets(arch, num_classes, 1, small_input, seed=0)
    return count_parameters(net)


def count_parameters(net: torch.nn.Module) -> dict[str, int]:
    """`parameter_count` of a network already built."""
    total = sum(p.numel() for p in net.parameters())
    head = sum(p.numel() for n, p in net.named_parameters() if n.startswith("head."))
    return {"classifier": total - head, "total": total}


def bench_arch(archs=("resnet18", "preact_resnet18"), *, batch_size: int = 64, rounds: int = 5, size: int = 32,
               num_classes: int = 10, device: str = "cpu", json_path: Path | None = None, console=None) -> list[dict]:
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise UserError(f"unknown arch {unknown[0]!r}: expected one of {', '.join(ARCHS)}")
    if batch_size < 2 or rounds < 1:
        raise UserError(f"--batch-size must be at least 2 and --rounds at least 1, got {batch_size} and {rounds}")
    from ccl.train.loop import resolve_device

    dev = resolve_device(device)
    layout = memory_format(dev)  # as training lays out its nets and images on the device
    small = size <= 64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, size, size, generator=gen).to(dev, memory_format=layout)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)
    nets = {a: build_nets(a, num_classes, 1, small, seed=0)[0].to(dev, memory_format=layout).train() for a in archs}
    counts = {a: count_parameters(n) for a, n in nets.items()}
    opts = {a: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for a, n in nets.items()}

    def step(a: str) -> float:
        t = time.perf_counter()
        logits = nets[a](x)[0]
        loss = F.cross_entropy(logits.float(), y)
        opts[a].zero_grad(set_to_none=True)
        loss.backward()
        opts[a].step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t

    for a in archs:  # one warm-up step each
        step(a)
    times = {a: [] for a in archs}
    for _ in range(rounds):
        for a in archs:
            times[a].append(step(a))
    rows = []
    for a in archs:
        med = statistics.median(times[a])
        rows.append({"arch": a, **{f"params_{k}": v for k, v in counts[a].items()},
                     "step_ms": 1000 * med, "images_per_s": batch_size / med, "batch_size": batch_size,
                     "size": size, "device": str(dev), "threads": torch.get_num_threads()})
    base = rows[0]["step_ms"]
    for r in rows:
        r["ratio"] = r["step_ms"] / base
    if console is not None:
        from rich.table import Table

        t = Table(title=f"one training step, batch {batch_size} at {size} px on {dev} ({torch.get_num_threads()} "
                  f"threads), median of {rounds}")
        for c in ("arch", "params (classifier)", "params (with head)", "step ms", "images/s", f"x {archs[0]}"):
            t.add_column(c, justify="left" if c == "arch" else "right")
        for r in rows:
            t.add_row(r["arch"], f"{r['params_classifier']:,}", f"{r['params_total']:,}", f"{r['step_ms']:.1f}",
                      f"{r['images_per_s']:.0f}", f"{r['ratio']:.2f}")
        console.print(t)
    if json_path is not None:
        files.write_json(Path(json_path), rows, indent=2)
    return rows
