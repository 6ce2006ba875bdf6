"""Extraction's image path up to the decoded pixels: read in DataLoader workers, decode on the device.

Workers (`ImageFiles`) do only what must happen on the CPU. For a JPEG they read the file's bytes and,
from its header (no pixel decode), its size and EXIF orientation, and decide the orientation as
`regionspot.data.images.load_record_image` does. Anything the device decoder cannot take (PNG, CMYK
JPEGs, 16-bit images, unreadable headers, an image to resample to its annotated size) is decoded right
there by `load_record_image`, which also names the fault of an unusable file.

On the compute device, `decode_images` decodes a batch's JPEGs in one call (`torchvision.io.decode_jpeg`:
nvJPEG on CUDA; libjpeg-turbo, the same library and pixels as PIL, on a CPU run), applies the EXIF
orientation to the tensor, and falls back to the CPU decode for a JPEG the device decoder refuses
(progressive JPEGs on some GPUs, corrupt files). Every image leaves as uint8 [3, H, W] RGB in its
annotation's frame, (H, W) = (record.height, record.width).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from regionspot.data.images import (
    ImageDecodeError,
    SizeMismatch,
    exif_orientation,
    exif_turn,
    load_record_image,
)
from regionspot.data.records import ImageRecord

# Header faults PIL raises; the CPU decode then tells the real reason (see data/images.py).
_HEADER_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_DEVICE_FORMATS = ("JPEG", "MPO")  # MPO: a camera JPEG with extra frames; both decoders read the first
_DEVICE_MODES = ("RGB", "L")  # YCbCr and grey JPEGs; CMYK / YCCK ones go to PIL


@dataclass
class ImageFile:
    """What a worker hands over for one image: a JPEG to decode on the device, the image decoded on the
    CPU, or the reason the image cannot be used."""

    position: int
    jpeg: torch.Tensor | None = None  # uint8 [bytes], the whole file
    orientation: int = 1  # EXIF orientation to apply once decoded (1: none)
    image: torch.Tensor | None = None  # uint8 [H, W, 3], decoded on the CPU, annotation's frame
    error: str | None = None

    def pin_memory(self) -> ImageFile:
        """Called by DataLoader(pin_memory=True): page-locked tensors copy to the GPU asynchronously."""
        if self.jpeg is not None:
            self.jpeg = self.jpeg.pin_memory()
        if self.image is not None:
            self.image = self.image.pin_memory()
        return self


def read_jpeg(record: ImageRecord, size_mismatch: SizeMismatch = "skip") -> tuple[bytearray, int] | None:
    """A record's file bytes and the EXIF orientation to apply after decoding, when the device decoder
    can take it (an RGB or grey JPEG of the annotated size in one of its frames); None otherwise.

    Raises:
        ImageDecodeError: the image has the annotated size in neither frame and `size_mismatch` is "skip".
    """
    if record.skip_reason:
        return None
    try:
        with open(record.path, "rb") as f:
            data = bytearray(f.read())  # writable: tensors share it without a copy
        with Image.open(io.BytesIO(data)) as im:  # parses the header only
            if im.format not in _DEVICE_FORMATS or im.mode not in _DEVICE_MODES:
                return None
            stored, orientation = im.size, exif_orientation(im)
    except _HEADER_ERRORS:
        return None
    want = (int(record.width), int(record.height))
    if not exif_turn(record.path, stored, orientation, want, size_mismatch):
        orientation = 1
    oriented = stored[::-1] if orientation in (5, 6, 7, 8) else stored
    if oriented != want:  # "rescale": the CPU path resamples it
        return None
    return data, orientation


def _decode_on_cpu(record: ImageRecord, size_mismatch: SizeMismatch) -> torch.Tensor:
    """uint8 [H, W, 3] by `load_record_image` (which raises ImageDecodeError, naming the fault)."""
    return torch.from_numpy(np.require(load_record_image(record, size_mismatch), requirements="W"))


class ImageFiles(Dataset):
    """The DataLoader workers' part: `ImageFile`s of `records` by position (see the module docstring)."""

    def __init__(self, records: Sequence[ImageRecord], size_mismatch: SizeMismatch = "skip"):
        self.records, self.size_mismatch = records, size_mismatch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> ImageFile:
        record = self.records[position]
        try:
            jpeg = read_jpeg(record, self.size_mismatch)
            if jpeg is not None:
                return ImageFile(position, jpeg=torch.frombuffer(jpeg[0], dtype=torch.uint8), orientation=jpeg[1])
            return ImageFile(position, image=_decode_on_cpu(record, self.size_mismatch))
        except ImageDecodeError as e:
            return ImageFile(position, error=str(e))


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to [C, H, W], as PIL's `ImageOps.exif_transpose` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))  # shown turned 90 degrees clockwise
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


def _decode_jpegs(files: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG files on `device`, in one call when every file decodes; None for a file it refuses."""
    if not files:
        return []
    try:
        return list(decode_jpeg(list(files), mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one refused file fails the batched call: decode them one by one
        pass
    out = []
    for data in files:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


def decode_images(
    files: Sequence[ImageFile],
    records: Sequence[ImageRecord],
    device: torch.device,
    size_mismatch: SizeMismatch = "skip",
) -> tuple[list[torch.Tensor | str], int]:
    """Decode a batch's images onto `device`.

    Args:
        files: what the workers handed over, one per image.
        records: all records; `files[i].position` indexes them.
        device: where the images are decoded (JPEGs) or copied to (images decoded on the CPU).
        size_mismatch: as in `load_record_image`, for a JPEG the device decoder refuses.
    Returns:
        Per file, uint8 [3, H, W] RGB on `device` in the annotation's frame, or the reason it cannot be
        used; and how many of the images were decoded on the CPU.
    """
    out: list[torch.Tensor | str | None] = [f.error for f in files]
    on_cpu = 0
    jpegs = [i for i, f in enumerate(files) if f.jpeg is not None]
    decoded = _decode_jpegs([files[i].jpeg for i in jpegs], device)
    for i, image in zip(jpegs, decoded, strict=True):
        record = records[files[i].position]
        if image is not None:
            image = orient(image, files[i].orientation)
        if image is None or tuple(image.shape[1:]) != (int(record.height), int(record.width)):
            try:  # the device refused it: the CPU decode reads it, or names its fault
                image = _decode_on_cpu(record, size_mismatch).to(device).permute(2, 0, 1)
            except ImageDecodeError as e:
                out[i] = str(e)
                continue
            on_cpu += 1
        out[i] = image
    for i, f in enumerate(files):
        if f.image is not None:
            out[i] = f.image.to(device, non_blocking=True).permute(2, 0, 1)  # (3, H, W)
            on_cpu += 1
    return out, on_cpu
