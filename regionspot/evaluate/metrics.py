"""Detection metrics: LVIS (federated) or plain COCO, by the reference APIs or a fast C++ evaluator.

- LVIS-format annotations (categories carry `frequency`, images carry `neg_category_ids` and
  `not_exhaustive_category_ids`): evaluator "lvis" is the official `lvis` package (0.5.3), evaluator
  "fast" is faster-coco-eval's LVIS mode (C++ matching and accumulation) summarised here exactly as
  the `lvis` package summarises. Names: AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AR@300, ARs@300,
  ARm@300, ARl@300 (300 = max_dets).
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
    detections: list[dict],
    iou_type: str = "bbox",
    evaluator: str = "lvis",
    max_dets: int = 300,
) -> dict[str, float | None]:
    """Evaluate detections against LVIS- or COCO-format ground truth.

    Args:
        ground_truth: an annotation file or its parsed dict (copied, never modified).
        detections: results-format dicts {image_id, category_id, bbox [x, y, w, h], score} and, for
            iou_type "segm", segmentation (COCO RLE). Not modified.
        iou_type: "bbox" or "segm".
        evaluator: "lvis" (the reference APIs) or "fast" (faster-coco-eval's C++ core).
        max_dets: detections per image the LVIS protocol keeps, highest score first (300).
    Returns:
        {name: value in [0, 1] or None}, names as `metric_names`.
    """
    if evaluator not in EVALUATORS:
        raise RegionSpotError(f"unknown evaluator {evaluator!r}; choose one of {', '.join(EVALUATORS)}")
    if iou_type not in IOU_TYPES:
        raise RegionSpotError(f"unknown iou type {iou_type!r}; choose one of {', '.join(IOU_TYPES)}")
    gt = (
        load_ground_truth(ground_truth)
        if isinstance(ground_truth, (str, Path))
        else copy.deepcopy(ground_truth)
    )
    dets = [_result_for(d, iou_type) for d in detections]
    fmt = annotation_format(gt)
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        _quiet("lvis", "faster_coco_eval"),
    ):
        warnings.simplefilter("ignore")
        if fmt == "lvis":
            dets = limit_per_image(dets, max_dets)
            values = (
                _lvis_reference(gt, dets, iou_type, max_dets)
                if evaluator == "lvis"
                else _lvis_fast(gt, dets, iou_type, max_dets)
            )
        else:
            values = (
                _coco_reference(gt, dets, iou_type) if evaluator == "lvis" else _coco_fast(gt, dets, iou_type)
            )
    return {name: _clean(v) for name, v in zip(metric_names(fmt, max_dets), values, strict=True)}


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


def _lvis_fast(gt: dict, dets: list[dict], iou_type: str, max_dets: int) -> list[float]:
    from faster_coco_eval import COCO, COCOeval_faster

    # The lvis package drops annotations and detections of area <= 0 (its get_ann_ids keeps
    # 0 < area < inf); do the same so both evaluators see the same instances.
    gt["annotations"] = [a for a in gt["annotations"] if a.get("area", 1) > 0]
    coco_gt = COCO(gt, print_function=_silent)
    coco_dt = _fast_results(coco_gt, gt, dets, iou_type, drop_empty=True)
    ev = COCOeval_faster(coco_gt, coco_dt, iou_type, lvis_style=True, print_function=_silent)
    ev.params.maxDets = [max_dets]
    ev.evaluate()
    ev.accumulate()
    precision = np.asarray(ev.eval["precision"])[..., -1]  # [T, R, K, A]
    recall = np.asarray(ev.eval["recall"])[..., -1]  # [T, K, A]
    iou_thrs = np.asarray(ev.params.iouThrs)
    lbl = list(ev.params.areaRngLbl)
    cat_ids = sorted(ev.params.catIds)
    freq = {c["id"]: c["frequency"] for c in gt["categories"]}
    groups = [[k for k, c in enumerate(cat_ids) if freq[c] == f] for f in ("r", "c", "f")]

    def ap(iou=None, area="all", cats=None):
        s = precision if iou is None else precision[np.where(iou_thrs == iou)[0]]
        s = s[:, :, :, lbl.index(area)]
        return _mean_valid(s if cats is None else s[:, :, cats])

    def ar(area="all"):
        return _mean_valid(recall[:, :, lbl.index(area)])

    return [
        ap(), ap(iou=0.5), ap(iou=0.75), ap(area="small"), ap(area="medium"), ap(area="large"),
        ap(cats=groups[0]), ap(cats=groups[1]), ap(cats=groups[2]),
        ar(), ar("small"), ar("medium"), ar("large"),
    ]  # fmt: skip


def _mean_valid(s: np.ndarray) -> float:
    """Mean over entries > -1, or -1 when there are none (as both reference APIs summarise)."""
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _fast_results(coco_gt, gt: dict, dets: list[dict], iou_type: str, drop_empty: bool = False):
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
        if drop_empty and not d["area"] > 0:
            continue
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
