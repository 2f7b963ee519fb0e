"""On-device augmentation: shapes, ranges, per-sample randomness, determinism, op semantics against PIL and
torchvision, the draws against RoLR's and TCL's specs, mixup."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from ccl.pipeline.augment import (
    CUTOUT_FILL,
    GEOMETRIC_OPS,
    OP_FNS,
    OP_INDEX,
    OPS,
    RA_RANGES,
    TCL_JITTER_STRENGTH,
    TCL_P,
    Augment,
    ContrastiveParams,
    StrongParams,
    WeakParams,
    _cutout_box,
    _hue,
    apply_mixup,
    draw_mixup,
    mixup,
)

MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n, h=32, w=32, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=gen(seed))  # [N, 3, H, W]


def denorm(x):
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def strong_params(ops, value, n, size, cutout=None, offset=0, flip=False):
    """Hand-made strong-view parameters for op-level tests: no crop (unless offset/flip say so), no cutout."""
    return StrongParams(
        weak=WeakParams(flip=torch.full((n,), flip), offset=torch.full((n, 2), offset)),
        ops=ops, value=value,
        cutout=torch.zeros(n, 4, dtype=torch.long) if cutout is None else cutout,
    )


def _pil(x01_chw):
    return Image.fromarray((x01_chw.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _from_pil(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


# -- shapes, dtypes, ranges -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style,hw,size", [("cifar", (32, 32), 32), ("imagenet", (40, 56), 24)])
def test_views_shapes_dtypes_ranges(style, hw, size):
    aug = Augment(MEAN, STD, size, style=style)
    x = images(16, *hw)
    weak, strong = aug.views(x, n_strong=2, generator=gen())
    assert len(strong) == 2
    for v in [weak, *strong, aug.weak(x), aug.strong(x), aug.eval_view(x)]:
        assert v.shape == (16, 3, size, size) and v.dtype == torch.float32
        assert torch.isfinite(v).all()
        px = denorm(v)
        assert px.min() >= -1e-5 and px.max() <= 1 + 1e-5


def test_non_square_input_works_for_both_styles():
    x = images(4, 24, 40)
    for style in ("cifar", "imagenet"):
        aug = Augment(MEAN, STD, 32, style=style)
        weak, (strong,) = aug.views(x, generator=gen())
        assert weak.shape == strong.shape == aug.eval_view(x).shape == (4, 3, 32, 32)


def test_views_stay_float32_under_autocast():
    aug = Augment(MEAN, STD, 32)
    x = images(8)
    ref = aug.strong(x, generator=gen(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug.strong(x, generator=gen(4))
        ev = aug.eval_view(x)
    assert out.dtype == ev.dtype == torch.float32
    assert torch.equal(out, ref)


def test_float_input_equals_uint8_input():
    aug = Augment(MEAN, STD, 32)
    x = images(8)
    a = aug.strong(x, generator=gen(3))
    b = aug.strong(x.float() / 255, generator=gen(3))
    torch.testing.assert_close(a, b)


# -- weak view ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_mode,torch_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_cifar_crop_and_flip_match_pad_slice_reference(pad_mode, torch_mode):
    aug = Augment(MEAN, STD, 32, pad=4, pad_mode=pad_mode)
    x01 = images(32).float() / 255
    p = aug.sample_weak(32, (32, 32), generator=gen(1))
    out = aug.apply_weak(x01, p)
    padded = F.pad(x01, (4, 4, 4, 4), mode=torch_mode)
    for i in range(32):  # per-sample reference, the way a PIL pipeline does it
        dy, dx = p.offset[i].tolist()
        ref = padded[i, :, dy:dy + 32, dx:dx + 32]
        if p.flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_weak_is_random_per_sample():
    n = 64
    x = images(1).expand(n, 3, 32, 32)  # identical images
    aug = Augment(MEAN, STD, 32)
    p = aug.sample_weak(n, (32, 32), generator=gen())
    assert 0 < int(p.flip.sum()) < n
    assert len({tuple(o) for o in p.offset.tolist()}) > n // 4
    assert p.offset.min() >= 0 and p.offset.max() <= 8
    w = aug.weak(x, generator=gen())
    assert len({v.numpy().tobytes() for v in w}) > n // 2


def test_imagenet_crop_boxes_are_valid_and_per_sample():
    aug = Augment(MEAN, STD, 16, style="imagenet")
    p = aug.sample_weak(256, (30, 50), generator=gen())
    y0, x0, h, w = p.box.unbind(1)
    assert (y0 >= 0).all() and (x0 >= 0).all()
    assert (y0 + h <= 30 + 1e-4).all() and (x0 + w <= 50 + 1e-4).all()
    area = h * w / (30 * 50)
    assert area.min() >= 0.08 - 1e-4 and area.max() <= 1 + 1e-4
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert len(set(p.box[:, 2].tolist())) > 200


def test_imagenet_full_box_is_identity_and_flip_mirrors():
    aug = Augment(MEAN, STD, 20, style="imagenet")
    x01 = images(2, 20, 20).float() / 255
    box = torch.tensor([[0.0, 0.0, 20.0, 20.0]] * 2)
    out = aug.apply_weak(x01, WeakParams(flip=torch.tensor([False, True]), box=box))
    torch.testing.assert_close(out[0], x01[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x01[1].flip(-1), atol=1e-5, rtol=0)


# -- strong view: RoLR's RandAugment ---------------------------------------------------------------------------------


def test_randaugment_draws_cover_each_ops_full_range():
    """3 ops per sample, with replacement, uniform over the 14; each value uniform over its op's whole range."""
    n = 40_000
    aug = Augment(MEAN, STD, 32)
    p = aug.sample_strong(n, (32, 32), generator=gen())
    assert p.ops.shape == p.value.shape == (n, 3)
    freq = torch.bincount(p.ops.flatten(), minlength=len(OPS)).double() / p.ops.numel()
    assert (freq - 1 / len(OPS)).abs().max() < 0.005  # 5 binomial standard errors is 0.004
    # With replacement: P(some op twice among 3) = 1 - 14 * 13 * 12 / 14^3 = 0.204.
    repeated = (p.ops[:, 0] == p.ops[:, 1]) | (p.ops[:, 0] == p.ops[:, 2]) | (p.ops[:, 1] == p.ops[:, 2])
    assert abs(repeated.double().mean().item() - (1 - 14 * 13 * 12 / 14**3)) < 0.01
    for name in OPS:
        v = p.value[p.ops == OP_INDEX[name]].double()
        lo, hi = RA_RANGES[name]
        if name == "posterize":  # int(U[4, 8)): 4, 5, 6, 7 bits, each a quarter of the time
            share = torch.bincount(v.long(), minlength=9)[4:8].double() / v.numel()
            assert set(v.unique().tolist()) == {4.0, 5.0, 6.0, 7.0} and (share - 0.25).abs().max() < 0.02
            continue
        span = hi - lo
        assert v.min() >= lo and v.max() < hi, name
        assert v.min() < lo + 0.002 * span and v.max() > hi - 0.002 * span, name  # reaches both ends
        assert abs(v.mean().item() - (lo + hi) / 2) < 0.02 * span, name  # uniform: mean mid-range
        assert abs(v.std().item() - span / 12**0.5) < 0.02 * span, name


