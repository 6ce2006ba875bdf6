"""The encoders' image preprocessing as tensor operations, on whatever device holds the image.

Both start from the decoded image, uint8 [3, H, W] RGB in the annotation's frame:

- SAM (`sam_input`): the longest side resized to the encoder's input size S and rounded to uint8, as
  segment_anything's `ResizeLongestSide.apply_image` does with PIL; then normalised with SAM's pixel
  mean/std and zero-padded bottom/right to S x S, as `Sam.preprocess` does.
- CLIP (`clip_input`): squashed to S x S (no crop, aspect ratio not kept) with bilinear interpolation,
  without antialias by default as the official pipeline's torchvision resize did; then scaled to [0, 1]
  and normalised with CLIP's mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide


def as_chw(image) -> torch.Tensor:
    """A decoded image as uint8 [3, H, W]: a uint8 [3, H, W] tensor as it is, an HxWx3 array copied
    (decoded arrays may be read-only)."""
    if isinstance(image, torch.Tensor):
        return image
    return torch.tensor(image).permute(2, 0, 1)


def _as_channels(values, like: torch.Tensor) -> torch.Tensor:
    """Per-channel constants (a sequence of 3 or a [3, 1, 1] tensor) as float32 [3, 1, 1] on `like`'s device."""
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).reshape(3, 1, 1)


def _pil_bilinear_pass(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One of PIL's resampling passes: antialiased bilinear (PIL's filter), rounded half up to uint8 levels."""
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.add_(0.5).floor_().clamp_(0, 255)


def sam_resize(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """Resize so that the longest side is `long_side`, as SAM's `ResizeLongestSide.apply_image` does.

    PIL resizes in two passes, horizontal then vertical, rounding half up to uint8 after each; doing
    the same in float32 gives PIL's pixels within one level where PIL's fixed-point weights round the
    other way: up to ~0.2% of the pixels when downscaling, none for most upscales.

    Args:
        image: uint8 [3, H, W] RGB, on any device.
        long_side: SAM's input size S.
    Returns:
        uint8 [3, h', w'] on the image's device, max(h', w') = S, the sides rounded as
        `ResizeLongestSide.get_preprocess_shape` rounds them.
    """
    h, w = image.shape[-2:]
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(h, w, long_side)
    x = image[None].float()  # (1, 3, H, W)
    if new_w != w:
        x = _pil_bilinear_pass(x, (h, new_w))  # (1, 3, H, w')
    if new_h != h:
        x = _pil_bilinear_pass(x, (new_h, new_w))  # (1, 3, h', w')
    return x[0].to(torch.uint8)


def sam_input(images: Sequence[torch.Tensor], size: int, pixel_mean, pixel_std) -> torch.Tensor:
    """SAM image encoder input of a batch: longest side resized (`sam_resize`), normalised, padded.

    Args:
        images: at least one uint8 [3, Hi, Wi] RGB image, all on one device.
        size: the encoder's input size S (`image_encoder.img_size`).
        pixel_mean, pixel_std: SAM's per-channel constants on the 0-255 scale (3 values or [3, 1, 1]).
    Returns:
        float32 [B, 3, S, S] on the images' device; each image at the top left, zeros elsewhere.
    """
    mean, std = _as_channels(pixel_mean, images[0]), _as_channels(pixel_std, images[0])
    out = torch.zeros(len(images), 3, size, size, device=images[0].device)  # (B, 3, S, S)
    for i, image in enumerate(images):
        resized = sam_resize(image, size).float()  # (3, h', w')
        out[i, :, : resized.shape[1], : resized.shape[2]] = (resized - mean) / std
    return out


def clip_input(
    images: Sequence[torch.Tensor], size: int, mean, std, antialias: bool = False
) -> torch.Tensor:
    """CLIP image input of a batch: each image squashed to S x S (bilinear), scaled to [0, 1], normalised.

    Args:
        images: at least one uint8 [3, Hi, Wi] RGB image, all on one device.
        size: CLIP's input size S.
        mean, std: CLIP's per-channel constants on the 0-1 scale (3 values or [3, 1, 1]).
        antialias: False (default) resizes as the official pipeline did (torchvision's tensor resize
            before 0.17, `F.interpolate` bilinear); True antialiases when downscaling, as PIL does.
    Returns:
        float32 [B, 3, S, S] on the images' device.
    """
    mean, std = _as_channels(mean, images[0]), _as_channels(std, images[0])
    out = torch.empty(len(images), 3, size, size, device=images[0].device)  # (B, 3, S, S)
    for i, image in enumerate(images):
        x = image[None].float().div_(255)  # (1, 3, H, W)
        out[i] = F.interpolate(x, size=(size, size), mode="bilinear", antialias=antialias, align_corners=False)[0]
    return (out - mean) / std
