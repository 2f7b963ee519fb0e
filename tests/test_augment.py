"""On-device augmentation: shapes, ranges, per-sample randomness, determinism, op semantics against PIL, mixup."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from ccl.errors import UserError
from ccl.pipeline.augment import (
    COLOR_OPS,
    GEOMETRIC_OPS,
    OP_INDEX,
    OPS,
    RA_WARP_MODE,
    Augment,
    StrongParams,
    WeakParams,
    _geometric_theta,
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


def strong_params(ops, level, sign, n, size):
    """Hand-made RandAugment parameters (no crop, no cutout) for op-level tests."""
    return StrongParams(
        weak=WeakParams(flip=torch.zeros(n, dtype=torch.bool), offset=torch.full((n, 2), 0)),
        ops=ops, level=level, sign=sign, cutout=torch.zeros(n, 4, dtype=torch.long),
    )


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


# -- strong view -------------------------------------------------------------------------------------------------------


def test_randaugment_ops_are_drawn_per_sample():
    aug = Augment(MEAN, STD, 32, ra_ops=3, ra_max_magnitude=5)
    p = aug.sample_strong(128, (32, 32), generator=gen())
    assert p.ops.shape == (128, 3) and p.ops.min() >= 0 and p.ops.max() < len(OPS)
    assert len({tuple(r) for r in p.ops.tolist()}) > 64  # many different op combinations in one batch
    assert len(set(p.ops[:, 0].tolist())) == len(OPS)
    assert p.level.min() >= 0 and p.level.max() <= 0.5
    assert set(p.sign.unique().tolist()) == {-1.0, 1.0}


def test_strong_views_differ_across_identical_images():
    n = 32
    x = images(1).expand(n, 3, 32, 32)
    s = Augment(MEAN, STD, 32).strong(x, generator=gen())
    assert len({v.numpy().tobytes() for v in s}) == n


def test_rand_augment_applies_each_samples_own_ops():
    """The sorted, batched application equals applying each sample's ops to it alone."""
    size, k = 16, 3
    aug = Augment(MEAN, STD, size, ra_ops=k, ra_max_magnitude=10)
    n = 2 * len(OPS)
    g = gen(5)
    ops = torch.cat([torch.arange(len(OPS)).repeat(2)[:, None], torch.randint(0, len(OPS), (n, k - 1), generator=g)], 1)
    level = torch.rand(n, k, generator=g)
    sign = torch.where(torch.rand(n, k, generator=g) < 0.5, -1.0, 1.0)
    x01 = images(n, size, size, seed=2).float() / 255
    out = aug.rand_augment(x01, strong_params(ops, level, sign, n, size))
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    for i in range(n):
        ref = x01[i:i + 1]
        for slot in range(k):
            name = OPS[int(ops[i, slot])]
            if name in COLOR_OPS:
                ref = COLOR_OPS[name](ref, level[i:i + 1, slot], sign[i:i + 1, slot])
        if any(OPS[int(o)] in GEOMETRIC_OPS for o in ops[i]):
            theta = _geometric_theta(ops[i:i + 1], level[i:i + 1], sign[i:i + 1])[:, :2]
            grid = F.affine_grid(theta, [1, 3, size, size], align_corners=False)
            ref = (F.grid_sample(ref - mean, grid, mode=RA_WARP_MODE, align_corners=False) + mean).clamp(0, 1)
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-6, rtol=0)
    assert not torch.equal(out, x01)


def test_rand_augment_does_not_modify_its_input():
    aug = Augment(MEAN, STD, 32)
    x01 = images(16).float() / 255
    before = x01.clone()
    aug.rand_augment(x01, aug.sample_strong(16, (32, 32), generator=gen()))
    assert torch.equal(x01, before)


@pytest.mark.parametrize("value", [0, 255])
@pytest.mark.parametrize("op", OPS)
def test_each_op_keeps_white_and_black_in_range(op, value):
    n, size = 4, 16
    aug = Augment(MEAN, STD, size, ra_ops=1)
    x01 = torch.full((n, 3, size, size), value / 255.0)
    ops = torch.full((n, 1), OP_INDEX[op])
    level = torch.tensor([[0.0], [1.0], [1.0], [0.5]])
    sign = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    out = aug.rand_augment(x01, strong_params(ops, level, sign, n, size))
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    # Magnitude 0 changes nothing except autocontrast/equalize, which take no magnitude.
    if op not in ("autocontrast", "equalize"):
        torch.testing.assert_close(out[0], x01[0], atol=1e-6, rtol=0)


def test_magnitude_zero_is_identity_for_every_op():
    size = 16
    aug = Augment(MEAN, STD, size, ra_ops=2)
    names = [o for o in OPS if o not in ("autocontrast", "equalize")]
    n = len(names)
    ops = torch.tensor([[OP_INDEX[o], OP_INDEX[o]] for o in names])
    x01 = images(n, size, size).float() / 255
    out = aug.rand_augment(x01, strong_params(ops, torch.zeros(n, 2), torch.ones(n, 2), n, size))
    torch.testing.assert_close(out, x01, atol=1e-5, rtol=0)


