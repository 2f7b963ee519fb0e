"""On-device augmentation: weak, strong (RandAugment + Cutout) and eval views, and mixup.

Batches arrive as uint8 [N, 3, H, W] on the training device. Every view is built from the whole batch in a few
tensor ops, with random parameters drawn per sample, so the cost does not grow with Python work per image:

- weak, style "cifar": random `size` crop of the image padded by `pad` px (reflect or black), then a horizontal
  flip with p = 0.5. Crop and flip are one integer gather, so no pixel is interpolated.
- weak, style "imagenet": random-resized-crop (scale, ratio as torchvision) to `size`, with the flip folded into
  the same per-sample affine grid: one `grid_sample` call for the batch.
- strong: an independently drawn weak view, then RandAugment and Cutout.
  RandAugment chooses its `ra_ops` operations and their magnitudes per sample (Kornia 0.9's `RandAugment` picks
  once per batch, which is not the augmentation the papers use). Samples are sorted by the op they drew in each
  slot, so each op runs once on the contiguous slice of samples that drew it. The colour ops run in slot order;
  the geometric ops (rotate, shear, translate) of all slots are composed into one affine matrix per sample and
  applied afterwards in one warp, which fills uncovered pixels with the dataset mean.
- eval: deterministic resize (cifar), or short-side resize to size / 0.875 and center crop (imagenet).

All randomness comes from an optional `torch.Generator` (any device; the parameters are drawn on its device and
moved to the batch's) or, when it is None, from torch's global RNG, so a fixed seed gives identical views. The
parameter draws are separate from their application (`sample_weak`/`apply_weak`, `sample_strong`/`apply_strong`),
so callers and tests can inspect what each sample drew.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from ccl.errors import UserError

STYLES = ("cifar", "imagenet")
PAD_MODES = ("reflect", "zeros")

# The 14-op RandAugment pool of FixMatch-style RandAugment (no invert/cutout inside the pool; Cutout follows it).
# The position of a name is the op index stored in StrongParams.ops.
OPS = (
    "identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
    "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
)
OP_INDEX = {name: i for i, name in enumerate(OPS)}
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")

# Strength of each op at magnitude 10 (level 1.0); a drawn magnitude m scales it by m / 10.
MAX_MAGNITUDE = 10.0
RA_RANGES = {
    "rotate_deg": 30.0,       # degrees, random sign
    "shear": 0.3,             # shear factor, random sign
    "translate": 0.3,         # fraction of the image side, random sign
    "enhance": 0.9,           # colour/contrast/brightness/sharpness factor 1 +- 0.9
    "posterize_bits": 4,      # bits dropped (8 -> 4)
}
# Resampling of the geometric ops: nearest, the default of PIL's rotate/transform (which PIL-based RandAugment code
# calls without a resample argument) and of torchvision's RandAugment; about 3x cheaper than bilinear on CPU.
RA_WARP_MODE = "nearest"
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
    """Per-sample parameters of a strong view: its own weak crop/flip, then RandAugment, then Cutout."""

    weak: WeakParams
    ops: torch.Tensor     # int64 [N, K]: index into OPS, applied in slot order (colour ops; geometric ops fused)
    level: torch.Tensor   # float32 [N, K]: magnitude / 10, in [0, ra_max_magnitude / 10]
    sign: torch.Tensor    # float32 [N, K]: +1 or -1, the direction of the signed ops
    cutout: torch.Tensor  # int64 [N, 4]: (y0, y1, x0, x1), half-open box in output pixels; empty for side 0


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
# RandAugment colour ops. Each takes x float [M, 3, H, W] in [0, 1], level [M] in [0, 1] and sign [M] in {-1, +1},
# and returns a new tensor in [0, 1]. The enhance ops follow PIL's ImageEnhance (blend with a degenerate image).


def _factor(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return (1.0 + sign * RA_RANGES["enhance"] * level).view(-1, 1, 1, 1)  # [M, 1, 1, 1]


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (degenerate + factor * (x - degenerate)).clamp_(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601-2 luma, as PIL's convert("L").
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # [M, 1, H, W]


def _autocontrast(x, level, sign):
    lo = x.amin(dim=(2, 3), keepdim=True)  # [M, 3, 1, 1]
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    # A flat channel has nothing to stretch: PIL leaves it unchanged.
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-6), x).clamp_(0.0, 1.0)


def _equalize(x, level, sign):
    # Kornia's equalize is batched over (N, C) and follows PIL's lookup table.
    return kornia.enhance.equalize(x)


def _solarize(x, level, sign):
    # PIL inverts levels >= 256 - 256 * level (of 255), so level 0 inverts nothing.
    threshold = ((1.0 - level) * (256.0 / 255.0)).view(-1, 1, 1, 1)  # [M, 1, 1, 1]
    return torch.where(x < threshold, x, 1.0 - x)


def _posterize(x, level, sign):
    # Keep 8 - round(4 * level) bits: integer math on the 8-bit level, so the result is exact.
    step = torch.pow(2.0, (level * RA_RANGES["posterize_bits"]).round()).view(-1, 1, 1, 1)  # [M, 1, 1, 1]
    q = (x * 255.0).round_()
    return (q / step).floor_().mul_(step).div_(255.0)


def _color(x, level, sign):
    return _blend(x, _gray(x), _factor(level, sign))


def _contrast(x, level, sign):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), _factor(level, sign))


def _brightness(x, level, sign):
    return (x * _factor(level, sign)).clamp_(0.0, 1.0)


def _sharpness(x, level, sign):
    # PIL's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 on the interior with the border pixels kept, as in
    # kornia.enhance.sharpness; written as a separable 3x3 box sum plus 4x the centre, several times faster on
    # CPU than a grouped convolution or avg_pool2d.
    rows = x[..., :-2] + x[..., 1:-1]
    rows += x[..., 2:]  # [M, 3, H, W-2]
    box = rows[..., :-2, :] + rows[..., 1:-1, :]
    box += rows[..., 2:, :]  # [M, 3, H-2, W-2]
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = box.add_(x[..., 1:-1, 1:-1], alpha=4.0).div_(13.0).clamp_(0.0, 1.0)
    return _blend(x, smooth, _factor(level, sign))


COLOR_OPS = {
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "solarize": _solarize,
    "posterize": _posterize,
    "color": _color,
    "contrast": _contrast,
    "brightness": _brightness,
    "sharpness": _sharpness,
}


def _geometric_theta(ops: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Compose each sample's rotate/shear/translate draws into one sampling matrix, float32 [N, 3, 3].

    The matrices act in the normalised [-1, 1] coordinates of `F.affine_grid` (output -> input), about the image
    centre. The strong view is square, so rotation and shear there are the same as in pixels, and a translation
    of t * side px is 2 t in normalised units. Every op's direction is a random sign, so building the sampling
    (inverse) matrix directly gives the same distribution as inverting a forward transform.
    """
    n, k = ops.shape
    theta = torch.eye(3, device=ops.device).expand(n, 3, 3)
    zero = torch.zeros(n, device=ops.device)
    for slot in range(k):
        op, v = ops[:, slot], level[:, slot] * sign[:, slot]  # [N]

        def pick(name: str, scale: float) -> torch.Tensor:
            return torch.where(op == OP_INDEX[name], v * scale, zero)

        angle = pick("rotate", math.radians(RA_RANGES["rotate_deg"]))
        shx = pick("shear_x", RA_RANGES["shear"])
        shy = pick("shear_y", RA_RANGES["shear"])
        tx = pick("translate_x", 2.0 * RA_RANGES["translate"])
        ty = pick("translate_y", 2.0 * RA_RANGES["translate"])
        cos, sin = angle.cos(), angle.sin()
        # A slot holds one op, so at most one of (angle, shears, translations) is non-zero per sample.
        m = torch.stack([
            torch.stack([cos, shx - sin, tx], dim=1),
            torch.stack([shy + sin, cos, ty], dim=1),
            torch.stack([zero, zero, zero + 1.0], dim=1),
        ], dim=1)  # [N, 3, 3]
        theta = theta @ m
    return theta


