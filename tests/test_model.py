"""The networks: the baselines' pre-activation ResNet-18 against the code's shapes and parameter count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ccl.model.resnet import PreActBlock, PreActResNet18, build_nets


def _code_preresnet18_params(num_classes: int) -> int:
    """The parameter count of LiJunnan1992/DivideMix PreResNet.py's ResNet18(num_classes), from its layer shapes:
    a 3x3 conv 3->64 and its BN; per PreActBlock(cin, cout, stride) BN(cin), 3x3 cin->cout, BN(cout), 3x3
    cout->cout and, where the shape changes, a 1x1 cin->cout without BN; then Linear(512, num_classes)."""
    def block(cin, cout, stride):
        return 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + (cin * cout if stride != 1 or cin != cout else 0)

    total, cin = 27 * 64 + 2 * 64, 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        total += block(cin, cout, stride) + block(cout, cout, 1)
        cin = cout
    return total + 512 * num_classes + num_classes


@pytest.mark.parametrize("classes", [10, 100])
def test_preact_resnet18_has_the_codes_parameter_count(classes):
    (net,) = build_nets("preact_resnet18", classes, 1, small_input=True, seed=0)
    body = sum(p.numel() for p in net.backbone.parameters()) + sum(p.numel() for p in net.classifier.parameters())
    assert body == _code_preresnet18_params(classes)
    assert _code_preresnet18_params(10) == 11_171_274  # the figure the docstring quotes


@pytest.mark.parametrize("side", [32, 64])
def test_preact_resnet18_returns_logits_and_a_unit_embedding(side):
    (net,) = build_nets("preact_resnet18", 10, 1, small_input=True, seed=0)
    logits, z = net(torch.randn(3, 3, side, side))
    assert logits.shape == (3, 10) and z.shape == (3, 128)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert net.backbone(torch.randn(2, 3, side, side)).shape == (2, 512)
    # the stages halve the resolution three times: 32 -> 4 before the pool, as the code's avg_pool2d(out, 4) expects
    assert net.backbone.blocks(net.backbone.stem(torch.randn(1, 3, 32, 32))).shape == (1, 512, 4, 4)


def test_the_shortcut_takes_the_activated_input_and_the_sum_is_not_activated():
    """PreResNet.py's PreActBlock: shortcut(relu(bn1(x))), even for the identity; no ReLU after the sum."""
    block = PreActBlock(4, 4, 1).eval()  # fresh BN in eval mode: x / sqrt(1 + eps)
    torch.nn.init.zeros_(block.conv2.weight)  # the residual branch gives 0: the output is the shortcut alone
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(block(x), F.relu(x) / (1 + 1e-5) ** 0.5, atol=1e-6)
    block = PreActBlock(4, 8, 2).eval()
    torch.nn.init.zeros_(block.conv2.weight)
    out = block(x)
    assert out.shape == (2, 8, 3, 3)
    assert torch.allclose(out, block.shortcut(F.relu(x) / (1 + 1e-5) ** 0.5), atol=1e-6)
    torch.nn.init.normal_(block.conv2.weight)
    assert (block(x) < 0).any()  # no activation after the sum


def test_the_last_stage_has_no_bn_or_relu_before_the_pool():
    body = PreActResNet18().eval()
    feat = body(torch.randn(4, 3, 32, 32))
    assert (feat < 0).any()  # pooled straight from the last block's sum
