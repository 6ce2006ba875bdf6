"""The run identity: what makes two extractions the same run, and whether a shard set fits a use.

`identity.json` (written first into a shard set directory, by `ShardSetWriter.claim`) and the
manifest share the identity's sections: `dataset` (name, sources), `proposals` (source, sha256),
`backbones`, `run` (shard_size, limit, max_boxes, masks) and `storage`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from regionspot.shards.location import Location

IDENTITY = "identity.json"
_ABSENT = "absent"


def run_identity(
    *,
    dataset: str,
    sources: dict,
    proposals: dict,
    backbones: dict,
    shard_size: int,
    limit: int | None = None,
    max_boxes: int | None = None,
    masks: bool = False,
    storage: str,
) -> dict:
    """The identity of one extraction run: a shard set directory holds the shards of one identity only.

    Args:
        dataset, sources: the reader's name and source files (paths and sha256).
        proposals: `{"source": "gt"}` or `{"source": FILE, "sha256": ...}`; other keys (stats) are
            information, not identity, and are dropped.
        backbones: the backbones section (models' `Backbones.info()`), fingerprint included.
        shard_size, limit, max_boxes, masks: the run options that change what the shards hold.
        storage: "wds" or "zarr".
    """
    return {
        "dataset": {"name": dataset, "sources": sources},
        "proposals": {k: v for k, v in proposals.items() if k != "stats"},
        "backbones": backbones,
        "run": {"shard_size": shard_size, "limit": limit, "max_boxes": max_boxes, "masks": masks},
        "storage": storage,
    }


def read_identity(path: Path | str | Location) -> dict | None:
    """The identity stored in the shard set at `path` (a directory, a URL or a Location), or None when it
    has none (or an unreadable one)."""
    try:
        return json.loads(Location.parse(path).read_bytes(IDENTITY))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one dict keyed by dotted paths: {"run": {"limit": 5}} -> {"run.limit": 5}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# How the backbones ran (precision, attention kernel, compile): recorded, but the same run may resume
# with other settings, since they move the features only within float rounding (no fingerprint change).
RUNTIME = "backbones.runtime."


def identity_differences(here: dict, there: dict, where: str) -> list[str]:
    """How the identity `here` differs from `there` (stored in `where`), one phrase per differing leaf,
    in sorted key order: "run.limit differs: 5 here, 3 in shards/toy/identity.json"."""
    a, b = flatten(here), flatten(there)
    keys = sorted(
        k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT) and not k.startswith(RUNTIME)
    )
    return [f"{k} differs: {a.get(k, _ABSENT)} here, {b.get(k, _ABSENT)} in {where}" for k in keys]


@dataclass(frozen=True)
class Wanted:
    """What a use (an evaluation) needs of a shard set; `mismatch` says whether a set provides it."""

    dataset: str
    dataset_sha256: str | None  # None: any annotation file of that dataset
    proposals_sha256: str | None  # None: the annotated boxes
    fingerprint: str | None  # None: any (checked later against the head)
    masks: bool
    limit: int | None  # None: every image


def mismatch(doc: dict, want: Wanted) -> str | None:
    """Why a manifest or identity does not serve `want` (a short phrase naming the field), or None.

    It serves when it names the same dataset (name and annotation sha256), the same proposals ("gt"
    or the file's sha256), the wanted backbones fingerprint, every box (no --max-boxes), masks when
    they are wanted, and at least the images wanted (no --limit, or a larger one).
    """
    dataset = doc.get("dataset") or {}
    if dataset.get("name") != want.dataset:
        return f"dataset is {dataset.get('name')!r}, not {want.dataset!r}"
    sha = (dataset.get("sources") or {}).get("sha256")
    if want.dataset_sha256 and sha and sha != want.dataset_sha256:
        return "dataset annotation file differs (sha256)"
    props = doc.get("proposals") or {}
    if want.proposals_sha256 is None:
        if props.get("source", "gt") != "gt":
            return f"proposals are {props.get('source')!r}, not the annotated boxes (gt)"
    elif props.get("sha256") != want.proposals_sha256:
        return f"proposals are {props.get('source', 'gt')!r}, not this proposals file (sha256 differs)"
    fp = (doc.get("backbones") or {}).get("fingerprint")
    if want.fingerprint and fp != want.fingerprint:
        return f"backbones fingerprint is {str(fp)[:12]}, not {want.fingerprint[:12]}"
    run = doc.get("run") or {}
    if run.get("max_boxes") is not None:
        return f"extracted with --max-boxes {run['max_boxes']} (evaluation needs every box)"
    if want.masks and not run.get("masks"):
        return "extracted without --masks"
    if run.get("limit") is not None and (want.limit is None or run["limit"] < want.limit):
        return f"extracted with --limit {run['limit']}"
    return None
