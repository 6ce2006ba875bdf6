"""From head logits to labelled, scored regions: shared by evaluation and predict, so a region gets
the same label and score in both.

The official RegionSpot order (DESIGN.md §2 "Evaluation"), per image:
  1. all regions of the image go through the head together -> logits [N, K] (or [N, T, K]);
  2. with T = 3 tokens, each region keeps the token SAM rates best (its IoU prediction);
  3. softmax over the vocabulary, per region -> probabilities [N, K];
  4. the `candidates` best (region, class) pairs of the image by probability;
  5. score = proposal score x probability (GT boxes: 1 x probability);
  6. the `max_dets` best of those by score.
Steps 4 and 6 rank by different quantities, so a confident class on a weak proposal can enter the
candidates and still lose its place to a less probable class on a strong proposal.
"""

from __future__ import annotations

import torch


def best_token_logits(logits: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """Pick, for each region, the logits of the token SAM rates best.

    Args:
        logits: [..., T, K] per-token class logits (T = 1 or 3), e.g. [N, T, K] or [B, N, T, K].
        iou: [..., T] SAM's predicted IoU of each token's mask, same leading dimensions.
    Returns:
        [..., K]: T = 1 squeezes the token axis; otherwise the token with the highest predicted IoU
        (the first one on ties).
    """
    if logits.shape[-2] == 1:
        return logits.squeeze(-2)
    best = iou.argmax(dim=-1, keepdim=True)  # [..., 1]
    index = best.unsqueeze(-1).expand(*best.shape, logits.shape[-1])  # [..., 1, K]
    return logits.gather(-2, index.to(logits.device)).squeeze(-2)  # [..., K]


def region_probabilities(logits: torch.Tensor, iou: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the vocabulary per region, after choosing the best token when there are several.

    Args:
        logits: [N, K] or [N, T, K] head logits (already scaled by the logit scale).
        iou: [N, T] SAM's predicted IoU; needed only when logits carry a token axis with T > 1.
    Returns:
        float32 [N, K] probabilities, each row summing to 1.
    """
    if logits.dim() == 3:
        if logits.shape[1] > 1 and iou is None:
            raise ValueError("logits have several tokens per region; pass SAM's iou to choose one")
        logits = best_token_logits(logits, iou if iou is not None else logits.new_zeros(logits.shape[:2]))
    return torch.softmax(logits.float(), dim=-1)  # [N, K]


def select_detections(
    probs: torch.Tensor, proposal_scores: torch.Tensor, candidates: int = 900, max_dets: int = 300
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's detections in the official order: `candidates` by probability, then `max_dets` by score.

    Args:
        probs: [N, K] class probabilities of the image's N regions (softmax over the vocabulary).
        proposal_scores: [N] the proposal confidence of each region (1.0 for GT boxes).
        candidates: how many (region, class) pairs to keep by probability (official: 900).
        max_dets: how many of those to keep by score = proposal score x probability (LVIS: 300).
    Returns:
        region_idx int64 [M], class_idx int64 [M] (vocabulary positions), scores float32 [M], sorted by
        score, highest first (ties: the higher probability, then the lower flat index region * K + class);
        M = min(max_dets, candidates, N * K). N = 0 gives three empty tensors.
    """
    if probs.dim() != 2 or proposal_scores.shape != probs.shape[:1]:
        raise ValueError(
            f"expected probs [N, K] and proposal_scores [N], got {tuple(probs.shape)} and "
            f"{tuple(proposal_scores.shape)}"
        )
    num_regions, num_classes = probs.shape
    flat = probs.float().reshape(-1)  # [N*K]
    k = min(candidates, flat.numel())
    if k <= 0 or max_dets <= 0:
        empty = torch.zeros(0, dtype=torch.int64, device=probs.device)
        return empty, empty.clone(), torch.zeros(0, dtype=torch.float32, device=probs.device)
    # Step 4: the candidates by probability, ties by flat index (region * K + class), lower first.
    top_p, top_i = _topk_stable(flat, k)  # [k]
    region = top_i // num_classes
    scores = proposal_scores.to(flat.device, torch.float32)[region] * top_p  # [k] step 5
    # Step 6: the max_dets best by score. A stable sort keeps candidate order (probability) on ties.
    order = torch.sort(scores, descending=True, stable=True).indices[: min(max_dets, k)]
    chosen = top_i[order]
    return chosen // num_classes, chosen % num_classes, scores[order]


def _topk_stable(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of a 1-D tensor, sorted highest first; exact ties go to the lower index.

    torch.topk leaves the choice and order among tied values unspecified; this makes both
    reproducible at the cost of one more pass over `values`.
    """
    kth = values.topk(k, sorted=False).values.min()
    above = (values > kth).nonzero().squeeze(1)  # [a], a < k
    at = (values == kth).nonzero().squeeze(1)[: k - above.numel()]  # the lowest indices of the tie
    index = torch.cat([above, at])  # [k]
    index = index[torch.argsort(index)]
    order = torch.sort(values[index], descending=True, stable=True).indices
    index = index[order]
    return values[index], index


def topk_labels(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each region's k most probable classes (for predict's captions).

    Args:
        probs: [N, K] class probabilities.
        k: labels per region; more than K gives K.
    Returns:
        scores float32 [N, k'] and class indices int64 [N, k'] (k' = min(k, K)), most probable first.
    """
    k = min(k, probs.shape[-1])
    scores, idx = probs.float().topk(k, dim=-1)  # [N, k']
    return scores, idx
