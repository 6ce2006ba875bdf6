"""One sample per image: the fields, dtypes and shapes every storage writes and every reader returns.

This module is the only place that knows field names, file extensions and stored dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from regionspot.errors import RegionSpotError

FORMAT = "regionspot-shards"
# 2: each shard's record holds the per-sample index (shards/index.py); 3: the index's checksum is XXH3-64
SCHEMA_VERSION = 3
REINDEXABLE = (1, 2)  # older versions whose shards `regionspot shards reindex` brings to this one
SAM_DIM = 256

# The backbones' outputs (SAM tokens and IoU, CLIP maps) are stored at half precision: the cache's size
# and the trainer's read rate depend on it. Torch: `getattr(torch, FEATURE_DTYPE.name)`.
FEATURE_DTYPE = np.dtype(np.float16)

META_FIELDS = ("key", "image_id", "file_name", "width", "height")
# name -> (stored dtype, number of dimensions)
ARRAY_FIELDS: dict[str, tuple[np.dtype, int]] = {
    "boxes": (np.dtype(np.float32), 2),  # [N, 4] XYXY, pixels of the original image
    "labels": (np.dtype(np.int32), 1),  # [N] index into the manifest vocabulary; -1 = unknown
    "scores": (np.dtype(np.float32), 1),  # [N] proposal confidence; 1.0 for annotations
    "sam_tokens": (FEATURE_DTYPE, 3),  # [N, T, 256] position-aware tokens
    "sam_iou": (FEATURE_DTYPE, 2),  # [N, T] SAM's predicted IoU per token
    "clip_map": (FEATURE_DTYPE, 2),  # [L, C] CLIP token map, class token first
}
STORED_DTYPES: dict[str, np.dtype] = {name: dtype for name, (dtype, _) in ARRAY_FIELDS.items()}
TEXT_DTYPE = np.dtype(np.float32)  # text_embeddings.npy, [K, D]
REGION_FIELDS = ("boxes", "labels", "scores", "sam_tokens", "sam_iou")


def field_shapes(regions: int, tokens: int, clip_shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """The shape of every array field of a sample with `regions` regions, T = `tokens` and a CLIP map
    [L, C] = `clip_shape`."""
    n, (length, width) = regions, clip_shape
    return {"boxes": (n, 4), "labels": (n,), "scores": (n,), "sam_tokens": (n, tokens, SAM_DIM),
            "sam_iou": (n, tokens), "clip_map": (length, width)}  # fmt: skip


@dataclass
class Sample:
    """One image's cached features. `masks`, when extracted, is one COCO RLE dict per region
    (`{"size": [h, w], "counts": str}`)."""

    key: str
    image_id: int | str
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    sam_tokens: np.ndarray
    sam_iou: np.ndarray
    clip_map: np.ndarray
    masks: list[dict] | None = None

    @property
    def num_regions(self) -> int:
        return int(self.boxes.shape[0])

    def meta(self) -> dict:
        meta = {name: getattr(self, name) for name in META_FIELDS}
        if self.masks is not None:
            meta["masks"] = self.masks
        return meta

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_FIELDS}

    def problems(self) -> list[str]:
        """Every way this sample breaks the schema, as short phrases (empty when valid)."""
        out = []
        key = str(self.key)
        if not key or "." in key or "/" in key:
            # webdataset splits member names at the first '.'; '/' would make a tar directory
            out.append(f"key {self.key!r} is empty or contains '.' or '/'")
        n = None
        for name, (dtype, ndim) in ARRAY_FIELDS.items():
            a = getattr(self, name)
            if not isinstance(a, np.ndarray):
                out.append(f"{name} is not an array")
                continue
            if a.dtype != dtype or a.ndim != ndim:
                out.append(f"{name} is {a.dtype}[{a.ndim}d], expected {dtype}[{ndim}d]")
            if name in REGION_FIELDS:
                n = a.shape[0] if n is None else n
                if a.shape[0] != n:
                    out.append(f"{name} has {a.shape[0]} rows, expected {n}")
        if isinstance(self.boxes, np.ndarray) and self.boxes.ndim == 2 and self.boxes.shape[1] != 4:
            out.append(f"boxes have {self.boxes.shape[1]} columns, expected 4")
        t = self.sam_tokens
        if isinstance(t, np.ndarray) and t.ndim == 3 and t.shape[2] != SAM_DIM:
            out.append(f"sam_tokens width is {t.shape[2]}, expected {SAM_DIM}")
        iou = self.sam_iou
        if isinstance(t, np.ndarray) and isinstance(iou, np.ndarray) and t.ndim == 3 and iou.ndim == 2:
            if iou.shape[1] != t.shape[1]:
                out.append(f"sam_iou has {iou.shape[1]} tokens, sam_tokens {t.shape[1]}")
        if self.masks is not None and n is not None and len(self.masks) != n:
            out.append(f"{len(self.masks)} masks for {n} regions")
        return out


def json_default(obj):
    """JSON for what extraction code naturally hands over: numpy scalars and arrays, and the bytes
    `counts` of pycocotools' RLEs (ASCII)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("ascii")
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


class ShardGuard:
    """What a writer checks before accepting a sample: the schema, a key not seen before in this
    shard, and the token count T and CLIP map shape [L, C] of the shard's first sample (a shard is
    stacked per field, so they must agree)."""

    def __init__(self, path):
        self.path = path
        self.keys: set[str] = set()
        self.shapes: tuple | None = None  # (T, L, C) of the first sample

    def __call__(self, sample: Sample) -> None:
        problems = sample.problems()
        if sample.key in self.keys:
            problems.append(f"key {sample.key!r} already written to this shard")
        if not problems:
            shapes = (sample.sam_tokens.shape[1], *sample.clip_map.shape)
            if self.shapes is not None and shapes != self.shapes:
                problems.append(f"(T, L, C) = {shapes}, the shard's first sample has {self.shapes}")
            self.shapes = self.shapes or shapes
        if problems:
            raise RegionSpotError(f"{self.path}: cannot write sample {sample.key!r}: {'; '.join(problems)}")
        self.keys.add(sample.key)


def shard_name(index: int, storage: str) -> str:
    """`shard-000012.tar` or `shard-000012.zarr`."""
    return f"shard-{index:06d}.{'tar' if storage == 'wds' else 'zarr'}"


def record_name(index: int) -> str:
    """The per-shard completion record written beside a finished shard."""
    return f"shard-{index:06d}.json"
