"""zarr v3 storage: `shard-NNNNNN.zarr`, one group per shard with per-image and per-region arrays.

Reading: `ZarrReader` through the per-sample index of the shard's record (shards/index.py: its region rows
and a checksum of its arrays), `storage.read_shard(path)` for a bare shard, or `zarr.open_group("shard-000000.zarr",
mode="r")`; per image `key`, `image_id`, `file_name`,
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
from pathlib import Path

import numpy as np
import zarr

from regionspot.errors import RegionSpotError
from regionspot.shards.index import CHECKSUM, IndexedShard, checksum, make_layout, mismatch
from regionspot.shards.location import Location
from regionspot.shards.schema import (
    ARRAY_FIELDS,
    REGION_FIELDS,
    SAM_DIM,
    STORED_DTYPES,
    Sample,
    ShardGuard,
    field_shapes,
    json_default,
)

_IMAGE_ROWS = 1024  # per-image metadata rows per chunk
_REGION_ROWS = 4096  # region rows per chunk
_STR = np.dtypes.StringDType()  # variable-length strings: zarr v3's "string" data type


class ZarrShardWriter:
    """Buffers a shard's samples (a shard is the unit of atomicity, ~1000 images) and writes the
    group under a temporary name on `close()`, then renames it into place.

    After `close()`, `entries` is the shard's per-sample index and `layout` its (T, [L, C]) (shards/index.py).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._guard = ShardGuard(self.path)
        self.samples: list[Sample] = []
        self.entries: list[dict] = []

    @property
    def layout(self) -> dict | None:
        return make_layout(self._guard.shapes)

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
        self.entries, rows = [], 0
        for sample in self.samples:  # the arrays as stored, still in memory: no second pass over the disk
            n = sample.num_regions
            digest = checksum(np.ascontiguousarray(a) for a in sample.arrays().values())
            self.entries.append({"key": sample.key, "regions": n, CHECKSUM: digest, "rows": [rows, rows + n]})
            rows += n
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


