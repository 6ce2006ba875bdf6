"""Detection metrics: LVIS (federated) or plain COCO, by the reference APIs or a fast evaluator.

- LVIS-format annotations (categories carry `frequency`, images carry `neg_category_ids` and
  `not_exhaustive_category_ids`): evaluator "lvis" is the official `lvis` package (0.5.3), evaluator
  "fast" our vectorised re-implementation of it (`lvis_fast`), summarised here as the `lvis` package
  summarises. (faster-coco-eval's LVIS mode was measured and set aside: it keeps an entry per
  (image, class) pair, 3.2 GB at a tenth of LVIS val.) Names: AP, AP50, AP75, APs, APm, APl, APr,
  APc, APf, AR@300, ARs@300, ARm@300, ARl@300 (300 = max_dets).
- COCO-format annotations: evaluator "lvis" is pycocotools' COCOeval, "fast" faster-coco-eval's
  COCOeval_faster. Names: AP, AP50, AP75, APs, APm, APl, AR@1, AR@10, AR@100, ARs@100, ARm@100, ARl@100.

Values are floats in [0, 1]; None where the API reports -1 (no ground truth in that group). An empty
detection list still gives every metric (0 where there is ground truth).

`lvis` 0.5.3 calls `np.float`, which NumPy 2 removed. Rather than pinning NumPy, `_lvis_numpy_shim`
hands the `lvis.eval` module (and only it) a stand-in for numpy that adds the removed aliases back
and forwards everything else to numpy; no global state of numpy changes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import types
import warnings
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError

EVALUATORS = ("lvis", "fast")
IOU_TYPES = ("bbox", "segm")
COCO_MAX_DETS = (1, 10, 100)


# --- the lvis package on NumPy 2 -------------------------------------------------------------------


class _NumpyWithOldAliases(types.ModuleType):
    """numpy as lvis 0.5.3 expects it: the scalar aliases NumPy 1.24 removed, everything else numpy's."""

    float = float
    int = int
    bool = bool
    object = object

    def __getattr__(self, name):
        return getattr(np, name)


def _lvis_numpy_shim() -> None:
    """Give `lvis.eval` (only) a numpy with `np.float` and friends; idempotent."""
    import lvis.eval

    if not isinstance(lvis.eval.np, _NumpyWithOldAliases):
        lvis.eval.np = _NumpyWithOldAliases("numpy")


# --- ground truth ------------------------------------------------------------------------------------


def load_ground_truth(path: Path | str) -> dict:
    """Read a COCO- or LVIS-format annotation file into a dict."""
    try:
        with open(path) as f:
            gt = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RegionSpotError(f"cannot read annotations {path}: {e}") from None
    if not isinstance(gt, dict) or not {"images", "annotations", "categories"} <= set(gt):
        raise RegionSpotError(
            f"{path} is not a COCO/LVIS annotation file (needs images, annotations, categories)"
        )
    return gt


def annotation_format(gt: dict) -> str:
    """'lvis' when the file carries LVIS's federated fields, else 'coco'."""
    cats, imgs = gt.get("categories") or [], gt.get("images") or []
    if cats and all("frequency" in c for c in cats) and all("neg_category_ids" in i for i in imgs):
        return "lvis"
    return "coco"


def metric_names(fmt: str, max_dets: int = 300) -> list[str]:
    """The result names for an annotation format, in the APIs' order."""
    if fmt == "lvis":
        return ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"] + [
            f"AR{a}@{max_dets}" for a in ("", "s", "m", "l")
        ]
    return (
        ["AP", "AP50", "AP75", "APs", "APm", "APl"]
        + [f"AR@{m}" for m in COCO_MAX_DETS]
        + [f"AR{a}@{COCO_MAX_DETS[-1]}" for a in ("s", "m", "l")]
    )


# --- entry point -------------------------------------------------------------------------------------


def compute_metrics(
    ground_truth: dict | Path | str,
    detections: list[dict] | dict[str, object],
    iou_type: str = "bbox",
    evaluator: str = "lvis",
    max_dets: int = 300,
) -> dict[str, float | None]:
    """Evaluate detections against LVIS- or COCO-format ground truth.

    Args:
        ground_truth: an annotation file or its parsed dict (never modified).
        detections: results-format dicts {image_id, category_id, bbox [x, y, w, h], score} and, for
            iou_type "segm", segmentation (COCO RLE); or the same as columns (`to_columns`), which
            the fast LVIS evaluator takes without building a dict per detection. Not modified.
        iou_type: "bbox" or "segm".
        evaluator: "lvis" (the reference APIs) or "fast" (vectorised LVIS evaluation; faster-coco-eval
            for COCO-format files).
        max_dets: detections per image the LVIS protocol keeps, highest score first (300).
    Returns:
        {name: value in [0, 1] or None}, names as `metric_names`.
    """
    if evaluator not in EVALUATORS:
        raise RegionSpotError(f"unknown evaluator {evaluator!r}; choose one of {', '.join(EVALUATORS)}")
    if iou_type not in IOU_TYPES:
        raise RegionSpotError(f"unknown iou type {iou_type!r}; choose one of {', '.join(IOU_TYPES)}")
    gt = load_ground_truth(ground_truth) if isinstance(ground_truth, (str, Path)) else ground_truth
    fmt = annotation_format(gt)
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        _quiet("lvis", "faster_coco_eval"),
    ):
        warnings.simplefilter("ignore")
        if fmt == "lvis" and evaluator == "fast":  # reads gt and the columns, copies nothing big
            cols = detections if isinstance(detections, dict) else to_columns(detections, iou_type)
            values = _lvis_fast(gt, limit_columns(cols, max_dets), iou_type)
        else:  # the reference APIs modify what they are given: hand them copies
            if not isinstance(ground_truth, (str, Path)):
                gt = copy.deepcopy(gt)
            dets = to_results(detections) if isinstance(detections, dict) else detections
            dets = [_result_for(d, iou_type) for d in dets]
            if fmt == "lvis":
                values = _lvis_reference(gt, limit_per_image(dets, max_dets), iou_type, max_dets)
            elif evaluator == "lvis":
                values = _coco_reference(gt, dets, iou_type)
            else:
                values = _coco_fast(gt, dets, iou_type)
    return {name: _clean(v) for name, v in zip(metric_names(fmt, max_dets), values, strict=True)}


