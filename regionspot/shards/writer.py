"""`ShardSetWriter`: the write side of a shard set (DESIGN.md §4), every file of the directory.

How to read what it writes: `ShardSet(path)`. The files, in the order they appear:
- `identity.json`: the run identity (`run_identity`), written by `claim` before any shard; a run with
  another identity is refused.
- `shard-NNNNNN.tar|.zarr`: written under a temporary name (`.shard-NNNNNN.tar.tmp-PID`) and renamed
  when complete.
- `shard-NNNNNN.json`: the shard's record, written after the shard is in place, so a record means a
  complete shard (for resume and for the manifest): `{"index", "name", "samples", "regions", "bytes",
  "sha256", "skipped": [{"key", "reason"}], "layout", "sample_index"}`; the last two are the per-sample
  index readers use (shards/index.py), built while the shard is written.
- `text_embeddings.npy` (float32 [K, D]) and `manifest.json`: written by `finish` once every shard
  of the run has its record.
Every JSON file is strict JSON (no NaN), written under a temporary name and renamed into place.

A set at a URL (`s3://bucket/sets/o365`, see `location.py`) holds the same objects: a shard is written
in local scratch (`Location.scratch_path`), then uploaded under its final key, and its record only
after it, so a record still means a complete shard; the other files are single PUTs.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError
from regionspot.shards.identity import IDENTITY, identity_differences, read_identity
from regionspot.shards.index import INDEX, LAYOUT
from regionspot.shards.location import Location
from regionspot.shards.locks import LOCK_GLOB, ShardLock
from regionspot.shards.manifest import MANIFEST, TEXT_EMBEDDINGS, build_manifest, is_finished
from regionspot.shards.schema import TEXT_DTYPE, Sample, record_name, shard_name
from regionspot.shards.storage import STORAGES, ShardWriter, open_writer, shard_checksum


def _json_bytes(obj, where: str) -> bytes:
    try:
        return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()
    except ValueError as e:
        raise RegionSpotError(f"cannot write {where}: {e} (a NaN or infinite value)") from e


def write_json_atomic(path: Path | str, obj, location: Location | None = None) -> None:
    """Write `obj` as strict JSON to the file `path`, or to the object `path` of `location`, atomically.

    Raises:
        RegionSpotError naming the file when `obj` holds NaN or infinity (not JSON; nothing is written).
    """
    if location is None:
        path = Path(path)
        location, path = Location.parse(path.parent), path.name
    location.write_bytes_atomic(str(path), _json_bytes(obj, location.display(str(path))))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class OpenShard:
    """One shard being written: `write` and `skip` per image in key order, then `close` (or `abort`).

    Usable as a context manager (close on success, abort on an exception).
    """

    def __init__(self, out: Path, index: int, storage: str):
        self.out, self.index = out, index
        self.name = shard_name(index, storage)
        self.samples = self.regions = 0
        self.skipped: list[dict] = []
        self.record: dict | None = None  # set by close()
        self._writer: ShardWriter = open_writer(storage, out / self.name)

    def write(self, sample: Sample) -> None:
        """Append one image's sample (refused with RegionSpotError when it breaks the schema)."""
        self._writer.write(sample)
        self.samples, self.regions = self.samples + 1, self.regions + sample.num_regions

    def skip(self, key: str, reason: str) -> None:
        """Record that the image `key` of this shard was not extracted, and why."""
        self.skipped.append({"key": key, "reason": reason})

    def close(self) -> dict:
        """Rename the shard into place, hash it and write its record; returns the record."""
        self._writer.close()
        sha256, nbytes = shard_checksum(self.out / self.name)
        record = {"index": self.index, "name": self.name, "samples": self.samples, "regions": self.regions,
                  "bytes": nbytes, "sha256": sha256, "skipped": self.skipped,
                  LAYOUT: self._writer.layout, INDEX: self._writer.entries}  # fmt: skip
        write_json_atomic(self.out / record_name(self.index), record)
        self.record = record
        return record

    def abort(self) -> None:
        """Drop the unfinished shard; no record is written."""
        self._writer.abort()

    def __enter__(self) -> OpenShard:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.abort() if kind is not None else self.close()


class _UploadedShard(OpenShard):
    """An `OpenShard` written in a local scratch directory and, on `close`, uploaded to `location`:
    the shard first, then its record, so a record in the store still means a complete shard."""

    def __init__(self, location: Location, index: int, storage: str):
        self.location, self.scratch = location, location.scratch_path(f"shard-{index:06d}")
        self.scratch.mkdir(parents=True)
        super().__init__(self.scratch, index, storage)

    def close(self) -> dict:
        try:
            record = super().close()
            self.location.upload(self.scratch / self.name, self.name)
            self.location.upload(self.scratch / record_name(self.index), record_name(self.index))
        except BaseException:
            self.record = None
            raise
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        return record

    def abort(self) -> None:
        super().abort()
        shutil.rmtree(self.scratch, ignore_errors=True)