class ZarrReader(IndexedShard):
    """Indexed reads of one zarr shard: a sample's region rows (the shard's region arrays are decoded once)
    and its CLIP map (one chunk), checked against the index.

    Args: as `IndexedShard`'s; entries have "rows" instead of offset, length and members.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._opened: dict | None = None

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_opened": None}

    def _open(self) -> dict:
        """The shard's per-image metadata and region arrays, decoded once; its CLIP maps, not yet read."""
        if self._opened is None:
            group = open_zarr(self.location, self.name)
            try:
                offsets = group["box_offsets"][...]
                opened = {name: group[name][...].tolist() for name in ("key", "image_id", "file_name", "width", "height")}
                opened.update({name: group[name][...] for name in REGION_FIELDS})
                opened.update(offsets=offsets, clip=group["clip_map"], masks=group.attrs.get("masks"))
            except Exception as e:  # zarr raises many kinds for a damaged store
                raise RegionSpotError(f"{self.where}: unreadable shard ({e}); {self.fix}") from e
            n = len(offsets) - 1
            if n < len(self.entries):
                raise self.fault(self.entries[n]["key"], f"the shard holds {n} samples, the index "
                                                          f"{len(self.entries)}: it is truncated")  # fmt: skip
            rows = np.stack([offsets[:-1], offsets[1:]], 1)[: len(self.entries)]  # (images, 2)
            indexed = np.array([e["rows"] for e in self.entries], np.int64).reshape(-1, 2)
            differ = np.flatnonzero((rows != indexed).any(1))
            if differ.size:
                i = int(differ[0])
                raise self.fault(self.entries[i]["key"], f"its region rows are {rows[i].tolist()}, the index "
                                                          f"says {indexed[i].tolist()}")  # fmt: skip
            self._opened = opened
        return self._opened

    def _arrays(self, i: int) -> dict[str, np.ndarray]:
        """Sample i's arrays, in ARRAY_FIELDS order, as stored."""
        opened = self._open()
        lo, hi = self.entries[i]["rows"]
        arrays = {name: opened[name][lo:hi] for name in REGION_FIELDS}
        try:
            arrays["clip_map"] = opened["clip"][i]  # (L, C)
        except Exception as e:
            raise self.fault(self.entries[i]["key"], f"its CLIP map is unreadable ({e})") from e
        return {name: arrays[name] for name in ARRAY_FIELDS}

    def read(self, i: int, verify: bool = True) -> Sample:
        """Sample `i` (its region arrays are views of the shard's, decoded once)."""
        return self.read_into(i, {}, verify)

    def read_into(self, i: int, dest: dict[str, np.ndarray], verify: bool = True) -> Sample:
        """Sample `i`, its arrays named in `dest` copied into those arrays; as `WdsReader.read_into`."""
        e = self.entries[i]
        key = e["key"]
        arrays = self._arrays(i)
        opened = self._opened
        if opened["key"][i] != key:
            raise self.fault(key, f"the shard holds key {opened['key'][i]!r} there: the index and the shard disagree")
        want = field_shapes(e["regions"], self.tokens, self.clip_shape) if self.tokens is not None else None
        for name, array in arrays.items():
            if array.dtype != STORED_DTYPES[name] or (want is not None and array.shape != want[name]):
                raise self.fault(key, f"{name} is {array.dtype}{list(array.shape)}, expected "
                                       f"{STORED_DTYPES[name]}{list(want[name]) if want else ''}")  # fmt: skip
        if verify and (digest := checksum(arrays.values())) != e[CHECKSUM]:
            raise self.fault(key, f"{mismatch(digest, e[CHECKSUM])}: its arrays changed since extraction")
        self.check_labels(key, arrays["labels"])
        for name, out in dest.items():
            out[...] = arrays[name]
            arrays[name] = out
        masks = opened["masks"]
        return Sample(
            key=key,
            image_id=opened["image_id"][i],
            file_name=opened["file_name"][i],
            width=int(opened["width"][i]),
            height=int(opened["height"][i]),
            **arrays,
            masks=masks[i] if masks else None,
        )


def open_zarr(location: Location, name: str):
    """The zarr group of shard `name` at `location`, read-only."""
    try:
        if location.is_local:
            return zarr.open_group(str(location.local_path / name), mode="r", zarr_format=3)
        return zarr.open_group(location.url(name), mode="r", zarr_format=3,
                               storage_options=location.storage_options or None)  # fmt: skip
    except Exception as e:  # zarr raises many kinds for a damaged store
        raise RegionSpotError(f"{location}/{name}: unreadable shard ({e}); run 'regionspot shards verify {location}'") from e


def scan_zarr(path: Path, checksums: bool = False) -> tuple[dict | None, list[dict]]:
    """(layout, entries): the per-sample index of a zarr shard as its arrays say (keys, region rows and
    counts); with `checksums`, every sample is decoded for its checksum."""
    path = Path(path)
    location = Location.parse(path.parent)
    group = open_zarr(location, path.name)
    try:
        offsets = group["box_offsets"][...]
        keys = group["key"][...].tolist()
        tokens, clip_shape = group["sam_tokens"].shape[1], group["clip_map"].shape[1:]
    except Exception as e:
        raise RegionSpotError(f"{path}: unreadable shard ({e}); run 'regionspot shards verify' on its set") from e
    layout = make_layout((tokens, *clip_shape)) if keys else None
    entries = [{"key": k, "regions": int(offsets[i + 1] - offsets[i]), "rows": [int(offsets[i]), int(offsets[i + 1])]}
               for i, k in enumerate(keys)]  # fmt: skip
    if checksums:
        reader = ZarrReader(location, path.name, layout, entries)
        for i, e in enumerate(entries):
            e[CHECKSUM] = checksum(reader._arrays(i).values())
    return layout, entries
