"""A vectorised re-implementation of the `lvis` package's evaluation (LVISEval.evaluate + accumulate).

Why: the reference API loops in Python over every (image, class) pair — 19,809 x 1,203 = 24 M pairs
on LVIS val, each holding a Python list — which takes minutes and tens of GB. Here detections and
ground truth are columns, only (image, class) pairs that hold something are touched, and every
step keeps the reference's exact rules, so the numbers agree to float rounding:

- ground truth and detections of area <= 0 are dropped (its get_ann_ids keeps 0 < area < inf);
- federated filter: a detection counts only for a class present in its image or in the image's
  `neg_category_ids`; an unmatched detection of a `not_exhaustive_category_ids` class is ignored;
- greedy matching per (image, class, area range, IoU threshold): detections by score (stable), each
  takes the unmatched non-ignored ground truth of highest IoU >= threshold (ties: the later one),
  else the unmatched ignored one likewise; an unmatched detection outside the area range is ignored;
- accumulation per class and area range: detections by score (stable, images in id order), precision
  made monotone from the right, read at the 101 recall thresholds by `searchsorted(side="left")`.
Greedy matching is sequential per pair; here it advances all pairs at once, one detection rank per
round. Returns the same `precision [T, R, K, A]` and `recall [T, K, A]` arrays as LVISEval.eval.
"""

from __future__ import annotations

import numpy as np

from regionspot.errors import RegionSpotError

IOU_THRS = np.linspace(
    0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True
)  # as lvis.eval.Params
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RNG = np.array([[0, 1e5**2], [0, 32**2], [32**2, 96**2], [96**2, 1e5**2]], np.float64)
AREA_LBL = ["all", "small", "medium", "large"]


