"""Box conversions and the one place that decides which boxes are usable."""

from __future__ import annotations

import numpy as np


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] (x, y, w, h) -> [N, 4] (x0, y0, x1, y1), same frame, float64."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] XYXY -> [N] areas (negative extents count as zero)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def sanitize_boxes(boxes: np.ndarray, width, height) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Clip boxes to the image and mark the unusable ones.

    Args:
        boxes: [N, 4] XYXY in pixels of the image.
        width, height: the image size; scalars, or [N] arrays (one size per box, so a whole
            annotation file can be sanitised in one call).
    Returns:
        boxes_clipped: float32 [N, 4], clipped to [0, width] x [0, height] (rows with keep=False
            are meaningless).
        keep: bool [N]; False for NaN/inf coordinates and boxes with zero or negative area after
            clipping (including boxes entirely outside the image).
        counts: {"dropped_invalid": boxes not kept, "clipped": kept boxes that clipping changed}.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    w = np.broadcast_to(np.asarray(width, np.float64), (len(b),))
    h = np.broadcast_to(np.asarray(height, np.float64), (len(b),))
    finite = np.isfinite(b).all(axis=1)
    b = np.where(finite[:, None], b, 0.0)
    limits = np.stack([w, h, w, h], axis=1)  # (N, 4)
    clipped = np.clip(b, 0.0, limits)
    keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    changed = keep & (clipped != b).any(axis=1)
    counts = {"dropped_invalid": int((~keep).sum()), "clipped": int(changed.sum())}
    return clipped.astype(np.float32), keep, counts


def best_n_in_order(scores: np.ndarray, n: int | None) -> np.ndarray:
    """Which of N items to keep when only `n` may stay: the n highest scores.

    Args:
        scores: [N] numbers (proposal scores, box areas, ...), in file order.
        n: how many to keep; None keeps all.
    Returns:
        int64 [min(n, N)] indices, sorted in file order; equal scores are ranked by file order.
    """
    scores = np.asarray(scores).reshape(-1)
    if n is None or len(scores) <= n:
        return np.arange(len(scores))
    if n < 0:
        raise ValueError(f"cannot keep {n} items")
    return np.sort(np.argsort(-scores, kind="stable")[:n])
