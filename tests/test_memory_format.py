"""Regression test for the CPU heap corruption of channels_last with oneDNN (torch 2.14, AVX-512 x86 CPUs).

Every architecture trains a few steps at an odd batch size with 2 threads, in the memory format the code picks on
CPU, in a child process: an abort (SIGABRT/SIGSEGV from a corrupted heap) fails this test instead of killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ccl.model import ARCHS, memory_format

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from ccl.model import Net, memory_format
    torch.set_num_threads(2)
    torch.manual_seed(0)
    fmt = memory_format("cpu")
    # The minimal repro of the oneDNN bug: a strided 1x1 conv's backward at batch 29.
    conv = torch.nn.Conv2d(8, 16, 1, 2, bias=False).to(memory_format=fmt)
    for _ in range(40):
        conv(torch.randn(29, 8, 32, 32, requires_grad=True)).sum().backward()
    for arch in sys.argv[1:]:
        net = Net(arch, num_classes=7, small_input=True).to("cpu", memory_format=fmt)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for n in (29, 17, 29):  # odd batches, as an epoch's last batch is
            x = torch.randn(n, 3, 32, 32).contiguous(memory_format=fmt)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, z = net(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), torch.randint(0, 7, (n,))) + z.sum() * 0
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert torch.isfinite(loss), arch
        print("ok", arch, flush=True)
    """
)


def test_cpu_never_picks_channels_last_and_cuda_does():
    assert memory_format("cpu") == torch.contiguous_format
    assert memory_format(torch.device("cpu")) == torch.contiguous_format
    assert memory_format("cuda:0") == torch.channels_last


@pytest.mark.timeout(600)
def test_every_arch_trains_at_odd_batches_with_two_threads_in_a_child():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *ARCHS], capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"child died with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert [line.split()[1] for line in proc.stdout.splitlines()] == list(ARCHS)
