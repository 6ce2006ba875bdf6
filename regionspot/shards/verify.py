"""`regionspot shards verify` and `info`: check a shard set against its manifest and records."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError
from regionspot.shards.identity import IDENTITY
from regionspot.shards.manifest import MANIFEST, read_manifest
from regionspot.shards.schema import TEXT_DTYPE
from regionspot.shards.storage import SUFFIXES, read_shard, shard_checksum

_ENTRY = ("name", "samples", "regions", "bytes", "sha256")


def _expected_shapes(manifest: dict) -> tuple[int | None, int | None]:
    """(T, C) the manifest's backbones promise; None where it does not say."""
    backbones = manifest.get("backbones", {})
    return backbones.get("sam", {}).get("tokens"), backbones.get("clip", {}).get("width")


def _check_shard(path: Path, entry: dict, manifest: dict, keys: dict[str, str]) -> list[str]:
    """Faults of one present shard: checksum, then (if its bytes are right) schema and counts."""
    name = entry["name"]
    sha, nbytes = shard_checksum(path)
    if (sha, nbytes) != (entry["sha256"], entry["bytes"]):
        return [f"{name}: checksum mismatch ({nbytes} bytes, sha256 {sha[:12]}; manifest says "
                f"{entry['bytes']} bytes, sha256 {str(entry['sha256'])[:12]})"]  # fmt: skip
    faults: list[str] = []
    tokens, width = _expected_shapes(manifest)
    vocabulary = len(manifest.get("vocabulary", []))
    clip_shape = None
    samples = regions = 0
    try:
        for sample in read_shard(path):
            samples, regions = samples + 1, regions + sample.num_regions
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
    except RegionSpotError as e:
        return faults + [str(e)]
    if (samples, regions) != (entry["samples"], entry["regions"]):
        faults.append(
            f"{name}: {samples} samples / {regions} regions, manifest says {entry['samples']} / {entry['regions']}"
        )
    return faults


def verify_shardset(path: Path | str, on_shard: Callable[[str], None] | None = None) -> list[str]:
    """Every fault of the shard set at `path`; an empty list means it is sound.

    Checks: each listed shard exists and matches the manifest's sha256 and byte count (and its
    `shard-NNNNNN.json` record, when present); every sample meets the schema, agrees with the
    manifest's backbones (T, CLIP width) and vocabulary (labels), and appears once in the set;
    sample and region counts per shard and in total; no unlisted shard files; the text embeddings.

    Args:
        path: the shard set directory.
        on_shard: called with each shard's name once it is checked (for a progress bar).
    Returns:
        One line per fault, each naming the file (and sample) at fault.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except RegionSpotError as e:
        return [str(e)]
    try:
        entries = [{k: s[k] for k in _ENTRY} for s in manifest["shards"]]
        images, regions = manifest["dataset"]["images"], manifest["dataset"]["regions"]
        text_file = manifest["text_embeddings"]["file"]
    except (KeyError, TypeError) as e:
        return [f"manifest.json: malformed (field {e} missing or invalid)"]
    faults: list[str] = []
    listed = {e["name"] for e in entries}
    extra = sorted(p.name for p in path.glob("shard-*") if p.suffix in SUFFIXES and p.name not in listed)
    faults += [f"{name}: not listed in the manifest" for name in extra]
    keys: dict[str, str] = {}
    for entry in entries:
        shard = path / entry["name"]
        record_file = shard.with_suffix(".json")  # shard-NNNNNN.json, written when the shard finished
        if record_file.is_file():
            try:
                record = json.loads(record_file.read_text())
                differ = [k for k in _ENTRY if record.get(k) != entry[k]]
            except json.JSONDecodeError:
                differ = ["(not valid JSON)"]
            if differ:
                faults.append(f"{record_file.name}: {', '.join(differ)} differ from the manifest")
        if not shard.exists():
            faults.append(f"{entry['name']}: missing")
        else:
            faults += _check_shard(shard, entry, manifest, keys)
        if on_shard is not None:
            on_shard(entry["name"])
    sums = (sum(e["samples"] for e in entries), sum(e["regions"] for e in entries))
    if sums != (images, regions):
        faults.append(
            f"manifest: shards hold {sums[0]} images / {sums[1]} regions, dataset says {images} / {regions}"
        )
    faults += _check_text(path / text_file, len(manifest.get("vocabulary", [])), manifest)
    return faults


def _check_text(file: Path, vocabulary: int, manifest: dict) -> list[str]:
    if not file.is_file():
        return [f"{file.name}: missing"]
    try:
        text = np.load(file, allow_pickle=False)
    except ValueError as e:
        return [f"{file.name}: unreadable ({e})"]
    embed_dim = manifest.get("backbones", {}).get("clip", {}).get("embed_dim")
    if text.dtype != TEXT_DTYPE or text.ndim != 2 or text.shape[0] != vocabulary:
        return [f"{file.name}: {text.dtype}{list(text.shape)}, expected {TEXT_DTYPE} [{vocabulary}, D]"]
    if embed_dim is not None and text.shape[1] != embed_dim:
        return [f"{file.name}: width {text.shape[1]}, manifest's CLIP embed_dim is {embed_dim}"]
    norms = np.linalg.norm(text, axis=1)
    if not np.all(np.abs(norms - 1) < 1e-3):
        return [f"{file.name}: rows are not L2-normalised (norms {norms.min():.3f}..{norms.max():.3f})"]
    return []


def shardset_info(path: Path | str) -> dict:
    """What `regionspot shards info` prints: dataset, storage, counts, size, vocabulary, backbones, run."""
    manifest = read_manifest(Path(path))
    images = manifest["dataset"]["images"]
    nbytes = sum(s["bytes"] for s in manifest["shards"])
    sam, clip = manifest["backbones"]["sam"], manifest["backbones"]["clip"]
    return {
        "path": str(path),
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
