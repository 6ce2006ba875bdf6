"""A URL set's shards read whole: hashed as they stream, and copied to a local file where one is wanted.

`fetch` is the one streaming pass over a shard in an object store (`Location.open_read`, a zarr
shard file by file): it computes the shard's checksum as `storage.shard_checksum` does on disk and can
copy the bytes to a local file as they arrive. `shards verify URL` hashes every shard this way (training
and evaluation never fetch a whole shard: they read each sample's range through the per-sample index).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from regionspot.shards.location import Location
from regionspot.shards.storage import storage_of

_CHUNK = 8 << 20


def fetch(location: Location, name: str, dest: Path | None = None) -> tuple[str, int]:
    """(sha256 hex, bytes) of the shard `name`, the values `storage.shard_checksum` gives for the same
    shard on disk, from one sequential read of it; with `dest` its bytes are also written there (a
    file; a directory for a zarr shard).

    Raises:
        FileNotFoundError: the shard (or one of a zarr shard's files) is missing.
        RegionSpotError: the store failed past its retries.
    """
    digest, total = hashlib.sha256(), 0
    is_dir = storage_of(Path(name)) == "zarr"
    if is_dir and not location.exists(name):
        raise FileNotFoundError(location.display(name))
    for rel in location.files(name) if is_dir else [""]:
        if is_dir:
            digest.update(rel.encode() + b"\0")  # a zarr shard's checksum covers its files' relative paths
        target = None if dest is None else dest / rel if rel else dest
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
        with (
            location.open_read(f"{name}/{rel}" if rel else name) as src,
            open(target, "wb") if target is not None else contextlib.nullcontext() as out,
        ):
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                total += len(chunk)
                if out is not None:
                    out.write(chunk)
    return digest.hexdigest(), total
