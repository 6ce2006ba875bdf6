"""`regionspot shards reindex`: give a shard set written before the current per-sample index (format version
1: none; 2: CRC-32C checksums) that index, in place: each record gets its shard's "layout" and "sample_index"
(shards/index.py), then the manifest says the current version. The shards themselves are not rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from regionspot.errors import RegionSpotError
from regionspot.shards.index import INDEX, LAYOUT
from regionspot.shards.manifest import MANIFEST, read_manifest
from regionspot.shards.schema import REINDEXABLE, SCHEMA_VERSION, record_name
from regionspot.shards.storage import scan_index, shard_checksum
from regionspot.shards.writer import write_json_atomic

_ENTRY = ("name", "samples", "regions", "bytes", "sha256")


def reindex_shardset(path: Path | str, on_shard: Callable[[str], None] | None = None) -> dict:
    """Write the per-sample index of every shard of the set at `path` into its record and mark the manifest
    the current format version; returns the new manifest. Running it again rewrites the same index.

    Each shard is checked against the manifest's sha256 and byte count first, and its samples and regions
    against the manifest's counts: an index is only written for the bytes the extraction wrote.

    Raises:
        RegionSpotError naming the shard: missing, damaged (checksum), or holding other counts.
    """
    path = Path(path)
    manifest = read_manifest(path, versions=(*REINDEXABLE, SCHEMA_VERSION))
    try:
        entries = [{k: s[k] for k in _ENTRY} for s in manifest["shards"]]
    except (KeyError, TypeError) as e:
        raise RegionSpotError(f"{path / MANIFEST}: malformed (field {e} missing or invalid)") from e
    damaged = "it is damaged: re-extract it, or restore it from a copy"
    for index, entry in enumerate(entries):
        shard = path / entry["name"]
        if not shard.exists():
            raise RegionSpotError(f"{shard}: missing; restore it, or re-run the extraction that wrote {path}")
        if shard_checksum(shard) != (entry["sha256"], entry["bytes"]):
            raise RegionSpotError(f"{shard}: its bytes differ from the manifest's sha256; {damaged}")
        layout, found = scan_index(shard, checksums=True)
        counts = (len(found), sum(e["regions"] for e in found))
        if counts != (entry["samples"], entry["regions"]):
            raise RegionSpotError(f"{shard}: holds {counts[0]} samples / {counts[1]} regions, the manifest says "
                                  f"{entry['samples']} / {entry['regions']}; {damaged}")  # fmt: skip
        record_file = path / record_name(index)
        try:
            record = json.loads(record_file.read_text())
        except (OSError, json.JSONDecodeError):  # lost or damaged: rebuilt from the manifest
            record = {"index": index, **entry, "skipped": []}
        write_json_atomic(record_file, {**record, **entry, LAYOUT: layout, INDEX: found})
        if on_shard is not None:
            on_shard(entry["name"])
    manifest["version"] = SCHEMA_VERSION
    write_json_atomic(path / MANIFEST, manifest)
    return manifest
