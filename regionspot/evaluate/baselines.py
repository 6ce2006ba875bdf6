"""The paper's Table 1 baselines: CLIP alone names each region, no trained head.

- clip-crop: each box is cut out of the original image (no context), squashed to CLIP's S x S input
  (aspect ratio not kept, as the feature map's input is) and classified by CLIP's image embedding
  (after ln_post and projection) against the shard set's text embeddings.
- clip-mask: the same, with the pixels outside the region's SAM mask painted CLIP's mean colour
  first (needs shards extracted with --masks).
Regions, proposal scores and text embeddings come from the shard set, so the baselines see exactly
the regions the head sees; only the per-region CLIP pass runs online.
"""

from __future__ import annotations

import numpy as np
import torch

from regionspot.errors import RegionSpotError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation mean (RGB, 0-1)


def crop_region(image: np.ndarray, box: np.ndarray, mask: np.ndarray | None = None, fill=None) -> np.ndarray:
    """The box's pixels (whole pixels covering it), optionally with the outside of `mask` filled.

    Args:
        image: uint8 [H, W, 3] RGB, the original image.
        box: [4] XYXY pixels of the original image.
        mask: bool/uint8 [H, W] the region's mask, or None (clip-crop).
        fill: RGB uint8 [3] written outside the mask.
    Returns:
        uint8 [h, w, 3], at least 1 x 1.
    """
    h, w = image.shape[:2]
    x0 = int(np.clip(np.floor(box[0]), 0, w - 1))
    y0 = int(np.clip(np.floor(box[1]), 0, h - 1))
    x1 = int(np.clip(np.ceil(box[2]), x0 + 1, w))
    y1 = int(np.clip(np.ceil(box[3]), y0 + 1, h))
    crop = image[y0:y1, x0:x1]
    if mask is not None:
        crop = np.where(mask[y0:y1, x0:x1, None].astype(bool), crop, np.asarray(fill, np.uint8))
    return np.ascontiguousarray(crop)


def clip_region_logits(
    clip, image: np.ndarray, boxes: np.ndarray, text: torch.Tensor, logit_scale: float,
    masks: list[dict] | None = None, device: torch.device | str = "cpu", chunk: int = 64,
) -> torch.Tensor:  # fmt: skip
    """Class logits of one image's regions from CLIP on each region's crop.

    Args:
        clip: the backbones' ClipMapEncoder (prepare, image_embeddings).
        image: uint8 [H, W, 3] RGB original image.
        boxes: float [N, 4] XYXY pixels of the original image.
        text: float32 [K, D] L2-normalised text embeddings, on `device`.
        logit_scale: CLIP's scale s (logits = s * image . text).
        masks: N COCO RLE dicts (clip-mask) or None (clip-crop).
    Returns:
        float32 [N, K] logits.
    """
    fill = None
    if masks is not None:
        import pycocotools.mask as mask_utils

        mean = getattr(clip, "mean", None)
        mean = OPENAI_MEAN if mean is None else tuple(float(v) for v in torch.as_tensor(mean).flatten())
        fill = np.round(np.asarray(mean) * 255).astype(np.uint8)
        if len(masks) != len(boxes):
            raise RegionSpotError("clip-mask needs one SAM mask per region; extract the shards with --masks")
    out = []
    for lo in range(0, len(boxes), chunk):
        crops = []
        for i in range(lo, min(lo + chunk, len(boxes))):
            mask = None
            if masks is not None:
                rle = dict(masks[i])
                if isinstance(rle["counts"], str):
                    rle["counts"] = rle["counts"].encode()
                mask = mask_utils.decode(rle)  # [H, W]
            crops.append(crop_region(image, boxes[i], mask, fill))
        with torch.inference_mode():
            emb = clip.image_embeddings(clip.prepare(crops).to(device))  # [n, D], L2-normalised
            out.append((logit_scale * emb.float() @ text.T).cpu())  # [n, K]
    if not out:
        return torch.zeros(0, text.shape[0])
    return torch.cat(out)
