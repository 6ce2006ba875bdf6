"""SAM's image-encoder attention on `F.scaled_dot_product_attention` (the fast path, DESIGN.md §2).

segment_anything's `Attention` materialises softmax(q k^T * scale + rel-pos) itself, in the input dtype,
one full score matrix per head. The same result comes from SDPA with the decomposed relative-position
bias passed as an additive float mask, which lets PyTorch pick a fused kernel (memory-efficient
attention on CUDA). `use_fast_attention` swaps the modules of one encoder instance; the library's
classes are left alone, and the replacement keeps the library's parameters under the same names, so
state dicts, weight hashes and fingerprints do not depend on the choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

SAM_ATTENTION = ("sdpa", "library")


class SdpaAttention(nn.Module):
    """The computation of segment_anything's `Attention` (same parameters, shared, not copied) on SDPA.

    Input and output: [B, H, W, C] tokens (a window for windowed blocks, the whole grid for global ones).
    """

    def __init__(self, library: Attention):
        super().__init__()
        self.num_heads = library.num_heads
        self.use_rel_pos = library.use_rel_pos
        self.qkv = library.qkv
        self.proj = library.proj
        if self.use_rel_pos:
            self.rel_pos_h = library.rel_pos_h
            self.rel_pos_w = library.rel_pos_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, H*W, head_dim) each
        bias = self._rel_pos_bias(q, h, w) if self.use_rel_pos else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale head_dim**-0.5, as SAM's
        x = x.transpose(1, 2).reshape(b, h, w, -1)  # (B, H, W, C)
        return self.proj(x)

    def _rel_pos_bias(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The decomposed relative-position term SAM adds to the scores, as a mask [B, heads, H*W, H*W].

        rel_h[i, j, k] = q(i, j) . R_h[i - k] is added for every key in row k, rel_w[i, j, l] =
        q(i, j) . R_w[j - l] for every key in column l (the unscaled q, as SAM's add_decomposed_rel_pos).
        """
        b, heads, _, dim = q.shape
        rq = q.reshape(b, heads, h, w, dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, get_rel_pos(h, h, self.rel_pos_h))  # (B, n, H, W, H)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, get_rel_pos(w, w, self.rel_pos_w))  # (B, n, H, W, W)
        bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, n, H, W, H, W)
        return bias.reshape(b, heads, h * w, h * w).to(q.dtype)


def use_fast_attention(image_encoder: nn.Module) -> int:
    """Replace every segment_anything `Attention` inside `image_encoder` (this instance only) with
    `SdpaAttention` sharing its parameters; returns how many were replaced (0 when already done)."""
    found = [
        (parent, name, child)
        for parent in image_encoder.modules()
        for name, child in parent.named_children()
        if isinstance(child, Attention)
    ]
    for parent, name, child in found:
        setattr(parent, name, SdpaAttention(child))
    return len(found)