@pytest.mark.parametrize("op,values,pil_fn", [
    ("rotate", [-30.0, -17.3, 0.7, 12.9, 30.0], lambda im, v: im.rotate(v)),
    ("shear_x", [-0.3, -0.11, 0.173, 0.3], lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0))),
    ("shear_y", [-0.3, 0.07, 0.29], lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0))),
    ("translate_x", [-0.3, -0.123, 0.05, 0.2999],
     lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0))),
    ("translate_y", [-0.29, 0.157, 0.3],
     lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1]))),
    ("solarize", [0.0, 12.5, 128.0, 200.3, 255.9], lambda im, v: ImageOps.solarize(im, v)),
    ("posterize", [4.0, 5.0, 6.0, 7.0], lambda im, v: ImageOps.posterize(im, int(v))),
    ("equalize", [0.5], lambda im, v: ImageOps.equalize(im)),
    ("identity", [0.5], lambda im, v: im),
])
def test_exact_ops_match_pil(op, values, pil_fn):
    """The geometric ops (nearest, black fill, PIL's 16.16 fixed point), solarize, posterize and equalize give
    PIL's pixels exactly, at RoLR's calls (`randaugment.py`), on square and non-square images."""
    for h, w in ((24, 24), (20, 28)):
        x = images(4, h, w, seed=7)
        x[1] = x[1] // 2 + 40  # a low-contrast image, so equalize has work to do
        x01 = x.float() / 255
        for v in values:
            out = OP_FNS[op](x01, torch.full((4,), v))
            ref = torch.stack([_from_pil(pil_fn(_pil(im), v)) for im in x01])
            assert (out - ref).abs().max() * 255 < 1e-3, (op, v, h, w)


