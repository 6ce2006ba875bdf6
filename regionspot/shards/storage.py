"""One interface over the two storages: open a writer, read a shard, checksum a shard."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from regionspot.errors import RegionSpotError
from regionspot.shards.schema import Sample
from regionspot.shards.wds import WdsShardWriter, iter_wds
from regionspot.shards.zarr_storage import ZarrShardWriter, iter_zarr

STORAGES = ("wds", "zarr")
SUFFIXES = {".tar": "wds", ".zarr": "zarr"}


class ShardWriter(Protocol):
    """Writes one shard under a temporary name; `close()` renames it to its final path, `abort()`
    removes the temporary. Usable as a context manager (close on success, abort on an exception)."""

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


def storage_of(path: Path) -> str:
    """'wds' or 'zarr', from the shard's suffix."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise RegionSpotError(f"{path}: not a shard (expected a .tar or .zarr)")
    return SUFFIXES[path.suffix]


def iter_shard(
    path: Path, start: int = 0, stop: int | None = None, keep: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, Sample]]:
    """(index in shard, sample) for samples [start, stop) of one shard, in stored order; samples
    before `start` or rejected by `keep(index)` are skipped without decoding."""
    reader = iter_wds if storage_of(path) == "wds" else iter_zarr
    return reader(Path(path), start, stop, keep)


def read_shard(path: Path, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
    """The samples [start, stop) of one shard, in stored order; the storage follows from the suffix.

    Starting at an offset skips the earlier samples without decoding them (tar headers only for wds,
    direct indexing for zarr), so resuming mid-shard is cheap.
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
