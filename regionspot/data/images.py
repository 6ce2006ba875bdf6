"""Image files: decode to RGB uint8, or read only the size from the header.

Images keep their stored orientation (no EXIF transpose): COCO, LVIS and Objects365 boxes are
annotated on the raw pixel grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from regionspot.errors import RegionSpotError

# What PIL raises for unreadable files: OSError (missing, truncated, unknown format), SyntaxError
# (some corrupt PNG/GIF headers), ValueError / DecompressionBombError (absurd sizes).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageDecodeError(RegionSpotError):
    """An image file is missing or cannot be decoded; extraction skips such images and lists them."""


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB.

    Args:
        path: an image file PIL can read (JPEG, PNG, ...); grey, palette, RGBA and CMYK are converted.
    Returns:
        uint8 [H, W, 3] RGB in the file's stored orientation.
    Raises:
        ImageDecodeError: the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(f"cannot decode {path}: {e}") from e


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image from its header only (no pixel decode).

    Raises:
        ImageDecodeError: the file is missing or its header is not an image's.
    """
    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(f"cannot read the size of {path}: {e}") from e