@pytest.mark.parametrize("op,values,pil_fn", [
    ("brightness", [0.05, 0.5, 0.95], lambda im, v: ImageEnhance.Brightness(im).enhance(v)),
    ("color", [0.05, 0.4, 0.95], lambda im, v: ImageEnhance.Color(im).enhance(v)),
    ("contrast", [0.05, 0.6, 0.95], lambda im, v: ImageEnhance.Contrast(im).enhance(v)),
    ("sharpness", [0.05, 0.5, 0.95], lambda im, v: ImageEnhance.Sharpness(im).enhance(v)),
    ("autocontrast", [0.5], lambda im, v: ImageOps.autocontrast(im)),
])
def test_enhance_ops_match_pil_within_its_truncation(op, values, pil_fn):
    """ImageEnhance blends and autocontrast's table truncate to 8 bits (`(UINT8) value`); ours keep the fraction:
    0 <= ours - PIL < 1 level. Their degenerate images (grey, smoothed) are PIL's, rounded as PIL rounds."""
    x = images(4, 24, 24, seed=7)
    x[1] = x[1] // 2 + 40
    x01 = x.float() / 255
    for v in values:
        out = OP_FNS[op](x01, torch.full((4,), v))
        ref = torch.stack([_from_pil(pil_fn(_pil(im), v)) for im in x01])
        diff = (out - ref) * 255
        assert diff.min() > -1e-3 and diff.max() < 1 + 1e-3, (op, v, diff.min().item(), diff.max().item())


def test_rand_augment_applies_each_samples_own_ops_in_slot_order():
    """The sorted, batched application equals applying each sample's ops, one after the other, to it alone."""
    size, k = 16, 3
    aug = Augment(MEAN, STD, size, ra_ops=k)
    n = 2 * len(OPS)
    g = gen(5)
    ops = torch.cat([torch.arange(len(OPS)).repeat(2)[:, None], torch.randint(0, len(OPS), (n, k - 1), generator=g)], 1)
    lo = torch.tensor([RA_RANGES[o][0] for o in OPS])[ops]
    hi = torch.tensor([RA_RANGES[o][1] for o in OPS])[ops]
    value = lo + (hi - lo) * torch.rand(n, k, generator=g)
    value = torch.where(ops == OP_INDEX["posterize"], value.floor(), value)
    x01 = images(n, size, size, seed=2).float() / 255
    out = aug.rand_augment(x01, strong_params(ops, value, n, size))
    for i in range(n):
        ref = x01[i:i + 1]
        for slot in range(k):
            ref = OP_FNS[OPS[int(ops[i, slot])]](ref, value[i:i + 1, slot])
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-6, rtol=0)
    assert not torch.equal(out, x01)


def test_strong_views_differ_across_identical_images():
    n = 32
    x = images(1).expand(n, 3, 32, 32)
    s = Augment(MEAN, STD, 32).strong(x, generator=gen())
    assert len({v.numpy().tobytes() for v in s}) == n


