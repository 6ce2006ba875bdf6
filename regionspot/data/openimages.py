"""`OpenImagesReader`: the OpenImages boxes CSV and class-descriptions CSV.

Boxes CSV (header row required): `ImageID, Source, LabelName, Confidence, XMin, XMax, YMin, YMax,
IsOccluded, IsTruncated, IsGroupOf, ...`, coordinates normalised to [0, 1]. Class descriptions:
`LabelName, DisplayName` rows (`/m/011k07,Tortoise`), with or without a header row. Images are
`<image_dir>/<ImageID>.jpg`.

The CSVs carry no image sizes, so a record reads its size from the image header (no decode) the
first time its width, height or pixel boxes are asked for: a `--limit 10` run of 1.7M images reads
10 headers. Counts and clipping work on the normalised boxes and need no size.
"""

from __future__ import annotations

import csv
from array import array
from pathlib import Path

import numpy as np

from regionspot.data.coco import snippet
from regionspot.data.images import ImageDecodeError, image_size
from regionspot.data.records import Category, ImageRecord, Reader, clean_class_name
from regionspot.errors import RegionSpotError

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")
BOX_HEADER = (
    "ImageID, Source, LabelName, Confidence, XMin, XMax, YMin, YMax, IsOccluded, IsTruncated, IsGroupOf, ..."
)


class HeaderSizedRecord(ImageRecord):
    """An `ImageRecord` whose width, height and pixel boxes come from the image header on first access.

    `normalized`: float32 [N, 4] XYXY in [0, 1]. An image whose header cannot be read, or that has
    a `skip_reason` (its header is not read), gets size (0, 0) and degenerate boxes; extraction skips
    it anyway. Accepts the dataclass's own arguments too (width, height, boxes), so
    `dataclasses.replace` gives an ordinary, sized record.
    """

    def __init__(
        self,
        key,
        image_id,
        file_name,
        path,
        width=None,
        height=None,
        boxes=None,
        labels=None,
        scores=None,
        skip_reason=None,
        *,
        normalized=None,
    ):
        if "." in key:
            raise ValueError(f"image key {key!r} contains '.', which shard member names cannot hold")
        self.key, self.image_id, self.file_name, self.path = key, image_id, file_name, Path(path)
        self.skip_reason = skip_reason
        self.labels = np.asarray(labels if labels is not None else (), np.int32).reshape(-1)
        self.scores = (
            np.ones(len(self.labels), np.float32) if scores is None else np.asarray(scores, np.float32)
        )
        self._size = None if width is None or height is None else (int(width), int(height))
        self._normalized = None if normalized is None else np.asarray(normalized, np.float32).reshape(-1, 4)
        self._boxes = None if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
        if self._boxes is None and self._normalized is None:
            self._boxes = np.zeros((0, 4), np.float32)

    def _resolve(self) -> None:
        if self._size is None:
            try:
                self._size = (0, 0) if self.skip_reason else image_size(self.path)
            except ImageDecodeError:
                self._size = (0, 0)
        if self._boxes is None:
            w, h = self._size
            self._boxes = (self._normalized * np.array([w, h, w, h], np.float32)).astype(
                np.float32
            )  # (N, 4) px

    @property
    def width(self) -> int:
        self._resolve()
        return self._size[0]

    @width.setter
    def width(self, value: int) -> None:
        self._resolve()
        self._size = (int(value), self._size[1])

    @property
    def height(self) -> int:
        self._resolve()
        return self._size[1]

    @height.setter
    def height(self, value: int) -> None:
        self._resolve()
        self._size = (self._size[0], int(value))

    @property
    def boxes(self) -> np.ndarray:
        self._resolve()
        return self._boxes

    @boxes.setter
    def boxes(self, value: np.ndarray) -> None:
        self._resolve()
        self._boxes = np.asarray(value, np.float32).reshape(-1, 4)


def read_class_descriptions(path: Path) -> list[tuple[str, str]]:
    """(LabelName, DisplayName) rows in file order; a `LabelName,DisplayName` header row is skipped."""
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            if not rows and row[0].strip().lower() == "labelname":
                continue  # header row (OpenImages v7 files have one, v6 files do not)
            if len(row) < 2 or not row[0].strip():
                raise RegionSpotError(
                    f"{path}: malformed class description at line {reader.line_num} {snippet(row)}: "
                    "expected 'LabelName,DisplayName'"
                )
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise RegionSpotError(f"{path}: no class descriptions (expected 'LabelName,DisplayName' rows)")
    seen = set()
    for mid, _ in rows:
        if mid in seen:
            raise RegionSpotError(f"{path}: class {mid!r} is described more than once")
        seen.add(mid)
    return rows


