"""One interface over the two storages: open a writer, read a shard, checksum a shard."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from regionspot.errors import RegionSpotError
from regionspot.shards.schema import Sample
from regionspot.shards.wds import WdsShardWriter, read_wds
from regionspot.shards.zarr_storage import ZarrShardWriter, read_zarr

STORAGES = ("wds", "zarr")


class ShardWriter(Protocol):
    def write(self, sample: Sample) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def open_writer(storage: str, path: Path) -> ShardWriter:
    """A writer for the shard at `path` (written under a temporary name until `close()`)."""
    if storage == "wds":
        return WdsShardWriter(path)
    if storage == "zarr":
        return ZarrShardWriter(path)
    raise RegionSpotError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")


def read_shard(path: Path) -> Iterator[Sample]:
    """The samples of one shard, in stored order; the storage follows from the suffix."""
    path = Path(path)
    if path.suffix == ".tar":
        return read_wds(path)
    if path.suffix == ".zarr":
        return read_zarr(path)
    raise RegionSpotError(f"{path}: not a shard (expected a .tar or .zarr)")


def shard_checksum(path: Path) -> tuple[str, int]:
    """(sha256, bytes) of a shard: of the file, or of a zarr directory's sorted (relative path, bytes) pairs."""
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