def test_rand_augment_does_not_modify_its_input():
    aug = Augment(MEAN, STD, 32)
    x01 = images(16).float() / 255
    before = x01.clone()
    aug.rand_augment(x01, aug.sample_strong(16, (32, 32), generator=gen()))
    assert torch.equal(x01, before)


@pytest.mark.parametrize("value", [0, 255])
@pytest.mark.parametrize("op", OPS)
def test_each_op_keeps_white_and_black_in_range(op, value):
    n, size = 3, 16
    aug = Augment(MEAN, STD, size, ra_ops=1)
    x01 = torch.full((n, 3, size, size), value / 255.0)
    lo, hi = RA_RANGES[op]
    ops = torch.full((n, 1), OP_INDEX[op])
    vals = torch.tensor([[lo], [(lo + hi) / 2], [hi - 1e-3]])
    out = aug.rand_augment(x01, strong_params(ops, vals.floor() if op == "posterize" else vals, n, size))
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_neutral_values_are_identity_for_every_op():
    """Factor 1, 8 bits, threshold 256 and no motion change nothing (values outside RoLR's draws: the op maths)."""
    size = 16
    neutral = {"brightness": 1.0, "color": 1.0, "contrast": 1.0, "sharpness": 1.0, "posterize": 8.0,
               "rotate": 0.0, "shear_x": 0.0, "shear_y": 0.0, "translate_x": 0.0, "translate_y": 0.0,
               "solarize": 256.0, "identity": 0.5}
    names = list(neutral)
    n = len(names)
    ops = torch.tensor([[OP_INDEX[o], OP_INDEX[o]] for o in names])
    value = torch.tensor([[neutral[o]] * 2 for o in names])
    x01 = images(n, size, size).float() / 255
    out = Augment(MEAN, STD, size, ra_ops=2).rand_augment(x01, strong_params(ops, value, n, size))
    torch.testing.assert_close(out, x01, atol=1e-5, rtol=0)


def test_geometric_ops_fill_uncovered_pixels_with_black():
    size = 16
    aug = Augment(MEAN, STD, size, ra_ops=1)
    names = list(GEOMETRIC_OPS)
    n = len(names)
    ops = torch.tensor([[OP_INDEX[o]] for o in names])
    value = torch.tensor([[RA_RANGES[o][1] - 1e-3] for o in names])
    x01 = torch.ones(n, 3, size, size)  # white: any pixel brought in from outside the image shows as black
    out = aug.rand_augment(x01, strong_params(ops, value, n, size))
    for i, name in enumerate(names):
        black = (out[i] == 0).all(dim=0)
        assert black.any() and ((out[i] == 0) | (out[i] == 1)).all(), name


# -- cutout ------------------------------------------------------------------------------------------------------------


def test_cutout_box_is_rolrs_pil_rectangle():
    """RoLR's CutoutAbs arithmetic and PIL's inclusive rectangle, against `_cutout_box`, over random draws."""
    g = gen(3)
    for h, w in ((32, 32), (24, 40)):
        n = 300
        v = torch.rand(n, generator=g) * 0.5 * w
        cy = h - (h - 1) * torch.rand(n, generator=g)
        cx = w - (w - 1) * torch.rand(n, generator=g)
        box = _cutout_box(v, cy, cx, h, w)
        for i in range(n):
            vi, cyi, cxi = float(v[i]), float(cy[i]), float(cx[i])
            x0, y0 = int(max(0, cxi - vi / 2.0)), int(max(0, cyi - vi / 2.0))
            im = Image.new("RGB", (w, h))
            ImageDraw.Draw(im).rectangle((x0, y0, min(w, x0 + vi), min(h, y0 + vi)), CUTOUT_FILL)
            ref = torch.from_numpy(np.array(im)[..., 0] > 0)
            y0b, y1b, x0b, x1b = box[i].tolist()
            ours = torch.zeros(h, w, dtype=torch.bool)
            ours[y0b:y1b, x0b:x1b] = True
            assert torch.equal(ours, ref), (vi, cyi, cxi)