class OpenImagesReader(Reader):
    """Reads the OpenImages boxes and class-descriptions CSVs.

    Args:
        boxes_csv, classes_csv: the two CSVs (see the module docstring).
        image_dir: folder of `<ImageID>.jpg`.
        name: the dataset name recorded in manifests.
        data_root: source paths in `sources` are given relative to it.
        allow_outside_root: read ImageIDs that leave `image_dir` (`/x`; see `Reader`).
    Vocabulary: the class-descriptions rows in file order, Category.id = row number (1-based);
    `label_names` holds the LabelName (`/m/...`) of each entry. Records: key = image_id = ImageID;
    group boxes (IsGroupOf=1) skipped and counted.
    """

    def __init__(
        self,
        boxes_csv: Path,
        classes_csv: Path,
        image_dir: Path,
        name: str,
        *,
        data_root: Path | None = None,
        allow_outside_root: bool = False,
    ):
        super().__init__(name, image_dir, data_root, allow_outside_root)
        self.boxes_csv, self.classes_csv = Path(boxes_csv), Path(classes_csv)
        self.label_names: list[str] = []

    def _source_files(self) -> dict[str, Path]:
        return {"annotations": self.boxes_csv, "classes": self.classes_csv}

    def _load(self) -> tuple[list[Category], list[ImageRecord]]:
        classes = read_class_descriptions(self.classes_csv)
        self.label_names = [mid for mid, _ in classes]
        vocabulary = [Category(i + 1, clean_class_name(display)) for i, (_, display) in enumerate(classes)]
        label_of = {mid: k for k, mid in enumerate(self.label_names)}

        image_ids, img_pos, labels, coords, group = self._read_boxes(label_of)
        img_pos = np.frombuffer(img_pos, np.int64) if len(img_pos) else np.zeros(0, np.int64)
        labels = np.frombuffer(labels, np.int64).astype(np.int32) if len(labels) else np.zeros(0, np.int32)
        coords = np.frombuffer(coords, np.float64).reshape(-1, 4) if len(coords) else np.zeros((0, 4))
        group = np.frombuffer(group, np.int8).astype(bool) if len(group) else np.zeros(0, bool)

        # Group boxes cover several objects at once; they are not one region to name. Boxes are
        # clipped to the unit square: no image size is needed yet.
        labels, normalized, bounds = self._boxes_per_image(
            img_pos, labels, coords, group, "group_skipped", len(image_ids), 1.0, 1.0
        )
        records = []
        for i, image_id in enumerate(image_ids):
            a, b = bounds[i], bounds[i + 1]
            path, skip_reason = self._image_path(f"{image_id}.jpg")
            records.append(
                HeaderSizedRecord(
                    image_id,
                    image_id,
                    f"{image_id}.jpg",
                    path,
                    labels=labels[a:b],
                    skip_reason=skip_reason,
                    normalized=normalized[a:b],
                )
            )
        return vocabulary, records

    def _read_boxes(self, label_of: dict[str, int]):
        """Stream the boxes CSV into compact arrays: image ids (first-seen order), and per box the
        image position, label, (XMin, YMin, XMax, YMax) and IsGroupOf."""
        path = self.boxes_csv
        image_index: dict[str, int] = {}
        img_pos, labels, coords, group = array("q"), array("q"), array("d"), array("b")
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in BOX_COLUMNS if c not in header]
            if missing:
                raise RegionSpotError(
                    f"{path}: not an OpenImages boxes CSV; the header row lacks {', '.join(missing)} "
                    f"(expected {BOX_HEADER})"
                )
            iid, lab, x0, x1, y0, y1, grp = (header.index(c) for c in BOX_COLUMNS)
            for row in reader:
                if not row:
                    continue
                try:
                    image_id = row[iid]
                    box = (float(row[x0]), float(row[y0]), float(row[x1]), float(row[y1]))
                    label = label_of[row[lab]]
                    is_group = row[grp].strip() == "1"
                    if not image_id or "." in image_id:
                        raise ValueError("ImageID must be non-empty and hold no '.'")
                except (IndexError, ValueError, KeyError) as e:
                    why = (
                        f"LabelName {row[lab]!r} is not in {self.classes_csv}"
                        if isinstance(e, KeyError)
                        else f"{len(row)} columns, the header has {len(header)}"
                        if isinstance(e, IndexError)
                        else str(e)
                    )
                    raise RegionSpotError(
                        f"{path}: malformed row at line {reader.line_num} {snippet(row)}: {why}"
                    ) from None
                img_pos.append(image_index.setdefault(image_id, len(image_index)))
                labels.append(label)
                coords.extend(box)
                group.append(is_group)
        return list(image_index), img_pos, labels, coords, group