def evaluate_lvis(
    gt: dict,
    image_id: np.ndarray,
    category_id: np.ndarray,
    score: np.ndarray,
    bbox: np.ndarray | None = None,
    segmentation: list[dict] | None = None,
    iou_type: str = "bbox",
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Match and accumulate detections against LVIS-format ground truth.

    Args:
        gt: LVIS-format annotations (images with neg_category_ids / not_exhaustive_category_ids,
            categories, annotations with area, bbox and, for segm, segmentation).
        image_id, category_id, score: [M] detection columns, already limited per image (max_dets).
        bbox: float [M, 4] xywh (iou_type "bbox").
        segmentation: M COCO RLE dicts (iou_type "segm"; the area then comes from the mask).
    Returns:
        precision [T, R, K, A] and recall [T, K, A] (-1 where a class has no ground truth in that area
        range), and the category ids in K order (sorted).
    """
    import pycocotools.mask as mask_utils

    img_ids = np.array(sorted(int(i["id"]) for i in gt["images"]), np.int64)
    cat_ids = sorted(int(c["id"]) for c in gt["categories"])
    num_k = len(cat_ids)
    img_rank = {int(i): r for r, i in enumerate(img_ids)}
    cat_index = {c: k for k, c in enumerate(cat_ids)}

    # Ground truth columns, dataset order (the reference's order within a pair).
    anns = [a for a in gt["annotations"] if 0 < a["area"] < np.inf and a["category_id"] in cat_index
            and a["image_id"] in img_rank]  # fmt: skip
    g_key = np.array([img_rank[a["image_id"]] * num_k + cat_index[a["category_id"]] for a in anns], np.int64)
    g_area = np.array([a["area"] for a in anns], np.float64)
    g_base_ig = np.array([bool(a.get("ignore", 0)) for a in anns], bool)
    g_ig = (
        g_base_ig[:, None] | (g_area[:, None] < AREA_RNG[:, 0]) | (g_area[:, None] > AREA_RNG[:, 1])
    )  # [G, A]

    # Detection columns: known classes only; area from the box (bbox) or the mask (segm).
    image_id, category_id = np.asarray(image_id, np.int64), np.asarray(category_id, np.int64)
    unknown = ~np.isin(image_id, img_ids)
    if unknown.any():
        raise RegionSpotError(
            f"{int(unknown.sum())} detections name images not in the annotations, "
            f"e.g. image_id {int(image_id[unknown][0])}"
        )
    if iou_type == "bbox":
        bbox = np.asarray(bbox, np.float64).reshape(-1, 4)
        d_area = bbox[:, 2] * bbox[:, 3]
    else:
        # pycocotools' area() sizes a uint8 array by the list length: at most 255 masks per call on NumPy 2.
        chunks = [mask_utils.area(list(segmentation[i : i + 255])) for i in range(0, len(segmentation), 255)]
        d_area = np.concatenate(chunks).astype(np.float64) if chunks else np.zeros(0)
    cat_arr = np.array(cat_ids, np.int64)
    d_cat = np.minimum(np.searchsorted(cat_arr, category_id), num_k - 1)
    d_cat = np.where(cat_arr[d_cat] == category_id, d_cat, -1)  # -1: a class the annotations lack
    d_key = np.searchsorted(img_ids, image_id) * num_k + np.maximum(d_cat, 0)
    # Federated filter: classes present in the image (after the area filter) or verified absent.
    neg_keys = [img_rank[int(i["id"])] * num_k + cat_index[c] for i in gt["images"] for c in i.get("neg_category_ids", [])
                if c in cat_index]  # fmt: skip
    nel_keys = [
        img_rank[int(i["id"])] * num_k + cat_index[c]
        for i in gt["images"]
        for c in i.get("not_exhaustive_category_ids", [])
        if c in cat_index
    ]
    judged = np.union1d(g_key, np.array(neg_keys, np.int64))
    keep = (d_cat >= 0) & (d_area > 0) & (d_area < np.inf) & np.isin(d_key, judged)
    load_pos = np.flatnonzero(keep)  # position in the results list: the reference's tie order
    d_key, d_area, d_score = d_key[keep], d_area[keep], np.asarray(score, np.float64)[keep]
    d_nel = np.isin(d_key, np.array(nel_keys, np.int64))

    # Within a pair: detections by score (stable), ground truth in dataset order.
    d_order = np.lexsort((load_pos, -d_score, d_key))
    d_key, d_area, d_score, d_nel, load_pos = (x[d_order] for x in (d_key, d_area, d_score, d_nel, load_pos))
    g_order = np.argsort(g_key, kind="stable")
    g_key, g_ig, g_area = g_key[g_order], g_ig[g_order], g_area[g_order]
    anns = [anns[i] for i in g_order]

    matched, m_ig = _match(d_key, g_key, g_ig, load_pos, bbox, segmentation, anns, gt, iou_type)  # [D, T, A]
    d_out = (d_area[:, None] < AREA_RNG[:, 0]) | (d_area[:, None] > AREA_RNG[:, 1])  # [D, A]
    d_ig = np.where(matched, m_ig, (d_out | d_nel[:, None])[:, None, :])  # [D, T, A]

    # Accumulate: per class, detections by score, images in id order, then the order within a pair.
    d_cat_sorted = d_key % num_k
    acc = np.lexsort((load_pos, d_key // num_k, -d_score, d_cat_sorted))
    d_cat_sorted, matched, d_ig = d_cat_sorted[acc], matched[acc], d_ig[acc]
    num_gt = np.zeros((num_k, len(AREA_LBL)), np.int64)
    np.add.at(num_gt, g_key % num_k, (~g_ig).astype(np.int64))
    precision = -np.ones((len(IOU_THRS), len(REC_THRS), num_k, len(AREA_LBL)))
    recall = -np.ones((len(IOU_THRS), num_k, len(AREA_LBL)))
    seg_start = np.searchsorted(d_cat_sorted, np.arange(num_k + 1))  # [K + 1]
    for t in range(len(IOU_THRS)):
        for a in range(len(AREA_LBL)):
            tps = matched[:, t, a] & ~d_ig[:, t, a]
            fps = ~matched[:, t, a] & ~d_ig[:, t, a]
            precision[t, :, :, a], recall[t, :, a] = _accumulate(
                tps, fps, d_cat_sorted, seg_start, num_gt[:, a]
            )
    return precision, recall, cat_ids


def _match(d_key, g_key, g_ig, load_pos, bbox, segmentation, anns, gt, iou_type):
    """Greedy matching of every (image, class) pair at once. Returns matched [D, T, A] and, where
    matched, the matched ground truth's ignore flag [D, T, A]."""
    num_d, num_t, num_a = len(d_key), len(IOU_THRS), len(AREA_LBL)
    matched = np.zeros((num_d, num_t, num_a), bool)
    m_ig = np.zeros((num_d, num_t, num_a), bool)
    # Ground truth range of each detection's pair.
    g_lo, g_hi = np.searchsorted(g_key, d_key, "left"), np.searchsorted(g_key, d_key, "right")
    n_g = g_hi - g_lo
    with_gt = np.flatnonzero(n_g > 0)
    if with_gt.size == 0:
        return matched, m_ig
    # Rank of each detection within its pair (detections are sorted by pair, then score).
    first = np.searchsorted(d_key, d_key, "left")
    rank = np.arange(num_d) - first
    # Every (detection, ground truth) combination inside a pair, detection-major.
    c_d = np.repeat(with_gt, n_g[with_gt])  # [C]
    c_start = np.cumsum(n_g[with_gt]) - n_g[with_gt]
    c_g = g_lo[c_d] + np.arange(c_d.size) - np.repeat(c_start, n_g[with_gt])  # [C]
    iou = _combo_iou(c_d, c_g, with_gt, n_g, load_pos, bbox, segmentation, anns, gt, iou_type)  # [C]

    g_taken = np.zeros((len(g_key), num_t, num_a), bool)
    by_round = np.argsort(rank[c_d], kind="stable")  # combos of rank-0 detections first, detection-major
    c_d, c_g, iou = c_d[by_round], c_g[by_round], iou[by_round]
    round_bounds = np.searchsorted(rank[c_d], np.arange(rank[c_d].max() + 2))
    thr = np.minimum(IOU_THRS, 1 - 1e-10)[None, :, None]  # [1, T, 1]
    for r in range(len(round_bounds) - 1):
        lo, hi = round_bounds[r], round_bounds[r + 1]
        if lo == hi:
            continue
        cd, cg, ci = c_d[lo:hi], c_g[lo:hi], iou[lo:hi]  # one detection per pair in this round
        seg = np.flatnonzero(np.r_[True, cd[1:] != cd[:-1]])  # [S] start of each detection's combos
        seg_of = np.cumsum(np.r_[True, cd[1:] != cd[:-1]]) - 1  # [c] -> s
        ok = ~g_taken[cg] & (ci[:, None, None] >= thr)  # [c, T, A]
        ig = g_ig[cg][:, None, :]  # [c, 1, A]
        pick = np.full((len(seg), num_t, num_a), -1, np.int64)
        for group in (~ig, ig):  # non-ignored ground truth first; ignored only when none matches
            val = np.where(ok & group, ci[:, None, None], -1.0)  # [c, T, A]
            best = np.maximum.reduceat(val, seg, axis=0)  # [S, T, A]
            pos = np.where((val >= 0) & (val == best[seg_of]), np.arange(len(cd))[:, None, None], -1)
            last = np.maximum.reduceat(pos, seg, axis=0)  # ties: the later ground truth
            pick = np.where(pick >= 0, pick, last)
        s, t, a = np.nonzero(pick >= 0)
        g = cg[pick[s, t, a]]
        det = cd[seg[s]]
        g_taken[g, t, a] = True
        matched[det, t, a] = True
        m_ig[det, t, a] = g_ig[g, a]
    return matched, m_ig


def _combo_iou(c_d, c_g, with_gt, n_g, load_pos, bbox, segmentation, anns, gt, iou_type) -> np.ndarray:
    """IoU of each (detection, ground truth) combination, computed as pycocotools does."""
    if iou_type == "bbox":
        d = np.asarray(bbox, np.float64)[load_pos[c_d]]  # [C, 4] xywh
        g = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)[c_g]  # [C, 4]
        w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
        h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
        inter = w * h
        union = d[:, 2] * d[:, 3] + g[:, 2] * g[:, 3] - inter
        return np.where((w > 0) & (h > 0), inter / np.where((w > 0) & (h > 0), union, 1.0), 0.0)
    import pycocotools.mask as mask_utils

    sizes = {int(i["id"]): (i["height"], i["width"]) for i in gt["images"]}
    rles: dict[int, dict] = {}

    def gt_rle(i):
        if i not in rles:
            a = anns[i]
            h, w = sizes[int(a["image_id"])]
            s = a["segmentation"]
            if isinstance(s, list):
                rles[i] = mask_utils.merge(mask_utils.frPyObjects(s, h, w))
            elif isinstance(s["counts"], list):
                rles[i] = mask_utils.frPyObjects(s, h, w)
            else:
                rles[i] = s
        return rles[i]

    out = np.empty(len(c_d))
    starts = np.flatnonzero(np.r_[True, c_d[1:] != c_d[:-1]])
    ends = np.r_[starts[1:], len(c_d)]
    for lo, hi in zip(starts, ends, strict=True):
        dt = [segmentation[load_pos[c_d[lo]]]]
        gts = [gt_rle(int(i)) for i in c_g[lo:hi]]
        out[lo:hi] = np.asarray(mask_utils.iou(dt, gts, [0] * len(gts))).reshape(-1)
    return out