def test_cutout_draws_follow_rolr():
    """Box sizes and places against RoLR's own arithmetic run with numpy (`randaugment.py` Cutout, CutoutAbs),
    including its np.random.uniform(w) centre, which lies in (1, w]."""
    n, size = 20_000, 32
    p = Augment(MEAN, STD, size).sample_strong(n, (size, size), generator=gen())
    y0, y1, x0, x1 = p.cutout.unbind(1)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y1 <= size).all() and (x1 <= size).all()
    rng = np.random.RandomState(0)
    ref = []
    for _ in range(n):
        v = rng.random_sample() * 0.5 * size
        cx, cy = rng.uniform(size), rng.uniform(size)
        rx0, ry0 = int(max(0, cx - v / 2.0)), int(max(0, cy - v / 2.0))
        rx1, ry1 = min(size - 1, int(min(size, rx0 + v))), min(size - 1, int(min(size, ry0 + v)))
        ref.append((ry0, ry1 + 1, rx0, rx1 + 1))
    ref = torch.tensor(ref)
    for ours, theirs in ((y1 - y0, ref[:, 1] - ref[:, 0]), (x1 - x0, ref[:, 3] - ref[:, 2]), (y0, ref[:, 0])):
        a = torch.bincount(ours, minlength=size + 1).double() / n
        b = torch.bincount(theirs, minlength=size + 1).double() / n
        assert (a - b).abs().max() < 0.012  # about 5 standard errors of a share near 1/16
    assert ((y1 - y0) * (x1 - x0)).double().mean().item() == pytest.approx(
        ((ref[:, 1] - ref[:, 0]) * (ref[:, 3] - ref[:, 2])).double().mean().item(), rel=0.03)
    assert (y1 - y0).max() == 16 and (y1 - y0).min() >= 1


def test_cutout_fills_rolrs_colour_before_the_crop():
    """RoLR's order: RandAugment, Cutout (colour (125, 123, 114)), then the zero-padded crop and the flip."""
    n, size, pad = 64, 32, 4
    aug = Augment(MEAN, STD, size, ra_ops=0, pad=pad)
    x = torch.full((n, 3, size, size), 255, dtype=torch.uint8)
    p = aug.sample_strong(n, (size, size), generator=gen())
    out = denorm(aug.apply_strong(x.float() / 255, p))
    fill = torch.tensor(CUTOUT_FILL).view(3, 1, 1) / 255
    for i in range(n):
        ref = torch.ones(3, size, size)
        y0, y1, x0, x1 = p.cutout[i].tolist()
        ref[:, y0:y1, x0:x1] = fill
        dy, dx = p.weak.offset[i].tolist()
        ref = F.pad(ref, (pad,) * 4)[:, dy:dy + size, dx:dx + size]  # torchvision's RandomCrop: black padding
        if p.weak.flip[i]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    assert (p.cutout[:, 1] > p.cutout[:, 0]).all()


def test_cutout_zero_disables_it():
    aug = Augment(MEAN, STD, 32, ra_ops=0, cutout=0.0, pad=0)
    x = torch.full((16, 3, 32, 32), 255, dtype=torch.uint8)
    assert (aug.strong(x, generator=gen()) > 0).all()


# -- determinism -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["cifar", "imagenet"])
def test_fixed_seed_gives_identical_views(style):
    aug = Augment(MEAN, STD, 24, style=style)
    x = images(16, 28, 36)
    w1, s1 = aug.views(x, n_strong=2, generator=gen(11))
    w2, s2 = aug.views(x, n_strong=2, generator=gen(11))
    w3, s3 = aug.views(x, n_strong=2, generator=gen(12))
    assert torch.equal(w1, w2) and all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert not torch.equal(w1, w3) and not torch.equal(s1[0], s3[0])
    assert not torch.equal(s1[0], s1[1])  # the two strong views have their own draws
    torch.testing.assert_close(aug.weak(x, generator=gen(11)), w1)  # views starts with the weak draw


def test_global_rng_is_used_without_a_generator():
    aug = Augment(MEAN, STD, 32)
    x = images(8)
    torch.manual_seed(3)
    a = aug.strong(x)
    torch.manual_seed(3)
    b = aug.strong(x)
    assert torch.equal(a, b)