def to_columns(dets: list[dict], iou_type: str = "bbox") -> dict[str, object]:
    """Results-format dicts as columns: image_id, category_id int64 [M], score float64 [M], and
    bbox float64 [M, 4] xywh (bbox) or segmentation: M RLE dicts (segm)."""
    cols: dict[str, object] = {
        "image_id": np.array([d["image_id"] for d in dets], np.int64),
        "category_id": np.array([d["category_id"] for d in dets], np.int64),
        "score": np.array([d["score"] for d in dets], np.float64),
    }
    if iou_type == "segm":
        if any("segmentation" not in d for d in dets):
            raise RegionSpotError("segm evaluation needs masks: extract the shards with --masks")
        cols["segmentation"] = [d["segmentation"] for d in dets]
    else:
        cols["bbox"] = np.array([d["bbox"] for d in dets], np.float64).reshape(-1, 4)
    return cols


def to_results(cols: dict[str, object]) -> list[dict]:
    """Columns back to results-format dicts (Python numbers, as json writes them)."""
    out = [
        {"image_id": i, "category_id": c, "score": s}
        for i, c, s in zip(
            np.asarray(cols["image_id"]).tolist(),
            np.asarray(cols["category_id"]).tolist(),
            np.asarray(cols["score"]).tolist(),
            strict=True,
        )
    ]
    if cols.get("bbox") is not None:
        for d, b in zip(out, np.asarray(cols["bbox"]).reshape(-1, 4).tolist(), strict=True):
            d["bbox"] = b
    if cols.get("segmentation") is not None:
        for d, m in zip(out, cols["segmentation"], strict=True):
            d["segmentation"] = m
    return out


def _result_for(det: dict, iou_type: str) -> dict:
    """A private copy of one result; for segm without `bbox`, so that the APIs take the area from the
    mask (with a bbox present both APIs would use the box area for the small/medium/large split)."""
    out = {"image_id": det["image_id"], "category_id": det["category_id"], "score": float(det["score"])}
    if iou_type == "segm":
        if "segmentation" not in det:
            raise RegionSpotError("segm evaluation needs masks: extract the shards with --masks")
        out["segmentation"] = det["segmentation"]
    else:
        out["bbox"] = [float(v) for v in det["bbox"]]
    return out


def limit_per_image(dets: list[dict], max_dets: int) -> list[dict]:
    """Keep each image's `max_dets` best by score, as `lvis.LVISResults.limit_dets_per_image` does
    (same grouping and stable order, so ties fall the same way)."""
    by_image: dict = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    out = []
    for group in by_image.values():
        if len(group) > max_dets:
            group = sorted(group, key=lambda d: d["score"], reverse=True)[:max_dets]
        out.extend(group)
    return out


def limit_columns(cols: dict[str, object], max_dets: int) -> dict[str, object]:
    """`limit_per_image` on columns, leaving the rows in the same order as it would."""
    image_id, score = np.asarray(cols["image_id"]), np.asarray(cols["score"])
    if len(image_id) == 0:
        return cols
    _, first, inverse, counts = np.unique(
        image_id, return_index=True, return_inverse=True, return_counts=True
    )
    group_rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")  # images by first appearance
    if counts.max() <= max_dets:
        order = np.lexsort((np.arange(len(image_id)), group_rank[inverse]))
    else:
        big = counts[inverse] > max_dets
        # Within an over-full image: by score, highest first (stable); elsewhere: as given.
        by_score = np.lexsort((np.arange(len(score)), -score, inverse))
        rank_in_image = np.empty(len(score), np.int64)
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        rank_in_image[by_score] = np.arange(len(score)) - starts[inverse[by_score]]
        within = np.where(big, rank_in_image, np.arange(len(score)))
        order = np.lexsort((within, group_rank[inverse]))
        order = order[~big[order] | (rank_in_image[order] < max_dets)]
    out = {k: np.asarray(v)[order] for k, v in cols.items() if k != "segmentation" and v is not None}
    if cols.get("segmentation") is not None:
        out["segmentation"] = [cols["segmentation"][i] for i in order]
    return out