# ---------------------------------------------------------------------------------------------------------------------
# Resizing helpers


def _resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)


def _index_map(i: torch.Tensor, n: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map padded coordinates i (in [-pad, n - 1 + pad]) to source coordinates; mask of real pixels for zeros."""
    if mode == "reflect":
        i = i.abs()  # torch's "reflect": -1 -> 1, the edge pixel is not repeated
        return torch.where(i >= n, 2 * (n - 1) - i, i), None
    valid = (i >= 0) & (i < n)
    return i.clamp(0, n - 1), valid


def _float32(method):
    """Run a view method with autocast off: the warps' matrix products and the enhance blends stay float32 even
    when the caller (a training step) has autocast on."""

    @functools.wraps(method)
    def wrapper(self, x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return method(self, x, *args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------------------------------
# The module


class Augment(nn.Module):
    """Batched weak/strong/eval views on the device, normalised with the dataset's mean and std.

    mean, std: 3 floats each in [0, 1] pixel units (the manifest's). size: output side in px.
    style: "cifar" (pad-and-crop) or "imagenet" (random-resized-crop with `scale`, `ratio`).
    pad, pad_mode: cifar padding in px, "reflect" or "zeros" (black pixels, like torchvision's RandomCrop).
    ra_ops: RandAugment ops per sample; ra_max_magnitude: magnitudes are drawn per sample and op uniformly in
    [0, ra_max_magnitude] on the 0-10 scale (RoLR's RandAugment(3, 5)). cutout: the Cutout square's side is
    U(0, cutout) x size, per sample; 0 disables it.
    Style cifar resizes inputs of another size to size x size first (so eval and train see the same scale).
    """

    def __init__(
        self,
        mean,
        std,
        size: int,
        style: str = "cifar",
        pad: int = 4,
        pad_mode: str = "reflect",
        ra_ops: int = 3,
        ra_max_magnitude: float = 5,
        cutout: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ):
        super().__init__()
        if style not in STYLES:
            raise UserError(f"unknown augmentation style {style!r}: expected one of {', '.join(STYLES)}")
        if pad_mode not in PAD_MODES:
            raise UserError(f"unknown pad mode {pad_mode!r}: expected one of {', '.join(PAD_MODES)}")
        if len(mean) != 3 or len(std) != 3:
            raise UserError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise UserError(f"std must be positive, got {list(std)}")
        if not isinstance(size, int) or size < 3:
            raise UserError(f"augmentation size must be an integer of at least 3 px, got {size!r}")
        if not 0 <= pad < size:
            raise UserError(f"pad must be in [0, size), got {pad} for size {size}")
        if ra_ops < 0:
            raise UserError(f"ra_ops must be >= 0, got {ra_ops}")
        if not 0 <= ra_max_magnitude <= MAX_MAGNITUDE:
            raise UserError(f"ra_max_magnitude must be in [0, 10], got {ra_max_magnitude}")
        if not 0 <= cutout <= 1:
            raise UserError(f"cutout must be a fraction of the side in [0, 1], got {cutout}")
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise UserError(f"bad random-resized-crop scale {scale} or ratio {ratio}")
        self.size, self.style, self.pad, self.pad_mode = size, style, pad, pad_mode
        self.ra_ops, self.ra_max_magnitude, self.cutout = ra_ops, float(ra_max_magnitude), float(cutout)
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        # Not persistent: they come from the manifest, not from training.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return (f"size={self.size}, style={self.style}, pad={self.pad}, pad_mode={self.pad_mode}, "
                f"ra_ops={self.ra_ops}, ra_max_magnitude={self.ra_max_magnitude}, cutout={self.cutout}")

    # -- conversions ----------------------------------------------------------------------------------------------

    @staticmethod
    def to_float(x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float32 in [0, 1]; a floating batch is taken as already in [0, 1]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise UserError(f"expected an image batch [N, 3, H, W], got shape {list(x.shape)}")
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        if x.is_floating_point():
            return x.float()
        raise UserError(f"expected a uint8 or float image batch, got {x.dtype}")

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 1] -> (x - mean) / std."""
        return (x01 - self.mean.to(x01.device)) / self.std.to(x01.device)

    # -- parameter draws ------------------------------------------------------------------------------------------

    def sample_weak(self, n: int, in_hw: tuple[int, int], generator=None, device=None) -> WeakParams:
        """Draw per-sample weak-view parameters for n images of size in_hw (H, W)."""
        device = torch.device(device) if device is not None else self.mean.device
        if self.style == "cifar":
            offset = _randint(2 * self.pad + 1, (n, 2), generator, device)  # [N, 2]
            box = None
        else:
            offset, box = None, self._sample_boxes(n, in_hw, generator, device)  # [N, 4]
        flip = _rand((n,), generator, device) < 0.5  # [N]
        return WeakParams(flip=flip, offset=offset, box=box)

    def _sample_boxes(self, n, in_hw, generator, device, attempts: int = 10) -> torch.Tensor:
        """torchvision's RandomResizedCrop box search, vectorised: `attempts` draws per sample, first that fits."""
        h_in, w_in = float(in_hw[0]), float(in_hw[1])
        u = _rand((n, attempts, 4), generator, device)  # [N, A, 4]
        area = h_in * w_in * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
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
        """Draw per-sample strong-view parameters: weak crop/flip, RandAugment ops and magnitudes, Cutout box."""
        device = torch.device(device) if device is not None else self.mean.device
        weak = self.sample_weak(n, in_hw, generator, device)
        k = self.ra_ops
        ops = _randint(len(OPS), (n, k), generator, device)  # [N, K]
        level = _rand((n, k), generator, device) * (self.ra_max_magnitude / MAX_MAGNITUDE)  # [N, K]
        sign = torch.where(_rand((n, k), generator, device) < 0.5, -1.0, 1.0)  # [N, K]
        s = self.size
        u = _rand((n, 3), generator, device)  # [N, 3]: side, centre y, centre x
        side = (u[:, 0] * (self.cutout * s)).long()  # [N]
        cy, cx = (u[:, 1] * s).long(), (u[:, 2] * s).long()
        y0, x0 = cy - side // 2, cx - side // 2
        # Clipped at the borders: the square may hang over the edge, as in the reference Cutout.
        box = torch.stack([y0.clamp(0, s), (y0 + side).clamp(0, s), x0.clamp(0, s), (x0 + side).clamp(0, s)], 1)
        return StrongParams(weak=weak, ops=ops, level=level, sign=sign, cutout=box)

    # -- applying parameters (float [0, 1] in, float [0, 1] out; normalisation happens in the public views) -------

    def apply_weak(self, x01: torch.Tensor, p: WeakParams) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 1] -> crop/flip view float [N, 3, size, size] in [0, 1]."""
        s = self.size
        n, c = x01.shape[:2]
        dev = x01.device
        if self.style == "imagenet":
            h_in, w_in = x01.shape[-2:]
            y0, x0, h, w = p.box.to(dev).unbind(1)  # [N] each
            sx = torch.where(p.flip.to(dev), -w / w_in, w / w_in)  # a negative x scale mirrors the crop
            theta = torch.zeros(n, 2, 3, device=dev)
            theta[:, 0, 0] = sx
            theta[:, 0, 2] = (2 * x0 + w) / w_in - 1  # crop centre in normalised coordinates
            theta[:, 1, 1] = h / h_in
            theta[:, 1, 2] = (2 * y0 + h) / h_in - 1
            grid = F.affine_grid(theta, [n, c, s, s], align_corners=False)  # [N, S, S, 2]
            # "border": the half-pixel just outside a crop at the image edge repeats the edge, not black.
            return F.grid_sample(x01, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp_(0, 1)

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
        """Per-sample RandAugment on float [N, 3, S, S] in [0, 1]; returns a new tensor in [0, 1]."""
        n, k = p.ops.shape
        if n == 0 or k == 0:
            return x01.clone()
        dev = x01.device
        ops, level, sign = p.ops.to(dev), p.level.to(dev), p.sign.to(dev)
        nops = len(OPS)
        geo_ids = torch.tensor([OP_INDEX[name] for name in GEOMETRIC_OPS], device=dev)
        warped = torch.isin(ops, geo_ids).any(dim=1)  # [N]: drew at least one geometric op
        # The only host sync: per-slot op counts (and the warped count) give the slice of sorted samples each op
        # runs on, so every op runs once, on exactly the samples that drew it.
        counts = torch.bincount((ops + nops * torch.arange(k, device=dev)).flatten(), minlength=k * nops)
        counts = torch.cat([counts, warped.sum().view(1)]).tolist()
        n_warped, counts = counts[-1], [counts[i * nops:(i + 1) * nops] for i in range(k)]
        perm = torch.arange(n, device=dev)  # cur[i] is sample perm[i]; the batch is restored once at the end
        cur = x01
        for slot in range(k):
            if not any(counts[slot][OP_INDEX[name]] for name in COLOR_OPS):
                continue
            # Sort the samples by the op they drew in this slot (stable, so the result is deterministic).
            order = torch.argsort(ops[perm, slot], stable=True)
            perm, cur = perm[order], cur.index_select(0, order)  # a copy: the caller's tensor is never written
            lv, sg = level[perm, slot], sign[perm, slot]
            start = 0
            for j, count in enumerate(counts[slot]):
                if count and OPS[j] in COLOR_OPS:
                    sl = slice(start, start + count)
                    cur[sl] = COLOR_OPS[OPS[j]](cur[sl], lv[sl], sg[sl])
                start += count
        if n_warped:
            # Warp only the samples that drew a geometric op (the warp is among the costliest steps on CPU):
            # sort them to the front, then compose all their slots' rotate/shear/translate into one matrix.
            order = torch.argsort((~warped[perm]).to(torch.uint8), stable=True)
            perm, cur = perm[order], cur.index_select(0, order)
            moved = perm[:n_warped]
            theta = _geometric_theta(ops[moved], level[moved], sign[moved])[:, :2]  # [W, 2, 3]
            head = cur[:n_warped]
            grid = F.affine_grid(theta, list(head.shape), align_corners=False)  # [W, S, S, 2]
            # Warp x - mean with zero fill, so pixels from outside the image come out as the dataset mean
            # (0 after normalisation, like Cutout).
            mean = self.mean.to(dev)
            head = F.grid_sample(head - mean, grid, mode=RA_WARP_MODE, padding_mode="zeros", align_corners=False)
            cur[:n_warped] = head.add_(mean).clamp_(0.0, 1.0)
        if cur is x01:
            return x01.clone()
        return torch.empty_like(cur).index_copy_(0, perm, cur)  # back to batch order

    def apply_strong(self, x01: torch.Tensor, p: StrongParams) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 1] -> normalised strong view float [N, 3, size, size]."""
        out = self.normalize(self.rand_augment(self.apply_weak(x01, p.weak), p))
        s = self.size
        ar = torch.arange(s, device=out.device)
        box = p.cutout.to(out.device)
        rows = (ar >= box[:, 0:1]) & (ar < box[:, 1:2])  # [N, S]
        cols = (ar >= box[:, 2:3]) & (ar < box[:, 3:4])
        keep = ~(rows[:, None, :, None] & cols[:, None, None, :])  # [N, 1, S, S]
        # 0 after normalisation is the dataset mean. A multiply broadcasts over channels faster than masked_fill.
        return out.mul_(keep.to(out.dtype))

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

    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic eval view: uint8 [N, 3, H, W] -> normalised float32 [N, 3, size, size]."""
        with torch.autocast(x.device.type, enabled=False):
            return self._eval(x)

    def _eval(self, x: torch.Tensor) -> torch.Tensor:
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


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None):
    """Mixup (Zhang et al. 2018) as DivideMix and TCL use it, images and targets together: (x_mix, y_mix, lam, perm).

    x: float [N, ...]; y: float [N, C] targets. The draws are `draw_mixup`'s (one host read for lam), each mixed
    sample stays closer to its own x[i], whose index and per-sample weight the caller keeps.
    """
    if y.dim() != 2 or y.shape[0] != x.shape[0] or not y.is_floating_point():
        raise UserError(f"mixup needs float targets [N, C] matching x's N={x.shape[0]}, got {list(y.shape)}")
    lam, perm = draw_mixup(x.shape[0], alpha, generator, device=x.device)
    return apply_mixup(x, lam, perm), apply_mixup(y, lam, perm), lam, perm


def draw_mixup(n: int, alpha: float, generator: torch.Generator | None = None, host: random.Random | None = None,
               device=None) -> tuple[float, torch.Tensor]:
    """Mixup's draws for a batch of n, apart from their application (`apply_mixup`): (lam, perm).

    lam ~ Beta(alpha, alpha), then lam = max(lam, 1 - lam), one per batch as in DivideMix and TCL, drawn on the host
    from ``host`` so that no device-to-host read happens per step (without one, from a Random seeded from the
    generator's stream: one host read). perm: int64 [n], a random permutation from the generator, on ``device``.
    """
    if not alpha > 0:
        raise UserError(f"mixup alpha must be > 0, got {alpha}")
    source = generator.device if generator is not None else (device or "cpu")
    if host is None:
        host = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator, device=source).item()))
    lam = host.betavariate(alpha, alpha)
    perm = torch.randperm(n, generator=generator, device=source).to(device or source)
    return max(lam, 1.0 - lam), perm


def apply_mixup(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """lam * x + (1 - lam) * x[perm]: images [N, ...] and targets [N, C] alike."""
    return lam * x + (1.0 - lam) * x[perm]
