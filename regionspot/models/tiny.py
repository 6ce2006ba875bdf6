"""The `tiny` backbones: a small SAM and a small CLIP from the libraries' own classes, seeded weights.

They make every stage runnable on a CPU in seconds (tests, quickstart, benchmarks' smoke runs). Both
are built by the libraries' constructors, so the encoders treat them exactly like the released models;
their sizes live here and nowhere else. segment_anything and open_clip are imported inside the
builders: reading a size (presets) must not load either library.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

TINY_SEED = 20231102
TINY_SAM_SIZE = 256  # SAM input size S; patch 16, so a 16 x 16 embedding
TINY_CLIP_SIZE = 64  # the size the tiny CLIP's weights are drawn at; the `tiny` preset's --clip-size
TINY_CLIP_PATCH = 8


@contextmanager
def tiny_seed(seed: int = TINY_SEED) -> Iterator[None]:
    """Seed torch's CPU generator for building a `tiny` model, restoring the caller's random state after.

    Every stage that names `tiny` gets bit-identical weights, whatever it drew from the global RNG before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_sam() -> nn.Module:
    """A small SAM from segment_anything's own classes: 256-px input, a 2-block encoder of width 64,
    the full prompt encoder and mask decoder (transformer_dim 256). Weights from a fixed seed."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    img_size, patch = TINY_SAM_SIZE, 16
    with tiny_seed():
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=img_size,
                patch_size=patch,
                embed_dim=64,
                depth=2,
                num_heads=2,
                mlp_ratio=4,
                out_chans=256,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=4,
                global_attn_indexes=(1,),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=256,
                image_embedding_size=(img_size // patch, img_size // patch),
                input_image_size=(img_size, img_size),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=256, num_heads=8),
                transformer_dim=256,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
        )
    return sam.eval()


def build_tiny_clip(image_size: int = TINY_CLIP_SIZE) -> nn.Module:
    """A small CLIP from open_clip's own class: patch 8, two layers per tower, embed dim 64, input
    `image_size`; weights from a fixed seed.

    The tiny CLIP's weights are the ones drawn at 64 px: models.clip.load_clip runs it at another size
    with those, the position embeddings interpolated as for any CLIP (this builds the architecture).
    """
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with tiny_seed():
        model = open_clip.CLIP(
            embed_dim=64,
            vision_cfg=CLIPVisionCfg(
                layers=2, width=64, head_width=32, image_size=image_size, patch_size=TINY_CLIP_PATCH
            ),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
            quick_gelu=True,
        )
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # scores behave like released CLIPs: exp(logit_scale) = 100
    return model.eval()
