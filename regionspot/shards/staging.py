"""A URL set's shards read whole: hashed as they stream, and staged as local files for path readers.

`fetch` is the one streaming pass over a shard in an object store (`Location.open_read`, a zarr
shard file by file): it computes the shard's checksum as `storage.shard_checksum` does on disk and can
copy the bytes to a local file as they arrive. `shards verify URL` hashes every shard this way.

`StagedShards` is what `ShardSet.shard_paths` is for a set at a URL: the shard readers of today
(`storage.iter_shard`) open a shard by its path, so each shard is fetched to a local file on first use,
checked against the manifest's sha256, and kept in a temporary directory that goes when the ShardSet
that made it does (or at exit). It needs room for the shards read in $TMPDIR. A reader that takes
each sample's bytes with `Location.read_range` (the per-sample index) needs no staging.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

from regionspot.errors import RegionSpotError
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


def _remove(directory: Path, owner: int) -> None:
    if os.getpid() == owner:  # a forked DataLoader worker's copy goes without taking the files
        shutil.rmtree(directory, ignore_errors=True)


class StagedShards(Sequence[Path]):
    """Local copies of the shards of a set at a URL, in manifest order; item i is fetched on first use.

    Args:
        location: the shard set.
        entries: the manifest's shard entries (`name`, `bytes`, `sha256`).
    """

    def __init__(self, location: Location, entries: list[dict]):
        self.location, self.entries = location, entries
        self.dir = Path(tempfile.mkdtemp(prefix="regionspot-staged-"))
        # processes forked or spawned from this one (DataLoader workers) share the directory
        weakref.finalize(self, _remove, self.dir, os.getpid())

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        entry = self.entries[i]
        name = entry["name"]
        local = self.dir / name
        if local.exists():
            return local
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        try:
            sha, nbytes = fetch(self.location, name, tmp)
            if (sha, nbytes) != (entry["sha256"], entry["bytes"]):
                raise RegionSpotError(
                    f"{self.location.display(name)}: {nbytes} bytes, sha256 {sha[:12]}; the manifest says "
                    f"{entry['bytes']} bytes, sha256 {str(entry['sha256'])[:12]}; run 'regionspot shards "
                    f"verify {self.location}'"
                )
            try:
                os.replace(tmp, local)
            except OSError:
                if not local.exists():  # else another worker staged the same bytes first
                    raise
        except FileNotFoundError:
            raise RegionSpotError(
                f"{self.location.display(name)}: missing, though the manifest lists it; re-run the "
                "extraction that wrote the set"
            ) from None
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        return local

    def __repr__(self) -> str:
        return f"StagedShards({str(self.location)!r}, shards={len(self)}, in {self.dir})"
