"""Metrics: the lvis package on NumPy 2, pycocotools for COCO files, and the fast evaluator's agreement."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from regionspot.errors import RegionSpotError
from regionspot.evaluate.metrics import (
    annotation_format,
    compute_metrics,
    limit_columns,
    limit_per_image,
    metric_names,
    to_columns,
    to_results,
)

W, H = 320, 240
FREQ = {
    **dict.fromkeys(range(1, 5), "r"),
    **dict.fromkeys(range(5, 9), "c"),
    **dict.fromkeys(range(9, 13), "f"),
}


def _polygon(x, y, w, h):
    # A box with one corner cut, so that mask IoU differs from box IoU.
    return [[x, y, x + w, y, x + w, y + 0.7 * h, x + 0.7 * w, y + h, x, y + h]]


def _rle(x, y, w, h):
    m = np.zeros((H, W), np.uint8, order="F")
    m[int(y) : int(y + h), int(x) : int(x + w)] = 1
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode()
    return rle


def make_fixture(seed=0, images=30, rare_gt=True, lvis=True):
    """Small LVIS-format ground truth with rare/common/frequent classes, negative and not-exhaustive
    labels, boxes of all three sizes; detections that partly hit it; some images without detections."""
    rng = np.random.default_rng(seed)
    cats = [
        {"id": c, "name": f"class_{c}", "synonyms": [f"class_{c}"], "frequency": f} for c, f in FREQ.items()
    ]
    present = [c for c in FREQ if rare_gt or FREQ[c] != "r"]
    imgs, anns, dets = [], [], []
    for i in range(1, images + 1):
        n = int(rng.integers(0, 6))
        labels = rng.choice(present, size=n)
        img_anns = []
        for c in labels:
            side = float(rng.choice([20, 60, 130])) * rng.uniform(0.7, 1.3)
            w, h = side, min(side * rng.uniform(0.6, 1.4), H - 1.0)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            img_anns.append(
                {
                    "id": len(anns) + len(img_anns) + 1,
                    "image_id": i,
                    "category_id": int(c),
                    "bbox": [x, y, w, h],
                    "area": w * h * 0.955,
                    "segmentation": _polygon(x, y, w, h),
                }
            )
        anns += img_anns
        absent = sorted(set(FREQ) - set(labels.tolist()))
        neg = rng.choice(absent, size=min(2, len(absent)), replace=False).tolist()
        nel = [int(labels[0])] if n and rng.random() < 0.3 else []
        imgs.append(
            {
                "id": i,
                "width": W,
                "height": H,
                "file_name": f"{i}.jpg",
                "neg_category_ids": [int(c) for c in neg],
                "not_exhaustive_category_ids": nel,
            }
        )
        if i % 7 == 0:
            continue  # no detections for this image
        for a in img_anns:
            for _ in range(2):
                x, y, w, h = (v + rng.normal(0, 0.1 * a["bbox"][2]) for v in a["bbox"])
                w, h = max(w, 2.0), max(h, 2.0)
                c = a["category_id"] if rng.random() < 0.6 else int(rng.choice(list(FREQ)))
                dets.append(
                    {"image_id": i, "category_id": c, "bbox": [x, y, w, h], "score": float(rng.random())}
                )
        for _ in range(4):
            w, h = rng.uniform(10, 150, size=2)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            c = int(rng.choice(list(neg) + [int(rng.choice(list(FREQ)))]))
            dets.append({"image_id": i, "category_id": c, "bbox": [x, y, w, h], "score": float(rng.random())})
    for d in dets:
        x, y, w, h = d["bbox"]
        x0, y0 = min(max(x, 0), W - 2), min(max(y, 0), H - 2)
        d["bbox"] = [x0, y0, min(w, W - x0), min(h, H - y0)]
        d["segmentation"] = _rle(*d["bbox"])
    gt = {"images": imgs, "annotations": anns, "categories": cats}
    if not lvis:
        for img in imgs:
            del img["neg_category_ids"], img["not_exhaustive_category_ids"]
        for c in cats:
            del c["frequency"]
        for a in anns:
            a["iscrowd"] = 0
    return gt, dets


def _assert_close(a, b, tol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] is None) == (b[k] is None), k
        if a[k] is not None:
            assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("rare_gt", [True, False])
def test_fast_equals_lvis(iou_type, rare_gt):
    gt, dets = make_fixture(seed=1 if rare_gt else 2, rare_gt=rare_gt)
    assert annotation_format(gt) == "lvis"
    ref = compute_metrics(gt, dets, iou_type=iou_type, evaluator="lvis")
    fast = compute_metrics(gt, dets, iou_type=iou_type, evaluator="fast")
    assert list(ref) == metric_names("lvis", 300)
    _assert_close(ref, fast)
    assert (ref["APr"] is None) == (not rare_gt)  # a group without ground truth is null, not 0
    values = [v for v in ref.values() if v is not None]
    assert all(0 <= v <= 1 for v in values) and ref["AP"] > 0.05


def test_lvis_metrics_match_the_lvis_api_run_directly(tmp_path):
    import json

    from lvis import LVIS, LVISEval, LVISResults

    from regionspot.evaluate.metrics import _lvis_numpy_shim

    gt, dets = make_fixture(seed=3)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    ours = compute_metrics(tmp_path / "gt.json", dets, evaluator="lvis")
    _lvis_numpy_shim()  # the package's one NumPy 2 fault (np.float in accumulate)
    lvis_gt = LVIS(str(tmp_path / "gt.json"))
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, str(tmp_path / "dets.json")), "bbox")
    ev.run()
    _assert_close(ours, {k: (None if v < 0 else float(v)) for k, v in ev.get_results().items()}, tol=0)
    assert not hasattr(np, "float")  # the shim never touches numpy itself


@pytest.mark.parametrize("evaluator", ["lvis", "fast"])
def test_federated_rules(evaluator):
    gt, dets = make_fixture(seed=8)
    base = compute_metrics(gt, dets, evaluator=evaluator)
    # A class neither present in nor negative for an image is not judged there: adding confident
    # detections of it changes nothing.
    img = gt["images"][0]
    judged = set(img["neg_category_ids"]) | {
        a["category_id"] for a in gt["annotations"] if a["image_id"] == img["id"]
    }
    free = next(c for c in FREQ if c not in judged)
    extra = [{"image_id": img["id"], "category_id": free, "bbox": [5.0, 5.0, 50.0, 50.0], "score": 0.99}]
    _assert_close(base, compute_metrics(gt, dets + extra, evaluator=evaluator), tol=0)
    # A negative class is judged: a confident false positive lowers AP.
    extra[0]["category_id"] = img["neg_category_ids"][0]
    assert compute_metrics(gt, dets + extra * 20, evaluator=evaluator)["AP"] < base["AP"]


def test_limit_per_image_keeps_the_best_scores():
    dets = [{"image_id": 1, "score": s} for s in (0.1, 0.9, 0.5)] + [{"image_id": 2, "score": 0.3}]
    assert [d["score"] for d in limit_per_image(dets, 2)] == [0.9, 0.5, 0.3]


@pytest.mark.parametrize("max_dets", [1, 3, 300])
def test_limit_columns_keeps_the_reference_order(max_dets):
    rng = np.random.default_rng(0)
    dets = [{"image_id": int(i), "category_id": 1, "bbox": [0, 0, 1, 1], "score": float(s)}
            for i, s in zip(rng.integers(1, 6, 60), rng.integers(0, 5, 60) / 4, strict=True)]  # fmt: skip
    dets = [dict(d, bbox=[float(k), 0.0, 1.0, 1.0]) for k, d in enumerate(dets)]  # rows told apart by bbox
    assert to_results(limit_columns(to_columns(dets), max_dets)) == limit_per_image(dets, max_dets)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fast_equals_lvis_with_ties_duplicates_and_ignored_ground_truth(seed):
    gt, dets = make_fixture(seed=seed, images=15)
    for d in dets:
        d["score"] = round(d["score"], 1)  # many exact score ties
    gt["annotations"] += [
        dict(a, id=len(gt["annotations"]) + k + 1) for k, a in enumerate(gt["annotations"][:6])
    ]
    for a in gt["annotations"][::5]:
        a["ignore"] = 1
    for iou_type in ("bbox", "segm"):
        for max_dets in (2, 300):
            ref = compute_metrics(gt, dets, iou_type=iou_type, evaluator="lvis", max_dets=max_dets)
            _assert_close(
                ref, compute_metrics(gt, dets, iou_type=iou_type, evaluator="fast", max_dets=max_dets)
            )
            cols = to_columns(dets, iou_type)
            _assert_close(
                ref, compute_metrics(gt, cols, iou_type=iou_type, evaluator="fast", max_dets=max_dets)
            )


@pytest.mark.parametrize("evaluator", ["lvis", "fast"])
def test_more_than_max_dets_per_image(evaluator):
    gt, dets = make_fixture(seed=4, images=6)
    ref = compute_metrics(gt, dets, evaluator="lvis", max_dets=3)
    _assert_close(ref, compute_metrics(gt, dets, evaluator=evaluator, max_dets=3))
    assert "AR@3" in ref
    assert ref != compute_metrics(gt, dets, evaluator="lvis")


@pytest.mark.parametrize("lvis", [True, False])
@pytest.mark.parametrize("evaluator", ["lvis", "fast"])
def test_no_detections_still_gives_metrics(lvis, evaluator):
    gt, _ = make_fixture(seed=5, rare_gt=False, lvis=lvis)
    out = compute_metrics(gt, [], evaluator=evaluator)
    assert out == compute_metrics(gt, to_columns([]), evaluator=evaluator)
    assert out["AP"] == 0.0 and out["AP50"] == 0.0
    if lvis:
        assert out["APr"] is None and out["APf"] == 0.0 and out["AR@300"] == 0.0


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_format_fast_equals_pycocotools(iou_type):
    gt, dets = make_fixture(seed=6, lvis=False)
    assert annotation_format(gt) == "coco"
    ref = compute_metrics(gt, dets, iou_type=iou_type, evaluator="lvis")
    assert list(ref) == metric_names("coco")
    assert ref["AP"] > 0.05
    _assert_close(ref, compute_metrics(gt, dets, iou_type=iou_type, evaluator="fast"))


def test_inputs_are_not_modified_and_errors_name_the_choice():
    gt, dets = make_fixture(seed=7, images=5)
    before = repr((gt, dets))
    compute_metrics(gt, dets, evaluator="lvis", iou_type="segm")
    compute_metrics(gt, dets, evaluator="fast")
    assert repr((gt, dets)) == before
    with pytest.raises(RegionSpotError, match="fast"):
        compute_metrics(gt, dets, evaluator="slow")
    with pytest.raises(RegionSpotError, match="--masks"):
        compute_metrics(
            gt, [{k: v for k, v in d.items() if k != "segmentation"} for d in dets], iou_type="segm"
        )
