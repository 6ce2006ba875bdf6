"""zarr v3 storage: `shard-NNNNNN.zarr`, one group per shard with per-image and per-region arrays.

Reading: `zarr.open_group("shard-000000.zarr", mode="r")`; per image `key`, `image_id`, `file_name`,
`width`, `height`, `clip_map` [images, L, C]; the regions of image i are rows
`box_offsets[i]:box_offsets[i+1]` of `boxes`, `labels`, `scores`, `sam_tokens`, `sam_iou`; masks (when
extracted) are the group attribute "masks", a list per image. Arrays use zarr's default zstd codec
inside the sharding codec (one file per array), so a shard is a few dozen files. The same samples
give the same bytes (no timestamps in zarr metadata; zstd is deterministic).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import zarr

from regionspot.errors import RegionSpotError
from regionspot.shards.schema import REGION_FIELDS, SAM_DIM, STORED_DTYPES, Sample, ShardGuard, json_default

_IMAGE_ROWS = 1024  # per-image metadata rows per chunk
_REGION_ROWS = 4096  # region rows per chunk
_CLIP_BLOCK = 16  # CLIP maps decoded per read: amortises zarr's per-call overhead
_STR = np.dtypes.StringDType()  # variable-length strings: zarr v3's "string" data type


class ZarrShardWriter:
    """Buffers a shard's samples (a shard is the unit of atomicity, ~1000 images) and writes the
    group under a temporary name on `close()`, then renames it into place."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._guard = ShardGuard(self.path)
        self.samples: list[Sample] = []

    def write(self, sample: Sample) -> None:
        self._guard(sample)
        self.samples.append(sample)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            write_zarr(self.tmp, self.samples)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if self.path.exists():  # a directory cannot be replaced in one step: move the old one aside
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        self.samples = []

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.samples = []

    def __enter__(self) -> ZarrShardWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.abort() if kind is not None else self.close()


def _array(group, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    chunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, data.shape, strict=True))
    # one shard (file) per array: a whole multiple of the chunk shape covering the data
    shards = tuple(-(-max(s, 1) // c) * c for s, c in zip(data.shape, chunks, strict=True))
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards)
    if data.size:
        arr[...] = data


def write_zarr(path: Path, samples: list[Sample]) -> None:
    """Write `samples` (already checked by the writer: one T, one [L, C]) as a zarr v3 group at `path`."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    n = len(samples)
    t = samples[0].sam_tokens.shape[1] if samples else 1
    L, C = samples[0].clip_map.shape if samples else (0, 0)
    counts = np.array([s.num_regions for s in samples], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (images + 1,)
    masks = [s.masks for s in samples] if any(s.masks is not None for s in samples) else None
    group.attrs["masks"] = json.loads(json.dumps(masks, default=json_default))  # RLE counts as str
    ids = [s.image_id for s in samples]
    integer_ids = all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in ids)
    _array(group, "key", np.array([s.key for s in samples], dtype=_STR), (_IMAGE_ROWS,))
    _array(
        group,
        "image_id",
        np.array(ids, np.int64) if integer_ids else np.array(ids, dtype=_STR),
        (_IMAGE_ROWS,),
    )
    _array(group, "file_name", np.array([s.file_name for s in samples], dtype=_STR), (_IMAGE_ROWS,))
    _array(group, "width", np.array([s.width for s in samples], np.int64), (_IMAGE_ROWS,))  # original pixels
    _array(group, "height", np.array([s.height for s in samples], np.int64), (_IMAGE_ROWS,))
    _array(group, "box_offsets", offsets, (_IMAGE_ROWS,))
    clip = np.stack([s.clip_map for s in samples]) if n else np.zeros((0, L, C), STORED_DTYPES["clip_map"])  # (images, L, C)
    _array(group, "clip_map", clip, (1, L, C))
    empty = {
        "boxes": (0, 4),
        "labels": (0,),
        "scores": (0,),
        "sam_tokens": (0, t, SAM_DIM),
        "sam_iou": (0, t),
    }
    for name in REGION_FIELDS:
        data = np.concatenate([getattr(s, name) for s in samples]) if n else np.zeros(empty[name], STORED_DTYPES[name])
        _array(group, name, data, (_REGION_ROWS, *data.shape[1:]))  # (regions, ...)


def iter_zarr(
    path: Path, start: int = 0, stop: int | None = None, keep: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, Sample]]:
    """(index in shard, sample) for samples [start, stop) of one zarr shard, in stored order.

    Region arrays of the range are read at once; CLIP maps in blocks of a few images, so only the
    block holding a kept sample is decoded.
    """
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        offsets = group["box_offsets"][...]
        n = len(offsets) - 1
        stop = n if stop is None else min(stop, n)
        start = min(max(start, 0), stop)
        keys, ids, files = (group[name][start:stop].tolist() for name in ("key", "image_id", "file_name"))
        width, height = group["width"][start:stop], group["height"][start:stop]
        lo, hi = int(offsets[start]), int(offsets[stop])
        regions = {name: group[name][lo:hi] for name in REGION_FIELDS}
        clip = group["clip_map"]
        masks = group.attrs.get("masks")
    except Exception as e:  # zarr raises many kinds for a damaged store
        raise RegionSpotError(
            f"{path}: unreadable shard ({e}); run 'regionspot shards verify' on its set"
        ) from e
    block, block_start = None, -1
    for j, i in enumerate(range(start, stop)):
        if keep is not None and not keep(i):
            continue
        if block is None or not block_start <= i < block_start + len(block):
            block_start, end = i, i + 1
            while end < min(i + _CLIP_BLOCK, stop) and (keep is None or keep(end)):
                end += 1  # a run of wanted images
            try:
                block = clip[i:end]  # (≤ _CLIP_BLOCK, L, C)
            except Exception as e:
                raise RegionSpotError(
                    f"{path}: unreadable shard ({e}); run 'regionspot shards verify'"
                ) from e
        a, b = int(offsets[i]) - lo, int(offsets[i + 1]) - lo
        yield (
            i,
            Sample(
                key=keys[j],
                image_id=ids[j],
                file_name=files[j],
                width=int(width[j]),
                height=int(height[j]),
                **{name: regions[name][a:b] for name in REGION_FIELDS},
                clip_map=block[i - block_start],
                masks=masks[i] if masks else None,
            ),
        )


def read_zarr(path: Path, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
    """The samples [start, stop) of one zarr shard, in stored order."""
    for _, sample in iter_zarr(path, start, stop):
        yield sample
