"""The baseline: one network, plain cross-entropy on the noisy labels (weak view), every epoch."""

from __future__ import annotations

from ccl.train.methods.base import Method


class CE(Method):
    name = "ce"
    num_nets = 1
    default_warmup = 0

    def warming_up(self, epoch: int) -> bool:
        return True  # CE is the warm-up loss, for the whole run; it never estimates a confidence
