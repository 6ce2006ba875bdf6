"""`manifest.json`: what a shard set holds, written once every shard of its run is complete.

Read it with `json.load` or `ShardSet(dir).manifest`; DESIGN.md §4 shows an example. `ShardSetWriter.finish`
writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from regionspot.errors import RegionSpotError
from regionspot.shards.location import Location
from regionspot.shards.schema import FORMAT, REINDEXABLE, SCHEMA_VERSION

MANIFEST = "manifest.json"
TEXT_EMBEDDINGS = "text_embeddings.npy"


def is_finished(path: Path | str | Location) -> bool:
    """Whether the shard set at `path` (a directory, a URL or a Location) has its manifest (its
    extraction finished)."""
    return Location.parse(path).exists(MANIFEST)


def build_manifest(
    identity: dict, records: list[dict], vocabulary: list[dict], extra: dict | None = None, *, templates: str
) -> dict:
    """The manifest of a finished run (layout: DESIGN.md §4).

    Args:
        identity: the run identity: dataset (name, sources), proposals, backbones, run, storage.
        records: one per shard, `{"index", "name", "samples", "regions", "bytes", "sha256",
            "skipped": [{"key", "reason"}]}`, shards 0..n-1 in any order.
        vocabulary: `{"id", "name", "synonyms", "frequency"}` per label index.
        extra: optional "dataset_stats" (-> dataset.stats), "proposals" (replaces identity's), and
            any other top-level keys to add.
        templates: how the text embeddings were made (the prompt templates' name).
    Raises:
        RegionSpotError when the records do not cover shards 0..n-1 exactly once.
    """
    records = sorted(records, key=lambda r: r["index"])
    indices = [r["index"] for r in records]
    if indices != list(range(len(records))):
        missing = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        raise RegionSpotError(
            f"shard records do not cover shards 0..{len(records) - 1} once (missing {missing[:5]}, repeated "
            f"{repeated[:5]}); run the same 'regionspot extract' command again"
        )
    skipped = [s for r in records for s in r.get("skipped", [])]
    extra = dict(extra or {})
    return {
        "format": FORMAT,
        "version": SCHEMA_VERSION,
        "storage": identity["storage"],
        "dataset": {
            **identity["dataset"],
            "images": sum(r["samples"] for r in records),
            "regions": sum(r["regions"] for r in records),
            "skipped": skipped,
            **({"stats": extra.pop("dataset_stats")} if "dataset_stats" in extra else {}),
        },
        "proposals": extra.pop("proposals", identity["proposals"]),
        "vocabulary": vocabulary,
        "backbones": identity["backbones"],
        "run": identity["run"],
        "text_embeddings": {"file": TEXT_EMBEDDINGS, "templates": templates},
        "shards": [{k: r[k] for k in ("name", "samples", "regions", "bytes", "sha256")} for r in records],
        **extra,
    }


def read_manifest(path: Path | str | Location, versions: tuple[int, ...] = (SCHEMA_VERSION,)) -> dict:
    """The manifest of the shard set at `path` (a directory, a URL or a Location), checked for format
    and version.

    Raises RegionSpotError naming the fix: no directory or no shards ("run 'regionspot extract'
    first"), shards but no manifest (the extraction has not finished), invalid JSON, another format
    or schema version (one of `versions`; an older version that reindexing brings up to date: "run
    'regionspot shards reindex'")."""
    where = Location.parse(path)
    file = where.display(MANIFEST)
    try:
        text = where.read_bytes(MANIFEST)
    except (FileNotFoundError, IsADirectoryError):
        if not where.exists(""):
            raise RegionSpotError(
                f"no shards in {where} (no such directory); run 'regionspot extract' first"
            ) from None
        if where.list("shard-*"):
            raise RegionSpotError(
                f"{where} has shards but no {MANIFEST}: its extraction has not finished; run the same "
                "'regionspot extract' command again to complete it"
            ) from None
        raise RegionSpotError(f"no shards in {where}; run 'regionspot extract' first") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegionSpotError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise RegionSpotError(f"{file}: not a regionspot shard manifest (format {found!r})")
    version = manifest.get("version")
    if version in REINDEXABLE and version not in versions:
        raise RegionSpotError(
            f"{where}: shard format version {version} has {'no' if version == 1 else 'an older'} per-sample index; "
            f"run 'regionspot shards reindex {where}' once to write it (in place; the shards stay as they are)"
        )
    if manifest.get("version") not in versions:
        raise RegionSpotError(
            f"{file}: shard format version {manifest.get('version')}, this regionspot reads {SCHEMA_VERSION}; "
            "re-extract with this version"
        )
    return manifest
