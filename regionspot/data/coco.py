"""`CocoReader`: COCO-format detection JSON — COCO, LVIS v1, Objects365 v1/v2, V3Det and the toy set.

What it reads: `images` ({id, width, height, file_name and/or coco_url}), `annotations` ({image_id,
category_id, bbox [x, y, w, h], iscrowd?}) and `categories` ({id, name, synonyms?, frequency?}).
Image files are found under `image_dir` by the first of these spellings that exists for the first
image (probed once, not per image):
  file_name as given (COCO, V3Det `Images/a00000066/x.jpg`, toy);
  its last two parts (Objects365 v2 `images/v1/patch8/x.jpg` -> `patch8/x.jpg` under `train/`);
  its base name;
  the last two parts of coco_url (LVIS v1 `.../val2017/x.jpg` -> `<coco root>/val2017/x.jpg`);
  the base name of coco_url.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from regionspot.data.boxes import xywh_to_xyxy
from regionspot.data.records import Category, ImageRecord, Reader, clean_class_name, leaves_folder
from regionspot.errors import RegionSpotError


def read_json(path: Path) -> object:
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RegionSpotError(
            f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    except UnicodeDecodeError as e:
        raise RegionSpotError(f"{path}: not a JSON text file ({e.reason} at byte {e.start})") from None


def snippet(record: object, limit: int = 120) -> str:
    """A record, shortened for an error message."""
    text = json.dumps(record, default=str) if not isinstance(record, str) else repr(record)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parts(path: str | None) -> tuple[str, ...]:
    return PurePosixPath(path.replace("\\", "/")).parts if path else ()


# Each spelling maps an image dict to a path relative to the image directory, or None.
_SPELLINGS: tuple[Callable[[dict], str | None], ...] = (
    lambda im: im.get("file_name") or None,
    lambda im: "/".join(_parts(im.get("file_name"))[-2:]) if len(_parts(im.get("file_name"))) > 2 else None,
    lambda im: _parts(im.get("file_name"))[-1] if len(_parts(im.get("file_name"))) > 1 else None,
    lambda im: "/".join(_parts(im.get("coco_url"))[-2:]) if len(_parts(im.get("coco_url"))) >= 2 else None,
    lambda im: _parts(im.get("coco_url"))[-1] if im.get("coco_url") else None,
)


def _choose_spelling(
    images: list[dict], image_dir: Path, allow_outside_root: bool
) -> list[Callable[[dict], str | None]]:
    """Spellings in the order to try them: the first that names an existing file for the first image
    (inside `image_dir` unless `allow_outside_root`) leads; without images on disk, the dataset's own
    order stands."""
    if images:
        for spell in _SPELLINGS:
            rel = spell(images[0])
            if rel and (allow_outside_root or not leaves_folder(rel)) and (image_dir / rel).is_file():
                return [spell] + [s for s in _SPELLINGS if s is not spell]
    return list(_SPELLINGS)


def _check_image(path: Path, i: int, im: object) -> None:
    def bad(why: str):
        raise RegionSpotError(f"{path}: malformed image record {i} {snippet(im)}: {why}")

    if not isinstance(im, dict):
        bad("expected an object")
    if not isinstance(im.get("id"), int | str) or isinstance(im.get("id"), bool):
        bad("no integer or string 'id'")
    for k in ("width", "height"):
        v = im.get(k)
        if not isinstance(v, int | float) or isinstance(v, bool) or not (v > 0 and math.isfinite(v)):
            bad(
                f"'{k}' must be a positive number" + (f", not the string {v!r}" if isinstance(v, str) else "")
            )
    if "." in str(im["id"]):
        bad("image ids must not contain '.' (shard member names split at the first dot)")
    if not (im.get("file_name") or im.get("coco_url")):
        bad("neither 'file_name' nor 'coco_url'")


def _parse_categories(path: Path, cats: object) -> list[Category]:
    if not isinstance(cats, list):
        raise RegionSpotError(f"{path}: 'categories' must be a list")
    for i, c in enumerate(cats):
        if (
            not isinstance(c, dict)
            or not isinstance(c.get("id"), int)
            or isinstance(c.get("id"), bool)
            or not isinstance(c.get("name"), str)
        ):
            raise RegionSpotError(
                f"{path}: malformed category {i} {snippet(c)}: needs an integer 'id' and a 'name'"
            )
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RegionSpotError(f"{path}: category id {dup} appears more than once")
    return [
        Category(c["id"], clean_class_name(c["name"]), tuple(c.get("synonyms") or ()), c.get("frequency"))
        for c in sorted(cats, key=lambda c: c["id"])
    ]


class CocoReader(Reader):
    """Reads a COCO-format detection JSON (see the module docstring for the variants).

    Args:
        annotations: the JSON file.
        image_dir: the folder image file names are relative to (LVIS: the COCO root holding
            train2017/ and val2017/).
        name: the dataset name recorded in manifests.
        data_root: source paths in `sources` are given relative to it.
        allow_outside_root: read file names that leave `image_dir` (see `Reader`).
    Records: key = str(image id); boxes XYXY pixels, clipped; crowd annotations skipped. An empty
    'annotations' list is valid: every image has zero regions.
    """

    def __init__(
        self,
        annotations: Path,
        image_dir: Path,
        name: str,
        *,
        data_root: Path | None = None,
        allow_outside_root: bool = False,
    ):
        super().__init__(name, image_dir, data_root, allow_outside_root)
        self.annotations = Path(annotations)

    def _source_files(self) -> dict[str, Path]:
        return {"annotations": self.annotations}

    def _load(self) -> tuple[list[Category], list[ImageRecord]]:
        path = self.annotations
        data = read_json(path)
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations")
        ):
            raise RegionSpotError(
                f"{path}: not a COCO-format detection file (needs 'images', 'annotations' and 'categories' lists)"
            )
        vocabulary = _parse_categories(path, data.get("categories"))
        label_of = {c.id: k for k, c in enumerate(vocabulary)}

        images = data["images"]
        for i, im in enumerate(images):
            _check_image(path, i, im)
        position = {}
        for i, im in enumerate(images):
            if im["id"] in position:
                raise RegionSpotError(
                    f"{path}: image id {im['id']!r} appears more than once (image record {i})"
                )
            position[im["id"]] = i
        widths = np.array([im["width"] for im in images], np.float64)
        heights = np.array([im["height"] for im in images], np.float64)

        img_pos, labels, bboxes, crowd = self._parse_annotations(data["annotations"], position, label_of)
        del data  # the parsed JSON of a large dataset holds gigabytes; drop it before building records
        # Crowd regions are not objects to name.
        labels, boxes, bounds = self._boxes_per_image(
            img_pos, labels, xywh_to_xyxy(bboxes), crowd, "crowd_skipped", len(images), widths, heights
        )

        spellings = _choose_spelling(images, self.image_dir, self.allow_outside_root)
        records = []
        for i, im in enumerate(images):
            rel = next(r for r in (s(im) for s in spellings) if r)
            path, skip_reason = self._image_path(rel)
            a, b = bounds[i], bounds[i + 1]
            records.append(
                ImageRecord(
                    key=str(im["id"]),
                    image_id=im["id"],
                    file_name=rel,
                    path=path,
                    width=int(im["width"]),
                    height=int(im["height"]),
                    boxes=boxes[a:b],
                    labels=labels[a:b],
                    scores=np.ones(b - a, np.float32),
                    skip_reason=skip_reason,
                )
            )
        return vocabulary, records

    def _parse_annotations(self, anns: list, position: dict, label_of: dict):
        """Annotation fields as arrays: image position [A], label [A], bbox XYWH [A, 4], crowd [A].

        Fast path over all annotations at once: it takes boxes of plain numbers (numpy would turn
        the string "10" into 10.0 if asked for floats, so the boxes are read without a dtype first).
        Otherwise a slow pass checks every record, naming the first offending one; boxes with null
        coordinates pass it (they are dropped as invalid boxes, and counted).
        """

        def arrays(bboxes: np.ndarray):
            img_pos = np.array([position[a["image_id"]] for a in anns], np.int64)
            labels = np.array([label_of[a["category_id"]] for a in anns], np.int32)
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)
            return img_pos, labels, bboxes.astype(np.float64).reshape(-1, 4), crowd

        try:
            bboxes = np.array([a["bbox"] for a in anns])
            if not anns or (bboxes.dtype.kind in "iuf" and bboxes.shape == (len(anns), 4)):
                return arrays(bboxes)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass
        for i, a in enumerate(anns):
            why = self._annotation_fault(a, position, label_of)
            if why:
                raise RegionSpotError(f"{self.annotations}: malformed annotation {i} {snippet(a)}: {why}")
        return arrays(np.array([a["bbox"] for a in anns], np.float64))

    @staticmethod
    def _annotation_fault(a: object, position: dict, label_of: dict) -> str | None:
        if not isinstance(a, dict):
            return "expected an object"
        for key, known, where in (("image_id", position, "images"), ("category_id", label_of, "categories")):
            value = a.get(key)
            if not isinstance(value, int | str) or value not in known:
                return f"{key} {value!r} is not in '{where}'"
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            return "'bbox' must be [x, y, w, h]"
        if any(isinstance(v, str) for v in bbox):
            return "'bbox' must hold numbers, not strings"
        if not all(v is None or isinstance(v, int | float) for v in bbox):
            return "'bbox' must hold numbers"
        try:
            bool(a.get("iscrowd", 0))
        except (TypeError, ValueError):
            return "'iscrowd' must be 0 or 1"
        return None
