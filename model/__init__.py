"""ccl.model: networks with a projection head, and the twin."""

from ccl.model.resnet import ARCHS, Net, auto_arch, build_nets, eval_mode, memory_format

__all__ = ["ARCHS", "Net", "auto_arch", "build_nets", "eval_mode", "memory_format"]
