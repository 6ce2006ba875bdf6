"""`RegionSpotHead`: the only trained module — SAM region tokens attend to the CLIP map (DESIGN.md §2).

to_clip = Linear(256, C) -> TransformerDecoder (regions as tgt, self-attention among an image's
regions; the CLIP map as memory; no positional embeddings) -> projector = Linear(C, D) ->
L2-normalised region embedding; logits = exp(CLIP logit_scale) * embedding . text.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from regionspot.errors import RegionSpotError

OFFICIAL_PREFIX = "model."
_LAYER_PARTS = ("self_attn", "multihead_attn", "linear1", "linear2", "norm1", "norm2", "norm3")


class RegionSpotHead(nn.Module):
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
            clip_width=clip_width,
            embed_dim=embed_dim,
            sam_dim=sam_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            ff_dim=ff_dim,
            dropout=dropout,
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
            sam_tokens: [B, N, 256], or [B, N, T, 256] (the T tokens of a region enter the sequence as
                regions of their own and are scored each).
            clip_map: [B, L, C] CLIP token map.
            region_mask: [B, N] bool, True for real regions (padding changes no real region's output).
        Returns:
            [B, N, D] (or [B, N, T, D]); with return_attention also the last layer's cross-attention
            [B, N, L] (or [B, N, T, L]), mean over heads.
        """
        multi = sam_tokens.dim() == 4
        b, n = sam_tokens.shape[:2]
        t = sam_tokens.shape[2] if multi else 1
        tokens = sam_tokens.reshape(b, n * t, sam_tokens.shape[-1])  # (B, N*T, 256)
        padding = None
        if region_mask is not None:
            padding = ~region_mask.bool().repeat_interleave(t, dim=1)  # (B, N*T), True = padding
        x = self.to_clip(tokens.to(self.to_clip.weight.dtype))  # (B, N*T, C)
        memory = clip_map.to(x.dtype)
        attention = None
        if n * t:
            if return_attention:
                for layer in self.decoder.layers[:-1]:
                    x = layer(x, memory, tgt_key_padding_mask=padding)
                attention = self._cross_attention(self.decoder.layers[-1], x, memory, padding)
                x = self.decoder.norm(self.decoder.layers[-1](x, memory, tgt_key_padding_mask=padding))
            else:
                x = self.decoder(x, memory, tgt_key_padding_mask=padding)  # (B, N*T, C)
        x = self.projector(x)  # (B, N*T, D)
        x = x / (x.norm(dim=-1, keepdim=True) + 1e-7)
        shape = (b, n, t) if multi else (b, n)
        x = x.reshape(*shape, x.shape[-1])
        if return_attention:
            if attention is None:
                attention = memory.new_zeros(b, n * t, memory.shape[1])
            return x, attention.reshape(*shape, memory.shape[1])
        return x

    @staticmethod
    def _cross_attention(layer: nn.TransformerDecoderLayer, x, memory, padding) -> torch.Tensor:
        """The layer's cross-attention weights for input x (post-norm layout), mean over heads."""
        q = layer.norm1(x + layer._sa_block(x, None, padding))
        _, weights = layer.multihead_attn(q, memory, memory, need_weights=True, average_attn_weights=True)
        return weights  # (B, N, L)

    def forward(
        self,
        sam_tokens: torch.Tensor,
        clip_map: torch.Tensor,
        text_embeddings: torch.Tensor,
        region_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, N, K] (or [B, N, T, K]) of every region against every text embedding [K, D]."""
        emb = self.embed(sam_tokens, clip_map, region_mask)
        return self.logit_scale * emb @ text_embeddings.to(emb.dtype).t()

    # --- the checkpoints released with the paper ---
    def to_official_state_dict(self) -> dict:
        """This head's weights in the official layout (`model.` prefix), e.g. to test the importer."""
        return {f"{OFFICIAL_PREFIX}{k}": v.clone() for k, v in self.state_dict().items()}

    @classmethod
    def from_official_checkpoint(cls, path: str | Path) -> RegionSpotHead:
        """Load the head of an official RegionSpot `.pth` (frozen SAM / CLIP weights in it are skipped)."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise RegionSpotError(f"checkpoint {path}: no such file") from e
        except Exception as e:
            raise RegionSpotError(f"checkpoint {path}: cannot be read safely (weights_only) ({e})") from e
        return cls.from_official_state_dict(
            ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}, str(path)
        )

    @classmethod
    def from_official_state_dict(cls, state: dict, source: str = "checkpoint") -> RegionSpotHead:
        ours = {k[len(OFFICIAL_PREFIX) :]: v for k, v in state.items() if k.startswith(OFFICIAL_PREFIX)}
        ours = {k: v for k, v in ours.items() if k.split(".")[0] in ("to_clip", "decoder", "projector")}
        for key in ("to_clip.weight", "projector.weight", "decoder.norm.weight"):
            if key not in ours:
                raise RegionSpotError(
                    f"{source} is not a RegionSpot checkpoint: {OFFICIAL_PREFIX}{key} is missing"
                )
        clip_width, sam_dim = ours["to_clip.weight"].shape
        embed_dim = ours["projector.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[2]) for k in ours if k.startswith("decoder.layers."))
        ff_dim = ours["decoder.layers.0.linear1.weight"].shape[0]
        head = cls(
            clip_width, embed_dim, sam_dim=sam_dim, num_layers=layers, ff_dim=ff_dim, logit_scale=100.0
        )
        missing = sorted(set(head.state_dict()) - set(ours))
        if missing:
            shown = ", ".join(OFFICIAL_PREFIX + m for m in missing[:5])
            raise RegionSpotError(
                f"{source}: {len(missing)} head weights missing ({shown}{', ...' if len(missing) > 5 else ''})"
            )
        head.load_state_dict({k: ours[k].float() for k in head.state_dict()})
        return head