def _clean(value) -> float | None:
    value = float(value)
    return None if value < 0 or not np.isfinite(value) else value


@contextlib.contextmanager
def _quiet(*loggers: str):
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


# --- LVIS: the reference `lvis` package --------------------------------------------------------------


def _lvis_reference(gt: dict, dets: list[dict], iou_type: str, max_dets: int) -> list[float]:
    _lvis_numpy_shim()
    from lvis import LVIS, LVISEval, LVISResults

    lvis_gt = LVIS.__new__(LVIS)  # LVIS() only reads a path; build it from the dict
    lvis_gt.logger, lvis_gt.dataset = logging.getLogger("lvis"), gt
    lvis_gt._create_index()
    if dets:
        lvis_dt = LVISResults(lvis_gt, dets, max_dets=max_dets)
    else:  # LVISResults indexes results[0]; an empty result set is built the same way by hand
        lvis_dt = LVISResults.__new__(LVISResults)
        lvis_dt.logger, lvis_dt.dataset = logging.getLogger("lvis"), {**gt, "annotations": []}
        lvis_dt._create_index()
    ev = LVISEval(lvis_gt, lvis_dt, iou_type=iou_type)
    ev.params.max_dets = max_dets
    ev.run()
    return list(ev.get_results().values())


# --- LVIS: faster-coco-eval, summarised as the lvis package does -------------------------------------


def _lvis_fast(gt: dict, cols: dict[str, object], iou_type: str) -> list[float]:
    from regionspot.evaluate.lvis_fast import AREA_LBL, IOU_THRS, evaluate_lvis

    if iou_type == "segm" and cols.get("segmentation") is None:
        raise RegionSpotError("segm evaluation needs masks: extract the shards with --masks")
    precision, recall, cat_ids = evaluate_lvis(
        gt, cols["image_id"], cols["category_id"], cols["score"], bbox=cols.get("bbox"),
        segmentation=cols.get("segmentation"), iou_type=iou_type,
    )  # fmt: skip
    freq = {c["id"]: c["frequency"] for c in gt["categories"]}
    groups = [[k for k, c in enumerate(cat_ids) if freq[c] == f] for f in ("r", "c", "f")]

    def ap(iou=None, area="all", cats=None):
        s = precision if iou is None else precision[np.where(iou == IOU_THRS)[0]]
        s = s[:, :, :, AREA_LBL.index(area)]
        return _mean_valid(s if cats is None else s[:, :, cats])

    def ar(area="all"):
        return _mean_valid(recall[:, :, AREA_LBL.index(area)])

    return [
        ap(), ap(iou=0.5), ap(iou=0.75), ap(area="small"), ap(area="medium"), ap(area="large"),
        ap(cats=groups[0]), ap(cats=groups[1]), ap(cats=groups[2]),
        ar(), ar("small"), ar("medium"), ar("large"),
    ]  # fmt: skip


def _mean_valid(s: np.ndarray) -> float:
    """Mean over entries > -1, or -1 when there are none (as both reference APIs summarise)."""
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _fast_results(coco_gt, gt: dict, dets: list[dict], iou_type: str):
    """faster-coco-eval's results object, built directly: loadRes would add a polygon per box."""
    from faster_coco_eval import COCO
    from faster_coco_eval.core import mask as mask_utils

    anns = []
    for i, d in enumerate(dets):
        d = dict(d, id=i + 1, iscrowd=0)
        if iou_type == "bbox":
            d["area"] = d["bbox"][2] * d["bbox"][3]
        else:
            d["area"] = float(mask_utils.area(d["segmentation"]))
            d["bbox"] = [float(v) for v in mask_utils.toBbox(d["segmentation"])]
        anns.append(d)
    unknown = {d["image_id"] for d in anns} - set(coco_gt.getImgIds())
    if unknown:
        raise RegionSpotError(
            f"{len(unknown)} detected image ids are not in the annotations, e.g. {sorted(unknown)[:3]}"
        )
    res = COCO(print_function=_silent)
    res.dataset = {
        "images": list(gt["images"]),
        "categories": copy.deepcopy(gt["categories"]),
        "annotations": anns,
    }
    res.createIndex()
    return res


def _silent(*args, **kwargs) -> None:
    pass


# --- plain COCO ----------------------------------------------------------------------------------------


def _coco_reference(gt: dict, dets: list[dict], iou_type: str) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    if dets:
        coco_dt = coco_gt.loadRes(dets)
    else:  # loadRes indexes results[0]
        coco_dt = COCO()
        coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
        coco_dt.createIndex()
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return list(ev.stats)


def _coco_fast(gt: dict, dets: list[dict], iou_type: str) -> list[float]:
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(gt, print_function=_silent)
    ev = COCOeval_faster(
        coco_gt, _fast_results(coco_gt, gt, dets, iou_type), iou_type, print_function=_silent
    )
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return list(ev.stats[:12])