def _accumulate(tps, fps, cat, seg_start, num_gt):
    """Per-class precision at the recall thresholds and final recall, for one (IoU, area) cell.

    tps, fps: [D] bool in accumulation order (class, then score); cat: [D] class of each; seg_start:
    [K + 1] where each class's detections begin; num_gt: [K] non-ignored ground truth per class.
    Returns precision [R, K] and recall [K] (-1 for classes without ground truth).
    """
    num_k = len(num_gt)
    tp_cum = np.cumsum(tps, dtype=np.int64)
    fp_cum = np.cumsum(fps, dtype=np.int64)
    tp_before = np.r_[0, tp_cum][seg_start]  # [K + 1] true positives before each class
    fp_before = np.r_[0, fp_cum][seg_start]
    tp_seg = (tp_cum - tp_before[cat]).astype(np.float64)  # the reference casts its cumsum to float
    fp_seg = (fp_cum - fp_before[cat]).astype(np.float64)
    pr = tp_seg / (fp_seg + tp_seg + np.spacing(1))
    # Monotone from the right within each class: offsets keep the running max inside a class.
    offset = 2.0 * (num_k - cat)
    pr = np.maximum.accumulate((pr + offset)[::-1])[::-1] - offset

    n_det = np.diff(seg_start)  # [K]
    n_tp = np.diff(tp_before)  # [K]
    has_gt = num_gt > 0
    ng = np.maximum(num_gt, 1).astype(np.float64)
    # The first detection with recall >= r is the m-th true positive, m the least integer with
    # float(m / num_gt) >= r (exactly the reference's float comparison).
    m = np.maximum(np.ceil(REC_THRS[:, None] * ng[None, :]) - 1, 0)  # [R, K]
    m = np.where(m / ng >= REC_THRS[:, None], m, m + 1)
    m = np.where(m / ng >= REC_THRS[:, None], m, m + 1).astype(np.int64)
    tp_pos = np.flatnonzero(tps)
    k_idx = np.broadcast_to(np.arange(num_k), m.shape)
    reach = np.where(m == 0, n_det[k_idx] > 0, m <= n_tp[k_idx])
    idx = np.where(m == 0, seg_start[k_idx], tp_pos[np.clip(tp_before[k_idx] + m - 1, 0, max(len(tp_pos) - 1, 0))]
                   if len(tp_pos) else 0)  # fmt: skip
    precision = np.where(reach, pr[np.clip(idx, 0, max(len(pr) - 1, 0))] if len(pr) else 0.0, 0.0)
    precision = np.where(has_gt[None, :], precision, -1.0)
    recall = np.where(n_det > 0, n_tp / ng, 0.0)
    return precision, np.where(has_gt, recall, -1.0)
