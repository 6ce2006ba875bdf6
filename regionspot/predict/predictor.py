"""Name the regions of your own images: SAM + CLIP + the trained head, online (no shards).

    predictor = RegionPredictor.from_checkpoint("runs/bl/checkpoints/last", backbones="bl")
    predictor.set_vocabulary(["cat", "dog", "sofa"])   # text embeddings, cached per vocabulary
    predictor.set_image(image)                         # uint8 HxWx3 RGB: SAM's encoder and CLIP, once
    regions = predictor.predict(boxes=[[10, 20, 200, 220]])

A region goes through exactly the code extraction and evaluation use — the same SAM token and CLIP
map functions, the same float16 rounding the shards apply, the same head and the same scoring — so
for the same image and boxes it gets the label `regionspot eval` gives it, and its score (the softmax
probability over the vocabulary) agrees to within float32 noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from regionspot.data.boxes import box_areas
from regionspot.devices import resolve_device
from regionspot.errors import RegionSpotError
from regionspot.predict.config import DEFAULT_PRESET, automatic_defaults
from regionspot.predict.inputs import check_boxes, check_image, check_points, check_vocabulary

STORED_DTYPE = torch.float16  # what the shards hold (shards.schema.ARRAY_FIELDS); predict rounds the same way
# SamAutomaticMaskGenerator upsamples every candidate mask of a batch of clicks to the image's size
# (3 masks per click, ~8 bytes per pixel while it scores them): a batch is sized to stay under this.
AUTOMATIC_BATCH_BYTES = 512 * 2**20
AUTOMATIC_FILTERS = (  # the generator's filters in the order it applies them, with their flags
    ("pred_iou_thresh", "--pred-iou-thresh"),
    ("stability_score_thresh", "--stability-score-thresh"),
    ("min_mask_region_area", "--min-area"),
)


@dataclass
class Region:
    """One named region.

    box:       (x0, y0, x1, y1) pixels of the original image (clipped to it; for a point prompt, the
               box of SAM's mask).
    label:     the most probable vocabulary entry; score: its probability (softmax over the vocabulary).
    topk:      the k most probable (label, probability) pairs, best first.
    iou:       SAM's predicted IoU of the region's mask (of the token the region keeps).
    mask:      COCO RLE `{"size": [h, w], "counts": str}` of SAM's mask, or None when not asked for;
               `mask_array()` decodes it to bool [h, w]. RLE keeps a few hundred regions cheap.
    embedding: float32 [D], the region in CLIP's text space (L2-normalised), when asked for.
    attention: float32 [L], the head's last-layer cross-attention over the CLIP map (class token
               first), when asked for.
    point:     (x, y) of the click, for point prompts.
    token:     which SAM token the region keeps (0 for T = 1; 0..2 for the multimask tokens).
    """

    box: tuple[float, float, float, float]
    label: str
    score: float
    topk: list[tuple[str, float]]
    iou: float
    label_index: int
    mask: dict | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)
    attention: np.ndarray | None = field(default=None, repr=False)
    point: tuple[float, float] | None = None
    token: int = 0

    def mask_array(self) -> np.ndarray | None:
        """SAM's mask as bool [h, w], or None."""
        if self.mask is None:
            return None
        from pycocotools import mask as mask_utils

        rle = dict(self.mask)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        return mask_utils.decode(rle).astype(bool)

    def to_json(self) -> dict:
        """The region as written to OUT/<stem>.json (no embedding, no attention)."""
        out = {
            "box": [round(float(v), 2) for v in self.box],
            "label": self.label,
            "score": float(self.score),
            "topk": [[name, float(p)] for name, p in self.topk],
            "iou": float(self.iou),
        }
        if self.point is not None:
            out["point"] = [float(v) for v in self.point]
        if self.mask is not None:
            out["mask"] = self.mask
        return out


