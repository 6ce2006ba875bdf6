"""`regionspot shards verify` and `info`: check a shard set against its manifest and records."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError
from regionspot.shards.identity import IDENTITY
from regionspot.shards.index import ShardFault, index_differences, read_index
from regionspot.shards.location import Location
from regionspot.shards.manifest import MANIFEST, read_manifest
from regionspot.shards.schema import REINDEXABLE, SCHEMA_VERSION, TEXT_DTYPE
from regionspot.shards.staging import fetch
from regionspot.shards.storage import SUFFIXES, open_reader, scan_index, shard_checksum

_ENTRY = ("name", "samples", "regions", "bytes", "sha256")


def _expected_shapes(manifest: dict) -> tuple[int | None, int | None]:
    """(T, C) the manifest's backbones promise; None where it does not say."""
    backbones = manifest.get("backbones", {})
    return backbones.get("sam", {}).get("tokens"), backbones.get("clip", {}).get("width")


def _check_shard(
    path: Path,
    entry: dict,
    manifest: dict,
    record: dict | None,
    keys: dict[str, str],
    checksum: tuple[str, int] | None = None,
    where: Location | None = None,
) -> list[str]:
    """Faults of one present shard: checksum (`checksum` when it was taken already), then (if its bytes
    are right) its record's per-sample index against the shard, then every sample read through the index
    (its checksum), its schema and the counts. `where`: the set, when `path` is a scratch copy of its shard."""
    name = entry["name"]
    sha, nbytes = checksum or shard_checksum(path)
    if (sha, nbytes) != (entry["sha256"], entry["bytes"]):
        return [f"{name}: checksum mismatch ({nbytes} bytes, sha256 {sha[:12]}; manifest says "
                f"{entry['bytes']} bytes, sha256 {str(entry['sha256'])[:12]})"]  # fmt: skip
    record_file = Path(name).with_suffix(".json").name
    reindex = f"run 'regionspot shards reindex {where or path.parent}'"
    if record is None:
        return [f"{record_file}: missing (it holds the shard's per-sample index); {reindex}"]
    try:
        layout, index = read_index(record, record_file, entry["samples"], reindex)
        found_layout, found = scan_index(path)
    except RegionSpotError as e:
        return [str(e)]
    structure = ("key", "offset", "length", "members", "rows", "regions")
    differ = index_differences(index, found, [k for k in structure if found and k in found[0]])
    if found_layout is not None and layout != found_layout:
        differ.append(f"layout {layout} (the shard: {found_layout})")
    if differ:
        return [f"{record_file}: the per-sample index disagrees with {name}: {d}" for d in differ]
    faults: list[str] = []
    tokens, width = _expected_shapes(manifest)
    vocabulary = len(manifest.get("vocabulary", []))
    clip_shape = None
    try:
        reader = open_reader(Location.parse(path.parent), path.name, layout, index)  # path: maybe a scratch copy
    except ShardFault as e:
        return [f"{name}: sample {e.key}: {e.problem}"]
    for i in range(len(index)):
        try:
            sample = reader.read(i)
        except ShardFault as e:
            faults.append(f"{name}: sample {e.key}: {e.problem}")
            continue
        problems = sample.problems()
        if not problems:
            t = sample.sam_tokens.shape[1]
            if tokens is not None and t != tokens:
                problems.append(f"{t} SAM tokens per region, manifest says {tokens}")
            if width is not None and sample.clip_map.shape[1] != width:
                problems.append(f"CLIP map width {sample.clip_map.shape[1]}, manifest says {width}")
            clip_shape = clip_shape or sample.clip_map.shape
            if sample.clip_map.shape != clip_shape:
                problems.append(f"CLIP map {list(sample.clip_map.shape)}, others {list(clip_shape)}")
            labels = sample.labels
            if labels.size and (labels.min() < -1 or labels.max() >= vocabulary):
                problems.append(f"labels outside [-1, {vocabulary})")
            if not np.isfinite(sample.boxes).all():
                problems.append("non-finite boxes")
        if sample.key in keys:
            problems.append(f"key also in {keys[sample.key]}")
        keys.setdefault(sample.key, name)
        if problems:
            faults.append(f"{name}: sample {sample.key}: {'; '.join(problems)}")
    samples, regions = len(index), sum(e["regions"] for e in index)
    if (samples, regions) != (entry["samples"], entry["regions"]):
        faults.append(
            f"{name}: {samples} samples / {regions} regions, manifest says {entry['samples']} / {entry['regions']}"
        )
    return faults


def _check_remote_shard(
    where: Location, entry: dict, manifest: dict, record: dict | None, keys: dict[str, str]
) -> list[str]:
    """`_check_shard` for a shard in an object store: one streaming read hashes it into a scratch copy
    (the sample readers open files), which goes once the shard is checked."""
    scratch = where.scratch_path(entry["name"])
    try:
        checksum = fetch(where, entry["name"], scratch)
        return _check_shard(scratch, entry, manifest, record, keys, checksum, where)
    except FileNotFoundError:  # removed since the listing
        return [f"{entry['name']}: missing"]
    finally:
        shutil.rmtree(scratch) if scratch.is_dir() else scratch.unlink(missing_ok=True)


