"""Where evaluation's cached features come from: a named shard set, one found under the shards root,
or one extracted now and kept, so that evaluating the next checkpoint of a run costs only the head.

A shard set serves an evaluation when its manifest (or, for an unfinished extraction, its
`identity.json`) names the same dataset (name and annotation sha256), the same proposals ("gt" or
the file's sha256), the backbones fingerprint the head was trained on, every box (no --max-boxes),
masks when they are needed, and at least the images asked for (no --limit, or a larger one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from regionspot.errors import RegionSpotError
from regionspot.evaluate.config import EvalConfig

MANIFEST, IDENTITY = "manifest.json", "identity.json"


@dataclass(frozen=True)
class Wanted:
    """What the evaluation needs of a shard set."""

    dataset: str
    dataset_sha256: str | None
    proposals_sha256: str | None  # None: the annotated boxes
    fingerprint: str | None  # None: any (checked later against the head)
    masks: bool
    limit: int | None


def wanted(cfg: EvalConfig, reader, proposals, fingerprint: str | None) -> Wanted:
    return Wanted(
        dataset=reader.name,
        dataset_sha256=reader.sources.get("sha256"),
        proposals_sha256=None if proposals is None else proposals.sha256,
        fingerprint=fingerprint,
        masks=cfg.needs_masks,
        limit=cfg.limit,
    )


def mismatch(doc: dict, want: Wanted) -> str | None:
    """Why a manifest / identity does not serve `want` (a short phrase naming the field), or None."""
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


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def candidates(root: Path) -> list[Path]:
    """Shard set directories under the shards root (one or two levels down), sorted."""
    if not root.is_dir():
        return []
    found = {p.parent for pattern in ("*/" + MANIFEST, "*/*/" + MANIFEST) for p in root.glob(pattern)}
    return sorted(found)


def find_shardset(root: Path, want: Wanted) -> Path | None:
    """The first complete shard set under `root` that serves `want` (complete sets without a limit first)."""
    fits = [
        d for d in candidates(root) if (m := _read(d / MANIFEST)) is not None and mismatch(m, want) is None
    ]
    fits.sort(key=lambda d: ((_read(d / MANIFEST) or {}).get("run", {}).get("limit") is not None, str(d)))
    return fits[0] if fits else None


def check_named(path: Path, want: Wanted) -> None:
    """--shards DIR must hold a finished shard set that serves this evaluation."""
    manifest = _read(Path(path) / MANIFEST)
    if manifest is None:
        raise RegionSpotError(f"no shards in {path}; run 'regionspot extract' first")
    why = mismatch(manifest, want)
    if why:
        raise RegionSpotError(f"--shards {path} does not fit this evaluation: {why}; "
                              "drop --shards to find or extract a fitting set")  # fmt: skip


def extraction_dir(cfg: EvalConfig, want: Wanted, reader) -> Path:
    """Where to extract: shards-root/DATASET[-PROPOSALS][-masks][-limitN], reusing an unfinished
    extraction of the same run, and suffixed with the fingerprint when the name is taken."""
    dataset = reader.name.split(":")[0] if ":" in reader.name else reader.name
    name = dataset
    if cfg.proposals_path is not None:
        name += f"-{cfg.proposals_path.stem}"
    if want.masks:
        name += "-masks"
    if cfg.limit is not None:
        name += f"-limit{cfg.limit}"
    root = cfg.shards_root_dir()
    options = [root / name]
    if want.fingerprint:
        options.append(root / f"{name}-{want.fingerprint[:8]}")
    options += [root / f"{name}-{i}" for i in range(2, 100)]
    for d in options:
        if not d.exists() or not any(d.iterdir()):
            return d
        ident = _read(d / IDENTITY)
        if ident is not None and mismatch(ident, want) is None and not (d / MANIFEST).exists():
            return d  # an unfinished extraction of this run: resume it
    raise RegionSpotError(f"no free shard set name for {name} under {root}; pass --shards or --shards-root")


def extract_now(cfg: EvalConfig, want: Wanted, reader) -> Path:
    """Run the extraction stage for this evaluation and return the new shard set."""
    from regionspot.extract.config import ExtractConfig
    from regionspot.extract.runner import run_extract

    out = extraction_dir(cfg, want, reader)
    from rich.console import Console

    Console(stderr=True).print(
        f"no shard set under {cfg.shards_root_dir()} fits this evaluation: extracting into {out} (kept for next time)"
    )
    ecfg = ExtractConfig(
        dataset=cfg.dataset, data_root=cfg.data_root, out=out, backbones=cfg.backbones, **cfg.backbone_overrides(),
        masks=want.masks, proposals=cfg.proposals_path, gpus=cfg.gpus, limit=cfg.limit,
    )  # fmt: skip
    path = run_extract(ecfg)
    manifest = _read(Path(path) / MANIFEST) or {}
    why = mismatch(manifest, want)
    if why:  # e.g. the head was trained on other backbones than --backbones names
        raise RegionSpotError(f"extracted {path} with --backbones {cfg.backbones}, but {why}; "
                              "pass the --backbones the checkpoint was trained with")  # fmt: skip
    return Path(path)


def resolve_shardset(cfg: EvalConfig, want: Wanted, reader) -> tuple[Path, str]:
    """The shard set to evaluate from and how it was chosen ("given", "found" or "extracted")."""
    if cfg.shards is not None:
        check_named(cfg.shards, want)
        return Path(cfg.shards), "given"
    found = find_shardset(cfg.shards_root_dir(), want)
    if found is not None:
        return found, "found"
    return extract_now(cfg, want, reader), "extracted"
