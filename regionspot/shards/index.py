"""The per-sample index (format version 3): where each sample of a shard is, how many regions it has and a
checksum of it, so a reader makes one read per sample, checks it, and knows a truncated shard when it sees one.

The writer of a shard builds it as it writes (no extra pass) and the shard's record `shard-NNNNNN.json`
holds it beside the counts and the sha256:

    "layout": {"tokens": T, "clip_map": [L, C]},            # null for a shard without samples
    "sample_index": [
      {"key": "000123", "regions": 16, "xxh3": 11832407461271958013,
       "offset": 1536, "length": 541184,                    # wds: the sample's tar members, headers included
       "members": [[512, 183], [1536, 192], ...]},          # wds: (data offset in that span, data size) of
      ...]                                                  #   <key>.json, then each array in ARRAY_FIELDS order

A zarr entry has `"rows": [lo, hi]` (its region rows; the image is row i) instead of offset, length and
members. The checksum is XXH3-64: of the span's bytes for wds, of the sample's arrays (ARRAY_FIELDS order,
C order) for zarr. Every read computes it over every byte, so its speed bounds the trainer's per-core read
rate: on one core of the machine of the README's figures it hashes a 529 KiB `bl` sample at ~50 GB/s where
CRC-32C (google-crc32c, the CPU's CRC instruction; format version 2) gave ~22 GB/s, a third of a read from
the page cache. Its 64 bits also make a missed corruption far less likely than 32. `xxhash` is the
maintained binding of the reference xxHash C library, with SIMD paths on x86 and ARM.

Sets written before (format version 1: no index; 2: CRC-32C) get this index with
`regionspot shards reindex DIR`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xxhash

from regionspot.errors import RegionSpotError
from regionspot.shards.location import Location
from regionspot.shards.schema import ARRAY_FIELDS

INDEX = "sample_index"  # the record's per-sample list
LAYOUT = "layout"  # the record's {"tokens": T, "clip_map": [L, C]}
MEMBERS = ("json", *ARRAY_FIELDS)  # a wds entry's "members", in this order
CHECKSUM = "xxh3"  # an entry's checksum field


class ShardFault(RegionSpotError):
    """A sample that cannot be used as stored: a checksum mismatch, a truncated shard, an array of the wrong
    shape or dtype, a label outside the vocabulary. One line names the shard, the sample and the fix."""

    def __init__(self, shard: str, key: str, problem: str, fix: str):
        self.shard, self.key, self.problem = shard, key, problem
        super().__init__(f"{shard}: sample {key}: {problem}; {fix}")


class IndexedShard:
    """What a storage's reader of one shard shares with the other's: its index and how a fault reads.

    Args:
        location, name: where the shard is (a local directory or a URL) and its file name.
        layout, entries: the shard's per-sample index; without "regions" (a bare shard walked without an
            index) a sample is read with the shapes its own headers give.
        vocabulary: labels must lie in [-1, vocabulary) (None: not checked).
        fix: what a fault message tells the user to do (default: run `regionspot shards verify`).
    """

    def __init__(
        self,
        location: Location,
        name: str,
        layout: dict | None,
        entries: list[dict],
        vocabulary: int | None = None,
        fix: str | None = None,
    ):
        self.location, self.name, self.entries, self.vocabulary = location, name, entries, vocabulary
        self.tokens = layout["tokens"] if layout else None  # T
        self.clip_shape = tuple(layout["clip_map"]) if layout else None  # [L, C]
        self.where = f"{location}/{name}"
        self.fix = fix or f"run 'regionspot shards verify {location}'"

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, i: int) -> str:
        return self.entries[i]["key"]

    def regions(self, i: int) -> int:
        return self.entries[i]["regions"]

    def fault(self, key: str, problem: str) -> ShardFault:
        return ShardFault(self.where, key, problem, self.fix)

    def check_labels(self, key: str, labels: np.ndarray) -> None:
        """Refuse a label outside [-1, vocabulary)."""
        if self.vocabulary is not None and labels.size:
            values = labels.tolist()  # a few hundred at most: faster than two numpy reductions
            if min(values) < -1 or max(values) >= self.vocabulary:
                bad = next(v for v in values if v < -1 or v >= self.vocabulary)
                raise self.fault(key, f"label {bad} is outside the vocabulary [-1, {self.vocabulary})")


def hasher() -> xxhash.xxh3_64:
    """An incremental checksum: `.update(buffer)` in order, then `.intdigest()` (what `checksum` returns)."""
    return xxhash.xxh3_64()


def checksum(buffers: Iterable) -> int:
    """The checksum of the buffers' bytes, in order; numpy arrays (C-contiguous), bytes and memoryviews are
    read in place, without a copy."""
    h = hasher()
    for b in buffers:
        h.update(b)
    return h.intdigest()


def mismatch(found: int, stored: int) -> str:
    """The words of a checksum fault."""
    return f"checksum mismatch ({CHECKSUM} {found:016x}, the index says {stored:016x})"


def make_layout(shapes: tuple[int, int, int] | None) -> dict | None:
    """The record's layout from a shard's (T, L, C), or None for a shard without samples."""
    if shapes is None:
        return None
    tokens, length, width = (int(x) for x in shapes)
    return {"tokens": tokens, "clip_map": [length, width]}


def read_index(record: dict, where: str, samples: int, fix: str) -> tuple[dict | None, list[dict]]:
    """(layout, entries) of a shard's record, checked to list `samples` samples.

    Raises:
        RegionSpotError naming `where` and the fix when the record has no index (a version 1 set) or an
        index of another length.
    """
    entries, layout = record.get(INDEX), record.get(LAYOUT)
    if not isinstance(entries, list) or (entries and not isinstance(layout, dict)):
        raise RegionSpotError(f"{where}: no per-sample index; {fix}")
    if len(entries) != samples:
        raise RegionSpotError(
            f"{where}: the per-sample index lists {len(entries)} samples, the manifest {samples}; {fix}"
        )
    return layout, entries


def index_differences(stored: list[dict], found: list[dict], fields: Iterable[str]) -> list[str]:
    """How the index `stored` (a record's) differs from `found` (read from the shard), comparing `fields`:
    the sample count and the first differing sample, as short phrases."""
    out = []
    if len(stored) != len(found):
        out.append(f"the index lists {len(stored)} samples, the shard holds {len(found)}")
    for a, b in zip(stored, found, strict=False):
        differ = [f"{k} {a.get(k)} (the shard: {b.get(k)})" for k in fields if a.get(k) != b.get(k)]
        if differ:
            out.append(f"sample {b.get('key')}: {', '.join(differ)}")
            break
    return out