# -- eval --------------------------------------------------------------------------------------------------------------


def test_eval_is_deterministic_and_only_normalises_at_the_right_size():
    aug = Augment(MEAN, STD, 32)
    x = images(4)
    assert torch.equal(aug.eval_view(x), aug.eval_view(x))
    torch.testing.assert_close(aug.eval_view(x), aug.normalize(x.float() / 255))
    assert aug.eval_view(images(4, 40, 40)).shape == (4, 3, 32, 32)


def test_imagenet_eval_resizes_short_side_and_center_crops():
    aug = Augment(MEAN, STD, 28, style="imagenet")
    x = images(2, 64, 48)  # portrait, not the output size
    out = aug.eval_view(x)
    assert out.shape == (2, 3, 28, 28) and torch.equal(out, aug.eval_view(x))
    # short side 48 -> 32 (28 / 0.875), long side 64 -> 43; center crop 28
    ref = F.interpolate(x.float() / 255, size=(43, 32), mode="bilinear", align_corners=False, antialias=True)
    ref = ref.clamp(0, 1)[..., 7:35, 2:30]
    torch.testing.assert_close(out, aug.normalize(ref))


def test_module_eval_without_a_batch_keeps_nn_module_semantics():
    aug = Augment(MEAN, STD, 32)
    assert aug.eval() is aug and aug.training is False
    parent = torch.nn.Sequential(aug).train()
    assert aug.training
    parent.eval()
    assert not aug.training


# -- TCL's contrastive view -------------------------------------------------------------------------------------------


def test_contrastive_draws_follow_tcl():
    """Hzzone/TCL `models/tcl/tcl.py` train_transform with its CIFAR configs' crop scale 0.2."""
    n = 20_000
    aug = Augment(MEAN, STD, 32)
    p = aug.sample_contrastive(n, (32, 32), generator=gen())
    for name, flags in (("flip", p.flip), ("jitter", p.jitter), ("gray", p.gray), ("solarize", p.solarize)):
        assert abs(flags.double().mean().item() - TCL_P[name]) < 0.015, name
    y0, x0, h, w = p.box.unbind(1)
    area = h * w / 32**2
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 1 + 1e-4 and area.min() < 0.21
    assert (w / h).min() >= 3 / 4 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 32 + 1e-4).all() and (x0 + w <= 32 + 1e-4).all()
    centre = torch.tensor([1.0, 1.0, 1.0, 0.0])
    for j, s in enumerate(TCL_JITTER_STRENGTH):
        f = p.factor[:, j]
        assert f.min() >= centre[j] - s and f.max() <= centre[j] + s
        assert f.min() < centre[j] - 0.99 * s and f.max() > centre[j] + 0.99 * s
        assert abs(f.mean().item() - centre[j]) < 0.02 * s
    # The jitter order is a uniform random permutation per sample (torch.randperm(4) in ColorJitter).
    assert (p.order.sort(dim=1).values == torch.arange(4)).all()
    first = torch.bincount(p.order[:, 0], minlength=4).double() / n
    assert (first - 0.25).abs().max() < 0.015
    assert len({tuple(r) for r in p.order[:200].tolist()}) == 24
    # Larger images: the option's default crop scale, 0.08.
    q = Augment(MEAN, STD, 64, style="imagenet").sample_contrastive(4000, (80, 80), generator=gen())
    area = q.box[:, 2] * q.box[:, 3] / 80**2
    assert area.min() >= 0.08 - 1e-4 and area.min() < 0.1


