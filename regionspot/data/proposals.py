"""A detector's boxes as regions to name: `load_proposals(path, reader)` and `Proposals.apply`.

Two formats are read:
  COCO results list  `[{"image_id", "bbox": [x, y, w, h], "score", "category_id"?}, ...]`: one record
                     per box and category, so identical boxes of an image are merged, keeping the
                     highest score; boxes keep the order of their first record.
  official dict      `{"<image_id>": {"boxes": [[x0, y0, x1, y1], ...], "scores": [...], "labels": [...]}}`,
                     as the RegionSpot code writes it: taken as given (labels are ignored).
Image ids match the dataset's as int or str (`397133` and `"397133"` are one image). Every coordinate
and score must be a finite JSON number (not null, NaN, Infinity or a string such as "10") and every
score at least 0; a file that breaks this, or holds no box at all, is refused before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from regionspot.data.boxes import best_n_in_order, box_areas, sanitize_boxes, xywh_to_xyxy
from regionspot.data.coco import snippet
from regionspot.data.records import ImageRecord, Reader
from regionspot.errors import RegionSpotError

_SHOWN = 3  # offenders named in an error message


def _number_fault(v: object, what: str) -> str | None:
    """Why `v` is not a usable number (`what` names it in the message), or None."""
    if isinstance(v, str):
        return f"{what} {v!r} is a string, not a number"
    if not isinstance(v, int | float) or isinstance(v, bool):
        return f"{what} {json.dumps(v)} is not a number"
    try:
        finite = math.isfinite(v)
    except OverflowError:  # an integer beyond any float
        finite = False
    return None if finite else f"{what} {v} is not finite"


def _box_fault(box: object, shape_fault: str) -> str | None:
    if not isinstance(box, list) or len(box) != 4:
        return shape_fault
    return next((why for v in box if (why := _number_fault(v, "coordinate"))), None)


def _score_fault(score: object) -> str | None:
    return _number_fault(score, "score") or (f"score {score} is negative" if score < 0 else None)


class Proposals:
    """Boxes per image key, validated against a dataset.

    by_key: key -> (boxes float32 [N, 4] XYXY pixels, scores float32 [N]).
    sha256: of the file, for the run identity.
    stats:  format, records, images, boxes, duplicates_merged; after `apply` also boxes_dropped,
            boxes_clipped, boxes_capped, images_without_proposals.
    """

    def __init__(self, by_key: dict[str, tuple[np.ndarray, np.ndarray]], sha256: str, stats: dict):
        self.by_key, self.sha256, self.stats = by_key, sha256, stats

    def apply(self, records: list[ImageRecord], max_boxes: int | None = None) -> list[ImageRecord]:
        """Replace each record's regions by its proposals.

        Args:
            records: the dataset's records (any subset).
            max_boxes: keep an image's N highest-scoring proposals (ties: file order); None keeps all.
        Returns:
            New records in the same order: boxes XYXY pixels (clipped; NaN and empty boxes dropped),
            labels -1, scores the detector's; an image without proposals has zero regions.
        """
        counts = dict.fromkeys(
            ("boxes_dropped", "boxes_clipped", "boxes_capped", "images_without_proposals"), 0
        )
        out = []
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        for r in records:
            boxes, scores = self.by_key.get(r.key, empty)
            if r.key not in self.by_key:
                counts["images_without_proposals"] += 1
            boxes, keep, c = sanitize_boxes(boxes, r.width, r.height)
            counts["boxes_dropped"] += c["dropped_invalid"]
            counts["boxes_clipped"] += c["clipped"]
            top = best_n_in_order(scores[keep], max_boxes)
            counts["boxes_capped"] += int(keep.sum()) - len(top)
            boxes, scores = boxes[keep][top], scores[keep][top]
            out.append(
                dataclasses.replace(r, boxes=boxes, labels=np.full(len(boxes), -1, np.int32), scores=scores)
            )
        self.stats.update(counts)
        return out


def cap_boxes(record: ImageRecord, max_boxes: int) -> ImageRecord:
    """Keep a record's `max_boxes` largest boxes (annotations; ties: file order), in their original order."""
    if len(record.labels) <= max_boxes:
        return record
    keep = best_n_in_order(box_areas(record.boxes), max_boxes)
    return dataclasses.replace(
        record, boxes=record.boxes[keep], labels=record.labels[keep], scores=record.scores[keep]
    )