def _pil(x01_chw):
    return Image.fromarray((x01_chw.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _from_pil(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("op,level,sign,pil_fn", [
    ("autocontrast", 0.0, 1.0, ImageOps.autocontrast),
    ("equalize", 0.0, 1.0, ImageOps.equalize),
    ("solarize", 0.5, 1.0, lambda im: ImageOps.solarize(im, 128)),
    ("posterize", 0.5, 1.0, lambda im: ImageOps.posterize(im, 6)),
    ("brightness", 0.5, 1.0, lambda im: ImageEnhance.Brightness(im).enhance(1.45)),
    ("color", 0.5, -1.0, lambda im: ImageEnhance.Color(im).enhance(0.55)),
    ("contrast", 0.5, 1.0, lambda im: ImageEnhance.Contrast(im).enhance(1.45)),
    ("sharpness", 1.0, 1.0, lambda im: ImageEnhance.Sharpness(im).enhance(1.9)),
])
def test_color_ops_match_pil(op, level, sign, pil_fn):
    x = images(3, 24, 24, seed=7)
    x[1] = x[1] // 2 + 40  # a low-contrast image, so autocontrast and equalize have work to do
    x01 = x.float() / 255
    out = COLOR_OPS[op](x01, torch.full((3,), level), torch.full((3,), sign))
    ref = torch.stack([_from_pil(pil_fn(_pil(v))) for v in x01])
    # PIL rounds its intermediates to 8 bits (e.g. the grey image of Color and Contrast): allow one level and a half.
    assert (out - ref).abs().max() <= 1.5 / 255


def test_geometric_ops_move_pixels_and_fill_with_the_mean():
    size = 16
    aug = Augment(MEAN, STD, size, ra_ops=1)
    names = list(GEOMETRIC_OPS)
    n = len(names)
    ops = torch.tensor([[OP_INDEX[o]] for o in names])
    x01 = torch.ones(n, 3, size, size)  # white: any pixel brought in from outside the image shows as the mean
    out = aug.rand_augment(x01, strong_params(ops, torch.ones(n, 1), torch.ones(n, 1), n, size))
    normalised = aug.normalize(out)
    for i, name in enumerate(names):
        assert (out[i] < 1).any(), name
        # The uncovered corner is exactly the mean (0 after normalising).
        assert normalised[i].abs().amin(dim=0).min() < 1e-5, name


# -- cutout ------------------------------------------------------------------------------------------------------------


def test_cutout_fills_with_the_mean_within_bounds():
    n, size = 256, 32
    aug = Augment(MEAN, STD, size, ra_ops=0, cutout=0.5)
    x = torch.full((n, 3, size, size), 255, dtype=torch.uint8)  # white: positive after normalising, never 0
    p = aug.sample_strong(n, (size, size), generator=gen())
    out = aug.apply_strong(x.float() / 255, p)
    zero = (out == 0).all(dim=1)  # [N, S, S]
    y0, y1, x0, x1 = p.cutout.unbind(1)
    expected = (y1 - y0) * (x1 - x0)
    assert torch.equal(zero.sum(dim=(1, 2)), expected)
    assert expected.max() <= (size // 2) ** 2 and expected.max() > 0
    assert (expected == 0).any() or expected.min() < (size // 2) ** 2  # sizes vary per sample
    for i in range(0, n, 17):
        box = torch.zeros(size, size, dtype=torch.bool)
        box[y0[i]:y1[i], x0[i]:x1[i]] = True
        assert torch.equal(zero[i], box)
    assert (out[~zero.unsqueeze(1).expand_as(out)] > 0).all()


def test_cutout_zero_disables_it():
    aug = Augment(MEAN, STD, 32, ra_ops=0, cutout=0.0)
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


def test_mixup_rejects_bad_input():
    x, y = torch.zeros(4, 3), torch.zeros(4, 2)
    with pytest.raises(UserError):
        mixup(x, y, 0.0)
    with pytest.raises(UserError):
        mixup(x, torch.zeros(4, dtype=torch.long), 1.0)
    with pytest.raises(UserError):
        mixup(x, torch.zeros(4, 2, dtype=torch.long), 1.0)


# -- configuration ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(style="autoaugment"), dict(pad_mode="edge"), dict(ra_max_magnitude=11), dict(cutout=1.5),
    dict(ra_ops=-1), dict(pad=32), dict(size=0), dict(std=(0.2, 0.0, 0.2)), dict(mean=(0.5, 0.5)),
])
def test_bad_options_are_user_errors(kwargs):
    args = dict(mean=MEAN, std=STD, size=32) | kwargs
    with pytest.raises(UserError):
        Augment(**args)


def test_bad_batches_are_user_errors():
    aug = Augment(MEAN, STD, 32)
    with pytest.raises(UserError):
        aug.weak(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(UserError):
        aug.weak(torch.zeros(2, 3, 32, 32, dtype=torch.int32))


def test_ra_ops_zero_and_empty_batch():
    aug = Augment(MEAN, STD, 32, ra_ops=0, cutout=0.0)
    x = images(4)
    torch.testing.assert_close(aug.apply_strong(x.float() / 255, aug.sample_strong(4, (32, 32), gen())),
                               aug.weak(x, generator=gen()))
    w, (s,) = Augment(MEAN, STD, 32).views(images(0), generator=gen())
    assert w.shape == s.shape == (0, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_views_with_cuda_and_cpu_generators():
    aug = Augment(MEAN, STD, 32).cuda()
    x = images(16).cuda()
    for g in (torch.Generator(device="cuda").manual_seed(0), gen()):
        w, (s,) = aug.views(x, generator=g)
        assert w.is_cuda and s.is_cuda and s.shape == (16, 3, 32, 32)
    _, _, lam, perm = mixup(w, torch.eye(16, device="cuda"), 1.0, generator=torch.Generator(device="cuda"))
    assert perm.is_cuda and 0.5 <= lam <= 1
