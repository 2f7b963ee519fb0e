"""Networks: torchvision ResNets (CIFAR stem for small images), the baselines' pre-activation ResNet-18 and a small
ResNet, each with a projection head.

Every network's ``forward`` returns ``(logits, embedding)``: the classifier's logits and the L2-normalised output
of the projection head (DESIGN §5: Linear(d, d) - BN - ReLU - Linear(d, proj_dim)).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from ccl.errors import UserError

ARCHS = ("resnet18", "preact_resnet18", "resnet50", "resnet_small", "resnet_tiny")


def _cifar_stem(net: torchvision.models.ResNet) -> None:
    # Small images (CIFAR, Animal-10N's 64 px, digits) lose too much to the 7x7/2 conv and the max-pool:
    # a 3x3/1 conv and no pooling keep the 32x32 (or 64x64) resolution in the first stage.
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()


class SmallResNet(nn.Module):
    """A narrow CIFAR-style ResNet (one BasicBlock per stage) for tests and the CPU demo."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            blocks.append(BasicBlock(cin, cout, stride, down))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # [N, C, h, w]
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # [N, C]


class PreActBlock(nn.Module):
    """A pre-activation basic block as LiJunnan1992/DivideMix PreResNet.py l.37-60 has it (chenmc1996/Robust-LR's
    PreResNet.py has the same block): BN-ReLU first; the shortcut (identity, or a 1x1 conv without BN when the shape
    changes) takes the activated input, not the raw one; no activation after the sum."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))  # [N, cin, h, w]
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))  # [N, cout, h/stride, w/stride]
        return out + self.shortcut(a)


class PreActResNet18(nn.Module):
    """The network RoLR's, DivideMix's and TCL's code train on CIFAR: `ResNet18` of LiJunnan1992/DivideMix
    PreResNet.py l.162-163 (the class at l.120-159; chenmc1996/Robust-LR's PreResNet.py builds the same network; TCL's configs
    name `bigresnet18_preact`, its `preact_resnet.ResNet18`). A 3x3/1 conv with BN and ReLU, then four stages of two
    `PreActBlock`s (64, 128, 256, 512 channels; stride 2 from the second stage), no BN or ReLU after the last block,
    then the average pool. The code pools 4x4 windows, which is the global pool at 32 px; here the pool is global
    at any size. PyTorch's default initialisation, as the code leaves it. 11,171,274 parameters with its 10-class
    linear layer (tests/test_model.py)."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            for j in range(blocks):
                layers.append(PreActBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # [N, 512, h/8, w/8]
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # [N, 512]


def _backbone(arch: str, small_input: bool) -> tuple[nn.Module, int]:
    if arch == "resnet_small":
        body = SmallResNet((32, 64, 128))
        return body, body.out_dim
    if arch == "resnet_tiny":
        body = SmallResNet((8, 16, 32))
        return body, body.out_dim
    if arch == "preact_resnet18":
        body = PreActResNet18()
        return body, body.out_dim
    if arch in ("resnet18", "resnet50"):
        net = getattr(torchvision.models, arch)(weights=None)
        if small_input:
            _cifar_stem(net)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    raise UserError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")


class Net(nn.Module):
    """Backbone + linear classifier + projection head; ``forward(x) -> (logits [N, C], z [N, proj_dim])``."""

    def __init__(self, arch: str, num_classes: int, small_input: bool = True, proj_dim: int = 128):
        super().__init__()
        self.backbone, dim = _backbone(arch, small_input)
        self.classifier = nn.Linear(dim, num_classes)
        self.head = nn.Sequential(
            nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.backbone(x)  # [N, d]
        z = F.normalize(self.head(feat).float(), dim=1)  # [N, proj_dim], unit rows in fp32 for the contrastive terms
        return self.classifier(feat), z


def memory_format(device: torch.device | str) -> torch.memory_format:
    """The layout of the networks' weights on a device: channels_last on CUDA, contiguous everywhere else.

    On CUDA, channels_last lets cuDNN run NHWC convolutions on the tensor cores under AMP (the layout they want).
    On CPU it is unsafe, not just slower to no gain: torch 2.14's oneDNN backward of a strided 1x1 convolution in
    channels_last corrupts the heap on some AVX-512 x86 CPUs (``double free or corruption`` at batch 29 with 2
    threads; tests/test_memory_format.py runs that case in a subprocess). So CPU keeps the contiguous layout, and
    there is no option to change it.
    """
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def build_nets(arch: str, num_classes: int, count: int, small_input: bool, seed: int) -> nn.ModuleList:
    """``count`` independently initialised networks (the twin for count=2), contiguous; the caller moves them to
    their device in that device's `memory_format`."""
    nets = []
    for k in range(count):
        # Each net from its own seed: the twin must start different, and reproducibly so.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)
            nets.append(Net(arch, num_classes, small_input))
    return nn.ModuleList(nets)


def auto_arch(dataset: str, image_size: list[int] | None) -> str:
    """The paper's choice per dataset: ResNet-18 for CIFAR, ResNet-50 for Animal-10N and WebVision."""
    if dataset == "digits":
        return "resnet_small"
    if dataset.startswith("cifar"):
        return "resnet18"
    if dataset in ("animal10n", "webvision"):
        return "resnet50"
    return "resnet18" if image_size and max(image_size) <= 64 else "resnet50"


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Put modules in eval mode for the block and restore each one's own mode afterwards (BatchNorm then uses and
    keeps its running statistics: a fixed peer, a confidence pass, an evaluation)."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
