"""The training loss: sigmoid focal loss, reduced as the official RegionSpot code does.

Official (regionspot/modeling/regionspot.py): `loss.mean(1).sum() / n_box * n_box` over logits
[B, n_box, K] — for each image the mean over its regions, summed over classes and images. The official
batches repeat boxes to a common count; here padded regions are masked out of each image's mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def region_focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    region_mask: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss of every region against every class of its dataset's vocabulary.

    Args:
        logits: [B, N, K] (scaled by the logit scale); labels: [B, N] vocabulary index (-1 = padding or
            unknown: every class is a negative); region_mask: [B, N] bool, True = real region.
        alpha, gamma: focal loss weights (official: 0.25, 2).
    Returns:
        a float32 scalar: sum over images and classes of the mean over the image's real regions.
        Images without real regions add 0; padded rows never reach the sum (not even as NaN).
    """
    logits = logits.float()
    k = logits.shape[-1]
    targets = F.one_hot(labels.clamp(min=0), k).float() * (labels >= 0).unsqueeze(-1)  # (B, N, K)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss  # (B, N, K)
    real = region_mask.bool().unsqueeze(-1)
    loss = torch.where(real, loss, torch.zeros((), device=loss.device))
    per_image = loss.sum(1) / region_mask.sum(1, keepdim=True).clamp(min=1)  # (B, K)
    return per_image.sum()
