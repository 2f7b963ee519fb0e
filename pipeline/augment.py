"""On-device augmentation: weak, strong (RoLR's RandAugment + Cutout), TCL's contrastive and eval views, and mixup.

Batches arrive as uint8 [N, 3, H, W] on the training device. Every view is built from the whole batch in a few
tensor ops, with random parameters drawn per sample, so the cost does not grow with Python work per image:

- weak, style "cifar": random `size` crop of the image padded by `pad` px (black, as torchvision's RandomCrop
  pads by default), then a horizontal flip with p = 0.5. Crop and flip are one integer gather, so no pixel is
  interpolated.
- weak, style "imagenet": random-resized-crop (scale, ratio as torchvision) to `size`, with the flip folded into
  the same per-sample affine grid: one `grid_sample` call for the batch.
- strong: RoLR's RandAugment as its code runs it (chenmc1996/Robust-LR `randaugment.py`, `augment_list()` l. 143-160
  and `RandAugment.__call__` l. 170-177; `dataloader_cifar.py`, `cifar_dataloader.__init__`, inserts it *before*
  the crop and flip of the weak transform): 3 ops drawn with replacement from its 14, each op's value drawn
  uniformly over the op's *whole* range per sample and op (the `m` of RandAugment(3, 5) is never read), then
  Cutout, then an independently drawn weak crop and flip. Slot by slot, each colour op runs once on the
  contiguous slice of samples that drew it, and the five geometric ops share one warp; every op follows its PIL
  counterpart (ImageOps, ImageEnhance, Image.transform with nearest resampling and black fill), see `RA_RANGES`
  and the op functions.
- contrastive: TCL's SimCLR-style view (Hzzone/TCL `models/tcl/tcl.py`, `TCL.train_transform`):
  random-resized-crop, flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8 in a random order per sample,
  grayscale with p = 0.2, solarize at 128 with p = 0.5.
- eval: deterministic resize (cifar), or short-side resize to size / 0.875 and center crop (imagenet).

All randomness comes from an optional `torch.Generator` (any device; the parameters are drawn on its device and
moved to the batch's) or, when it is None, from torch's global RNG, so a fixed seed gives identical views. The
parameter draws are separate from their application (`sample_weak`/`apply_weak`, `sample_strong`/`apply_strong`,
`sample_contrastive`/`apply_contrastive`), so callers and tests can inspect what each sample drew.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Callable

import kornia
import torch
import torch.nn.functional as F
from torch import nn


VIEWS = ("weak", "strong", "contrastive", "eval")  # what a method may ask of `Augment.make_views`
STYLES = ("cifar", "imagenet")
PAD_MODES = ("zeros", "reflect")

# RoLR's 14-op pool in the order of its `augment_list()`; the position of a name is the op index stored in
# StrongParams.ops. Each op's value is drawn uniformly in [lo, hi), in the op's own units:
RA_RANGES: dict[str, tuple[float, float]] = {
    "autocontrast": (0.0, 1.0),   # value unused
    "brightness": (0.05, 0.95),   # ImageEnhance factor: every enhance op only ever weakens the image
    "color": (0.05, 0.95),        # ImageEnhance factor
    "contrast": (0.05, 0.95),     # ImageEnhance factor
    "equalize": (0.0, 1.0),       # value unused
    "identity": (0.0, 1.0),       # value unused
    "posterize": (4.0, 8.0),      # bits kept = int(value), so 4..7 (RoLR's int(U[4, 8)) never reaches 8)
    "rotate": (-30.0, 30.0),      # degrees, counter-clockwise about the centre (PIL's Image.rotate)
    "sharpness": (0.05, 0.95),    # ImageEnhance factor
    "shear_x": (-0.3, 0.3),       # PIL affine (1, v, 0, 0, 1, 0): about the top-left corner
    "shear_y": (-0.3, 0.3),       # PIL affine (1, 0, 0, v, 1, 0)
    "solarize": (0.0, 256.0),     # threshold on the 8-bit level: levels >= value are inverted
    "translate_x": (-0.3, 0.3),   # fraction of the width: output x samples input x + v * W
    "translate_y": (-0.3, 0.3),   # fraction of the height
}
OPS = tuple(RA_RANGES)
OP_INDEX = {name: i for i, name in enumerate(OPS)}
PARAMETERLESS_OPS = ("autocontrast", "equalize", "identity")
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
# RoLR's Cutout (`randaugment.py` l. 113-140): side U[0, 0.5) x the image width, filled with this colour.
CUTOUT_FILL = (125, 123, 114)

# TCL's contrastive view (`models/tcl/tcl.py`, TCL.train_transform; crop scale from its configs, e.g.
# `models/tcl/configs/cifar10_90_prer18.yml`: resized_crop_scale 0.2; the option's default, 0.08, holds for any
# data set without a config, so for the imagenet style).
TCL_JITTER = ("brightness", "contrast", "saturation", "hue")  # ColorJitter(0.4, 0.4, 0.4, 0.1)
TCL_JITTER_STRENGTH = (0.4, 0.4, 0.4, 0.1)  # factors U[1 - s, 1 + s] for the first three; hue shift U[-s, s] turns
TCL_P = {"flip": 0.5, "jitter": 0.8, "gray": 0.2, "solarize": 0.5}
TCL_SOLARIZE = 128  # RandomSolarize(threshold=128): levels >= 128 are inverted
TCL_CROP_SCALE = {"cifar": (0.2, 1.0), "imagenet": (0.08, 1.0)}

EVAL_CROP_FRACTION = 0.875    # imagenet eval: resize the short side to size / 0.875, then center crop size


@dataclass
class WeakParams:
    """Per-sample parameters of a weak view.

    `flip`: bool [N]. Style cifar: `offset`, int64 [N, 2] (dy, dx), the crop's top-left corner in the padded image,
    each in [0, 2 * pad]. Style imagenet: `box`, float32 [N, 4] (y0, x0, h, w), the crop in input pixels.
    """

    flip: torch.Tensor
    offset: torch.Tensor | None = None
    box: torch.Tensor | None = None


@dataclass
class StrongParams:
    """Per-sample parameters of a strong view: RandAugment and Cutout on the input, then its own weak crop/flip."""

    weak: WeakParams
    ops: torch.Tensor     # int64 [N, K]: index into OPS, applied in slot order
    value: torch.Tensor   # float32 [N, K]: each op's value in its units (RA_RANGES); posterize holds whole bits
    cutout: torch.Tensor  # int64 [N, 4]: (y0, y1, x0, x1), half-open box in the RandAugment image; empty for none


@dataclass
class ContrastiveParams:
    """Per-sample parameters of TCL's contrastive view."""

    box: torch.Tensor       # float32 [N, 4]: (y0, x0, h, w), the resized crop in input pixels
    flip: torch.Tensor      # bool [N]
    jitter: torch.Tensor    # bool [N]: ColorJitter applied (p = 0.8)
    order: torch.Tensor     # int64 [N, 4]: a permutation of TCL_JITTER, the order the jitter ops run in
    factor: torch.Tensor    # float32 [N, 4]: brightness, contrast, saturation factors; hue shift in turns
    gray: torch.Tensor      # bool [N]
    solarize: torch.Tensor  # bool [N]