def load_proposals(path: str | Path, reader: Reader) -> Proposals:
    """Read and validate a proposals file against `reader`'s images, before any extraction work.

    Raises:
        RegionSpotError: malformed JSON; records whose box or score is not a finite number (or is a
            negative score); no box at all; or image ids not in the dataset — naming the first
            offenders (index and image id) and how many there are.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RegionSpotError(f"cannot read proposals {path}: {e.strerror}") from None
    if not raw.strip():
        raise RegionSpotError(f"proposals {path} is empty; give the detector's results file")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise RegionSpotError(f"proposals {path}: malformed JSON ({getattr(e, 'msg', e)}{where})") from None
    if isinstance(data, list):
        by_key, stats = _from_results_list(path, data)
    elif isinstance(data, dict):
        by_key, stats = _from_official_dict(path, data)
    else:
        raise RegionSpotError(
            f"proposals {path}: expected a COCO results list [{{'image_id', 'bbox', 'score'}}, ...] or the "
            "official dict {'<image_id>': {'boxes', 'scores'}}"
        )
    known = {r.key for r in reader.records()}
    unknown = [k for k in by_key if k not in known]
    if unknown:
        raise RegionSpotError(
            f"proposals {path}: {len(unknown)} image id(s) not in dataset {reader.name!r} "
            f"(first: {', '.join(unknown[:_SHOWN])}); the proposals must be for this dataset's images"
        )
    stats.update(images=len(by_key), boxes=int(sum(len(s) for _, s in by_key.values())))
    if stats["boxes"] == 0:
        raise RegionSpotError(
            f"proposals {path} holds no boxes ({len(data)} {'records' if isinstance(data, list) else 'images'}); "
            "every image would have zero regions and AP 0: give the detector's results file"
        )
    return Proposals(by_key, hashlib.sha256(raw).hexdigest(), stats)


def _fail(path: Path, bad: list[tuple[str, object, str]], total: int, what: str) -> RegionSpotError:
    shown = "; ".join(f"{where} {snippet(rec, 80)}: {why}" for where, rec, why in bad[:_SHOWN])
    return RegionSpotError(f"proposals {path}: {len(bad)} of {total} {what} malformed, first: {shown}")


def _from_results_list(path: Path, data: list) -> tuple[dict, dict]:
    bad = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            bad.append((f"record {i}", rec, "expected an object"))
            continue
        where = f"record {i} (image_id {rec.get('image_id')!r})"
        if not isinstance(rec.get("image_id"), int | str) or isinstance(rec.get("image_id"), bool):
            bad.append((f"record {i}", rec, "no 'image_id'"))
        elif why := _box_fault(rec.get("bbox"), "no 'bbox' [x, y, w, h]"):
            bad.append((where, rec, why))
        elif "score" in rec and (why := _score_fault(rec["score"])):
            bad.append((where, rec, why))
    if bad:
        raise _fail(path, bad, len(data), "records")
    grouped: dict[str, dict[tuple, float]] = {}  # key -> {box: best score}, insertion = first appearance
    for rec in data:
        boxes = grouped.setdefault(str(rec["image_id"]), {})
        box = tuple(float(v) for v in rec["bbox"])
        score = float(rec.get("score", 1.0))
        boxes[box] = max(score, boxes.get(box, -np.inf))
    by_key = {}
    for key, boxes in grouped.items():
        xywh = np.array(list(boxes), np.float64).reshape(-1, 4)
        by_key[key] = (xywh_to_xyxy(xywh).astype(np.float32), np.array(list(boxes.values()), np.float32))
    merged = len(data) - sum(len(b) for b in grouped.values())
    return by_key, {"format": "coco-results", "records": len(data), "duplicates_merged": merged}


def _entry_fault(entry: object) -> str | None:
    """Why an official-dict entry is unusable, naming the first bad box or score, or None."""
    if not isinstance(entry, dict):
        return "expected {'boxes': [...], 'scores': [...]}"
    if not isinstance(entry.get("boxes"), list):
        return "no 'boxes' list of [x0, y0, x1, y1]"
    for j, box in enumerate(entry["boxes"]):
        if why := _box_fault(box, "not [x0, y0, x1, y1]"):
            return f"box {j}: {why}"
    if "scores" not in entry:
        return None
    scores = entry["scores"]
    if not isinstance(scores, list) or len(scores) != len(entry["boxes"]):
        return "'scores' must be one number per box"
    return next((f"box {j}: {why}" for j, s in enumerate(scores) if (why := _score_fault(s))), None)


def _from_official_dict(path: Path, data: dict) -> tuple[dict, dict]:
    bad = [
        (f"image {image_id!r}", entry, why)
        for image_id, entry in data.items()
        if (why := _entry_fault(entry))
    ]
    if bad:
        raise _fail(path, bad, len(data), "images")
    by_key = {}
    for image_id, entry in data.items():
        boxes = np.array(entry["boxes"], np.float32).reshape(-1, 4)
        scores = np.array(entry.get("scores", [1.0] * len(boxes)), np.float32).reshape(-1)
        by_key[str(image_id)] = (boxes, scores)
    return by_key, {"format": "official-dict", "records": len(data), "duplicates_merged": 0}