def test_contrastive_applies_tcls_ops_in_each_samples_order():
    n, size = 24, 16
    aug = Augment(MEAN, STD, size)
    x01 = images(n, size, size, seed=4).float() / 255
    p = aug.sample_contrastive(n, (size, size), generator=gen(2))
    p.jitter[:4] = True
    p.gray[:2], p.solarize[2:4] = False, False
    out = denorm(aug.apply_contrastive(x01, p))
    crop = Augment(MEAN, STD, size, style="imagenet")  # the same resized crop as the imagenet weak view's
    jitter = [OP_FNS["brightness"], OP_FNS["contrast"], OP_FNS["color"], _hue]  # ColorJitter's b, c, s, h
    for i in range(n):
        ref = crop.apply_weak(x01[i:i + 1], WeakParams(flip=p.flip[i:i + 1], box=p.box[i:i + 1]))
        if p.jitter[i]:
            for j in p.order[i].tolist():
                ref = jitter[j](ref, p.factor[i:i + 1, j])
        if p.gray[i]:
            g = (19595 * ref[:, 0:1] + 38470 * ref[:, 1:2] + 7471 * ref[:, 2:3]) / 65536
            ref = g.expand_as(ref)
        if p.solarize[i]:
            ref = torch.where((ref * 255 + 0.5).floor() < 128, ref, 1 - ref)
        torch.testing.assert_close(out[i:i + 1], ref, atol=2e-5, rtol=0)
    # The order matters: the same factors in another order give another image.
    p2 = ContrastiveParams(**{**p.__dict__, "order": p.order.flip(1)})
    assert not torch.allclose(aug.apply_contrastive(x01, p2)[:4], aug.apply_contrastive(x01, p)[:4])


def test_hue_matches_torchvision():
    tf = pytest.importorskip("torchvision.transforms.functional")
    x = images(16, 12, 12, seed=1).float() / 255
    x[0] = 0.5  # grey: no hue to shift
    v = torch.linspace(-0.1, 0.1, 16)
    ref = torch.stack([tf.adjust_hue(x[i], float(v[i])) for i in range(16)])
    torch.testing.assert_close(_hue(x, v), ref, atol=1e-5, rtol=0)


def test_contrastive_is_per_sample_and_seeded():
    aug = Augment(MEAN, STD, 32)
    x = images(1).expand(32, 3, 32, 32)
    a = aug.contrastive(x, generator=gen(1))
    assert len({v.numpy().tobytes() for v in a}) == 32
    assert torch.equal(a, aug.contrastive(x, generator=gen(1)))
    assert not torch.equal(a, aug.contrastive(x, generator=gen(2)))
    assert a.dtype == torch.float32 and a.shape == (32, 3, 32, 32)


# -- mixup -------------------------------------------------------------------------------------------------------------


def test_mixup():
    n, c = 32, 5
    x = torch.randn(n, 3, 8, 8, generator=gen())
    y = torch.softmax(torch.randn(n, c, generator=gen(1)), dim=1)
    for seed in range(20):
        x_mix, y_mix, lam, perm = mixup(x, y, alpha=4.0, generator=gen(seed))
        assert 0.5 <= lam <= 1.0
        assert sorted(perm.tolist()) == list(range(n))
        torch.testing.assert_close(x_mix, lam * x + (1 - lam) * x[perm])
        torch.testing.assert_close(y_mix, lam * y + (1 - lam) * y[perm])
        torch.testing.assert_close(y_mix.sum(1), torch.ones(n))
    a = mixup(x, y, 1.0, generator=gen(9))
    b = mixup(x, y, 1.0, generator=gen(9))
    assert a[2] == b[2] and torch.equal(a[3], b[3]) and torch.equal(a[0], b[0])
    lams = {mixup(x, y, 1.0, generator=gen(s))[2] for s in range(10)}
    assert len(lams) == 10


def test_draw_mixup_takes_lam_from_the_host_and_perm_from_the_generator():
    lam, perm = draw_mixup(16, 1.0, generator=gen(4), host=random.Random(7))
    b = random.Random(7).betavariate(1.0, 1.0)
    assert lam == max(b, 1 - b)
    # The generator gives only the permutation: no draw is spent on seeding lam.
    assert torch.equal(perm, torch.randperm(16, generator=gen(4)))
    lams = [draw_mixup(4, 2.0, host=random.Random(s))[0] for s in range(200)]
    assert min(lams) >= 0.5 and max(lams) <= 1.0 and len(set(lams)) == 200
    # Without a host Random, lam still follows the generator's seed.
    assert draw_mixup(8, 1.0, generator=gen(3)) [0] == draw_mixup(8, 1.0, generator=gen(3))[0]
    host = random.Random(0)
    assert draw_mixup(8, 1.0, host=host)[0] != draw_mixup(8, 1.0, host=host)[0]  # the host stream advances


