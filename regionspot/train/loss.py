"""The training loss, reduced as the official code does."""

from __future__ import annotations

import torch
from torchvision.ops import sigmoid_focal_loss


def region_focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    region_mask: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss of every region against every class of the vocabulary.

    Args:
        logits: [B, N, K]; labels: [B, N] class index (-1 = none); region_mask: [B, N] True = real.
    Returns:
        a scalar: per image the mean over its real regions, summed over classes and images.
    """
    k = logits.shape[-1]
    targets = torch.nn.functional.one_hot(labels.clamp(min=0), k).to(logits.dtype)
    targets = targets * (labels >= 0).unsqueeze(-1)  # (B, N, K)
    loss = sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="none")
    mask = region_mask.unsqueeze(-1).float()
    per_image = (loss * mask).sum(1) / region_mask.sum(1, keepdim=True).clamp(min=1)  # (B, K)
    return per_image.sum()
