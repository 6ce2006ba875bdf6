"""Where evaluation's cached features come from: a named shard set, one found under the shards root,
or one extracted now and kept, so that evaluating the next checkpoint of a run costs only the head.

Which set serves an evaluation is the shards' answer (`regionspot.shards.identity.mismatch`); this
module holds evaluation's policy: what it wants, which fitting set it prefers, where it extracts one.
"""

from __future__ import annotations

from pathlib import Path

from regionspot.errors import RegionSpotError
from regionspot.evaluate.config import EvalConfig
from regionspot.shards.identity import Wanted, mismatch, read_identity
from regionspot.shards.location import Location
from regionspot.shards.manifest import is_finished
from regionspot.shards.shardset import ShardSet, find_shardsets


def wanted(cfg: EvalConfig, reader, proposals, fingerprint: str | None) -> Wanted:
    """What this evaluation needs of a shard set: the dataset and proposals it scores, the head's
    backbones, masks for segm metrics, and at least its --limit images."""
    return Wanted(
        dataset=reader.name,
        dataset_sha256=reader.sources.get("sha256"),
        proposals_sha256=None if proposals is None else proposals.sha256,
        fingerprint=fingerprint,
        masks=cfg.needs_masks,
        limit=cfg.limit,
    )


def find_shardset(root: Path | Location, want: Wanted) -> Path | Location | None:
    """The first finished shard set under `root` (a directory or a URL's Location) that serves `want`
    (sets without a limit first); sets that cannot be read are passed over."""
    fits = []
    for d in find_shardsets(root):
        try:
            shards = ShardSet(d)
        except RegionSpotError:
            continue
        if shards.mismatch(want) is None:
            fits.append(shards)
    fits.sort(key=lambda s: ((s.manifest.get("run") or {}).get("limit") is not None, str(s.path)))
    return fits[0].path if fits else None


def check_named(path: Path | Location, want: Wanted) -> None:
    """--shards DIR (or URL) must hold a finished shard set that serves this evaluation."""
    why = ShardSet(path).mismatch(want)
    if why:
        raise RegionSpotError(f"--shards {path} does not fit this evaluation: {why}; "
                              "drop --shards to find or extract a fitting set")  # fmt: skip


def extraction_dir(cfg: EvalConfig, want: Wanted, reader) -> Location:
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
    options = [name]
    if want.fingerprint:
        options.append(f"{name}-{want.fingerprint[:8]}")
    options += [f"{name}-{i}" for i in range(2, 100)]
    for d in map(root.child, options):
        if not d.list():
            return d
        ident = read_identity(d)
        if ident is not None and mismatch(ident, want) is None and not is_finished(d):
            return d  # an unfinished extraction of this run: resume it
    raise RegionSpotError(f"no free shard set name for {name} under {root}; pass --shards or --shards-root")


def extract_now(cfg: EvalConfig, want: Wanted, reader) -> Path | Location:
    """Run the extraction stage for this evaluation and return the new shard set."""
    from regionspot.extract.config import ExtractConfig
    from regionspot.extract.runner import run_extract

    out = extraction_dir(cfg, want, reader)
    from rich.console import Console

    Console(stderr=True).print(
        f"no shard set under {cfg.shards_root_dir()} fits this evaluation: extracting into {out} (kept for next time)"
    )
    ecfg = ExtractConfig(
        dataset=cfg.dataset, data_root=cfg.data_root, out=out.local_path if out.is_local else out.url(),
        storage_options=cfg.storage_options, backbones=cfg.backbones, **cfg.backbone_overrides(), **cfg.runtime(),
        masks=want.masks, proposals=cfg.proposals_path, gpus=cfg.gpus, limit=cfg.limit,
        allow_outside_root=cfg.allow_outside_root,
    )  # fmt: skip
    run_extract(ecfg)
    shards = ShardSet(ecfg.output())
    why = shards.mismatch(want)
    if why:  # e.g. the head was trained on other backbones than --backbones names
        raise RegionSpotError(f"extracted {shards.path} with --backbones {cfg.backbones}, but {why}; "
                              "pass the --backbones the checkpoint was trained with")  # fmt: skip
    return shards.path


def resolve_shardset(cfg: EvalConfig, want: Wanted, reader) -> tuple[Path | Location, str]:
    """The shard set to evaluate from (a directory, or a URL's Location) and how it was chosen ("given",
    "found" or "extracted")."""
    if cfg.shards is not None:
        given = cfg.shards_location()
        check_named(given, want)
        return (given.local_path if given.is_local else given), "given"
    found = find_shardset(cfg.shards_root_dir(), want)
    if found is not None:
        return found, "found"
    return extract_now(cfg, want, reader), "extracted"