class ShardSetWriter:
    """Writes the shard set at `path` (a directory, a URL or a `Location`) with one storage ("wds" or
    "zarr").

    Several processes may write one set together (each its own shards): `claim` lets in every process
    of the same run, and `finish` writes the manifest for whichever finds every record present.
    Attributes: location, path (the directory as a `Path`, or for a URL the `Location`), storage.
    """

    def __init__(self, path: Path | str | Location, storage: str):
        if storage not in STORAGES:
            raise RegionSpotError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")
        self.location, self.storage = Location.parse(path), storage
        self.path: Path | Location = self.location.local_path if self.location.is_local else self.location

    def claim(self, identity: dict) -> None:
        """Record `identity` (see `run_identity`) in a new directory, or check that an existing one
        holds the same run.

        Raises:
            RegionSpotError naming every differing field ("run.limit differs: 5 here, 3 in
            DIR/identity.json") when the directory holds another run's shards.
        """
        assert identity["storage"] == self.storage, (identity["storage"], self.storage)
        identity = json.loads(json.dumps(identity))  # compared as stored: a tuple is a JSON list
        file = self.location.display(IDENTITY)
        if self.location.exists(IDENTITY):
            stored = read_identity(self.location)
            if stored is None:
                raise RegionSpotError(
                    f"{file}: not valid JSON; pass --overwrite to replace the shards in {self.path}"
                )
            differences = identity_differences(identity, stored, file)
            if differences:
                differs = "; ".join(differences)
                raise RegionSpotError(
                    f"{self.path} holds shards of a different run ({differs}); "
                    "pass --overwrite to replace them, or --out to write elsewhere"
                )
            return
        write_json_atomic(IDENTITY, identity, self.location)

    def clear(self) -> None:
        """Remove what an earlier run left in the directory (only the shard set's own files)."""
        own = (IDENTITY, MANIFEST, TEXT_EMBEDDINGS)
        temporaries = (".shard-", ".tmp-", *(f".{n}.tmp-" for n in own))  # the storages' and Location's
        for name in self.location.list():
            if name in own or name.startswith(("shard-", *temporaries)):
                self.location.delete(name)

    def is_complete(self, index: int) -> bool:
        """Whether shard `index` is written and recorded (a resumed run skips it)."""
        return self.location.exists(record_name(index)) and self.location.exists(shard_name(index, self.storage))

    def lock(self, index: int) -> ShardLock | None:
        """The lock a writer of shard `index` holds (shards/locks.py); None for a URL (no locks there)."""
        return ShardLock(self.path, index) if self.location.is_local else None

    def open_shard(self, index: int) -> OpenShard:
        """Start shard `index`, first removing the temporary files a killed writer of it left behind.

        Where several runs may write the set (not told apart by rank), call this only while holding
        `lock(index)`: the temporary files are then surely a dead writer's.
        """
        if not self.location.is_local:
            self.location.remove_stale_scratch(f"shard-{index:06d}")  # a killed upload's
            return _UploadedShard(self.location, index, self.storage)
        for stale in self.path.glob(f".{shard_name(index, self.storage)}*"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        return OpenShard(self.path, index, self.storage)

    def write_shard(
        self, index: int, samples: Iterable[Sample], skipped: Iterable[tuple[str, str]] = ()
    ) -> dict:
        """Write shard `index` at once from in-memory samples (and (key, reason) skipped images); returns
        its record."""
        with self.open_shard(index) as shard:
            for sample in samples:
                shard.write(sample)
            for key, reason in skipped:
                shard.skip(key, reason)
        return shard.record

    @property
    def finished(self) -> bool:
        """Whether the manifest is written."""
        return is_finished(self.location)

    def records(self, total: int) -> list[dict] | None:
        """The records of shards 0..total-1 without their per-sample index (it stays in the files; a set
        of a million images would hold a million entries in memory), or None while any is not complete."""
        present = set(self.location.list("shard-*"))  # one listing, not two requests per shard
        names = [(record_name(i), shard_name(i, self.storage)) for i in range(total)]
        if not all(record in present and shard in present for record, shard in names):
            return None
        records = (json.loads(self.location.read_bytes(record)) for record, _ in names)
        return [{k: v for k, v in r.items() if k != INDEX} for r in records]

    def finish(
        self,
        total: int,
        vocabulary: list[dict],
        text_embeddings: np.ndarray | Callable[[], np.ndarray],
        templates: str,
        extra: dict | None = None,
    ) -> bool:
        """Write the text embeddings and the manifest if every shard 0..total-1 has its record and the
        manifest is not written yet; returns whether this call wrote it.

        Args:
            total: the run's number of shards.
            vocabulary: `{"id", "name", "synonyms", "frequency"}` per label index.
            text_embeddings: float32 [K, D], L2-normalised, row k for vocabulary entry k; or a function
                returning them, called only when the file is not written yet (computing them may need
                the CLIP weights).
            templates: how the text embeddings were made (the prompt templates' name).
            extra: as `build_manifest`'s (dataset_stats, proposals with stats, other top-level keys).
        """
        records = self.records(total)
        if records is None or self.finished:
            return False
        identity = read_identity(self.location)
        if identity is None:
            raise RegionSpotError(
                f"{self.location.display(IDENTITY)} is missing or unreadable; run the extraction again"
            )
        if not self.location.exists(TEXT_EMBEDDINGS):
            text = text_embeddings() if callable(text_embeddings) else text_embeddings
            self.location.write_bytes_atomic(TEXT_EMBEDDINGS, _npy_bytes(np.asarray(text, TEXT_DTYPE)))
        manifest = build_manifest(identity, records, vocabulary, extra, templates=templates)
        write_json_atomic(MANIFEST, manifest, self.location)
        if self.location.is_local:  # every shard is complete: no writer will want a lock again
            for lock in self.path.glob(LOCK_GLOB):
                lock.unlink(missing_ok=True)
        return True
