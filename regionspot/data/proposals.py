"""A detector's boxes as regions to name: `load_proposals(path, reader)` and `Proposals.apply`.

Two formats are read:
  COCO results list  `[{"image_id", "bbox": [x, y, w, h], "score", "category_id"?}, ...]`: one record
                     per box and category, so identical boxes of an image are merged, keeping the
                     highest score; boxes keep the order of their first record.
  official dict      `{"<image_id>": {"boxes": [[x0, y0, x1, y1], ...], "scores": [...], "labels": [...]}}`,
                     as the RegionSpot code writes it: taken as given (labels are ignored).
Image ids match the dataset's as int or str (`397133` and `"397133"` are one image).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from regionspot.data.boxes import box_areas, sanitize_boxes, xywh_to_xyxy
from regionspot.data.coco import snippet
from regionspot.data.records import ImageRecord, Reader
from regionspot.errors import RegionSpotError

_SHOWN = 3  # offenders named in an error message


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_box(b: object) -> bool:
    return isinstance(b, list | tuple) and len(b) == 4 and all(_is_number(v) or v is None for v in b)


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
            boxes, scores = boxes[keep], scores[keep]
            if max_boxes is not None and len(scores) > max_boxes:
                top = np.sort(np.argsort(-scores, kind="stable")[:max_boxes])  # best N, in file order
                counts["boxes_capped"] += len(scores) - max_boxes
                boxes, scores = boxes[top], scores[top]
            out.append(
                ImageRecord(
                    key=r.key,
                    image_id=r.image_id,
                    file_name=r.file_name,
                    path=r.path,
                    width=r.width,
                    height=r.height,
                    boxes=boxes,
                    labels=np.full(len(boxes), -1, np.int32),
                    scores=scores,
                )
            )
        self.stats.update(counts)
        return out


def cap_boxes(record: ImageRecord, max_boxes: int) -> ImageRecord:
    """Keep a record's `max_boxes` largest boxes (annotations; ties: file order), in their original order."""
    if len(record.labels) <= max_boxes:
        return record
    keep = np.sort(np.argsort(-box_areas(record.boxes), kind="stable")[:max_boxes])
    return ImageRecord(
        key=record.key,
        image_id=record.image_id,
        file_name=record.file_name,
        path=record.path,
        width=record.width,
        height=record.height,
        boxes=record.boxes[keep],
        labels=record.labels[keep],
        scores=record.scores[keep],
    )


def load_proposals(path: str | Path, reader: Reader) -> Proposals:
    """Read and validate a proposals file against `reader`'s images, before any extraction work.

    Raises:
        RegionSpotError: malformed JSON, records without a usable box, or image ids not in the
            dataset — naming the first offenders and how many there are.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RegionSpotError(f"cannot read proposals {path}: {e.strerror}") from None
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
    return Proposals(by_key, hashlib.sha256(raw).hexdigest(), stats)


def _fail(path: Path, bad: list[tuple[str, object, str]], total: int, what: str) -> RegionSpotError:
    shown = "; ".join(f"{where} {snippet(rec, 80)}: {why}" for where, rec, why in bad[:_SHOWN])
    return RegionSpotError(f"proposals {path}: {len(bad)} of {total} {what} malformed, first: {shown}")


def _from_results_list(path: Path, data: list) -> tuple[dict, dict]:
    bad = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            bad.append((f"record {i}", rec, "expected an object"))
        elif not isinstance(rec.get("image_id"), int | str) or isinstance(rec.get("image_id"), bool):
            bad.append((f"record {i}", rec, "no 'image_id'"))
        elif not _is_box(rec.get("bbox")):
            bad.append((f"record {i}", rec, "no 'bbox' [x, y, w, h]"))
        elif "score" in rec and not _is_number(rec["score"]):
            bad.append((f"record {i}", rec, "'score' must be a number"))
    if bad:
        raise _fail(path, bad, len(data), "records")
    grouped: dict[str, dict[tuple, float]] = {}  # key -> {box: best score}, insertion = first appearance
    for rec in data:
        boxes = grouped.setdefault(str(rec["image_id"]), {})
        box = tuple(float("nan") if v is None else float(v) for v in rec["bbox"])
        score = float(rec.get("score", 1.0))
        boxes[box] = max(score, boxes.get(box, -np.inf))
    by_key = {}
    for key, boxes in grouped.items():
        xywh = np.array(list(boxes), np.float64).reshape(-1, 4)
        by_key[key] = (xywh_to_xyxy(xywh).astype(np.float32), np.array(list(boxes.values()), np.float32))
    merged = len(data) - sum(len(b) for b in grouped.values())
    return by_key, {"format": "coco-results", "records": len(data), "duplicates_merged": merged}


def _from_official_dict(path: Path, data: dict) -> tuple[dict, dict]:
    bad = []
    for image_id, entry in data.items():
        where = f"image {image_id!r}"
        if not isinstance(entry, dict):
            bad.append((where, entry, "expected {'boxes': [...], 'scores': [...]}"))
        elif not isinstance(entry.get("boxes"), list) or not all(_is_box(b) for b in entry["boxes"]):
            bad.append((where, entry, "no 'boxes' list of [x0, y0, x1, y1]"))
        elif "scores" in entry and (
            not isinstance(entry["scores"], list)
            or len(entry["scores"]) != len(entry["boxes"])
            or not all(_is_number(s) for s in entry["scores"])
        ):
            bad.append((where, entry, "'scores' must be one number per box"))
    if bad:
        raise _fail(path, bad, len(data), "images")
    by_key = {}
    for image_id, entry in data.items():
        boxes = np.array([[np.nan if v is None else v for v in b] for b in entry["boxes"]], np.float32)
        scores = np.array(entry.get("scores", [1.0] * len(boxes)), np.float32)
        by_key[str(image_id)] = (boxes.reshape(-1, 4), scores.reshape(-1))
    return by_key, {"format": "official-dict", "records": len(data), "duplicates_merged": 0}
