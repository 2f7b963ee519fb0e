"""The built-in data set: scikit-learn's handwritten digits, upscaled to 32x32 RGB."""

from __future__ import annotations

import numpy as np

from ccl.pipeline.convert.source import Item, Source, stratified_holdout

DIGITS_TEST_COUNT = 360  # 1,797 images -> 1,437 train / 360 test, stratified


def read_digits() -> Source:
    """scikit-learn's 1,797 8x8 digits (0..16 grey) upscaled to 32x32 RGB; stratified 1,437/360 split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # [N, 8, 8]
    labels = d.target.astype(np.int64)
    test = stratified_holdout(labels, DIGITS_TEST_COUNT / len(labels), total=DIGITS_TEST_COUNT)
    arrays = []
    for img in images:
        up = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR))  # [32, 32]
        arrays.append(np.repeat(up[:, :, None], 3, axis=2))  # [32, 32, 3]
    splits = {"train": [], "test": []}
    for i, (arr, y) in enumerate(zip(arrays, labels)):
        splits["test" if test[i] else "train"].append(Item(f"digits[{i}]", int(y), array=arr))
    return Source("digits", [str(c) for c in range(10)], splits, train_clean=True)


