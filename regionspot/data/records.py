"""What a dataset reader yields: one `ImageRecord` per image, plus the dataset's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_NAME_SUFFIXES = ("-other", "-merged", "-stuff")


def clean_class_name(name: str) -> str:
    """The name used for text embeddings: the dataset's spelling less `-other`, `-merged`, `-stuff`.

    LVIS names keep their underscores and parentheses, as the official code does.
    """
    for suffix in _NAME_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class Category:
    """One vocabulary entry. `id` is the dataset's own category id (what detections report)."""

    id: int
    name: str
    synonyms: tuple[str, ...] = ()
    frequency: str | None = None  # LVIS: "r", "c" or "f"

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "synonyms": list(self.synonyms), "frequency": self.frequency}

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

    def __post_init__(self):
        if "." in self.key:
            raise ValueError(f"image key {self.key!r} contains '.', which shard member names cannot hold")
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, np.int32).reshape(-1)
        if self.scores is None or len(self.scores) == 0 and len(self.labels):
            self.scores = np.ones(len(self.labels), np.float32)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        assert len(self.boxes) == len(self.labels) == len(self.scores), self.key
