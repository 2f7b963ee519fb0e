"""What a run ran on: the `environment` record of config.json.

The config, git SHA and command line do not reproduce a run alone: under torchrun the command does not show the
number of processes (so neither the global batch), and speed and numerics depend on the device, the library
versions, the CPU threads and the precision. This record keeps them.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

from ccl.train import dist


def git_sha() -> str | None:
    """The commit of the checkout ccl runs from, or None (an installed copy, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(*names: str, prefix: str | None = None) -> str | None:
    """The installed version of the first distribution named (or of one whose name starts with `prefix`), without
    importing it (importing triton or DALI has side effects); None when none is installed."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if prefix:
        for d in metadata.distributions():
            if (d.metadata["Name"] or "").lower().startswith(prefix):
                return f"{d.metadata['Name']} {d.version}"
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(cfg, device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    """The record for config.json. Call it on every rank's behalf from rank 0: the world size is the process
    group's, the device that of this process (every process runs on one device of the same kind)."""
    world = dist.world()
    cuda = device.type == "cuda"
    return {
        "world_size": world,
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        "batch_size_per_process": cfg.batch_size,
        "global_batch": cfg.batch_size * world,
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "device_count": world if cuda else 1,  # one GPU per process under torchrun
        "devices_visible": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": package_version("triton", "pytorch-triton"),
        "dali": package_version(prefix="nvidia-dali"),
        "kornia": package_version("kornia"),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "intra_op_threads": torch.get_num_threads(),
        "amp": amp_dtype is not None,
        "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else None,
        "compile": bool(cfg.compile),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