@dataclass
class ImageFeatures:
    """One image after the backbones: what `predict` needs, on the predictor's device."""

    image: np.ndarray  # uint8 [H, W, 3], kept for SAM's automatic mask generator
    sam_embedding: torch.Tensor  # [256, H', W'] SAM image embedding
    clip_map: torch.Tensor  # [L, C] float32 holding float16-rounded values, class token first

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the original image."""
        return int(self.image.shape[0]), int(self.image.shape[1])


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """The value the shards would hold: float32 -> float16 -> float32."""
    return x.to(STORED_DTYPE).float()


class RegionPredictor:
    """SAM + CLIP + a trained `RegionSpotHead`, for naming regions of single images.

    Build it with `from_checkpoint`; then `set_vocabulary`, `set_image`, `predict`. For many images,
    `encode_images` runs the backbones on a batch and `predict(features=...)` names the regions of each.
    `automatic` holds SamAutomaticMaskGenerator options for prompt-less calls (points_per_side,
    pred_iou_thresh, stability_score_thresh, min_mask_region_area, ...; default `automatic_defaults`
    of the SAM variant).
    """

    def __init__(self, backbones, head: torch.nn.Module, device: str | torch.device = "cpu", imported=False):
        self.backbones = backbones
        self.device = torch.device(device)
        self.head = head.to(self.device).eval()
        self.imported = imported
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.vocabulary: list[str] = []
        self._text: torch.Tensor | None = None
        self._features: ImageFeatures | None = None
        self.automatic: dict = automatic_defaults(backbones.spec.sam)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        backbones=None,
        *,
        sam_checkpoint: str | None = None,
        clip_pretrained: str | None = None,
        device: str | torch.device | None = None,
        **overrides,
    ) -> RegionPredictor:
        """Load the backbones and a head checkpoint, refusing a head trained on other backbones.

        Args:
            checkpoint: a checkpoint directory (runs/X/checkpoints/step-N or .../last), a
                head.safetensors, or an official RegionSpot .pth (imported: it takes the chosen
                backbones' fingerprint).
            backbones: a preset name (bb, bl, bl336, tiny), `BackboneOptions` or a resolved `BackboneSpec`;
                None: the checkpoint's preset when its fingerprint names one (tiny), else bl.
            sam_checkpoint, clip_pretrained, **overrides: with a preset name, the other
                `BackboneOptions` (sam, clip, clip_size, sam_tokens).
            device: auto (default: CUDA when present, else the CPU), cpu, cuda, cuda:N or a torch.device.
        """
        from regionspot.models.checkpoint import head_fingerprint, load_head
        from regionspot.models.options import BackboneOptions
        from regionspot.models.presets import backbones_for_checkpoint, load_backbones

        if backbones is None or isinstance(backbones, str):
            found = backbones_for_checkpoint(backbones, checkpoint)
            overrides = {**{k: v for k, v in found.items() if k != "backbones"}, **overrides}
            backbones = BackboneOptions(
                found.get("backbones", backbones or DEFAULT_PRESET), sam_checkpoint=sam_checkpoint,
                clip_pretrained=clip_pretrained, **overrides,
            )  # fmt: skip
        runtime = backbones.runtime() if isinstance(backbones, BackboneOptions) else {}
        spec = backbones.spec() if isinstance(backbones, BackboneOptions) else backbones
        checkpoint = Path(checkpoint)
        device = resolve_device(device)
        # the head first: a wrong checkpoint is reported before the (slow) backbones load
        head, fingerprint, imported = load_head(checkpoint)
        loaded = load_backbones(spec, device=device, **runtime)
        fingerprint = head_fingerprint(fingerprint, lambda: loaded.fingerprint)
        check_compatible(head, fingerprint, loaded, checkpoint, spec)
        return cls(loaded, head, device=device, imported=imported)

    # --- vocabulary -------------------------------------------------------------------------
    def set_vocabulary(self, names: Sequence[str]) -> None:
        """Use these class names; their text embeddings are computed once per vocabulary and cached."""
        names = check_vocabulary(names)
        key = tuple(names)
        if key not in self._text_cache:
            with torch.inference_mode():
                text = self.backbones.clip.text_embeddings(list(names))  # (K, D), L2-normalised
            self._text_cache[key] = torch.as_tensor(text, dtype=torch.float32).to(self.device)
        self.vocabulary, self._text = list(names), self._text_cache[key]

    # --- images -----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images: Sequence[np.ndarray]) -> list[ImageFeatures]:
        """Run SAM's image encoder and CLIP on a batch of uint8 HxWx3 RGB images (sizes may differ)."""
        images = [check_image(im) for im in images]
        if not images:
            return []
        sam, clip = self.backbones.sam, self.backbones.clip
        embeddings = sam.encode(sam.prepare(images))  # (B, 256, H', W')
        maps = _rounded(clip.feature_map(clip.prepare(images)))  # (B, L, C), float16-rounded like the shards
        return [ImageFeatures(im, e, m) for im, e, m in zip(images, embeddings, maps, strict=True)]

    def set_image(self, image: np.ndarray) -> None:
        """Encode one uint8 HxWx3 RGB image; later `predict` calls name regions of it."""
        self._features = self.encode_images([image])[0]

    # --- regions ----------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(
        self,
        boxes=None,
        points=None,
        topk: int = 5,
        masks: bool = True,
        embeddings: bool = False,
        attention: bool = False,
        *,
        features: ImageFeatures | None = None,
    ) -> list[Region]:
        """Name the regions of the current image (or of `features`), in prompt order.

        Args:
            boxes: [N, 4] XYXY pixels of the image (clipped to it; an empty box is an error).
            points: [N, 2] (x, y) pixels, one foreground click per region: SAM's three multimask
                tokens are each scored and the region keeps the one SAM rates best.
            Neither: the regions of SAM's automatic mask generator ("everything in the image").
            topk: how many (label, probability) pairs each region lists (at most the vocabulary size).
            masks, embeddings, attention: also return SAM's mask (COCO RLE), the region embedding
                [D] and the last-layer cross-attention over the CLIP map [L].
            features: an image encoded by `encode_images` (default: the one `set_image` encoded).
        """
        if features is None:
            if self._features is None:
                raise RegionSpotError("no image; call set_image(image) before predict()")
            features = self._features
        if self._text is None:
            raise RegionSpotError("no vocabulary; call set_vocabulary(['cat', 'dog', ...]) before predict()")
        if boxes is not None and points is not None:
            raise RegionSpotError("pass boxes or points, not both")
        if topk < 1:
            raise RegionSpotError(f"topk={topk}: must be at least 1")
        height, width = features.size
        sam = self.backbones.sam
        embedding = features.sam_embedding[None]  # (1, 256, H', W')
        prompt_points = None
        if points is not None:
            prompt_points = check_points(points, width, height)
            out = sam.point_tokens(
                embedding, [torch.from_numpy(prompt_points).to(self.device)], [(height, width)], masks=True
            )[0]
        else:
            if boxes is None:
                boxes = self.automatic_boxes(features)
            boxes = check_boxes(boxes, width, height)
            out = sam.region_tokens(
                embedding, [torch.from_numpy(boxes).to(self.device)], [(height, width)], masks=masks
            )[0]
        tokens, iou = _rounded(out.tokens), _rounded(out.iou)  # (N, T, 256), (N, T)
        if len(tokens) == 0:
            return []
        probs, chosen, embeds, attn = self._score(tokens, iou, features.clip_map, embeddings, attention)
        k = min(topk, len(self.vocabulary))
        top_p, top_i = _topk(probs, k)
        rle = out.masks if (masks or prompt_points is not None) and out.masks is not None else None
        regions = []
        for n in range(len(tokens)):
            mask = rle[n] if rle is not None else None
            box = _mask_box(mask) if prompt_points is not None else tuple(float(v) for v in boxes[n])
            pairs = [(self.vocabulary[i], float(p)) for p, i in zip(top_p[n], top_i[n], strict=True)]
            regions.append(
                Region(
                    box=box,
                    label=pairs[0][0],
                    score=pairs[0][1],
                    topk=pairs,
                    iou=float(iou[n, chosen[n]]),
                    label_index=int(top_i[n][0]),
                    mask=mask if masks else None,
                    embedding=None if embeds is None else embeds[n],
                    attention=None if attn is None else attn[n],
                    point=None if prompt_points is None else tuple(float(v) for v in prompt_points[n]),
                    token=int(chosen[n]),
                )
            )
        return regions

    # --- automatic regions --------------------------------------------------------------------------
    def automatic_boxes(self, features: ImageFeatures, options: dict | None = None) -> np.ndarray:
        """Boxes float32 [N, 4] XYXY (pixels of the image) of the regions SAM's automatic mask generator
        finds with `options` (default `self.automatic`); boxes smaller than min_mask_region_area dropped.

        The generator sees the image at most at SAM's input size (what SAM's encoder sees anyway): it
        scores every mask at the size it is given, so a 12-megapixel photo would cost minutes and
        gigabytes for the same boxes. Clicks go in batches sized to stay under AUTOMATIC_BATCH_BYTES.
        """
        from PIL import Image

        options = dict(self.automatic if options is None else options)
        image = features.image
        height, width = features.size
        scale = min(1.0, self.backbones.sam.img_size / max(height, width))
        if scale < 1:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        min_area = int(options.get("min_mask_region_area", 0))
        options["min_mask_region_area"] = int(min_area * scale * scale)
        pixels = image.shape[0] * image.shape[1]
        options.setdefault("points_per_batch", int(np.clip(AUTOMATIC_BATCH_BYTES // (3 * 8 * pixels), 1, 64)))
        points_per_side = options.pop("points_per_side", 32)
        boxes = np.asarray(self.backbones.sam.automatic_boxes(image, points_per_side, **options), np.float32)
        boxes = (boxes.reshape(-1, 4) / scale).clip(0, [width, height, width, height])
        return boxes[box_areas(boxes) >= max(min_area, 1e-6)].astype(np.float32)

    def explain_no_regions(self, features: ImageFeatures) -> str:
        """Why the automatic mask generator kept no region of this image, and which option to lower: its
        filters are relaxed one at a time, in the order it applies them, until regions appear (a few
        more generator runs)."""
        relaxed, off = dict(self.automatic), []
        for key, flag in AUTOMATIC_FILTERS:
            if not relaxed.get(key):
                continue
            off.append(f"{flag} 0")
            relaxed[key] = 0
            found = len(self.automatic_boxes(features, relaxed))
            if found:
                return (f"lower {flag} (now {self.automatic[key]}): with {' and '.join(off)} SAM keeps "
                        f"{found} region(s)")  # fmt: skip
        return (f"SAM finds no region even with every filter off; raise --points-per-side "
                f"(now {self.automatic.get('points_per_side', 32)})")  # fmt: skip

    def _score(self, tokens, iou, clip_map, want_embeddings: bool, want_attention: bool):
        """Head + scoring, as evaluation does: (probs [N, K] float64, chosen token [N], embeddings
        [N, D] or None, attention [N, L] or None)."""
        from regionspot.models.scoring import region_probabilities

        everything = torch.ones(1, len(tokens), dtype=torch.bool, device=tokens.device)  # (1, N) no padding
        logits = self.head(tokens[None], clip_map[None], self._text, region_mask=everything)[0]  # (N, T, K)
        probs = region_probabilities(logits, iou)  # (N, K): the best token's softmax, as evaluation does
        # the token region_probabilities kept (argmax, first on ties), for the mask, embedding, attention
        chosen = iou.argmax(-1) if iou.shape[1] > 1 else torch.zeros(len(iou), dtype=torch.long)
        embeds = attn = None
        if want_embeddings or want_attention:
            result = self.head.embed(
                tokens[None], clip_map[None], region_mask=everything, return_attention=want_attention
            )
            emb, att = result if want_attention else (result, None)
            rows = torch.arange(len(tokens), device=tokens.device)
            emb = emb[0]  # (N, T, D)
            if emb.dim() == 3:
                emb = emb[rows, chosen.to(emb.device)]  # (N, D)
            embeds = emb.float().cpu().numpy() if want_embeddings else None
            if att is not None:
                att = att[0]  # (N, T, L)
                if att.dim() == 3:
                    att = att[rows, chosen.to(att.device)]  # (N, L)
                attn = att.float().cpu().numpy()
        return probs.cpu(), chosen.cpu().numpy(), embeds, attn


def _topk(probs: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    from regionspot.models.scoring import topk_labels

    scores, idx = topk_labels(probs, k)  # (N, k), (N, k)
    return torch.as_tensor(scores).tolist(), torch.as_tensor(idx).tolist()


def _mask_box(mask: dict | None) -> tuple[float, float, float, float]:
    from pycocotools import mask as mask_utils

    rle = dict(mask)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return (x, y, x + w, y + h)


def check_compatible(head, fingerprint: str | None, backbones, checkpoint: Path, spec) -> None:
    """Refuse a head trained on other backbones (fingerprint) or of other dimensions than the CLIP."""
    clip = backbones.clip
    config = head.config() if hasattr(head, "config") else {}
    width, dim = config.get("clip_width"), config.get("embed_dim")
    if (width is not None and width != clip.width) or (dim is not None and dim != clip.embed_dim):
        raise RegionSpotError(
            f"checkpoint {checkpoint} expects a CLIP of width {width} and embedding size {dim}, but the chosen "
            f"backbones ({spec.clip}) give {clip.width} and {clip.embed_dim}; pass the --backbones it was trained with"
        )
    if fingerprint is not None and fingerprint != backbones.fingerprint:
        raise RegionSpotError(
            f"checkpoint {checkpoint} was trained on backbones with fingerprint {fingerprint[:12]}, but the chosen "
            f"backbones (sam {spec.sam}, clip {spec.clip} @{spec.clip_size}, tokens {spec.sam_tokens}) have "
            f"{backbones.fingerprint[:12]}; pass the --backbones/--sam-checkpoint/--clip-pretrained it was trained with"
        )
