"""zarr v3 storage: `shard-NNNNNN.zarr`, one group per shard with per-image and per-region arrays.

Reading: `zarr.open_group("shard-000000.zarr", mode="r")`; the regions of image i are rows
`box_offsets[i]:box_offsets[i+1]` of `boxes`, `labels`, `scores`, `sam_tokens`, `sam_iou`;
`clip_map[i]` is its CLIP map; masks (when extracted) are the group attribute "masks", a list per
image. Arrays use zarr's default zstd codec inside the sharding codec, so a shard is a few files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from regionspot.errors import RegionSpotError
from regionspot.shards.schema import ARRAY_FIELDS, REGION_FIELDS, SAM_DIM, Sample

_REGION_ROWS = 4096  # region rows per chunk
_STR = np.dtypes.StringDType()  # variable-length strings: zarr v3's "string" data type


class ZarrShardWriter:
    """Buffers a shard's samples (a shard is the unit of atomicity) and writes the group on close."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.samples: list[Sample] = []

    def write(self, sample: Sample) -> None:
        self.samples.append(sample)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        write_zarr(self.tmp, self.samples)
        os.replace(self.tmp, self.path)
        self.samples = []

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.samples = []


def _array(group, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    chunks = tuple(max(1, min(c, s)) if s else 1 for c, s in zip(chunks, data.shape, strict=True))
    shards = tuple(max(s, 1) for s in data.shape)  # one shard file per array
    shards = tuple(-(-sh // c) * c for sh, c in zip(shards, chunks, strict=True))
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards)
    if data.size:
        arr[...] = data


def write_zarr(path: Path, samples: list[Sample]) -> None:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    n = len(samples)
    t = samples[0].sam_tokens.shape[1] if samples else 1
    L, C = samples[0].clip_map.shape if samples else (0, 0)
    counts = np.array([s.num_regions for s in samples], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    group.attrs["masks"] = [s.masks for s in samples] if any(s.masks is not None for s in samples) else None
    ids = [s.image_id for s in samples]
    integer_ids = all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    _array(group, "key", np.array([s.key for s in samples], dtype=_STR), (1024,))
    _array(group, "image_id", np.array(ids, np.int64) if integer_ids else np.array(ids, dtype=_STR), (1024,))
    _array(group, "file_name", np.array([s.file_name for s in samples], dtype=_STR), (1024,))
    _array(group, "width", np.array([s.width for s in samples], np.int64), (1024,))
    _array(group, "height", np.array([s.height for s in samples], np.int64), (1024,))
    _array(group, "box_offsets", offsets, (1024,))
    clip_dtype = ARRAY_FIELDS["clip_map"][0]
    clip = np.stack([s.clip_map for s in samples]) if n else np.zeros((0, L, C), clip_dtype)
    _array(group, "clip_map", clip.astype(clip_dtype), (1, L, C))
    empty = {
        "boxes": (0, 4),
        "labels": (0,),
        "scores": (0,),
        "sam_tokens": (0, t, SAM_DIM),
        "sam_iou": (0, t),
    }
    for name in REGION_FIELDS:
        dtype = ARRAY_FIELDS[name][0]
        parts = [getattr(s, name) for s in samples]
        data = np.concatenate(parts).astype(dtype) if parts else np.zeros(empty[name], dtype)
        _array(group, name, data, (_REGION_ROWS, *data.shape[1:]))


def read_zarr(path: Path) -> Iterator[Sample]:
    """Yield the samples of one zarr shard in stored order."""
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        keys, ids, files = (group[n][...].tolist() for n in ("key", "image_id", "file_name"))
        offsets = group["box_offsets"][...]
        width, height = group["width"][...], group["height"][...]
        regions = {name: group[name][...] for name in REGION_FIELDS}
        clip = group["clip_map"]
    except Exception as e:  # zarr raises many kinds for a damaged store
        raise RegionSpotError(
            f"{path}: unreadable shard ({e}); run 'regionspot shards verify' on its set"
        ) from e
    masks = attrs.get("masks")
    for i, key in enumerate(keys):
        a, b = int(offsets[i]), int(offsets[i + 1])
        yield Sample(
            key=key,
            image_id=ids[i],
            file_name=files[i],
            width=int(width[i]),
            height=int(height[i]),
            **{name: regions[name][a:b] for name in REGION_FIELDS},
            clip_map=clip[i],
            masks=masks[i] if masks else None,
        )
