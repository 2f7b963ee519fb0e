"""Decoding shard images to uint8 CHW tensors, and `IsolatedDecoder`: batches decoded in a child process
(`ccl.pipeline.isolate`) so that a crash or a hang on one image kills only the child (the image is skipped and
reported, a new child takes the rest of the batch)."""

from __future__ import annotations

import io
import mmap
import os
import warnings

import numpy as np
import torch

from ccl.errors import UserError
from ccl.pipeline.imagecheck import image_problem
from ccl.pipeline.isolate import Isolated

DECODE_STALL_S = 60.0  # a decoder child that makes no progress on one image for this long is killed (a hang)
VARIABLE_LOAD_SIZE = 224  # default load size for sets whose images differ in size (ImageNet-style)
EVAL_RESIZE_RATIO = 256 / 224  # short side resized to load * ratio before the centre crop (the 256 -> 224 rule)


def resolve_load_size(image_size, load_size) -> tuple[tuple[int, int], bool]:
    """((H, W), variable): the decoded size and whether the set's images vary in size (manifest size null)."""
    variable = image_size is None
    if load_size is None:
        load_size = VARIABLE_LOAD_SIZE if variable else image_size
    hw = (int(load_size), int(load_size)) if isinstance(load_size, (int, np.integer)) else tuple(int(v) for v in load_size)
    if len(hw) != 2 or min(hw) < 1:
        raise UserError(f"load_size must be a positive int or (height, width), got {load_size!r}")
    return hw, variable


def short_side(hw: tuple[int, int]) -> int:
    """Short side to resize variable-size images to before the centre crop to `hw` (256 for 224)."""
    return round(max(hw) * EVAL_RESIZE_RATIO)


def image_decoder():
    """torchvision's decoder (about 3x faster than PIL on small PNGs); PIL where torchvision no longer has one
    (torchvision 0.29 deprecated its image decoders in favour of TorchCodec)."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        decode_image = None
    if decode_image is not None:
        def tv_decode(data: bytes) -> torch.Tensor:
            # bytearray: torch.frombuffer wants a writable buffer; the copy is a few KB.
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

        return tv_decode

    from PIL import Image

    def pil_decode(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)

    return pil_decode


def decode_to(data: bytes, hw: tuple[int, int], variable: bool, decode=None) -> torch.Tensor:
    """Encoded JPEG/PNG bytes -> uint8 [3, H, W] of size `hw`.

    Variable-size sets: short side resized to `short_side(hw)`, then centre-cropped, so aspect is kept.
    Fixed-size sets: an image of another size (only when load_size differs from the set's) is resized to hw.
    Raises one of DECODE_ERRORS when the bytes do not decode.
    """
    from torchvision.transforms.v2 import functional as TF

    img = (decode or image_decoder())(data)  # [3, h, w]
    if tuple(img.shape[1:]) == hw:
        return img
    if variable:
        img = TF.resize(img, short_side(hw), antialias=True)
        return TF.center_crop(img, list(hw))
    return TF.resize(img, list(hw), antialias=True)


# torchvision raises RuntimeError on bad bytes; PIL raises OSError (UnidentifiedImageError) or ValueError.
DECODE_ERRORS = (RuntimeError, OSError, ValueError)


def decode_items(items, paths, hw, variable, validate, out: torch.Tensor, start: int, word=None,
                  fds: dict | None = None, decode=None) -> list[tuple[int, str]]:
    """Read and decode items[start:] = (shard, offset, size) into out[j] ([N, 3, H, W] uint8); returns the
    (position, reason) of the images that failed. `word` (an `isolate.Word`), if given, is told the position
    being decoded, so that whoever watches this process knows which image it died on."""
    fds = {} if fds is None else fds
    decode = decode or image_decoder()
    failed = []
    with warnings.catch_warnings():
        # torchvision 0.29 warns on every decode call that its decoders are deprecated; once is plenty.
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        for j in range(start, len(items)):
            if word is not None:
                word.set(j)
            s, off, size = items[j]
            try:
                fd = fds.get(s)
                if fd is None:
                    fd = fds[s] = os.open(paths[s], os.O_RDONLY)
                data = os.pread(fd, size, off)
                if len(data) != size:
                    raise OSError(f"read {len(data)} of {size} bytes (the shard shrank?)")
                why = image_problem(data) if validate else None
                if why is not None:
                    failed.append((j, why))
                    continue
                out[j] = decode_to(data, hw, variable, decode)
            except DECODE_ERRORS as e:
                failed.append((j, f"{type(e).__name__}: {e}"))
    return failed


def _into_buffer(paths, hw, variable, validate, buf):
    """The handler of an `IsolatedDecoder`'s child: decodes a job's items into the shared buffer."""
    torch.set_num_threads(1)  # one image at a time; and a forked intra-op pool is not safe to use
    # Through numpy: a tensor made by torch.frombuffer over an mmap copies about 100x slower.
    view = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8))
    fds: dict[int, int] = {}
    decode = image_decoder()
    h, w = hw

    def handle(items, start, single_until, word):
        out = view[: len(items) * 3 * h * w].view(len(items), 3, h, w)
        return decode_items(items, paths, hw, variable, validate, out, start, word, fds, decode)

    return handle


class IsolatedDecoder:
    """Decodes batches in a forked child process (`ccl.pipeline.isolate.Isolated`), into shared memory: a crash
    or a hang costs the image it happened on, never the caller; the child is replaced and the rest of the batch
    goes on."""

    def __init__(self, paths: list[str], hw: tuple[int, int], variable: bool, validate: bool, max_batch: int):
        self.hw, self.max_batch = hw, max_batch
        self.buf = mmap.mmap(-1, max_batch * 3 * hw[0] * hw[1])  # anonymous and MAP_SHARED: the child sees it
        # Import what decoding needs here, once: every child forked after that starts in milliseconds.
        image_decoder()
        from torchvision.transforms.v2 import functional  # noqa: F401

        self.child = Isolated(_into_buffer, (paths, hw, variable, validate, self.buf), fork=True, name="decoder",
                              stall_s=DECODE_STALL_S)

    @property
    def restarts(self) -> int:
        return self.child.restarts

    def decode(self, items: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """uint8 [N, 3, H, W] for items = (shard, offset, size), and the (position, reason) of failures."""
        n = len(items)
        if n > self.max_batch:
            raise ValueError(f"batch of {n} exceeds the decoder's buffer of {self.max_batch}")
        failed = self.child.run(items, n)
        h, w = self.hw
        images = torch.from_numpy(np.frombuffer(self.buf, dtype=np.uint8, count=n * 3 * h * w).copy()).view(n, 3, h, w)
        return images, failed

    def close(self) -> None:
        self.child.close()