def test_apply_mixup_mixes_images_and_targets_alike():
    x = torch.randn(6, 3, 4, 4, generator=gen())
    y = torch.eye(6)[:, :4]
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    torch.testing.assert_close(apply_mixup(x, 0.7, perm), 0.7 * x + 0.3 * x.flip(0))
    torch.testing.assert_close(apply_mixup(y, 0.7, perm), 0.7 * y + 0.3 * y.flip(0))
    with pytest.raises(ValueError):
        apply_mixup(torch.zeros(6, dtype=torch.long), 0.7, perm)
    with pytest.raises(ValueError):
        apply_mixup(x, 0.7, perm[:5])


def test_mixup_rejects_bad_input():
    x, y = torch.zeros(4, 3), torch.zeros(4, 2)
    with pytest.raises(ValueError):
        mixup(x, y, 0.0)
    with pytest.raises(ValueError):
        draw_mixup(4, -1.0)
    with pytest.raises(ValueError):
        mixup(x, torch.zeros(4, dtype=torch.long), 1.0)
    with pytest.raises(ValueError):
        mixup(x, torch.zeros(4, 2, dtype=torch.long), 1.0)


# -- configuration ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(style="autoaugment"), dict(pad_mode="edge"), dict(cutout=1.5), dict(contrastive_scale=(0.0, 1.0)),
    dict(ra_ops=-1), dict(pad=32), dict(size=0), dict(std=(0.2, 0.0, 0.2)), dict(mean=(0.5, 0.5)),
])
def test_bad_options_are_errors(kwargs):
    # ValueError, not UserError: the config that builds an Augment is checked before (TrainConfig), so a bad value
    # here is a bug of ours and keeps its traceback
    args = dict(mean=MEAN, std=STD, size=32) | kwargs
    with pytest.raises(ValueError):
        Augment(**args)


def test_bad_batches_are_errors():
    aug = Augment(MEAN, STD, 32)
    with pytest.raises(ValueError):
        aug.weak(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError):
        aug.weak(torch.zeros(2, 3, 32, 32, dtype=torch.int32))


def test_ra_ops_zero_and_empty_batch():
    aug = Augment(MEAN, STD, 32, ra_ops=0, cutout=0.0)
    x = images(4)
    torch.testing.assert_close(aug.apply_strong(x.float() / 255, aug.sample_strong(4, (32, 32), gen())),
                               aug.weak(x, generator=gen()))
    w, (s,) = Augment(MEAN, STD, 32).views(images(0), generator=gen())
    assert w.shape == s.shape == (0, 3, 32, 32)
    assert Augment(MEAN, STD, 32).contrastive(images(0), generator=gen()).shape == (0, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_views_with_cuda_and_cpu_generators():
    aug = Augment(MEAN, STD, 32).cuda()
    x = images(16).cuda()
    for g in (torch.Generator(device="cuda").manual_seed(0), gen()):
        w, (s,) = aug.views(x, generator=g)
        c = aug.contrastive(x, generator=g)
        assert w.is_cuda and s.is_cuda and c.is_cuda and s.shape == c.shape == (16, 3, 32, 32)
    lam, perm = draw_mixup(16, 1.0, generator=torch.Generator(device="cuda"), host=random.Random(0), device="cuda")
    assert perm.is_cuda and 0.5 <= lam <= 1
    # The device ops match the CPU ops sample for sample.
    g_cpu = gen(5)
    p = aug.sample_strong(16, (32, 32), generator=g_cpu, device="cpu")
    torch.testing.assert_close(aug.apply_strong(x.float() / 255, p).cpu(),
                               Augment(MEAN, STD, 32).apply_strong(x.cpu().float() / 255, p), atol=1e-4, rtol=0)
