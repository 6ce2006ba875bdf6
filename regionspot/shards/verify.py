"""`regionspot shards verify` and `info`: check a shard set against its manifest and records."""

from __future__ import annotations

import json
from pathlib import Path

from regionspot.errors import RegionSpotError
from regionspot.shards.manifest import read_manifest
from regionspot.shards.storage import read_shard, shard_checksum


def verify_shardset(path: Path | str) -> list[str]:
    """Every fault of the shard set at `path` (checksums, schema, counts, missing files); empty = sound."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except RegionSpotError as e:
        return [str(e)]
    faults = []
    listed = {s["name"] for s in manifest["shards"]}
    extra = sorted(
        p.name for p in path.glob("shard-*") if p.suffix in (".tar", ".zarr") and p.name not in listed
    )
    faults += [f"{name}: not listed in the manifest" for name in extra]
    for entry in manifest["shards"]:
        shard = path / entry["name"]
        if not shard.exists():
            faults.append(f"{entry['name']}: missing")
            continue
        sha, nbytes = shard_checksum(shard)
        if (sha, nbytes) != (entry["sha256"], entry["bytes"]):
            faults.append(
                f"{entry['name']}: checksum mismatch ({nbytes} bytes, manifest says {entry['bytes']})"
            )
            continue
        samples = regions = 0
        try:
            for sample in read_shard(shard):
                samples, regions = samples + 1, regions + sample.num_regions
                problems = sample.problems()
                if problems:
                    faults.append(f"{entry['name']}: sample {sample.key}: {'; '.join(problems)}")
        except RegionSpotError as e:
            faults.append(str(e))
            continue
        if (samples, regions) != (entry["samples"], entry["regions"]):
            faults.append(
                f"{entry['name']}: {samples} samples / {regions} regions, manifest says "
                f"{entry['samples']} / {entry['regions']}"
            )
    total = sum(s["samples"] for s in manifest["shards"])
    if total != manifest["dataset"]["images"]:
        faults.append(f"manifest: shards hold {total} images, dataset says {manifest['dataset']['images']}")
    text = path / manifest["text_embeddings"]["file"]
    if not text.is_file():
        faults.append(f"{text.name}: missing")
    return faults


def shardset_info(path: Path | str) -> dict:
    """The numbers `regionspot shards info` prints."""
    manifest = read_manifest(Path(path))
    images = manifest["dataset"]["images"]
    nbytes = sum(s["bytes"] for s in manifest["shards"])
    clip = manifest["backbones"]["clip"]
    return {
        "path": str(path),
        "dataset": manifest["dataset"]["name"],
        "storage": manifest["storage"],
        "proposals": manifest["proposals"].get("source"),
        "shards": len(manifest["shards"]),
        "images": images,
        "regions": manifest["dataset"]["regions"],
        "skipped images": len(manifest["dataset"].get("skipped", [])),
        "bytes": nbytes,
        "bytes per image": round(nbytes / images) if images else 0,
        "vocabulary": len(manifest["vocabulary"]),
        "sam": f"{manifest['backbones']['sam']['model']} (tokens {manifest['backbones']['sam']['tokens']})",
        "clip": f"{clip['model']} @{clip['image_size']}",
        "fingerprint": manifest["backbones"]["fingerprint"],
        "run": json.dumps(manifest["run"]),
    }