# ---------------------------------------------------------------------------------------------------------------------
# Random draws


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 on `device`, drawn from `generator` (on its own device) or the global RNG of `device`."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """Integers in [0, high) as int64, from the same uniform stream as `_rand`."""
    return (_rand(shape, generator, device) * high).long().clamp_(max=high - 1)


# ---------------------------------------------------------------------------------------------------------------------
# RandAugment ops. Each takes x float [M, 3, H, W] in [0, 1] and v float [M], the op's value in its RA_RANGES units,
# and returns a new tensor in [0, 1]. They follow PIL's ops on 8-bit images, which round or truncate to 8 bits
# inside each op; here the values stay float, so a PIL result can differ by up to about one 8-bit level.
# They are written by hand, not taken from a library, on purpose: the strong view is meant to be the RandAugment of
# RoLR's code, which runs PIL, and each op here is held to PIL's output op by op in tests/test_augment.py.


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # PIL's ImageEnhance: Image.blend(degenerate, image, factor).
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601-2 luma with PIL's convert("L") weights (19595, 38470, 7471) / 65536.
    return (19595 * x[:, 0:1] + 38470 * x[:, 1:2] + 7471 * x[:, 2:3]) / 65536.0  # [M, 1, H, W]


def _levels(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit level of each value, rounded half up as PIL rounds (its ops act on integer levels)."""
    return (x * 255.0).add_(0.5).floor_()


def _identity(x, v):
    return x


def _autocontrast(x, v):
    lo = x.amin(dim=(2, 3), keepdim=True)  # [M, 3, 1, 1]
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    # A flat channel has nothing to stretch: PIL leaves it unchanged.
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-6), x).clamp_(0.0, 1.0)


def _equalize(x, v):
    # Kornia's equalize is batched over (N, C) and follows PIL's lookup table.
    return kornia.enhance.equalize(x)


def _solarize(x, v):
    # PIL inverts every level >= the threshold, so threshold 256 inverts nothing and 0 inverts everything.
    return torch.where(_levels(x) < v.view(-1, 1, 1, 1), x, 1.0 - x)


def _posterize(x, v):
    # Keep the top `v` bits of the 8-bit level: integer math on the level, so the result is exact.
    step = torch.pow(2.0, 8.0 - v.floor()).view(-1, 1, 1, 1)  # [M, 1, 1, 1]
    return (_levels(x) / step).floor_().mul_(step).div_(255.0)


def _color(x, v):
    # PIL's degenerate image is the 8-bit "L" image.
    return _blend(x, _levels(_gray(x)).div_(255.0), v)


def _contrast(x, v):
    # PIL blends with one grey level: the mean of the 8-bit "L" image, rounded to an integer level.
    mean = _levels(_levels(_gray(x)).mean(dim=(1, 2, 3), keepdim=True) / 255.0) / 255.0  # [M, 1, 1, 1]
    return _blend(x, mean, v)


