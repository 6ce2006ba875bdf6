"""What a dataset reader yields — one `ImageRecord` per image plus the vocabulary — and the `Reader`
interface every reader (`CocoReader`, `OpenImagesReader`) offers."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np

from regionspot.data.boxes import sanitize_boxes

_NAME_PARTS = ("-other", "-merged", "-stuff")


def clean_class_name(name: str) -> str:
    """The name used for text embeddings: the dataset's spelling less `-other`, `-merged` and `-stuff`
    wherever they occur (`sky-other-merged` -> `sky`), as the official code does.

    LVIS names keep their underscores and parentheses, as the official code does.
    """
    for part in _NAME_PARTS:
        name = name.replace(part, "")
    return name


@dataclass(frozen=True)
class Category:
    """One vocabulary entry. `id` is the dataset's own category id (what detections report)."""

    id: int
    name: str
    synonyms: tuple[str, ...] = ()
    frequency: str | None = None  # LVIS: "r", "c" or "f"

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "synonyms": list(self.synonyms),
            "frequency": self.frequency,
        }

    @classmethod
    def from_json(cls, d: dict) -> Category:
        return cls(int(d["id"]), d["name"], tuple(d.get("synonyms") or ()), d.get("frequency"))


@dataclass
class ImageRecord:
    """One image and its regions, as every reader yields it.

    key:     the image id as the dataset spells it, as a string with no `.` (webdataset splits
             member names at the first dot).
    path:    where the image file is.
    boxes:   float32 [N, 4], XYXY, absolute pixels of the original image, already clipped to it.
    labels:  int32 [N], index into the reader's vocabulary (position, not category id); -1 = unknown.
    scores:  float32 [N], proposal confidence; 1.0 for annotations.
    skip_reason: why extraction must skip the image without reading it (its file name leaves the
             image folder); None for an image to read.
    """

    key: str
    image_id: int | str
    file_name: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    skip_reason: str | None = None

    def __post_init__(self):
        if "." in self.key:
            raise ValueError(f"image key {self.key!r} contains '.', which shard member names cannot hold")
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, np.int32).reshape(-1)
        if self.scores is None or len(self.scores) == 0 and len(self.labels):
            self.scores = np.ones(len(self.labels), np.float32)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        assert len(self.boxes) == len(self.labels) == len(self.scores), self.key


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (annotation files run to gigabytes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def source_name(path: Path, data_root: Path | None) -> str:
    """How a source file is named in the run identity: relative to the data root when it lies under
    it (the same on every machine), else its file name; the sha256 beside it pins the content."""
    if data_root is not None:
        try:
            return Path(path).resolve().relative_to(Path(data_root).resolve()).as_posix()
        except ValueError:
            pass
    return Path(path).name


STAT_KEYS = (
    "images",
    "boxes",
    "crowd_skipped",
    "group_skipped",
    "boxes_dropped",
    "boxes_clipped",
    "images_without_boxes",
    "images_outside_root",
)


def leaves_folder(name: str) -> bool:
    """Whether a file name, taken relative to a folder, names a file outside it: absolute (`/x.jpg`,
    `C:\\x.jpg`) or climbing out (`../../x.jpg`).

    Decided on the name alone, not on the resolved path: links inside the folder are followed as
    usual, since datasets are often linked into place.
    """
    if PureWindowsPath(name).anchor:  # "/x", "\\x", "C:\\x", "C:x", "//host/share/x"
        return True
    climbed = posixpath.normpath(name.replace("\\", "/"))
    return climbed == ".." or climbed.startswith("../")


class Reader:
    """What every dataset reader offers; subclasses implement `_load` and `_source_files`.

    Annotations are parsed on first use of `records()`, `vocabulary`, `stats` or the id look-ups,
    and kept; `sources` hashes the annotation files on first use.

    name:        the dataset name (`lvis_val`) or the spec it was opened with (`coco:a.json:imgs`).
    image_dir:   the folder image file names are relative to.
    allow_outside_root: read file names that leave `image_dir` (`../x.jpg`, `/x.jpg`); when False
                 such an image keeps its record with a `skip_reason` (extraction skips and lists it)
                 and is counted in `stats["images_outside_root"]`.
    vocabulary:  list[Category]; label k of a record is vocabulary[k].
    sources:     {"annotations": relative path, "sha256": hex, ...}, for the run identity.
    stats:       counts of what the reader skipped, dropped and clipped (keys in STAT_KEYS).
    """

    def __init__(
        self, name: str, image_dir: Path, data_root: Path | None = None, allow_outside_root: bool = False
    ):
        self.name = name
        self.image_dir = Path(image_dir)
        self.data_root = data_root
        self.allow_outside_root = allow_outside_root
        self._vocabulary: list[Category] | None = None
        self._records: list[ImageRecord] | None = None
        self._by_key: dict[str, ImageRecord] | None = None
        self._sources: dict | None = None
        self._stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    def _load(self) -> tuple[list[Category], list[ImageRecord]]:
        """Parse the annotations: (vocabulary, records in any order), filling `self._stats`."""
        raise NotImplementedError

    def _source_files(self) -> dict[str, Path]:
        """role -> annotation file; the first role is "annotations"."""
        raise NotImplementedError

    def _image_path(self, name: str) -> tuple[Path, str | None]:
        """(the file of image file name `name`, why it must not be read or None); counts refusals."""
        path = self.image_dir / name
        if self.allow_outside_root or not leaves_folder(name):
            return path, None
        self._stats["images_outside_root"] += 1
        return path, (
            f"file_name {name!r} leaves the image folder {self.image_dir}; "
            "pass --allow-outside-root to read it"
        )

    def _boxes_per_image(
        self, img_pos, labels, boxes, unwanted, unwanted_stat: str, num_images: int, width, height
    ):
        """Drop the unwanted boxes, sanitise the rest and group them by image, counting both in `stats`.

        Args:
            img_pos: int [A], the image position of each box; labels: int32 [A];
            boxes: float [A, 4] XYXY, in the frame `width` x `height`.
            unwanted: bool [A], boxes that are not one object to name (crowd, group), counted under
                `stats[unwanted_stat]`.
            width, height: scalars, or [num_images] arrays (one size per image).
        Returns:
            labels int32 [B], boxes float32 [B, 4] (clipped), bounds int [num_images + 1]: image i's
            boxes are `bounds[i]:bounds[i + 1]`, in the file's order.
        """
        self._stats[unwanted_stat] = int(unwanted.sum())
        img_pos, labels, boxes = img_pos[~unwanted], labels[~unwanted], boxes[~unwanted]
        per_box = lambda size: np.asarray(size)[img_pos] if np.ndim(size) else size  # noqa: E731
        boxes, keep, counts = sanitize_boxes(boxes, per_box(width), per_box(height))
        self._stats["boxes_dropped"] = counts["dropped_invalid"]
        self._stats["boxes_clipped"] = counts["clipped"]
        img_pos, labels, boxes = img_pos[keep], labels[keep], boxes[keep]
        order = np.argsort(img_pos, kind="stable")
        bounds = np.searchsorted(img_pos[order], np.arange(num_images + 1))
        return labels[order], boxes[order], bounds

    def _ensure_loaded(self) -> None:
        if self._records is None:
            vocabulary, records = self._load()
            records.sort(key=lambda r: r.key)
            self._vocabulary, self._records = vocabulary, records
            self._stats["images"] = len(records)
            self._stats["boxes"] = int(sum(len(r.labels) for r in records))
            self._stats["images_without_boxes"] = sum(1 for r in records if len(r.labels) == 0)

    @property
    def vocabulary(self) -> list[Category]:
        self._ensure_loaded()
        return self._vocabulary

    @property
    def stats(self) -> dict[str, int]:
        self._ensure_loaded()
        return self._stats

    @property
    def sources(self) -> dict:
        if self._sources is None:
            sources = {}
            for role, path in self._source_files().items():
                prefix = "" if role == "annotations" else f"{role}_"
                sources[role] = source_name(path, self.data_root)
                sources[f"{prefix}sha256"] = file_sha256(path)
            self._sources = sources
        return self._sources

    def records(self) -> list[ImageRecord]:
        """One record per image, sorted by key (the order shards are cut in)."""
        self._ensure_loaded()
        return self._records

    def image_ids(self) -> set:
        """The dataset's image ids, as the annotation file spells them (int for COCO-style, str for OpenImages)."""
        return {r.image_id for r in self.records()}

    def record_by_image_id(self, image_id: int | str) -> ImageRecord:
        """The record of an image id, given as int or str (`397133` and `"397133"` name the same image).

        Raises:
            KeyError: no such image in the dataset.
        """
        if self._by_key is None:
            self._by_key = {r.key: r for r in self.records()}
        return self._by_key[str(image_id)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
