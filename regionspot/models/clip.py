"""Frozen CLIP as an image feature map and a text encoder (DESIGN.md §2).

The map is the visual transformer's full token sequence before `ln_post` and the projection:
[1 + (S/patch)^2, width], class token first, for the image resized to S x S (no crop).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TEMPLATES_NAME = "{}. + openai-imagenet-80"


def text_templates() -> list:
    """The 81 prompt templates: "{}." and the 80 OpenAI ImageNet templates (callables)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [lambda c: f"{c}.", *OPENAI_IMAGENET_TEMPLATES]


def is_torchscript(path: Path) -> bool:
    """OpenAI's own `.pt` files are TorchScript archives (a zip holding code/ and constants.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(
            n.split("/", 1)[-1].startswith("code/") or n.endswith("constants.pkl") for n in z.namelist()
        )


def build_tiny_clip() -> nn.Module:
    """A small CLIP from open_clip's own classes: 64-px input, patch 8, two layers per tower."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, image_size=64, patch_size=8),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        quick_gelu=True,
    )
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # behave like released CLIPs (exp(logit_scale) = 100)
    return model


class ClipMapEncoder(nn.Module):
    """Frozen CLIP: `prepare` (CPU workers) -> `feature_map`; `text_embeddings` for a vocabulary."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        image_size: int,
        mean,
        std,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.visual = model.visual
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self._mean, self._std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.width = int(self.visual.conv1.out_channels)
        patch = self.visual.conv1.kernel_size[0]
        self.num_tokens = 1 + (self.image_size // patch) ** 2
        self.embed_dim = int(self.visual.output_dim)
        self.logit_scale = float(model.logit_scale.exp().item())
        self.autocast_dtype = autocast_dtype

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> float32 [3, S, S]: squashed to S x S (bilinear, antialias), normalised."""
        x = torch.tensor(image).permute(2, 0, 1).float().div_(255)  # a copy: decoded arrays may be read-only
        x = F.interpolate(
            x[None],
            size=(self.image_size, self.image_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        mean = torch.tensor(self._mean).view(3, 1, 1)
        std = torch.tensor(self._std).view(3, 1, 1)
        return (x - mean) / std

    def _autocast(self):
        device = self.mean.device
        enabled = device.type == "cuda" and self.autocast_dtype is not None
        return torch.autocast(device.type, dtype=self.autocast_dtype, enabled=enabled)

    @torch.inference_mode()
    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] prepared images -> [B, L, C] token map before ln_post (class token first)."""
        with self._autocast():
            x = self.visual._embeds(images.to(self.mean.device))  # (B, L, C) after ln_pre
            x = self.visual.transformer(x)
        return x.float()

    @torch.inference_mode()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, D] L2-normalised image embeddings (after ln_post and projection)."""
        with self._autocast():
            return self.model.encode_image(images.to(self.mean.device), normalize=True).float()

    @torch.inference_mode()
    def text_embeddings(self, names: list[str], batch_names: int = 32) -> torch.Tensor:
        """Class names -> float32 [K, D]: the mean of 81 templates' raw embeddings, then L2-normalised."""
        templates = text_templates()
        out = []
        for start in range(0, len(names), batch_names):
            chunk = names[start : start + batch_names]
            prompts = [t(name) for name in chunk for t in templates]
            tokens = self.tokenizer(prompts).to(self.mean.device)
            with self._autocast():
                emb = self.model.encode_text(tokens, normalize=False).float()  # (k*81, D)
            emb = emb.view(len(chunk), len(templates), -1).mean(1)
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        if not out:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(out).cpu()
