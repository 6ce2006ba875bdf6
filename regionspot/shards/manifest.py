"""`manifest.json`: what a shard set holds, written once every shard of its run is complete.

Read it with `json.load` or `ShardSet(dir).manifest`; DESIGN.md §4 shows an example.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from regionspot.errors import RegionSpotError
from regionspot.shards.schema import FORMAT, SCHEMA_VERSION

MANIFEST = "manifest.json"
TEXT_EMBEDDINGS = "text_embeddings.npy"
TEMPLATES = "{}. + openai-imagenet-80"


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON under a temporary name and rename it into place, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def build_manifest(
    identity: dict, records: list[dict], vocabulary: list[dict], extra: dict | None = None
) -> dict:
    """The manifest of a finished run, from its identity and the per-shard records (in shard order)."""
    records = sorted(records, key=lambda r: r["index"])
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
        "text_embeddings": {"file": TEXT_EMBEDDINGS, "templates": TEMPLATES},
        "shards": [{k: r[k] for k in ("name", "samples", "regions", "bytes", "sha256")} for r in records],
        **extra,
    }


def read_manifest(path: Path) -> dict:
    """The manifest of the shard set at `path`, checked for format and version."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        if not path.exists():
            raise RegionSpotError(f"no shard set at {path}; run 'regionspot extract' first")
        if any(path.glob("shard-*")):
            raise RegionSpotError(
                f"{path} has shards but no {MANIFEST}: its extraction has not finished; run the same "
                "'regionspot extract' command again to complete it"
            )
        raise RegionSpotError(f"no shards in {path}; run 'regionspot extract' first")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise RegionSpotError(f"{file}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise RegionSpotError(f"{file}: not a regionspot shard manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != SCHEMA_VERSION:
        raise RegionSpotError(
            f"{file}: shard format version {manifest.get('version')}, this regionspot reads {SCHEMA_VERSION}; "
            "re-extract with this version"
        )
    return manifest