def _brightness(x, v):
    return (x * v.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _sharpness(x, v):
    # PIL's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 on the interior with the border pixels kept, as in
    # kornia.enhance.sharpness; written as a separable 3x3 box sum plus 4x the centre, several times faster on
    # CPU than a grouped convolution or avg_pool2d.
    rows = x[..., :-2] + x[..., 1:-1]
    rows += x[..., 2:]  # [M, 3, H, W-2]
    box = rows[..., :-2, :] + rows[..., 1:-1, :]
    box += rows[..., 2:, :]  # [M, 3, H-2, W-2]
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = _levels(box.add_(x[..., 1:-1, 1:-1], alpha=4.0).div_(13.0)).div_(255.0)  # 8-bit, as PIL
    return _blend(x, smooth, v)


_FIXED = 65536.0  # PIL's nearest affine transform works in 16.16 fixed point (Geometry.c, affine_fixed)


def _affine(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """PIL's Image.transform(size, AFFINE, coef) with nearest resampling and black fill, batched.

    coef float32 [M, 6] = (a, b, c, d, e, f): output pixel (x, y) takes the input pixel at
    floor(a x' + b y' + c), floor(d x' + e y' + f) with x' = x + 0.5, y' = y + 0.5; outside the image it is black.
    The sums run in 16.16 fixed point as PIL's do, so the rounding at pixel boundaries is PIL's too.
    """
    m, ch, h, w = x.shape
    coef = coef.double()  # float32 cannot hold c * 65536 exactly beyond about 256 px
    # Start at the first pixel centre (0.5, 0.5), as PIL does: c + a/2 + b/2 and f + d/2 + e/2, then FIX(v) =
    # floor(v * 65536 + 0.5). int32 holds these coordinates for images up to a few thousand px.
    start = coef[:, [2, 5]] + 0.5 * (coef[:, [0, 3]] + coef[:, [1, 4]])  # [M, 2]
    fixed = (torch.cat([coef[:, [0, 1, 3, 4]], start], dim=1) * _FIXED + 0.5).floor_().to(torch.int32)  # [M, 6]
    a, b, d, e, x0, y0 = (t.view(m, 1, 1) for t in fixed.unbind(1))
    xs = torch.arange(w, device=x.device, dtype=torch.int32).view(1, 1, w)
    ys = torch.arange(h, device=x.device, dtype=torch.int32).view(1, h, 1)
    # The arithmetic shift >> 16 floors, as PIL's does.
    xi = ((a * xs + x0) + b * ys) >> 16  # [M, H, W]
    yi = ((d * xs + y0) + e * ys) >> 16
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)  # [M, H, W]
    index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().view(m, 1, h * w).expand(m, ch, h * w)
    out = x.reshape(m, ch, h * w).gather(2, index).view(m, ch, h, w)
    return out * inside.unsqueeze(1).to(out.dtype)


def _geometric(x: torch.Tensor, v: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """RoLR's five geometric ops in one warp, each sample its own (op [M] indexes OPS, v [M] its value):

    rotate:      Image.rotate(v): about the centre (W/2, H/2), counter-clockwise for v > 0, output size kept;
    shear_x / y: Image.transform(size, AFFINE, (1, v, 0, 0, 1, 0)) / (1, 0, 0, v, 1, 0), about the top-left;
    translate:   (1, 0, v W, 0, 1, 0) / (1, 0, 0, 0, 1, v H).
    """
    h, w = x.shape[-2:]
    zero = torch.zeros_like(v)

    def is_(name: str) -> torch.Tensor:
        return op == OP_INDEX[name]

    rot = is_("rotate")
    t = torch.deg2rad(torch.where(rot, v, zero))
    cos, sin = t.cos(), t.sin()  # 1 and 0 for the other ops
    cx, cy = w / 2.0, h / 2.0
    b = torch.where(is_("shear_x"), v, -sin)
    d = torch.where(is_("shear_y"), v, sin)
    c = torch.where(is_("translate_x"), v * w, torch.where(rot, cx - cos * cx + sin * cy, zero))
    f = torch.where(is_("translate_y"), v * h, torch.where(rot, cy - sin * cx - cos * cy, zero))
    coef = torch.stack([cos, b, c, d, cos, f], dim=1)  # [M, 6]
    return _affine(x, coef)


def _geometric_op(name: str):
    def fn(x, v):
        return _geometric(x, v, torch.full_like(v, OP_INDEX[name], dtype=torch.long))

    fn.__name__ = f"_{name}"
    return fn


OP_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "autocontrast": _autocontrast,
    "brightness": _brightness,
    "color": _color,
    "contrast": _contrast,
    "equalize": _equalize,
    "identity": _identity,
    "posterize": _posterize,
    "rotate": _geometric_op("rotate"),
    "sharpness": _sharpness,
    "shear_x": _geometric_op("shear_x"),
    "shear_y": _geometric_op("shear_y"),
    "solarize": _solarize,
    "translate_x": _geometric_op("translate_x"),
    "translate_y": _geometric_op("translate_y"),
}
assert tuple(OP_FNS) == OPS


def _ignore_op(fn):
    """An op of (x, v) as a per-slot function of (x, v, op)."""
    return lambda x, v, op: fn(x, v)


def _ramp(k: torch.Tensor) -> torch.Tensor:
    return torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _hue(x, v):
    """torchvision's adjust_hue on tensors: shift the HSV hue by v [M] turns, without building HSV images.

    With hue in sixths h6, max c and spread d = max - min, RGB is c - d * clamp(min(k, 4 - k), 0, 1) for
    k = (n + h6) mod 6, n = 5, 3, 1 (the closed form of HSV -> RGB); grey pixels (d = 0) stay as they are.
    """
    r, g, b = x.unbind(1)  # [M, H, W] each
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    d = maxc - minc
    safe = torch.where(d > 0, d, torch.ones_like(d))
    h6 = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h6 = h6 + 6.0 * v.view(-1, 1, 1)
    out = [maxc - d * _ramp(torch.remainder(n + h6, 6.0)) for n in (5.0, 3.0, 1.0)]
    return torch.stack(out, dim=1).clamp_(0.0, 1.0)


# ColorJitter's four ops in TCL_JITTER order; torchvision's PIL path uses ImageEnhance for the first three.
JITTER_FNS = (_brightness, _contrast, _color, _hue)
_JITTER_SLOT_FNS = tuple(_ignore_op(fn) for fn in JITTER_FNS) + (None,)  # the last: no jitter


def _apply_per_slot(x: torch.Tensor, ops: torch.Tensor, value: torch.Tensor, fns, kind_of=None) -> torch.Tensor:
    """Apply each sample's ops in slot order: x float [N, 3, H, W]; ops int64 [N, K]; value float [N, K].

    kind_of (a list, op -> kind; default the op itself) groups ops that one function runs together; fns[kind] is
    called as fn(x_slice, value_slice, op_slice), or is None to do nothing. Returns a new tensor; x is never
    written. Per slot the samples are sorted by kind (stable, so deterministic) and each kind runs once on the
    contiguous slice that drew it. The only host sync is one read of the per-slot kind counts.
    """
    n, k = ops.shape
    nk = len(fns)
    if n == 0 or k == 0:
        return x.clone()
    dev = x.device
    kinds = ops if kind_of is None else torch.tensor(kind_of, device=dev)[ops]  # [N, K]
    counts = torch.bincount((kinds + nk * torch.arange(k, device=dev)).flatten(), minlength=k * nk).tolist()
    perm = torch.arange(n, device=dev)  # cur[i] is sample perm[i]; the batch order is restored once at the end
    cur = x
    for slot in range(k):
        slot_counts = counts[slot * nk:(slot + 1) * nk]
        if not any(c for c, fn in zip(slot_counts, fns) if fn is not None):
            continue
        order = torch.argsort(kinds[perm, slot], stable=True)
        perm, cur = perm[order], cur.index_select(0, order)  # a copy: the caller's tensor is never written
        v, o = value[perm, slot], ops[perm, slot]
        start = 0
        for fn, count in zip(fns, slot_counts):
            if count and fn is not None:
                sl = slice(start, start + count)
                cur[sl] = fn(cur[sl], v[sl], o[sl])
            start += count
    if cur is x:
        return x.clone()
    return torch.empty_like(cur).index_copy_(0, perm, cur)  # back to batch order


# RandAugment's kinds: each colour op alone, the five geometric ops together (one warp per slot), identity none.
_RA_KINDS = [name for name in OPS if name not in GEOMETRIC_OPS] + ["geometric"]
_RA_KIND_OF = [_RA_KINDS.index("geometric" if name in GEOMETRIC_OPS else name) for name in OPS]
_RA_FNS = tuple(None if kind == "identity" else _geometric if kind == "geometric" else _ignore_op(OP_FNS[kind])
                for kind in _RA_KINDS)


def _cutout_box(v: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """RoLR's CutoutAbs (`randaugment.py` l. 122-140) as a box: side v px, centre (cy, cx), all float [N].

    x0 = int(max(0, cx - v / 2)), x1 = min(w, x0 + v), and PIL's rectangle covers x0..int(x1) inclusive, cut at
    the image edge; the same along y. Returns int64 [N, 4] (y0, y1, x0, x1), half-open; v <= 0 gives no box
    (RoLR's Cutout returns the image unchanged).
    """
    y0 = (cy - v / 2).clamp_min(0).floor()
    x0 = (cx - v / 2).clamp_min(0).floor()
    y1 = ((y0 + v).floor() + 1).clamp_max(h)
    x1 = ((x0 + v).floor() + 1).clamp_max(w)
    none = v <= 0
    y1, x1 = torch.where(none, y0, y1), torch.where(none, x0, x1)
    return torch.stack([y0, y1, x0, x1], dim=1).long()


# ---------------------------------------------------------------------------------------------------------------------
# Resizing helpers


def _resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)


def _resized_crop(x01: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each sample's box (y0, x0, h, w) [N, 4] in input px, resize it to size x size (bilinear), mirror where
    flip [N]: one per-sample affine grid and one grid_sample for the batch."""
    n, c, h_in, w_in = x01.shape
    if n == 0:  # affine_grid refuses an empty batch
        return x01.new_zeros(0, c, size, size)
    dev = x01.device
    y0, x0, h, w = box.to(dev).unbind(1)  # [N] each
    sx = torch.where(flip.to(dev), -w / w_in, w / w_in)  # a negative x scale mirrors the crop
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * x0 + w) / w_in - 1  # crop centre in normalised coordinates
    theta[:, 1, 1] = h / h_in
    theta[:, 1, 2] = (2 * y0 + h) / h_in - 1
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)  # [N, S, S, 2]
    # "border": the half-pixel just outside a crop at the image edge repeats the edge, not black.
    return F.grid_sample(x01, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp_(0, 1)


def _index_map(i: torch.Tensor, n: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map padded coordinates i (in [-pad, n - 1 + pad]) to source coordinates; mask of real pixels for zeros."""
    if mode == "reflect":
        i = i.abs()  # torch's "reflect": -1 -> 1, the edge pixel is not repeated
        return torch.where(i >= n, 2 * (n - 1) - i, i), None
    valid = (i >= 0) & (i < n)
    return i.clamp(0, n - 1), valid


def _float32(method):
    """Run a view method with autocast off: the warps and the enhance blends stay float32 even when the caller (a
    training step) has autocast on."""

    @functools.wraps(method)
    def wrapper(self, x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return method(self, x, *args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------------------------------
# The module


class Augment(nn.Module):
    """Batched weak/strong/contrastive/eval views on the device, normalised with the dataset's mean and std.

    mean, std: 3 floats each in [0, 1] pixel units (the manifest's). size: output side in px.
    style: "cifar" (pad-and-crop) or "imagenet" (random-resized-crop with `scale`, `ratio`).
    pad, pad_mode: cifar padding in px, "zeros" (black, torchvision's RandomCrop default, as RoLR, DivideMix and
    TCL pad) or "reflect".
    ra_ops: RandAugment ops per sample (RoLR: 3). cutout: the Cutout side is U[0, cutout) x the image width, per
    sample (RoLR: 0.5); 0 disables it.
    contrastive_scale: the random-resized-crop area range of TCL's contrastive view (default: TCL_CROP_SCALE).
    Style cifar resizes inputs of another size to size x size first (so eval and train see the same scale).
    """

    def __init__(
        self,
        mean,
        std,
        size: int,
        style: str = "cifar",
        pad: int = 4,
        pad_mode: str = "zeros",
        ra_ops: int = 3,
        cutout: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        contrastive_scale: tuple[float, float] | None = None,
    ):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"unknown augmentation style {style!r}: expected one of {', '.join(STYLES)}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"unknown pad mode {pad_mode!r}: expected one of {', '.join(PAD_MODES)}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {list(std)}")
        if not isinstance(size, int) or size < 3:
            raise ValueError(f"augmentation size must be an integer of at least 3 px, got {size!r}")
        if not 0 <= pad < size:
            raise ValueError(f"pad must be in [0, size), got {pad} for size {size}")
        if ra_ops < 0:
            raise ValueError(f"ra_ops must be >= 0, got {ra_ops}")
        if not 0 <= cutout <= 1:
            raise ValueError(f"cutout must be a fraction of the side in [0, 1], got {cutout}")
        contrastive_scale = TCL_CROP_SCALE[style] if contrastive_scale is None else contrastive_scale
        for s in (scale, contrastive_scale):
            if not (0 < s[0] <= s[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
                raise ValueError(f"bad random-resized-crop scale {s} or ratio {ratio}")
        self.size, self.style, self.pad, self.pad_mode = size, style, pad, pad_mode
        self.ra_ops, self.cutout = ra_ops, float(cutout)
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.contrastive_scale = (float(contrastive_scale[0]), float(contrastive_scale[1]))
        # Not persistent: they come from the manifest, not from training.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # Per-op value ranges as tensors, indexed by op (moved with the module).
        lo_hi = torch.tensor([RA_RANGES[name] for name in OPS], dtype=torch.float32)  # [14, 2]
        self.register_buffer("ra_lo", lo_hi[:, 0].contiguous(), persistent=False)
        self.register_buffer("ra_span", (lo_hi[:, 1] - lo_hi[:, 0]).contiguous(), persistent=False)

    def extra_repr(self) -> str:
        return (f"size={self.size}, style={self.style}, pad={self.pad}, pad_mode={self.pad_mode}, "
                f"ra_ops={self.ra_ops}, cutout={self.cutout}, contrastive_scale={self.contrastive_scale}")

    # -- conversions ----------------------------------------------------------------------------------------------

    @staticmethod
    def to_float(x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float32 in [0, 1]; a floating batch is taken as already in [0, 1]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch [N, 3, H, W], got shape {list(x.shape)}")
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        if x.is_floating_point():
            return x.float()
        raise ValueError(f"expected a uint8 or float image batch, got {x.dtype}")

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 1] -> (x - mean) / std."""
        return (x01 - self.mean.to(x01.device)) / self.std.to(x01.device)

    def _ra_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """The size RandAugment and Cutout work at: style cifar resizes to size x size first."""
        return (self.size, self.size) if self.style == "cifar" else (int(in_hw[0]), int(in_hw[1]))

    # -- parameter draws ------------------------------------------------------------------------------------------

    def sample_weak(self, n: int, in_hw: tuple[int, int], generator=None, device=None) -> WeakParams:
        """Draw per-sample weak-view parameters for n images of size in_hw (H, W)."""
        device = torch.device(device) if device is not None else self.mean.device
        if self.style == "cifar":
            offset = _randint(2 * self.pad + 1, (n, 2), generator, device)  # [N, 2]
            box = None
        else:
            offset, box = None, self._sample_boxes(n, in_hw, generator, device, self.scale)  # [N, 4]
        flip = _rand((n,), generator, device) < 0.5  # [N]
        return WeakParams(flip=flip, offset=offset, box=box)

    def _sample_boxes(self, n, in_hw, generator, device, scale, attempts: int = 10) -> torch.Tensor:
        """torchvision's RandomResizedCrop box search, vectorised: `attempts` draws per sample, first that fits."""
        h_in, w_in = float(in_hw[0]), float(in_hw[1])
        u = _rand((n, attempts, 4), generator, device)  # [N, A, 4]
        area = h_in * w_in * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])  # w / h
        w = torch.sqrt(area * aspect)  # [N, A]
        h = torch.sqrt(area / aspect)
        fits = (w <= w_in) & (h <= h_in)
        first = fits.float().argmax(dim=1, keepdim=True)  # [N, 1]: first fitting attempt (0 when none fits)

        def pick(t):
            return t.gather(1, first).squeeze(1)  # [N]

        w, h, uy, ux = pick(w), pick(h), pick(u[..., 2]), pick(u[..., 3])
        # No attempt fits: the whole image, cut to the ratio range, centred (torchvision's fallback).
        in_ratio = w_in / h_in
        if in_ratio < self.ratio[0]:
            fw, fh = w_in, w_in / self.ratio[0]
        elif in_ratio > self.ratio[1]:
            fw, fh = h_in * self.ratio[1], h_in
        else:
            fw, fh = w_in, h_in
        ok = fits.any(dim=1)
        w = torch.where(ok, w, torch.full_like(w, fw))
        h = torch.where(ok, h, torch.full_like(h, fh))
        y0 = torch.where(ok, uy * (h_in - h), (h_in - h) / 2)
        x0 = torch.where(ok, ux * (w_in - w), (w_in - w) / 2)
        return torch.stack([y0, x0, h, w], dim=1)  # [N, 4]

    def sample_strong(self, n: int, in_hw: tuple[int, int], generator=None, device=None) -> StrongParams:
        """Draw per-sample strong-view parameters: weak crop/flip, RandAugment ops and values, Cutout box."""
        device = torch.device(device) if device is not None else self.mean.device
        weak = self.sample_weak(n, in_hw, generator, device)
        k = self.ra_ops
        # random.choices(augment_list, k=n): with replacement; val = lo + (hi - lo) * random.random().
        ops = _randint(len(OPS), (n, k), generator, device)  # [N, K]
        lo, span = self.ra_lo.to(device)[ops], self.ra_span.to(device)[ops]  # [N, K]
        value = lo + span * _rand((n, k), generator, device)
        value = torch.where(ops == OP_INDEX["posterize"], value.floor(), value)  # Posterize: int(v) bits
        cutout = self._sample_cutout(n, self._ra_hw(in_hw), generator, device)
        return StrongParams(weak=weak, ops=ops, value=value, cutout=cutout)

    def _sample_cutout(self, n: int, hw: tuple[int, int], generator, device) -> torch.Tensor:
        """RoLR's Cutout draws (`randaugment.py` l. 175 and 113-140): the box, int64 [N, 4] (see `_cutout_box`).

        v = U[0, cutout) x width px; the centre is np.random.uniform(w), which numpy reads as uniform(low=w,
        high=1.0), so it lies in (1, w] (and in (1, h] along y).
        """
        h, w = hw
        u = _rand((n, 3), generator, device)  # [N, 3]: side, centre y, centre x
        v = u[:, 0] * (self.cutout * w)  # [N] px
        return _cutout_box(v, h - (h - 1) * u[:, 1], w - (w - 1) * u[:, 2], h, w)

    def sample_contrastive(self, n: int, in_hw: tuple[int, int], generator=None, device=None) -> ContrastiveParams:
        """Draw per-sample parameters of TCL's contrastive view."""
        device = torch.device(device) if device is not None else self.mean.device
        box = self._sample_boxes(n, in_hw, generator, device, self.contrastive_scale)  # [N, 4]
        u = _rand((n, 4), generator, device)  # [N, 4]: flip, jitter, gray, solarize
        order = torch.argsort(_rand((n, 4), generator, device), dim=1)  # [N, 4]: a uniform random permutation
        s = torch.tensor(TCL_JITTER_STRENGTH, device=device)
        centre = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)  # factors around 1, the hue shift around 0
        factor = centre + s * (2.0 * _rand((n, 4), generator, device) - 1.0)  # [N, 4]
        return ContrastiveParams(
            box=box, flip=u[:, 0] < TCL_P["flip"], jitter=u[:, 1] < TCL_P["jitter"], order=order, factor=factor,
            gray=u[:, 2] < TCL_P["gray"], solarize=u[:, 3] < TCL_P["solarize"],
        )

    # -- applying parameters (float [0, 1] in, float [0, 1] out; normalisation happens in the public views) -------

    def apply_weak(self, x01: torch.Tensor, p: WeakParams) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 1] -> crop/flip view float [N, 3, size, size] in [0, 1]."""
        s = self.size
        n, c = x01.shape[:2]
        dev = x01.device
        if self.style == "imagenet":
            return _resized_crop(x01, p.box, p.flip, s)
        x01 = _resize(x01, (s, s))
        ar = torch.arange(s, device=dev)
        offset = p.offset.to(dev)
        rows = offset[:, 0:1] - self.pad + ar  # [N, S] coordinates in the unpadded image
        cols = offset[:, 1:2] - self.pad + ar
        cols = torch.where(p.flip.to(dev)[:, None], cols.flip(-1), cols)  # reversing the columns is the flip
        rows, row_ok = _index_map(rows, s, self.pad_mode)
        cols, col_ok = _index_map(cols, s, self.pad_mode)
        # One gather with a per-sample linear index, shared by the channels: about twice as fast on CPU as a
        # row gather followed by a column gather.
        index = (rows[:, :, None] * s + cols[:, None, :]).view(n, 1, s * s).expand(n, c, s * s)  # [N, C, S*S]
        out = x01.reshape(n, c, s * s).gather(2, index).view(n, c, s, s)
        if row_ok is not None:
            out = out * (row_ok[:, None, :, None] & col_ok[:, None, None, :])  # black padding
        return out

    def rand_augment(self, x01: torch.Tensor, p: StrongParams) -> torch.Tensor:
        """Per-sample RandAugment ops (no Cutout) on float [N, 3, H, W] in [0, 1]; returns a new tensor."""
        return _apply_per_slot(x01, p.ops.to(x01.device), p.value.to(x01.device), _RA_FNS, _RA_KIND_OF)

    @staticmethod
    def apply_cutout(x01: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """Fill each sample's box (y0, y1, x0, x1) [N, 4] of float [N, 3, H, W] with CUTOUT_FILL, in place."""
        h, w = x01.shape[-2:]
        dev = x01.device
        box = box.to(dev)
        rows = (torch.arange(h, device=dev) >= box[:, 0:1]) & (torch.arange(h, device=dev) < box[:, 1:2])  # [N, H]
        cols = (torch.arange(w, device=dev) >= box[:, 2:3]) & (torch.arange(w, device=dev) < box[:, 3:4])  # [N, W]
        inside = (rows[:, None, :, None] & cols[:, None, None, :])  # [N, 1, H, W]
        fill = torch.tensor(CUTOUT_FILL, device=dev, dtype=x01.dtype).view(1, 3, 1, 1) / 255.0
        return torch.where(inside, fill, x01)

    def apply_strong(self, x01: torch.Tensor, p: StrongParams) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 1] -> normalised strong view float [N, 3, size, size].

        RoLR's order: RandAugment and Cutout on the whole image, then the crop and flip.
        """
        if self.style == "cifar":
            x01 = _resize(x01, (self.size, self.size))
        x01 = self.apply_cutout(self.rand_augment(x01, p), p.cutout)
        return self.normalize(self.apply_weak(x01, p.weak))

    def apply_contrastive(self, x01: torch.Tensor, p: ContrastiveParams) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 1] -> normalised contrastive view float [N, 3, size, size]."""
        dev = x01.device
        x = _resized_crop(x01, p.box, p.flip, self.size)  # [N, 3, S, S]
        order = p.order.to(dev)
        # Samples without jitter draw the do-nothing op (index 4) in every slot.
        ops = torch.where(p.jitter.to(dev)[:, None], order, torch.full_like(order, len(JITTER_FNS)))  # [N, 4]
        value = p.factor.to(dev).gather(1, order)  # [N, 4]: the factor of the op each slot runs
        x = _apply_per_slot(x, ops, value, _JITTER_SLOT_FNS)
        x = torch.where(p.gray.to(dev).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
        solar = torch.where(_levels(x) < TCL_SOLARIZE, x, 1.0 - x)
        x = torch.where(p.solarize.to(dev).view(-1, 1, 1, 1), solar, x)
        return self.normalize(x)

    # -- public views ---------------------------------------------------------------------------------------------

    @_float32
    def weak(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> normalised weak view float32 [N, 3, size, size]."""
        x01 = self.to_float(x)
        p = self.sample_weak(x01.shape[0], tuple(x01.shape[-2:]), generator, x01.device)
        return self.normalize(self.apply_weak(x01, p))

    @_float32
    def strong(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> normalised strong view float32 [N, 3, size, size]."""
        x01 = self.to_float(x)
        p = self.sample_strong(x01.shape[0], tuple(x01.shape[-2:]), generator, x01.device)
        return self.apply_strong(x01, p)

    @_float32
    def contrastive(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> normalised TCL contrastive view float32 [N, 3, size, size]."""
        x01 = self.to_float(x)
        p = self.sample_contrastive(x01.shape[0], tuple(x01.shape[-2:]), generator, x01.device)
        return self.apply_contrastive(x01, p)

    def make_views(self, x: torch.Tensor, names: tuple[str, ...],
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """The views `names` (each one of `VIEWS`), in their order, from one uint8 batch: the one call through which
        training asks for views. ("weak", "strong", ...) takes `views`, with one uint8 -> float conversion; any
        other list, repeated names included (DivideMix's two weak views), draws each view on its own."""
        unknown = [n for n in names if n not in VIEWS]
        if unknown:
            raise ValueError(f"unknown view {unknown[0]!r}: the views are {', '.join(VIEWS)}")
        n_strong = len(names) - 1
        if n_strong > 0 and names == ("weak",) + ("strong",) * n_strong:
            weak, strongs = self.views(x, n_strong, generator=generator)
            return (weak, *strongs)
        makers = {"weak": self.weak, "strong": self.strong, "contrastive": self.contrastive,
                  "eval": lambda images, generator=None: self.eval_view(images)}
        return tuple(makers[n](x, generator=generator) for n in names)

    @_float32
    def views(self, x: torch.Tensor, n_strong: int = 1, generator: torch.Generator | None = None):
        """One weak and n_strong strong views of the same batch, each with its own draws: (weak, [strong, ...]).

        The uint8 -> float conversion happens once. With the same generator state, the weak view equals
        `weak(x, g)` and the strong views follow it in the generator's stream.
        """
        x01 = self.to_float(x)
        n, hw = x01.shape[0], tuple(x01.shape[-2:])
        weak = self.normalize(self.apply_weak(x01, self.sample_weak(n, hw, generator, x01.device)))
        strong = [self.apply_strong(x01, self.sample_strong(n, hw, generator, x01.device)) for _ in range(n_strong)]
        return weak, strong

    def forward(self, x: torch.Tensor, n_strong: int = 1, generator: torch.Generator | None = None):
        """Same as `views`."""
        return self.views(x, n_strong=n_strong, generator=generator)

    @_float32
    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic eval view: uint8 [N, 3, H, W] -> normalised float32 [N, 3, size, size].

        (Not `eval`, which stays nn.Module.eval.)
        """
        x01 = self.to_float(x)
        s = self.size
        if self.style == "cifar":
            return self.normalize(_resize(x01, (s, s)))
        h, w = x01.shape[-2:]
        short = int(round(s / EVAL_CROP_FRACTION))  # > s, so the crop always fits
        hw = (short, int(round(w * short / h))) if h <= w else (int(round(h * short / w)), short)
        x01 = _resize(x01, hw)
        top, left = (hw[0] - s) // 2, (hw[1] - s) // 2
        return self.normalize(x01[..., top:top + s, left:left + s])


# ---------------------------------------------------------------------------------------------------------------------
# Mixup


def draw_mixup(
    n: int,
    alpha: float,
    generator: torch.Generator | None = None,
    host: random.Random | None = None,
    device=None,
) -> tuple[float, torch.Tensor]:
    """Mixup's draws (Zhang et al. 2018) as DivideMix and TCL make them: (lam, perm).

    lam ~ Beta(alpha, alpha), then lam = max(lam, 1 - lam), so each mixed sample stays closer to its own x[i]
    (whose index and per-sample weight the caller keeps); one lam per batch, a Python float in [0.5, 1]. It is
    drawn on the host from `host`, so a training step never waits for the device; without `host` it comes from a
    fresh random.Random seeded from `generator` (one device -> host read). perm: int64 [n], a random permutation
    from `generator` on its device, returned on `device` (default: the generator's).
    """
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    source = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    if host is None:
        # torch has no Beta sampler that takes a Generator: seed Python's from the torch stream, so one seed
        # still fixes lam.
        host = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator, device=source).item()))
    lam = host.betavariate(alpha, alpha)
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(n, generator=generator, device=source)
    return lam, perm.to(device) if device is not None else perm


def apply_mixup(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """lam * x + (1 - lam) * x[perm] for float x [N, ...]: images, or [N, C] targets."""
    if not x.is_floating_point():
        raise ValueError(f"mixup needs floating values (images or soft targets), got {x.dtype}")
    if perm.shape != (x.shape[0],):
        raise ValueError(f"perm {list(perm.shape)} does not match the batch of {x.shape[0]}")
    return lam * x + (1.0 - lam) * x[perm.to(x.device)]


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None):
    """(x_mix, y_mix, lam, perm) from one `draw_mixup` applied to both; x float [N, ...], y float [N, C] targets.

    Kept for callers written before draw_mixup/apply_mixup; new code calls those two.
    """
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    if y.dim() != 2 or y.shape[0] != x.shape[0] or not y.is_floating_point():
        raise ValueError(f"mixup needs float targets [N, C] matching x's N={x.shape[0]}, got {list(y.shape)}")
    lam, perm = draw_mixup(x.shape[0], alpha, generator=generator, device=x.device)
    return apply_mixup(x, lam, perm), apply_mixup(y, lam, perm), lam, perm
