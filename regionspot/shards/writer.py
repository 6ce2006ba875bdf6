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
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError
from regionspot.shards.identity import IDENTITY, identity_differences, read_identity
from regionspot.shards.index import INDEX, LAYOUT
from regionspot.shards.manifest import MANIFEST, TEXT_EMBEDDINGS, build_manifest, is_finished
from regionspot.shards.schema import TEXT_DTYPE, Sample, record_name, shard_name
from regionspot.shards.storage import STORAGES, ShardWriter, open_writer, shard_checksum


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` and rename tmp to `path`, so readers never see half a file; on failure tmp goes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    """Write `obj` to `path` as strict JSON, atomically.

    Raises:
        RegionSpotError naming the file when `obj` holds NaN or infinity (not JSON; nothing is written).
    """
    try:
        text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    except ValueError as e:
        raise RegionSpotError(f"cannot write {path}: {e} (a NaN or infinite value)") from e
    _write_atomic(path, lambda tmp: tmp.write_text(text))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temporary name
        np.save(f, array, allow_pickle=False)


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


class ShardSetWriter:
    """Writes the shard set in directory `path` with one storage ("wds" or "zarr").

    Several processes may write one set together (each its own shards): `claim` lets in every process
    of the same run, and `finish` writes the manifest for whichever finds every record present.
    """

    def __init__(self, path: Path | str, storage: str):
        if storage not in STORAGES:
            raise RegionSpotError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")
        self.path, self.storage = Path(path), storage

    def claim(self, identity: dict) -> None:
        """Record `identity` (see `run_identity`) in a new directory, or check that an existing one
        holds the same run.

        Raises:
            RegionSpotError naming every differing field ("run.limit differs: 5 here, 3 in
            DIR/identity.json") when the directory holds another run's shards.
        """
        assert identity["storage"] == self.storage, (identity["storage"], self.storage)
        identity = json.loads(json.dumps(identity))  # compared as stored: a tuple is a JSON list
        file = self.path / IDENTITY
        if file.exists():
            stored = read_identity(self.path)
            if stored is None:
                raise RegionSpotError(
                    f"{file}: not valid JSON; pass --overwrite to replace the shards in {self.path}"
                )
            if stored != identity:
                differs = "; ".join(identity_differences(identity, stored, str(file)))
                raise RegionSpotError(
                    f"{self.path} holds shards of a different run ({differs}); "
                    "pass --overwrite to replace them, or --out to write elsewhere"
                )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(file, identity)

    def clear(self) -> None:
        """Remove what an earlier run left in the directory (only the shard set's own files)."""
        if not self.path.exists():
            return
        own = (IDENTITY, MANIFEST, TEXT_EMBEDDINGS)
        for p in self.path.iterdir():
            if p.name in own or p.name.startswith(("shard-", ".shard-", *(f".{n}.tmp-" for n in own))):
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def is_complete(self, index: int) -> bool:
        """Whether shard `index` is written and recorded (a resumed run skips it)."""
        return (self.path / record_name(index)).exists() and (
            self.path / shard_name(index, self.storage)
        ).exists()

    def open_shard(self, index: int) -> OpenShard:
        """Start shard `index`, first removing the temporary files a killed writer of it left behind."""
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
        return is_finished(self.path)

    def records(self, total: int) -> list[dict] | None:
        """The records of shards 0..total-1 without their per-sample index (it stays in the files; a set
        of a million images would hold a million entries in memory), or None while any is not complete."""
        if not all(self.is_complete(i) for i in range(total)):
            return None
        records = (json.loads((self.path / record_name(i)).read_text()) for i in range(total))
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
        identity = read_identity(self.path)
        if identity is None:
            raise RegionSpotError(
                f"{self.path / IDENTITY} is missing or unreadable; run the extraction again"
            )
        text_file = self.path / TEXT_EMBEDDINGS
        if not text_file.exists():
            text = text_embeddings() if callable(text_embeddings) else text_embeddings
            text = np.asarray(text, TEXT_DTYPE)
            _write_atomic(text_file, lambda tmp: _save_npy(tmp, text))
        manifest = build_manifest(identity, records, vocabulary, extra, templates=templates)
        write_json_atomic(self.path / MANIFEST, manifest)
        return True