def verify_shardset(path: Path | str | Location, on_shard: Callable[[str], None] | None = None) -> list[str]:
    """Every fault of the shard set at `path`; an empty list means it is sound.

    Checks: each listed shard exists and matches the manifest's sha256 and byte count (and its
    `shard-NNNNNN.json` record, when present); every sample meets the schema, agrees with the
    manifest's backbones (T, CLIP width) and vocabulary (labels), and appears once in the set;
    sample and region counts per shard and in total; no unlisted shard files; the text embeddings.

    Args:
        path: the shard set: a directory, a URL (each shard is streamed once, no copy of the set is
            made) or a Location.
        on_shard: called with each shard's name once it is checked (for a progress bar).
    Returns:
        One line per fault, each naming the file (and sample) at fault.
    """
    where = Location.parse(path)
    try:
        manifest = read_manifest(where)
    except RegionSpotError as e:
        return [str(e)]
    try:
        entries = [{k: s[k] for k in _ENTRY} for s in manifest["shards"]]
        images, regions = manifest["dataset"]["images"], manifest["dataset"]["regions"]
        text_file = manifest["text_embeddings"]["file"]
    except (KeyError, TypeError) as e:
        return [f"manifest.json: malformed (field {e} missing or invalid)"]
    faults: list[str] = []
    present = where.list("shard-*")

    def has(name: str) -> bool:  # an https server may list nothing: what the listing lacks is asked for
        return name in present or where.exists(name)

    listed = {e["name"] for e in entries}
    extra = [name for name in present if Path(name).suffix in SUFFIXES and name not in listed]
    faults += [f"{name}: not listed in the manifest" for name in extra]
    keys: dict[str, str] = {}
    for entry in entries:
        record_file = str(Path(entry["name"]).with_suffix(".json"))  # shard-NNNNNN.json, written when the shard finished
        record = None
        if has(record_file):
            try:
                record = json.loads(where.read_bytes(record_file))
                differ = [k for k in _ENTRY if record.get(k) != entry[k]]
            except (json.JSONDecodeError, UnicodeDecodeError):
                differ = ["(not valid JSON)"]
            if differ:
                faults.append(f"{record_file}: {', '.join(differ)} differ from the manifest")
        if not has(entry["name"]):
            faults.append(f"{entry['name']}: missing")
        elif where.is_local:
            faults += _check_shard(where.local_path / entry["name"], entry, manifest, record, keys)
        else:
            faults += _check_remote_shard(where, entry, manifest, record, keys)
        if on_shard is not None:
            on_shard(entry["name"])
    sums = (sum(e["samples"] for e in entries), sum(e["regions"] for e in entries))
    if sums != (images, regions):
        faults.append(
            f"manifest: shards hold {sums[0]} images / {sums[1]} regions, dataset says {images} / {regions}"
        )
    faults += _check_text(where, text_file, len(manifest.get("vocabulary", [])), manifest)
    return faults


def _check_text(where: Location, name: str, vocabulary: int, manifest: dict) -> list[str]:
    try:
        text = np.load(io.BytesIO(where.read_bytes(name)), allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError):
        return [f"{name}: missing"]
    except (ValueError, EOFError, OSError) as e:
        return [f"{name}: unreadable ({e})"]
    embed_dim = manifest.get("backbones", {}).get("clip", {}).get("embed_dim")
    if text.dtype != TEXT_DTYPE or text.ndim != 2 or text.shape[0] != vocabulary:
        return [f"{name}: {text.dtype}{list(text.shape)}, expected {TEXT_DTYPE} [{vocabulary}, D]"]
    if embed_dim is not None and text.shape[1] != embed_dim:
        return [f"{name}: width {text.shape[1]}, manifest's CLIP embed_dim is {embed_dim}"]
    norms = np.linalg.norm(text, axis=1)
    if not np.all(np.abs(norms - 1) < 1e-3):
        return [f"{name}: rows are not L2-normalised (norms {norms.min():.3f}..{norms.max():.3f})"]
    return []


def shardset_info(path: Path | str | Location) -> dict:
    """What `regionspot shards info` prints: format version, dataset, storage, counts, size, vocabulary,
    backbones, run. A set of an older format is described too, with the command that updates it."""
    where = Location.parse(path)
    manifest = read_manifest(where, versions=(*REINDEXABLE, SCHEMA_VERSION))
    version = str(manifest["version"])
    images = manifest["dataset"]["images"]
    nbytes = sum(s["bytes"] for s in manifest["shards"])
    sam, clip = manifest["backbones"]["sam"], manifest["backbones"]["clip"]
    return {
        "path": str(where),
        "format version": version if version == str(SCHEMA_VERSION)
        else f"{version} (older; run 'regionspot shards reindex {where}')",
        "dataset": manifest["dataset"]["name"],
        "storage": manifest["storage"],
        "proposals": manifest["proposals"].get("source"),
        "shards": len(manifest["shards"]),
        "images": images,
        "regions": manifest["dataset"]["regions"],
        "regions per image": round(manifest["dataset"]["regions"] / images, 2) if images else 0,
        "skipped images": len(manifest["dataset"].get("skipped", [])),
        "bytes": nbytes,
        "bytes per image": round(nbytes / images) if images else 0,
        "vocabulary": len(manifest["vocabulary"]),
        "sam": f"{sam['model']} (tokens {sam['tokens']})",
        "clip": f"{clip['model']} @{clip['image_size']}",
        "fingerprint": manifest["backbones"]["fingerprint"],
        "run": json.dumps(manifest["run"]),
    }


def shard_sets_in(path: Path | str) -> list[Path]:
    """The shard sets one level under `path` when it is a folder of sets (what `train --shards` mixes),
    sorted by name; [] when `path` is a shard set itself (or holds none). A set there counts whether
    its extraction finished or not (verify then says what is missing)."""
    path = Path(path)

    def is_set(p: Path) -> bool:
        return (p / MANIFEST).exists() or (p / IDENTITY).exists() or any(p.glob("shard-*"))

    if not path.is_dir() or is_set(path):
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and is_set(p))
