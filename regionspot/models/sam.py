"""Frozen SAM as a region encoder: one position-aware token per region prompt (DESIGN.md §2).

The token is the mask decoder's output token after the two-way transformer, before the hypernetwork
MLP: mask token 0, the single-mask output (T = 1), or the three multimask tokens (T = 3). The image
encoder runs once per image; the prompts of a whole batch of images go through the decoder's
transformer together, a chunk at a time; masks are upsampled only when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from regionspot.errors import RegionSpotError
from regionspot.models.frozen import FrozenEncoder, first_line
from regionspot.models.preprocess import as_chw, sam_input
from regionspot.models.sam_attention import SAM_ATTENTION, use_fast_attention
from regionspot.models.tiny import build_tiny_sam

# The decoder's output tokens are [iou, mask 0 (single mask), mask 1..3 (multimask), prompt tokens...];
# its IoU head predicts one score per mask token.
TOKEN_SLICES = {1: slice(1, 2), 3: slice(2, 5)}
IOU_SLICES = {1: slice(0, 1), 3: slice(1, 4)}
MASK_INDEX_OFFSET = {1: 0, 3: 1}  # hypernetwork MLP index of a token slice's first token
SAM_CHECKPOINTS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}


def load_sam(variant: str, checkpoint: str | Path | None, attention: str = "sdpa") -> Sam:
    """SAM `variant` (vit_b, vit_l, vit_h: the library's builders; tiny) with weights loaded safely.

    segment_anything's builders unpickle a checkpoint with a plain torch.load, so they build the
    architecture only and the weights are read here with weights_only=True.
    `attention`: "sdpa" runs the image encoder's attention on F.scaled_dot_product_attention
    (models/sam_attention.py; equal to the library's within float rounding, same state dict);
    "library" keeps segment_anything's own modules.
    """
    if attention not in SAM_ATTENTION:
        raise RegionSpotError(f"--sam-attention {attention!r}: choose one of {', '.join(SAM_ATTENTION)}")
    sam = build_tiny_sam() if variant == "tiny" else _read_sam(variant, checkpoint)
    if attention == "sdpa":
        use_fast_attention(sam.image_encoder)
    return sam


def _read_sam(variant: str, checkpoint: str | Path | None) -> Sam:
    if checkpoint is None or not Path(checkpoint).is_file():
        raise RegionSpotError(
            f"--sam-checkpoint {checkpoint}: no such file; download SAM {variant} weights from "
            f"{SAM_CHECKPOINTS[variant]}"
        )
    sam = sam_model_registry[variant](checkpoint=None)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = first_line(e)
        raise RegionSpotError(
            f"--sam-checkpoint {checkpoint}: not a SAM state dict readable with weights_only=True ({reason}); "
            f"official weights: {SAM_CHECKPOINTS[variant]}"
        ) from e
    if not isinstance(state, dict):
        raise RegionSpotError(
            f"--sam-checkpoint {checkpoint}: holds a {type(state).__name__}, not a state dict"
        )
    try:
        sam.load_state_dict(state)
    except RuntimeError as e:
        raise RegionSpotError(
            f"--sam-checkpoint {checkpoint} does not hold SAM {variant} weights ({first_line(e)}); "
            "pick the matching --sam (vit_b, vit_l, vit_h)"
        ) from e
    return sam.eval()


@dataclass
class RegionTokens:
    """One image's regions: tokens float32 [N, T, 256], SAM's IoU predictions [N, T], masks (COCO RLE)."""

    tokens: torch.Tensor
    iou: torch.Tensor
    masks: list[dict] | None = None


def encode_rle(masks: np.ndarray) -> list[dict]:
    """Binary masks [N, H, W] as COCO RLE dicts with `counts` as str (JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


class SamRegionEncoder(FrozenEncoder):
    """Frozen SAM: `prepare` (CPU workers) -> `encode` (once per image) -> `region_tokens` per prompt."""

    def __init__(self, sam: Sam, tokens: int = 1, precision: str = "fp32"):
        super().__init__(precision)
        if tokens not in TOKEN_SLICES:
            raise ValueError(f"tokens must be 1 or 3, not {tokens}")
        self.sam = sam.eval().requires_grad_(False)
        self.tokens = tokens
        self.img_size = int(sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.img_size)
        self.eval()

    def hot_modules(self) -> dict[str, nn.Module]:
        return {"SAM's image encoder": self.sam.image_encoder}

    def prepare(self, images: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Decoded RGB images (HxWx3 uint8 arrays, or uint8 [3, H, W] tensors on any device) -> the image
        encoder's input float32 [B, 3, S, S] on this encoder's device: longest side resized as
        `ResizeLongestSide.apply_image` does, normalised, padded bottom/right (`models.preprocess`)."""
        pixels = [as_chw(im).to(self.device, non_blocking=True) for im in images]
        return sam_input(pixels, self.img_size, self.sam.pixel_mean, self.sam.pixel_std)

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """`prepare`d images [B, 3, S, S] -> image embeddings [B, 256, S/16, S/16] float32."""
        with self._autocast():
            return self.sam.image_encoder(batch.to(self.device)).float()

    @torch.inference_mode()
    def region_tokens(
        self,
        embeddings: torch.Tensor,
        boxes: list[torch.Tensor],
        original_sizes: list[tuple[int, int]],
        masks: bool = False,
        chunk: int = 256,
    ) -> list[RegionTokens]:
        """Position-aware tokens of box prompts.

        Args:
            embeddings: [B, 256, h, w] from `encode`.
            boxes: per image, [Ni, 4] XYXY in pixels of the original image.
            original_sizes: per image, (height, width) of the original image.
            masks: also return each region's mask (the token SAM rates best) as COCO RLE of the original size.
            chunk: prompts per decoder call (bounds memory).
        Returns: per image, RegionTokens with tokens [Ni, T, 256] and iou [Ni, T] on the device, T = self.tokens.
        """
        frame, encode = self.transform.apply_boxes_torch, self._box_prompts
        return self._prompt_tokens(
            embeddings, boxes, original_sizes, frame, encode, self.tokens, masks, chunk
        )

    @torch.inference_mode()
    def point_tokens(
        self,
        embeddings: torch.Tensor,
        points: list[torch.Tensor],
        original_sizes: list[tuple[int, int]],
        masks: bool = False,
        chunk: int = 256,
    ) -> list[RegionTokens]:
        """Tokens of single foreground clicks ([Ni, 2] XY pixels of the original image, per image).

        Always the three multimask tokens (T = 3), as SAM and the official code do for ambiguous prompts.
        """
        frame, encode = self.transform.apply_coords_torch, self._click_prompts
        return self._prompt_tokens(embeddings, points, original_sizes, frame, encode, 3, masks, chunk)

    def _box_prompts(self, boxes: torch.Tensor):
        """[N, 4] XYXY boxes in SAM's resized frame -> the prompt encoder's (sparse, dense) embeddings."""
        return self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)

    def _click_prompts(self, points: torch.Tensor):
        """[N, 2] XY points in SAM's resized frame, one foreground click each -> (sparse, dense)."""
        coords = points[:, None, :]  # (N, 1, 2)
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=self.device)  # foreground
        return self.sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)

    def _prompt_tokens(self, embeddings, prompts, sizes, frame, encode, tokens: int, masks, chunk):
        """Per-image prompts in original pixels -> SAM's resized frame (`frame`) -> prompt
        embeddings (`encode`) -> the decoder's tokens, split back per image."""
        counts = [len(p) for p in prompts]
        if sum(counts) == 0:
            return self._split(counts, self._empty(tokens), masks)
        resized = torch.cat(
            [frame(p.to(self.device).float(), tuple(s)) for p, s in zip(prompts, sizes, strict=True)]
        )  # (N, 4) boxes or (N, 2) points, in SAM's resized frame
        decoded = self._decode(embeddings, counts, encode(resized), tokens, sizes, masks, chunk)
        return self._split(counts, decoded, masks)

    def _empty(self, tokens: int):
        return torch.zeros(0, tokens, 256, device=self.device), torch.zeros(0, tokens, device=self.device), []

    def _decode(self, embeddings, counts, prompts, tokens: int, sizes, want_masks: bool, chunk: int):
        """The decoder's transformer for all prompts of a batch of images, `chunk` prompts at a time.

        Same computation as MaskDecoder.predict_masks, stopped after the transformer (and the IoU head)
        unless masks are wanted.
        """
        sparse, dense = prompts  # (N, P, 256), (N, 256, h, w)
        dec = self.sam.mask_decoder
        image_pe = self.sam.prompt_encoder.get_dense_pe()  # (1, 256, h, w)
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)  # (5, 256)
        image_of = [i for i, count in enumerate(counts) for _ in range(count)]  # the image of each prompt
        # built on the host and sent without waiting: a device-side repeat_interleave would read its
        # length back, stalling the launch queue once per batch
        image_index = torch.tensor(image_of).to(self.device, non_blocking=True)  # (N,)
        out_tokens, out_iou, out_masks = [], [], []
        for start in range(0, len(image_of), chunk):
            index = image_index[start : start + chunk]
            n = len(index)
            src = embeddings[index] + dense[start : start + chunk]  # (n, 256, h, w)
            query = torch.cat([output_tokens.expand(n, -1, -1), sparse[start : start + chunk]], dim=1)
            with self._autocast():
                hs, src_out = dec.transformer(src, image_pe.expand(n, -1, -1, -1), query)  # (n, 5+P, 256)
                iou = dec.iou_prediction_head(hs[:, 0])[:, IOU_SLICES[tokens]]  # (n, T)
            token = hs[:, TOKEN_SLICES[tokens]].float()  # (n, T, 256)
            out_tokens.append(token)
            out_iou.append(iou.float())
            if want_masks:
                low = self._low_res_masks(src_out, src.shape, token, iou.float(), tokens)  # (n, 4h, 4w)
                out_masks.extend(self._full_masks(low, image_of[start : start + chunk], sizes))
        return torch.cat(out_tokens), torch.cat(out_iou), out_masks

    def _low_res_masks(self, src_out, shape, token, iou, tokens: int) -> torch.Tensor:
        """Each prompt's mask logits for the token SAM rates best (of its T): [n, 4h, 4w]."""
        dec = self.sam.mask_decoder
        n, c, h, w = shape
        with self._autocast():
            up = dec.output_upscaling(src_out.transpose(1, 2).reshape(n, c, h, w)).float()  # (n, 32, 4h, 4w)
        best = iou.argmax(1)  # (n,)
        first = MASK_INDEX_OFFSET[tokens]
        hyper = torch.stack(
            [dec.output_hypernetworks_mlps[first + t](token[:, t]) for t in range(tokens)], dim=1
        )  # (n, T, 32)
        hyper = hyper[torch.arange(n, device=hyper.device), best]  # (n, 32)
        return (hyper.unsqueeze(1) @ up.flatten(2)).view(n, up.shape[-2], up.shape[-1])

    def _full_masks(self, low: torch.Tensor, image_of: list[int], sizes, group: int = 16) -> list[dict]:
        """Low-res mask logits -> binary masks of the original image size (SAM's postprocess) -> RLE."""
        out = []
        for start in range(0, len(low), group):  # a few at a time: full-size masks are large
            stop = min(start + group, len(low))
            j = start
            while j < stop:  # runs of prompts of the same image share one postprocess call
                k = j
                while k < stop and image_of[k] == image_of[j]:
                    k += 1
                h, w = sizes[image_of[j]]
                input_size = ResizeLongestSide.get_preprocess_shape(h, w, self.img_size)
                full = self.sam.postprocess_masks(
                    low[j:k, None], input_size, (int(h), int(w))
                )  # (m, 1, H, W)
                out.extend(encode_rle((full[:, 0] > self.sam.mask_threshold).cpu().numpy()))
                j = k
        return out

    def _split(self, counts, decoded, want_masks: bool) -> list[RegionTokens]:
        tokens, iou, masks = decoded
        out, start = [], 0
        for n in counts:
            stop = start + n
            out.append(
                RegionTokens(tokens[start:stop], iou[start:stop], masks[start:stop] if want_masks else None)
            )
            start = stop
        return out

    def automatic_boxes(self, image: np.ndarray, points_per_side: int = 32, **options) -> np.ndarray:
        """Boxes [N, 4] XYXY (original pixels) of the regions SAM's automatic mask generator finds.

        `options`: further SamAutomaticMaskGenerator arguments (e.g. pred_iou_thresh; tiny SAM needs low ones).
        """
        from segment_anything import SamAutomaticMaskGenerator

        generator = SamAutomaticMaskGenerator(self.sam, points_per_side=points_per_side, **options)
        with torch.inference_mode():
            found = generator.generate(image)
        boxes = np.array([r["bbox"] for r in found], np.float32).reshape(-1, 4)  # XYWH
        boxes[:, 2:] += boxes[:, :2]
        return boxes
