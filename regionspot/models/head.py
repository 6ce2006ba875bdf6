"""`RegionSpotHead`: the only trained module — SAM region tokens attend to the CLIP map (DESIGN.md §2).

    sam_tokens [B, N, 256] --to_clip--> [B, N, C] --TransformerDecoder(tgt = regions, memory = CLIP map
    [B, L, C]; self-attention among one image's regions; no positional embeddings)--> [B, N, C]
    --projector--> [B, N, D] --/ (norm + 1e-7)--> region embeddings; logits = s * emb . text [K, D]

with s = exp(CLIP's logit_scale), read from the shards' manifest and stored with the head.

Several tokens per region (T = 3, SAM's multimask tokens) are run as the official code runs them
(`RegionSpot.forward_inference`): token t of every region of an image forms its own sequence, so
self-attention mixes the image's regions at one token index and never a region's tokens with each
other; each token is scored on its own ([B, N, T, K]) and the caller keeps the one SAM rates best.
"""

from __future__ import annotations

import torch
from torch import nn

# The official checkpoints name these weights `model.to_clip.*`, ... (models/checkpoint.py reads them).
OFFICIAL_PREFIX = "model."


class RegionSpotHead(nn.Module):
    """The fusion head. Args: clip_width C (CLIP map width), embed_dim D (CLIP embedding width),
    sam_dim (256 for every SAM), decoder depth / heads / feed-forward width / dropout, and the logit
    scale s = exp(CLIP logit_scale)."""

    def __init__(
        self,
        clip_width: int,
        embed_dim: int,
        sam_dim: int = 256,
        num_layers: int = 3,
        num_heads: int = 8,
        ff_dim: int = 2048,
        dropout: float = 0.1,
        logit_scale: float = 100.0,
    ):
        super().__init__()
        self._config = dict(
            clip_width=int(clip_width),
            embed_dim=int(embed_dim),
            sam_dim=int(sam_dim),
            num_layers=int(num_layers),
            num_heads=int(num_heads),
            ff_dim=int(ff_dim),
            dropout=float(dropout),
            logit_scale=float(logit_scale),
        )
        self.to_clip = nn.Linear(sam_dim, clip_width)
        layer = nn.TransformerDecoderLayer(
            clip_width, num_heads, ff_dim, dropout, batch_first=True, norm_first=False
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(clip_width))
        self.projector = nn.Linear(clip_width, embed_dim)
        self.logit_scale = float(logit_scale)

    def config(self) -> dict:
        """The constructor arguments (what a checkpoint stores to rebuild the head)."""
        return dict(self._config)

    def embed(
        self,
        sam_tokens: torch.Tensor,
        clip_map: torch.Tensor,
        region_mask: torch.Tensor | None = None,
        return_attention: bool = False,
    ):
        """L2-normalised region embeddings.

        Args:
            sam_tokens: [B, N, 256] position-aware tokens, or [B, N, T, 256] (T tokens per region, each
                run as the official code runs multimask tokens, see the module docstring).
            clip_map: [B, L, C] CLIP token map (before ln_post), class token first.
            region_mask: [B, N] bool, True for real regions. Padded regions are hidden from the real
                ones' self-attention, so padding changes no real region's output.
            return_attention: also return the last decoder layer's cross-attention weights.
        Returns:
            float32 embeddings [B, N, D] (or [B, N, T, D]); with return_attention also [B, N, L] (or
            [B, N, T, L]): the last layer's attention of each region over the L map tokens, mean over
            heads (rows sum to 1).
        """
        multi = sam_tokens.dim() == 4
        b, n = sam_tokens.shape[:2]
        t = sam_tokens.shape[2] if multi else 1
        length = clip_map.shape[1]
        dtype = self.to_clip.weight.dtype
        tokens = sam_tokens.to(dtype)
        memory = clip_map.to(dtype)  # (B, L, C)
        if multi:
            # one sequence per (image, token index): (B, N, T, 256) -> (B*T, N, 256)
            tokens = tokens.transpose(1, 2).reshape(b * t, n, tokens.shape[-1])
            memory = memory.repeat_interleave(t, dim=0)  # (B*T, L, C)
        padding = self._padding(region_mask, b, n, t, sam_tokens.device)
        x = self.to_clip(tokens)  # (B*T, N, C)
        attention = None
        if n == 0:
            attention = x.new_zeros(b * t, 0, length)
        elif return_attention:
            for layer in self.decoder.layers[:-1]:
                x = layer(x, memory, tgt_key_padding_mask=padding)
            x, attention = self._last_layer(self.decoder.layers[-1], x, memory, padding)
            x = self.decoder.norm(x)
        else:
            x = self.decoder(x, memory, tgt_key_padding_mask=padding)  # (B*T, N, C)
        x = self.projector(x).float()  # (B*T, N, D); normalised in float32 even under autocast
        x = x / (x.norm(dim=-1, keepdim=True) + 1e-7)
        if multi:
            x = x.reshape(b, t, n, x.shape[-1]).transpose(1, 2)  # (B, N, T, D)
        if not return_attention:
            return x
        if multi:
            attention = attention.reshape(b, t, n, length).transpose(1, 2)  # (B, N, T, L)
        return x, attention

    @staticmethod
    def _padding(region_mask, b: int, n: int, t: int, device) -> torch.Tensor | None:
        """tgt_key_padding_mask [B*T, N] (True = padding) from region_mask [B, N] (True = real)."""
        if region_mask is None or n == 0:
            return None
        real = region_mask.to(device=device, dtype=torch.bool)
        if real.shape != (b, n):
            raise ValueError(f"region_mask has shape {tuple(real.shape)}, expected {(b, n)}")
        # An image without any real region would attend to nothing (softmax of all -inf = NaN);
        # let its padding attend to itself: those rows are padding and are never read.
        real = real | ~real.any(dim=1, keepdim=True)
        return (~real).repeat_interleave(t, dim=0)  # (B*T, N)

    @staticmethod
    def _last_layer(layer: nn.TransformerDecoderLayer, x, memory, padding):
        """A post-norm decoder layer, as nn.TransformerDecoderLayer.forward computes it, that also
        returns its cross-attention weights [B, N, L] averaged over heads."""
        x = layer.norm1(x + layer._sa_block(x, None, padding))
        attended, weights = layer.multihead_attn(
            x, memory, memory, need_weights=True, average_attn_weights=True
        )
        x = layer.norm2(x + layer.dropout2(attended))
        x = layer.norm3(x + layer._ff_block(x))
        return x, weights

    def forward(
        self,
        sam_tokens: torch.Tensor,
        clip_map: torch.Tensor,
        text_embeddings: torch.Tensor,
        region_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of every region against every class.

        Args:
            sam_tokens: [B, N, 256] or [B, N, T, 256]; clip_map: [B, L, C];
            text_embeddings: [K, D], L2-normalised; region_mask: [B, N] bool, True = real region.
        Returns:
            float32 [B, N, K] (or [B, N, T, K]) = logit_scale * embedding . text. N = 0 gives [B, 0, K].
        """
        emb = self.embed(sam_tokens, clip_map, region_mask)  # float32
        # float32 product: bf16 would round logits of scale 100 to steps of 0.5
        with torch.autocast(emb.device.type, enabled=False):
            return self.logit_scale * emb @ text_embeddings.float().t()  # (B, N, [T,] K)

    def to_official_state_dict(self) -> dict:
        """This head's weights under the official checkpoint names (`model.` prefix)."""
        return {f"{OFFICIAL_PREFIX}{k}": v.detach().clone() for k, v in self.state_dict().items()}
