"""SAM's image encoder on the fast attention path equals segment_anything's own, at vit_b shapes."""

from functools import partial

import pytest
import torch
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention
from torch import nn

from regionspot.models.sam_attention import SdpaAttention, use_fast_attention

VIT_B = dict(embed_dim=768, num_heads=12, window_size=14)  # SAM vit_b: head_dim 64, 14 x 14 windows


def random_rel_pos(module: nn.Module, seed: int) -> None:
    """SAM initialises the relative positions to zero; random ones make the bias matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


@pytest.mark.parametrize(
    "input_size, tokens",
    [
        ((14, 14), (4, 14, 14)),  # a windowed block: 4 windows of 14 x 14
        ((16, 16), (1, 16, 16)),  # a global block at the size its positions were made for
        ((64, 64), (1, 24, 24)),  # a global block of vit_b at 1024 px run on another grid (interpolated)
    ],
)
def test_sdpa_attention_equals_the_library_module(input_size, tokens):
    library = Attention(768, num_heads=12, qkv_bias=True, use_rel_pos=True, input_size=input_size).eval()
    random_rel_pos(library, 0)
    fast = SdpaAttention(library)
    assert fast.state_dict().keys() == library.state_dict().keys()
    assert all(fast.state_dict()[k].data_ptr() == v.data_ptr() for k, v in library.state_dict().items())
    x = torch.randn(*tokens, 768)
    with torch.no_grad():
        expected, out = library(x), fast(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def vit_b_width_encoder(depth: int, img_size: int, global_attn_indexes) -> ImageEncoderViT:
    return ImageEncoderViT(
        img_size=img_size,
        depth=depth,
        mlp_ratio=4,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        global_attn_indexes=global_attn_indexes,
        **VIT_B,
    ).eval()


def assert_same_embeddings(encoder: nn.Module, image: torch.Tensor) -> None:
    with torch.no_grad():
        expected = encoder(image)
        assert use_fast_attention(encoder) == len(encoder.blocks)
        assert use_fast_attention(encoder) == 0  # already done
        out = encoder(image)
    assert all(isinstance(b.attn, SdpaAttention) for b in encoder.blocks)
    relative = (out - expected).abs().max() / expected.abs().max()
    assert relative < 1e-4, relative


def test_fast_attention_image_embeddings_equal_the_library_encoder():
    """vit_b width, heads and windows; 4 blocks (2 windowed, 2 global) at 320 px: a 20 x 20 grid, so the
    windowed blocks pad to 28 x 28 as at 1024 px (64 x 64 -> 70 x 70)."""
    torch.manual_seed(1)
    encoder = vit_b_width_encoder(depth=4, img_size=320, global_attn_indexes=(1, 3))
    random_rel_pos(encoder, 1)
    keys = encoder.state_dict().keys()
    assert_same_embeddings(encoder, torch.randn(1, 3, 320, 320))
    assert encoder.state_dict().keys() == keys  # weight hashes and fingerprints do not see the choice


@pytest.mark.slow
def test_fast_attention_equals_the_library_on_vit_b_at_1024():
    """The whole vit_b image encoder at 1024 px (two passes: minutes on two cores)."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        encoder = sam_model_registry["vit_b"](checkpoint=None).image_encoder.eval()
    random_rel_pos(encoder, 2)
    assert_same_embeddings(encoder, torch.randn(1, 3, 1024, 1024))
