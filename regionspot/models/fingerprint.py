"""What makes two sets of backbone weights the same (DESIGN.md §4).

The fingerprint hashes the weights as loaded (not the tag or path they came from), the token choice,
the CLIP input size and its resize's antialias: shards, checkpoints and predictions agree exactly when
it does.
"""

from __future__ import annotations

import hashlib
import json

import torch


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict: sorted names, then each tensor's dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            # a byte view of the contiguous CPU tensor: hashed in place, no extra copy (4 GB for vit_h + ViT-L)
            flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
            digest.update(memoryview(flat.numpy()))
    return digest.hexdigest()


def backbones_fingerprint(
    sam_sha256: str, clip_sha256: str, sam_tokens: int, clip_size: int, clip_antialias: bool = False
) -> str:
    """The backbones' identity: both weight hashes, the SAM token choice, the CLIP input size and
    whether its resize antialiases (the choices that change the stored features beyond float rounding)."""
    key = json.dumps(
        {
            "sam": sam_sha256,
            "clip": clip_sha256,
            "sam_tokens": int(sam_tokens),
            "clip_size": int(clip_size),
            "clip_antialias": bool(clip_antialias),
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()
