"""Methods: each one file, driven by the one loop in ccl.train.loop through the interface in `base`.

METHODS is the one list of method names: the config's check and `ccl train --method`'s help (the field's
choices in ccl.train.config), the recipes (checked by that config) and tools/gpu_check.py take theirs from it.
"""

from __future__ import annotations

from ccl.errors import UserError
from ccl.train.methods.base import Method, Rng, Step
from ccl.train.methods.ccl import CCL
from ccl.train.methods.ce import CE
from ccl.train.methods.dividemix import DivideMix
from ccl.train.methods.rolr import RoLR
from ccl.train.methods.tcl import TCL

METHODS: dict[str, type[Method]] = {m.name: m for m in (CCL, CE, RoLR, TCL, DivideMix)}


def build_method(cfg, num_classes: int, num_train: int, arch: str, small_input: bool) -> Method:
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; expected one of {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg, num_classes, num_train, arch, small_input)


__all__ = ["METHODS", "Method", "Rng", "Step", "build_method"]
