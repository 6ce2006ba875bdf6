"""Image files: decode to RGB uint8, or read only the size from the header.

`load_image` keeps the stored orientation (no EXIF transpose). `load_record_image` decodes an image
in the frame its annotation describes: it applies the EXIF orientation when, and only when, that
gives the annotated width x height, and skips (or, asked to, resamples) an image whose size matches
the annotation in neither frame, so boxes never land in the wrong place.

High bit depths: 16-bit samples become 8-bit by keeping their high byte (`v >> 8`), the rule Pillow
itself applies to 16-bit RGB(A) PNGs, and the one libpng (`png_set_strip_16`) and torchvision
(`convert_image_dtype`) use; so grey and colour 16-bit files, and any later decoder, give the same
bytes, and a file widened from 8 bits (`v * 257`) decodes back to exactly its 8-bit values.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps

from regionspot.errors import RegionSpotError

if TYPE_CHECKING:
    from regionspot.data.records import ImageRecord

# What PIL raises for unreadable files: OSError (missing, truncated, unknown format), SyntaxError
# (some corrupt PNG/GIF headers), ValueError / DecompressionBombError (absurd sizes).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_ORIENTATION = 0x0112  # the EXIF tag; values 5-8 swap width and height
SizeMismatch = Literal["skip", "rescale"]
SIZE_MISMATCH: tuple[str, ...] = ("skip", "rescale")


class ImageDecodeError(RegionSpotError):
    """An image extraction cannot use: missing, undecodable, outside the image folder, or not the
    annotated size. Extraction skips such images and lists them with the message as the reason."""


def _rgb8(im: Image.Image, path: str | Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a loaded PIL image of any mode."""
    if im.mode.startswith("I"):  # 16-bit grey ("I;16", "I;16B", ...; older Pillow opens it as "I")
        grey = np.asarray(im)
        if grey.size and (grey.min() < 0 or grey.max() > 0xFFFF):
            raise ImageDecodeError(
                f"cannot decode {path}: 32-bit integer pixels; convert the file to 8 or 16 bits"
            )
        grey = (grey.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise ImageDecodeError(
            f"cannot decode {path}: 32-bit float pixels have no defined 8-bit scale; convert the file to 8 bits"
        )
    if im.mode != "RGB":  # grey, palette, RGBA (alpha dropped), CMYK, ...; 16-bit RGB(A) reads as 8-bit
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB.

    Args:
        path: an image file PIL can read (JPEG, PNG, ...); grey, palette, RGBA, CMYK and 16-bit
            images are converted (see the module docstring for 16 bits).
    Returns:
        uint8 [H, W, 3] RGB in the file's stored orientation.
    Raises:
        ImageDecodeError: the file is missing, truncated, not an image, or of float pixels.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return _rgb8(im, path)
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(f"cannot decode {path}: {e}") from e


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 = as stored) of an opened image; a JPEG's is known without decoding
    its pixels, a PNG's only after `im.load()` (its EXIF may follow the pixels)."""
    value = im.getexif().get(_ORIENTATION, 1)
    return int(value) if value in range(2, 9) else 1  # a malformed tag: as stored, as exif_transpose does


def exif_turn(
    path: str | Path,
    stored: tuple[int, int],
    orientation: int,
    want: tuple[int, int],
    size_mismatch: SizeMismatch = "skip",
) -> bool:
    """Whether to apply the EXIF `orientation` to an image of `stored` (width, height) annotated as
    `want` (width, height): the rule of `load_record_image`, for decoders that orient the pixels themselves.

    Returns:
        True when the oriented image has the annotated size. When neither frame has it, False with
        `size_mismatch` "rescale" (the caller resamples), else ImageDecodeError (the reason to list).
    """
    oriented = stored[::-1] if orientation in (5, 6, 7, 8) else stored
    turn = orientation in range(2, 9) and oriented == want
    if not turn and stored != want and size_mismatch == "skip":
        turned = f" ({oriented[0]}x{oriented[1]} with its EXIF orientation)" if oriented != stored else ""
        raise ImageDecodeError(
            f"{path}: image is {stored[0]}x{stored[1]}{turned}, the annotation says {want[0]}x{want[1]}; "
            "its boxes would land in the wrong place (pass --size-mismatch rescale to resample it "
            "to the annotated size, or fix the annotation's width/height)"
        )
    return turn


def load_record_image(record: ImageRecord, size_mismatch: SizeMismatch = "skip") -> np.ndarray:
    """Decode a record's image in the frame of its annotation (`record.width` x `record.height`).

    The EXIF orientation is applied when, and only when, the oriented image has the annotated size
    (detectron2's `read_image`, which the official code uses, always applies it; annotations made
    on the stored pixel grid keep it). This includes the orientations that keep the size (mirror,
    180 degrees), which the size cannot tell apart: there the official behaviour stands.

    Args:
        record: the image; `record.path` is read unless `record.skip_reason` is set.
        size_mismatch: what to do when the image has the annotated size in neither orientation:
            "skip" raises ImageDecodeError; "rescale" resamples the image (bilinear) to the annotated
            size, which puts the image under the boxes as annotated, so the stored boxes, sizes and
            detections stay in the annotation's frame.
    Returns:
        uint8 [record.height, record.width, 3] RGB.
    Raises:
        ImageDecodeError: the record has a skip reason; the file is missing or undecodable; its size
            differs from the annotation's and `size_mismatch` is "skip". The message is the reason
            extraction lists.
    """
    if size_mismatch not in SIZE_MISMATCH:
        raise ValueError(f"size_mismatch must be one of {SIZE_MISMATCH}, not {size_mismatch!r}")
    if record.skip_reason:
        raise ImageDecodeError(record.skip_reason)
    path, want = record.path, (int(record.width), int(record.height))
    try:
        with Image.open(path) as im:
            im.load()  # first: a PNG may keep its EXIF after the pixels
            turn = exif_turn(path, im.size, exif_orientation(im), want, size_mismatch)
            image = _rgb8(ImageOps.exif_transpose(im) if turn else im, path)
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(f"cannot decode {path}: {e}") from e
    if image.shape[:2] != (want[1], want[0]):
        image = np.asarray(Image.fromarray(image).resize(want, Image.Resampling.BILINEAR))
    return image


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image from its header only (no pixel decode), in its stored orientation.

    Raises:
        ImageDecodeError: the file is missing or its header is not an image's.
    """
    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(f"cannot read the size of {path}: {e}") from e
