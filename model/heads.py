"""TCL's network: the project's backbones with the classifier and projector heads of Hzzone/TCL.

TCL's code builds both heads as two-layer MLPs with BatchNorm (models/tcl/tcl_wrapper.py l.22-39):

    projector:  Linear(d, d) - BN(d) - ReLU - Linear(d, 256) - BN(256)                 then L2-normalised (l.172)
    classifier: Linear(d, d) - BN(d) - ReLU - Dropout(0.25) - Linear(d, C) - BN(C)

with d the encoder's width (512 for its PreAct ResNet-18) and 256 the configs' `feat_dim`. `Net` (ccl.model.resnet)
keeps its own heads for CCL, RoLR and CE; `TCLNet` has the same interface, ``forward(x) -> (logits, z)``, and the
same attribute names (`backbone`, `classifier`, `head` for the projector), so the loop, checkpoints and analysis
treat both alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ccl.model.resnet import _backbone


def tcl_projector(dim: int, out_dim: int = 256) -> nn.Sequential:
    """TCL's projector (tcl_wrapper.py l.22-29): [N, dim] -> [N, out_dim], before the L2 normalisation."""
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim),
                         nn.BatchNorm1d(out_dim))


def tcl_classifier(dim: int, num_classes: int, dropout: float = 0.25) -> nn.Sequential:
    """TCL's classifier (tcl_wrapper.py l.31-39): [N, dim] -> logits [N, C]; the last BatchNorm normalises the
    logits themselves."""
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Dropout(p=dropout),
                         nn.Linear(dim, num_classes), nn.BatchNorm1d(num_classes))


class TCLNet(nn.Module):
    """Backbone + TCL's classifier and projector; ``forward(x) -> (logits [N, C], z [N, proj_dim])``, z with unit
    rows in float32 (the contrastive and cluster terms need the range under autocast)."""

    def __init__(self, arch: str, num_classes: int, small_input: bool = True, proj_dim: int = 256,
                 dropout: float = 0.25):
        super().__init__()
        self.backbone, dim = _backbone(arch, small_input)
        self.classifier = tcl_classifier(dim, num_classes, dropout)
        self.head = tcl_projector(dim, proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.backbone(x)  # [N, d]
        z = F.normalize(self.head(feat).float(), dim=1)  # [N, proj_dim]
        return self.classifier(feat), z


def build_tcl_nets(arch: str, num_classes: int, count: int, small_input: bool, seed: int, *, proj_dim: int = 256,
                   dropout: float = 0.25) -> nn.ModuleList:
    """``count`` TCL networks, each from its own seed as `ccl.model.build_nets` seeds them (reproducible runs)."""
    nets = []
    for k in range(count):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)
            nets.append(TCLNet(arch, num_classes, small_input, proj_dim, dropout))
    return nn.ModuleList(nets)
