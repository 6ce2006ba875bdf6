"""Frozen SAM as a region encoder: one position-aware token per region prompt (DESIGN.md §2).

The token is the mask decoder's output token after the two-way transformer, before the hypernetwork
MLP: mask token 0 (the single-mask output, T = 1) or the three multimask tokens (T = 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

# name -> (image size, encoder width, depth, heads, global attention blocks, window, decoder MLP width)
SAM_VARIANTS = {
    "vit_b": (1024, 768, 12, 12, (2, 5, 8, 11), 14, 2048),
    "vit_l": (1024, 1024, 24, 16, (5, 11, 17, 23), 14, 2048),
    "vit_h": (1024, 1280, 32, 16, (7, 15, 23, 31), 14, 2048),
    "tiny": (256, 64, 2, 2, (1,), 4, 256),
}
SAM_CHECKPOINTS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}
TOKEN_SLICES = {1: slice(1, 2), 3: slice(2, 5)}  # in the decoder's output tokens: [iou, mask0, mask1..3]
IOU_SLICES = {1: slice(0, 1), 3: slice(1, 4)}


def build_sam(variant: str) -> Sam:
    """A SAM of the given variant built from segment_anything's own classes (weights not loaded)."""
    img_size, width, depth, heads, global_attn, window, mlp = SAM_VARIANTS[variant]
    patch = 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=depth,
            embed_dim=width,
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=heads,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=global_attn,
            window_size=window,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(img_size // patch, img_size // patch),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=mlp, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


@dataclass
class RegionTokens:
    """One image's regions: tokens float32 [N, T, 256], SAM's IoU predictions [N, T], masks (COCO RLE)."""

    tokens: torch.Tensor
    iou: torch.Tensor
    masks: list[dict] | None = None


def encode_rle(mask: np.ndarray) -> dict:
    """A binary HxW mask as COCO RLE with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


class SamRegionEncoder(nn.Module):
    """Frozen SAM: `prepare` (CPU workers) -> `encode` (once per image) -> `region_tokens` per prompt."""

    def __init__(self, sam: Sam, tokens: int = 1, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        if tokens not in TOKEN_SLICES:
            raise ValueError(f"tokens must be 1 or 3, not {tokens}")
        self.sam = sam.eval().requires_grad_(False)
        self.tokens = tokens
        self.img_size = sam.image_encoder.img_size
        self.transform = ResizeLongestSide(self.img_size)
        self.autocast_dtype = autocast_dtype

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> uint8 [3, h', w'] with the longest side at SAM's input size."""
        return torch.from_numpy(self.transform.apply_image(image)).permute(2, 0, 1).contiguous()

    def _autocast(self):
        device = self.sam.pixel_mean.device
        enabled = device.type == "cuda" and self.autocast_dtype is not None
        return torch.autocast(device.type, dtype=self.autocast_dtype, enabled=enabled)

    @torch.inference_mode()
    def encode(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Prepared uint8 images -> image embeddings [B, 256, H/16, W/16] (normalised and padded here)."""
        device = self.sam.pixel_mean.device
        batch = torch.stack([self.sam.preprocess(im.to(device).float()) for im in images])  # (B, 3, S, S)
        with self._autocast():
            return self.sam.image_encoder(batch).float()

    @torch.inference_mode()
    def _decode(self, embeddings, image_index, sparse, dense, tokens: int, sizes, input_sizes, masks, chunk):
        """Run the decoder's transformer for prompts of many images, `chunk` prompts at a time."""
        dec = self.sam.mask_decoder
        pe = self.sam.prompt_encoder.get_dense_pe()  # (1, 256, h, w)
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        out_tokens, out_iou, out_masks = [], [], []
        for start in range(0, len(image_index), chunk):
            idx = slice(start, start + chunk)
            n = len(image_index[idx])
            src = embeddings[image_index[idx]] + dense[idx]  # (n, 256, h, w)
            query = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse[idx]], dim=1)
            with self._autocast():
                hs, src_out = dec.transformer(src, pe.expand(n, -1, -1, -1), query)
            hs = hs.float()
            out_tokens.append(hs[:, TOKEN_SLICES[tokens]])  # (n, T, 256)
            iou = dec.iou_prediction_head(hs[:, 0])[:, IOU_SLICES[tokens]]  # (n, T)
            out_iou.append(iou)
            if masks:
                b, c, h, w = src.shape
                up = dec.output_upscaling(src_out.float().transpose(1, 2).reshape(b, c, h, w))
                best = hs[:, TOKEN_SLICES[tokens]][torch.arange(n), iou.argmax(1)]  # the token SAM rates best
                mlp_index = (iou.argmax(1) + (0 if tokens == 1 else 1)).tolist()
                hyper = torch.stack(
                    [dec.output_hypernetworks_mlps[m](t) for m, t in zip(mlp_index, best, strict=True)]
                )
                low = (hyper.unsqueeze(1) @ up.flatten(2)).view(n, 1, up.shape[-2], up.shape[-1])
                for j, i in enumerate(image_index[idx].tolist()):
                    full = self.sam.postprocess_masks(low[j : j + 1], input_sizes[i], sizes[i])
                    out_masks.append(encode_rle((full[0, 0] > self.sam.mask_threshold).cpu().numpy()))
        return (
            torch.cat(out_tokens) if out_tokens else torch.zeros(0, tokens, 256),
            torch.cat(out_iou) if out_iou else torch.zeros(0, tokens),
            out_masks,
        )

    def _split(self, counts, tokens, iou, masks, want_masks) -> list[RegionTokens]:
        out, start = [], 0
        for n in counts:
            out.append(
                RegionTokens(
                    tokens[start : start + n],
                    iou[start : start + n],
                    masks[start : start + n] if want_masks else None,
                )
            )
            start += n
        return out

    @torch.inference_mode()
    def region_tokens(
        self,
        embeddings: torch.Tensor,
        boxes: list[torch.Tensor],
        original_sizes: list[tuple[int, int]],
        masks: bool = False,
        chunk: int = 64,
    ) -> list[RegionTokens]:
        """Tokens for box prompts.

        Args:
            embeddings: [B, 256, h, w] from `encode`.
            boxes: per image, [Ni, 4] XYXY in pixels of the original image.
            original_sizes: per image, (height, width) of the original image.
        Returns: per image, RegionTokens with tokens [Ni, T, 256] and iou [Ni, T] (T = self.tokens).
        """
        device = embeddings.device
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            return self._split(
                counts, torch.zeros(0, self.tokens, 256), torch.zeros(0, self.tokens), [], masks
            )
        resized = torch.cat(
            [
                self.transform.apply_boxes_torch(b.to(device).float(), s)
                for b, s in zip(boxes, original_sizes, strict=True)
            ]
        )  # (N, 4) in SAM's frame
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=resized, masks=None)
        image_index = torch.repeat_interleave(
            torch.arange(len(boxes), device=device), torch.tensor(counts, device=device)
        )
        input_sizes = [ResizeLongestSide.get_preprocess_shape(h, w, self.img_size) for h, w in original_sizes]
        t, i, m = self._decode(
            embeddings, image_index, sparse, dense, self.tokens, original_sizes, input_sizes, masks, chunk
        )
        return self._split(counts, t, i, m, masks)

    @torch.inference_mode()
    def point_tokens(
        self,
        embeddings: torch.Tensor,
        points: list[torch.Tensor],
        original_sizes: list[tuple[int, int]],
        masks: bool = False,
        chunk: int = 64,
    ) -> list[RegionTokens]:
        """Tokens for single foreground clicks ([Ni, 2] XY pixels per image): always the three multimask
        tokens (T = 3), as SAM and the official code do for ambiguous prompts."""
        device = embeddings.device
        counts = [len(p) for p in points]
        if sum(counts) == 0:
            return self._split(counts, torch.zeros(0, 3, 256), torch.zeros(0, 3), [], masks)
        coords = torch.cat(
            [
                self.transform.apply_coords_torch(p.to(device).float(), s)
                for p, s in zip(points, original_sizes, strict=True)
            ]
        )[:, None, :]  # (N, 1, 2)
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=device)
        sparse, dense = self.sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        image_index = torch.repeat_interleave(
            torch.arange(len(points), device=device), torch.tensor(counts, device=device)
        )
        input_sizes = [ResizeLongestSide.get_preprocess_shape(h, w, self.img_size) for h, w in original_sizes]
        t, i, m = self._decode(
            embeddings, image_index, sparse, dense, 3, original_sizes, input_sizes, masks, chunk
        )
        return self._split(counts, t, i, m, masks)

    def automatic_boxes(self, image: np.ndarray, points_per_side: int = 32, **options) -> np.ndarray:
        """Boxes [N, 4] XYXY of the regions SAM's automatic mask generator finds in the image
        (`options`: further SamAutomaticMaskGenerator arguments, e.g. pred_iou_thresh)."""
        from segment_anything import SamAutomaticMaskGenerator

        generator = SamAutomaticMaskGenerator(self.sam, points_per_side=points_per_side, **options)
        with torch.inference_mode():
            found = generator.generate(image)
        boxes = np.array([r["bbox"] for r in found], np.float32).reshape(-1, 4)  # XYWH
        boxes[:, 2:] += boxes[:, :2]
        return boxes
