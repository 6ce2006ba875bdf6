"""One interface over the two storages: open a writer, open an indexed reader, read a bare shard, index and
checksum a shard."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from regionspot.errors import RegionSpotError
from regionspot.shards.location import Location
from regionspot.shards.schema import Sample
from regionspot.shards.wds import WdsReader, WdsShardWriter, scan_wds
from regionspot.shards.zarr_storage import ZarrReader, ZarrShardWriter, scan_zarr

STORAGES = ("wds", "zarr")
SUFFIXES = {".tar": "wds", ".zarr": "zarr"}


class ShardWriter(Protocol):
    """Writes one shard under a temporary name; `close()` renames it to its final path, `abort()`
    removes the temporary. Usable as a context manager (close on success, abort on an exception).
    After `close()`, `entries` and `layout` are the shard's per-sample index (shards/index.py)."""

    entries: list[dict]

    @property
    def layout(self) -> dict | None: ...
    def write(self, sample: Sample) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def __enter__(self) -> ShardWriter: ...
    def __exit__(self, kind, value, tb) -> None: ...


def open_writer(storage: str, final_path: Path) -> ShardWriter:
    """A writer for the shard at `final_path` (`shard-NNNNNN.tar` for wds, `.zarr` for zarr).

    `write()` refuses (RegionSpotError) a sample that breaks the schema, repeats a key, or has another
    token count T or CLIP map shape than the shard's first sample.
    """
    if storage == "wds":
        return WdsShardWriter(final_path)
    if storage == "zarr":
        return ZarrShardWriter(final_path)
    raise RegionSpotError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")


class ShardReader(Protocol):
    """Indexed reads of one shard (`WdsReader`, `ZarrReader`): one read per sample, checked against the
    index (checksum unless `verify=False`; shapes, dtypes, key and labels always)."""

    tokens: int | None  # T, from the index's layout
    clip_shape: tuple[int, int] | None  # [L, C]

    def __len__(self) -> int: ...
    def key(self, i: int) -> str: ...
    def regions(self, i: int) -> int: ...
    def read(self, i: int, verify: bool = True) -> Sample: ...
    def read_into(self, i: int, dest: dict[str, np.ndarray], verify: bool = True) -> Sample: ...


def open_reader(
    location: Location, name: str, layout: dict | None, entries: list[dict], **options
) -> ShardReader:
    """An indexed reader of shard `name` at `location`, from its record's index (`read_index`); `options`
    are `IndexedShard`'s (vocabulary, fix).

    Raises:
        ShardFault when the shard ends before its last indexed sample (wds).
    """
    reader = WdsReader if storage_of(Path(name)) == "wds" else ZarrReader
    return reader(location, name, layout, entries, **options)


def scan_index(path: Path, checksums: bool = False) -> tuple[dict | None, list[dict]]:
    """(layout, entries): a shard's per-sample index as its bytes say (what `regionspot shards reindex` writes
    and `verify` compares with the record). Without `checksums`, only the structure: keys and where the
    samples are (wds: offsets, lengths, members; zarr: also region rows and counts)."""
    scan = scan_wds if storage_of(path) == "wds" else scan_zarr
    return scan(Path(path), checksums)


def storage_of(path: Path) -> str:
    """'wds' or 'zarr', from the shard's suffix."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise RegionSpotError(f"{path}: not a shard (expected a .tar or .zarr)")
    return SUFFIXES[path.suffix]


def iter_shard(
    path: Path, start: int = 0, stop: int | None = None, keep: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, Sample]]:
    """(index in shard, sample) for samples [start, stop) of a bare shard (no index needed), in stored order;
    samples before `start` or rejected by `keep(index)` are skipped without decoding."""
    path = Path(path)
    layout, entries = scan_index(path)
    reader = open_reader(Location.parse(path.parent), path.name, layout, entries)
    stop = len(entries) if stop is None else min(stop, len(entries))
    for i in range(max(start, 0), stop):
        if keep is None or keep(i):
            yield i, reader.read(i, verify=False)  # a bare shard: no index, no checksums to compare


def read_shard(path: Path, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
    """The samples [start, stop) of one shard, in stored order; the storage follows from the suffix.

    Starting at an offset skips the earlier samples without decoding them (tar headers only for wds,
    direct indexing for zarr). Training and evaluation read through the index instead (`open_reader`).
    """
    storage_of(path)  # raise now, not on first next()
    return (sample for _, sample in iter_shard(path, start, stop))


def shard_checksum(path: Path) -> tuple[str, int]:
    """(sha256 hex, bytes) of a shard: of the tar file, or of a zarr directory's files as sorted
    (relative path, bytes) pairs."""
    path = Path(path)
    digest, total = hashlib.sha256(), 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f != path:
            digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                total += len(chunk)
    return digest.hexdigest(), total
