"""Detections as columns, and the results file they are written to.

`detections.json` is the COCO / LVIS results format: a list of
`{"image_id", "category_id" (the annotation file's id), "bbox": [x, y, w, h] (pixels), "score"}`, plus
`"segmentation"` (COCO RLE) with --masks. Read it with `json.load`; the lvis / pycocotools APIs take
it as is. It is strict JSON: a non-finite box or score is refused when it is added, never written.
The columns held here carry exactly the values written (boxes rounded to 0.01 px, scores as float64
of the float32 product), so metrics computed from them equal metrics computed from the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError


class Detections:
    """Accumulates one image's detections at a time; `columns()` gives them to the metrics."""

    def __init__(self, category_ids: list[int], with_masks: bool = False):
        """category_ids: the dataset id of each vocabulary position (manifest vocabulary order)."""
        self.category_ids = np.asarray(category_ids, np.int64)
        self.with_masks = with_masks
        self._image_id: list[np.ndarray] = []
        self._category: list[np.ndarray] = []
        self._bbox: list[np.ndarray] = []
        self._score: list[np.ndarray] = []
        self._masks: list[dict] = []
        self.images = 0

    def add(self, image_id: int, boxes_xyxy: np.ndarray, class_idx: np.ndarray, scores: np.ndarray,
            masks: list[dict] | None = None) -> None:  # fmt: skip
        """One image's selected detections.

        Args:
            image_id: the annotation file's image id.
            boxes_xyxy: float [M, 4] XYXY pixels of the original image (the selected regions' boxes).
            class_idx: int [M] vocabulary positions.
            scores: float [M] final scores (proposal score x probability).
            masks: M COCO RLE dicts (with_masks only).
        Raises:
            RegionSpotError: a box or score is NaN or infinite (a damaged shard or a diverged head);
                JSON has no such numbers, and metrics on them would mean nothing.
        """
        self.images += 1
        m = len(scores)
        if m == 0:
            return
        b = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
        s = np.asarray(scores, np.float32)
        if not (np.isfinite(b).all() and np.isfinite(s).all()):
            what = "scores" if np.isfinite(b).all() else "boxes"
            raise RegionSpotError(
                f"image {image_id}: detection {what} are not finite (NaN or infinite); the shards' boxes "
                "or scores are damaged or the head diverged: run 'regionspot shards verify' on the set "
                "and check the checkpoint"
            )
        xywh = np.round(np.column_stack([b[:, :2], b[:, 2:] - b[:, :2]]), 2)  # [M, 4]
        self._image_id.append(np.full(m, image_id, np.int64))
        self._category.append(self.category_ids[np.asarray(class_idx, np.int64)])
        self._bbox.append(xywh)
        self._score.append(s.astype(np.float64))
        if self.with_masks:
            if masks is None or len(masks) != m:
                raise ValueError("with_masks detections need one mask per detection")
            self._masks.extend({"size": list(r["size"]), "counts": _text(r["counts"])} for r in masks)

    def __len__(self) -> int:
        return sum(len(s) for s in self._score)

    def columns(self) -> dict[str, object]:
        """image_id, category_id int64 [M], bbox float64 [M, 4] xywh, score float64 [M], segmentation (masks)."""
        cat = lambda parts, shape, dtype: np.concatenate(parts) if parts else np.zeros(shape, dtype)  # noqa: E731
        cols = {
            "image_id": cat(self._image_id, (0,), np.int64),
            "category_id": cat(self._category, (0,), np.int64),
            "bbox": cat(self._bbox, (0, 4), np.float64),
            "score": cat(self._score, (0,), np.float64),
        }
        if self.with_masks:
            cols["segmentation"] = self._masks
        return cols

    def write_json(self, path: Path, chunk: int = 20000) -> None:
        """Write the results list, streaming (LVIS val holds ~6 M detections), atomically."""
        cols = self.columns()
        # `add` refuses non-finite values; f-strings would write them as `nan`, which is not JSON
        assert np.isfinite(cols["bbox"]).all() and np.isfinite(cols["score"]).all()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        n = len(cols["score"])
        with open(tmp, "w") as f:
            f.write("[")
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                rows = zip(cols["image_id"][lo:hi].tolist(), cols["category_id"][lo:hi].tolist(),
                           cols["bbox"][lo:hi].tolist(), cols["score"][lo:hi].tolist(), strict=True)  # fmt: skip
                parts = []
                for k, (i, c, (x, y, w, h), s) in enumerate(rows):
                    # f-string floats are repr(), what json writes; the values read back unchanged.
                    row = f'{{"image_id": {i}, "category_id": {c}, "bbox": [{x}, {y}, {w}, {h}], "score": {s}'
                    if self.with_masks:
                        row += (
                            f', "segmentation": {json.dumps(cols["segmentation"][lo + k], allow_nan=False)}'
                        )
                    parts.append(row + "}")
                f.write(("" if lo == 0 else ", ") + ", ".join(parts))
            f.write("]\n")
        os.replace(tmp, path)


def _text(counts) -> str:
    return counts.decode() if isinstance(counts, bytes) else counts
