"""A small ImageFolder of real scans: scikit-learn's 1,797 handwritten digits as JPEG files.

Used by `metatrainer demo` and the tests. The 8×8 scans (17 grey levels) are upsampled so the
network sees more than a handful of pixels; they are real handwriting, not synthetic noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cluster.errors import UserError


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images as uint8 [N, 8, 8], labels [N]) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise UserError(
            "the sample data needs scikit-learn: pip install 'metatrainer[demo]'"
        ) from None
    digits = sk_load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    return images, digits.target.astype(np.int64)


def write_digits_imagefolder(
    dst: str | Path, size: int = 32, limit: int | None = None, quality: int = 90
) -> int:
    """Write `dst/<digit>/<index>.jpg` for the first `limit` digits (all if None); return count."""
    images, labels = load_digits()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    dst = Path(dst)
    for digit in range(10):
        (dst / str(digit)).mkdir(parents=True, exist_ok=True)
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        img = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
        img.save(dst / str(label) / f"{i:04d}.jpg", quality=quality)
    return len(labels)
